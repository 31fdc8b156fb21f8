// The chat page: conversations in the sidebar (kept on the server), a streamed answer
// with its thinking, tool calls run through the server, settings per thinking mode.

import { ApiError, call, hasSavedKey, onKeyNeeded, setApiKey, streamChat } from "./api.js";
import { renderMarkdown } from "./markdown.js";

// Qwen3's recommended sampling for each mode.
const RECOMMENDED = {
  thinking: { temperature: 0.6, top_p: 0.95, top_k: 20 },
  plain: { temperature: 0.7, top_p: 0.8, top_k: 20 },
};
const BUDGETS = [0, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]; // 0: no budget
const MAX_TOOL_ROUNDS = 8;
const SETTINGS_STORAGE = "qwenkit.settings";

const $ = (id) => document.getElementById(id);

const state = {
  conversations: [],
  current: null, // {id, title, messages}
  tools: [], // OpenAI tool schemas of the server's MCP tools
  generation: null, // AbortController of the running answer
  settings: loadSettings(),
  // What the loaded model can do (its /v1/models "capabilities"): thinking at all, switched on and off.
  canThink: true,
  thinkSwitch: true,
  vision: false, // the model reads images: the attach button, paste and drop
  attachments: [], // {name, url: data URL} for the next message
};

// -- settings -----------------------------------------------------------------------

function loadSettings() {
  const defaults = {
    think: true, budget: 0, useTools: true, max_tokens: null, system: "",
    thinking: { ...RECOMMENDED.thinking }, plain: { ...RECOMMENDED.plain },
  };
  try {
    const saved = JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || "{}");
    return {
      ...defaults, ...saved,
      thinking: { ...defaults.thinking, ...saved.thinking },
      plain: { ...defaults.plain, ...saved.plain },
    };
  } catch {
    return defaults;
  }
}

function saveSettings() {
  localStorage.setItem(SETTINGS_STORAGE, JSON.stringify(state.settings));
}

/** Whether answers think: the switch, where the model has one; a model that cannot never does. */
const thinking = () => state.canThink && (state.settings.think || !state.thinkSwitch);
const modeName = () => (thinking() ? "thinking" : "plain");

function budgetLabel(index) {
  const n = BUDGETS[index];
  return n === 0 ? "off" : n >= 1024 ? `${n / 1024}k` : String(n);
}

function showSettings() {
  const s = state.settings;
  const mode = s[modeName()];
  $("think").checked = thinking();
  $("think").disabled = !state.canThink || !state.thinkSwitch;
  $("budget").value = s.budget;
  $("budget").disabled = !thinking();
  $("budget-value").textContent = budgetLabel(s.budget);
  $("budget").setAttribute("aria-valuetext", s.budget === 0 ? "off, no limit" : `${BUDGETS[s.budget]} tokens`);
  $("settings-mode").textContent = thinking() ? "thinking" : "non-thinking";
  $("temperature").value = mode.temperature;
  $("top_p").value = mode.top_p;
  $("top_k").value = mode.top_k;
  $("max_tokens").value = s.max_tokens ?? "";
  $("system").value = s.system;
  $("use-tools").checked = s.useTools;
}

function readNumber(input, fallback, { integer = false } = {}) {
  if (input.value.trim() === "") return fallback;
  const value = integer ? parseInt(input.value, 10) : parseFloat(input.value);
  return Number.isFinite(value) ? value : fallback;
}

function bindSettings() {
  $("think").addEventListener("change", (e) => { state.settings.think = e.target.checked; saveSettings(); showSettings(); });
  $("budget").addEventListener("input", (e) => {
    state.settings.budget = Number(e.target.value);
    saveSettings();
    showSettings();
  });
  $("use-tools").addEventListener("change", (e) => { state.settings.useTools = e.target.checked; saveSettings(); });
  for (const name of ["temperature", "top_p", "top_k"]) {
    $(name).addEventListener("change", (e) => {
      const mode = state.settings[modeName()];
      mode[name] = readNumber(e.target, RECOMMENDED[modeName()][name], { integer: name === "top_k" });
      saveSettings();
    });
  }
  $("max_tokens").addEventListener("change", (e) => {
    const n = readNumber(e.target, null, { integer: true });
    state.settings.max_tokens = n && n > 0 ? n : null;
    saveSettings();
  });
  $("system").addEventListener("change", (e) => { state.settings.system = e.target.value; saveSettings(); });
  $("reset-sampling").addEventListener("click", () => {
    state.settings[modeName()] = { ...RECOMMENDED[modeName()] };
    saveSettings();
    showSettings();
  });
  $("open-settings").addEventListener("click", () => { showSettings(); $("settings").showModal(); });
  $("change-key").addEventListener("click", () => askForKey("Enter the server's API key.").catch(() => {}));
  $("forget-key").addEventListener("click", () => { setApiKey(null, false); announce("The saved key is forgotten."); });
}

/** The request for one round, with the settings of the current mode. */
function requestBody(messages) {
  const s = state.settings;
  const mode = s[modeName()];
  const body = {
    messages, stream: true, stream_options: { include_usage: true }, enable_thinking: thinking(),
    temperature: mode.temperature, top_p: mode.top_p, top_k: mode.top_k,
  };
  if (thinking() && BUDGETS[s.budget] > 0) body.thinking_budget = BUDGETS[s.budget];
  if (s.max_tokens) body.max_tokens = s.max_tokens;
  if (s.useTools && state.tools.length) body.tools = state.tools;
  return body;
}

// -- the API key --------------------------------------------------------------------

let keyRequest = null;

/** Show the key dialog; resolves once a key is entered (one dialog for concurrent asks). */
function askForKey(reason) {
  if (keyRequest) return keyRequest;
  const dialog = $("key-dialog");
  $("key-reason").textContent = reason;
  $("api-key").value = "";
  $("remember-key").checked = hasSavedKey();
  keyRequest = new Promise((resolve, reject) => {
    const done = () => {
      dialog.removeEventListener("close", done);
      keyRequest = null;
      if (dialog.returnValue === "ok" && $("api-key").value) {
        setApiKey($("api-key").value, $("remember-key").checked);
        resolve();
      } else {
        reject(new ApiError(401, "no API key given"));
      }
    };
    dialog.addEventListener("close", done);
  });
  dialog.returnValue = "";
  if (!dialog.open) dialog.showModal();
  return keyRequest;
}

// -- small DOM helpers --------------------------------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children);
  return node;
}

// Outline icons (24x24 paths), drawn in the text colour.
const ICONS = {
  rename: "M4 20h4L19 9l-4-4L4 16z M13.5 6.5l4 4",
  delete: "M5 7h14 M10 7V4h4v3 M7 7l1 13h8l1-13 M10 11v6 M14 11v6",
};

function icon(name) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("class", "svg-icon");
  const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
  path.setAttribute("d", ICONS[name]);
  svg.append(path);
  return svg;
}

function announce(text) {
  $("status").textContent = text;
}

function scrollToEnd(force = false) {
  const log = $("log");
  if (force || log.scrollHeight - log.scrollTop - log.clientHeight < 120) log.scrollTop = log.scrollHeight;
}

const seconds = (ms) => `${(ms / 1000).toFixed(1)} s`;

// -- messages -----------------------------------------------------------------------

/** A user message: its text, or (with images) its parts, the images as thumbnails. */
function addUserMessage(content) {
  $("welcome").hidden = true;
  const bubble = el("div", { class: "bubble" });
  if (Array.isArray(content)) {
    const thumbs = el("div", { class: "thumbs" });
    for (const part of content) {
      if (part.type === "image_url") thumbs.append(el("img", { class: "thumb", src: part.image_url.url, alt: "attached image" }));
    }
    bubble.append(thumbs, content.filter((p) => p.type === "text").map((p) => p.text).join(""));
  } else {
    bubble.textContent = content;
  }
  $("log").append(el("article", { class: "msg user", "aria-label": "You" }, bubble));
  scrollToEnd(true);
}

// -- attached images ------------------------------------------------------------------

const MAX_INLINE_BYTES = 1 << 20; // larger images are scaled down (the server's body limit is 4 MiB)
const MAX_SIDE = 1600;

function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

/** A data: URL of `file`, scaled to at most MAX_SIDE pixels a side (JPEG) when it is large. */
async function inlineImage(file) {
  if (file.size <= MAX_INLINE_BYTES) return readAsDataURL(file);
  const bitmap = await createImageBitmap(file);
  const scale = Math.min(1, MAX_SIDE / Math.max(bitmap.width, bitmap.height));
  const canvas = document.createElement("canvas");
  canvas.width = Math.round(bitmap.width * scale);
  canvas.height = Math.round(bitmap.height * scale);
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/jpeg", 0.9);
}

async function attachFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    if (!state.vision) {
      addErrorMessage(`${$("model-name").textContent || "This model"} does not read images.`);
      return;
    }
    try {
      state.attachments.push({ name: file.name || "pasted image", url: await inlineImage(file) });
    } catch (e) {
      addErrorMessage(`Could not read ${file.name || "the image"}: ${e.message}`);
    }
  }
  showAttachments();
}

function showAttachments() {
  const box = $("attachments");
  box.replaceChildren(...state.attachments.map((a, i) => {
    const remove = el("button", { type: "button", "aria-label": `Remove ${a.name}`, text: "×" });
    remove.addEventListener("click", () => { state.attachments.splice(i, 1); showAttachments(); });
    return el("div", { class: "attachment" }, el("img", { class: "thumb", src: a.url, alt: a.name }), remove);
  }));
  box.hidden = !state.attachments.length;
}

function addErrorMessage(text) {
  $("log").append(el("div", { class: "msg error", role: "alert", text }));
  scrollToEnd(true);
}

/** One assistant message: its thinking, answer, tool calls and usage, live or restored. */
class AnswerView {
  constructor() {
    $("welcome").hidden = true;
    this.article = el("article", { class: "msg assistant", "aria-label": "Assistant", "aria-busy": "true" });
    this.body = el("div", { class: "content markdown" });
    this.tools = el("div", { class: "tools" });
    this.article.append(this.body, this.tools);
    $("log").append(this.article);
    this.text = "";
    this.thinking = null;
    this.thinkingTokens = 0;
    this.thinkingStart = null;
    this.thinkingEnd = null;
    this.toolBlocks = new Map(); // index -> block
    this.pending = false;
  }

  addReasoning(text) {
    if (!this.thinking) this.openThinking();
    this.thinkingTokens += 1;
    this.thinking.text.append(text);
    this.showThinkingStats();
    scrollToEnd();
  }

  openThinking(open = true) {
    const text = el("div", { class: "thinking-text" });
    const label = el("span", { class: "thinking-label", text: "Thinking…" });
    const stats = el("span", { class: "thinking-stats muted small" });
    const details = el("details", { class: "thinking", open }, el("summary", {}, label, " ", stats), text);
    this.article.prepend(details);
    this.thinking = { details, label, stats, text };
    this.thinkingStart = performance.now();
  }

  showThinkingStats() {
    const end = this.thinkingEnd ?? performance.now();
    const n = this.thinkingTokens;
    this.thinking.stats.textContent = `${n} token${n === 1 ? "" : "s"} · ${seconds(end - this.thinkingStart)}`;
  }

  /** The answer started: fold the thinking away. */
  foldThinking() {
    if (!this.thinking || this.thinkingEnd !== null) return;
    this.thinkingEnd = performance.now();
    this.thinking.details.open = false;
    this.thinking.label.textContent = "Thought";
    this.showThinkingStats();
  }

  addContent(text) {
    this.foldThinking();
    this.text += text;
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => this.render());
    }
  }

  render() {
    this.pending = false;
    this.body.replaceChildren(renderMarkdown(this.text));
    scrollToEnd();
  }

  toolCall(index, call) {
    this.foldThinking();
    let block = this.toolBlocks.get(index);
    if (!block) {
      const name = el("code", { class: "tool-name" });
      const status = el("span", { class: "tool-status muted small", text: "calling…" });
      const args = el("pre", { class: "tool-args" });
      const result = el("pre", { class: "tool-result" });
      const details = el("details", { class: "tool", open: true },
        el("summary", {}, "Tool ", name, " ", status),
        el("div", { class: "tool-section" }, el("div", { class: "small muted", text: "Arguments" }), args),
        el("div", { class: "tool-section" }, el("div", { class: "small muted", text: "Result" }), result));
      block = { details, name, status, args, result };
      this.toolBlocks.set(index, block);
      this.tools.append(details);
    }
    block.id = call.id;
    block.name.textContent = call.function.name;
    block.args.textContent = prettyJson(call.function.arguments);
    scrollToEnd();
  }

  toolResult(id, content) {
    for (const block of this.toolBlocks.values()) {
      if (block.id === id) {
        block.result.textContent = content;
        block.status.textContent = content.startsWith("Error") ? "failed" : "done";
        block.details.classList.toggle("failed", content.startsWith("Error"));
      }
    }
    scrollToEnd();
  }

  /** The answer is over: final render, exact counts from the usage, and the usage line. */
  finish(meta = {}) {
    this.render();
    this.article.setAttribute("aria-busy", "false");
    const reasoningTokens = meta.usage?.completion_tokens_details?.reasoning_tokens;
    if (this.thinking) {
      if (reasoningTokens) this.thinkingTokens = reasoningTokens;
      if (meta.thinking_s !== undefined && this.thinkingEnd === null) {
        this.thinkingEnd = this.thinkingStart + meta.thinking_s * 1000;
      }
      this.foldThinking();
      this.showThinkingStats();
    }
    const notes = [];
    if (meta.usage) {
      const u = meta.usage;
      const reasoning = u.completion_tokens_details?.reasoning_tokens ?? 0;
      notes.push(`prompt ${u.prompt_tokens}`, `reasoning ${reasoning}`, `answer ${u.completion_tokens - reasoning} tokens`);
    }
    if (meta.tokens_per_s) notes.push(`${meta.tokens_per_s.toFixed(1)} tokens/s`);
    if (meta.stopped) notes.push("stopped");
    if (meta.error) notes.push(`error: ${meta.error}`);
    if (notes.length) this.article.append(el("p", { class: "usage muted small", text: notes.join(" · ") }));
    if (meta.error) this.article.append(el("p", { class: "error-text", role: "alert", text: meta.error }));
  }

  /** A saved message, shown as it was. */
  static restore(message) {
    const view = new AnswerView();
    const meta = storedMeta(message.meta);
    if (message.reasoning_content) {
      view.openThinking(false);
      view.thinking.text.append(message.reasoning_content);
      view.thinkingTokens = meta.usage?.completion_tokens_details?.reasoning_tokens ?? 0;
      view.thinkingEnd = view.thinkingStart + (meta.thinking_s ?? 0) * 1000;
      view.thinking.label.textContent = "Thought";
    }
    view.text = message.content || "";
    (message.tool_calls || []).forEach((c, i) => view.toolCall(i, c));
    view.finish(meta);
    return view;
  }
}

function prettyJson(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}

function showConversation(messages) {
  const log = $("log");
  log.querySelectorAll(".msg").forEach((n) => n.remove());
  $("welcome").hidden = messages.length > 0;
  let last = null;
  for (const m of messages) {
    if (m.role === "user") addUserMessage(m.content || "");
    else if (m.role === "assistant") last = AnswerView.restore(m);
    else if (m.role === "tool" && last) last.toolResult(m.tool_call_id, m.content || "");
  }
  scrollToEnd(true);
}

// -- conversations ------------------------------------------------------------------

const titleOf = (c) => c.title || "New chat";

async function refreshList() {
  const list = await call("/web/api/conversations");
  state.conversations = list.data;
  showList();
}

function showList() {
  const ul = $("conversations");
  ul.replaceChildren();
  $("conversations-empty").hidden = state.conversations.length > 0;
  for (const c of state.conversations) {
    const current = state.current?.id === c.id;
    const link = el("a", { href: `#${c.id}`, class: "open", "aria-current": current ? "page" : null, text: titleOf(c) });
    const rename = el("button", { type: "button", class: "icon rename", "aria-label": `Rename “${titleOf(c)}”` },
      icon("rename"));
    const remove = el("button", { type: "button", class: "icon delete", "aria-label": `Delete “${titleOf(c)}”` },
      icon("delete"));
    const li = el("li", { class: current ? "conversation current" : "conversation", "data-id": c.id }, link, rename, remove);
    link.addEventListener("click", () => closeSidebar());
    rename.addEventListener("click", () => startRename(li, c));
    remove.addEventListener("click", () => deleteConversation(c));
    ul.append(li);
  }
  $("chat-title").textContent = state.current ? titleOf(state.current) : "New chat";
  document.title = state.current ? `${titleOf(state.current)} · qwenkit` : "qwenkit chat";
}

function startRename(li, conversation) {
  const input = el("input", { type: "text", class: "rename-input", "aria-label": "New title", maxlength: "200" });
  input.value = conversation.title || "";
  li.replaceChildren(input);
  input.focus();
  input.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title && title !== conversation.title) {
      try {
        const updated = await call(`/web/api/conversations/${conversation.id}`, { method: "PATCH", body: { title } });
        if (state.current?.id === updated.id) state.current.title = updated.title;
        announce(`Renamed to ${updated.title}`);
      } catch (e) {
        addErrorMessage(`Could not rename: ${e.message}`);
      }
    }
    await refreshList();
    $("conversations").querySelector(`[data-id="${conversation.id}"] .rename`)?.focus();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); finish(true); }
    if (e.key === "Escape") { e.preventDefault(); e.stopPropagation(); finish(false); }
  });
  input.addEventListener("blur", () => finish(true));
}

async function deleteConversation(conversation) {
  if (!confirm(`Delete “${titleOf(conversation)}” and its messages?`)) return;
  try {
    await call(`/web/api/conversations/${conversation.id}`, { method: "DELETE" });
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 404)) return addErrorMessage(`Could not delete: ${e.message}`);
  }
  if (state.current?.id === conversation.id) newChat();
  await refreshList();
  announce(`Deleted ${titleOf(conversation)}`);
}

async function openConversation(id) {
  if (state.current?.id === id) return;
  state.generation?.abort();
  try {
    const conversation = await call(`/web/api/conversations/${id}`);
    state.current = conversation;
    showConversation(conversation.messages);
  } catch (e) {
    newChat();
    addErrorMessage(e.message);
  }
  showList();
}

function newChat() {
  state.generation?.abort();
  state.current = null;
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
  showConversation([]);
  showList();
  $("prompt").focus();
}

// -- sending ------------------------------------------------------------------------

/**
 * A saved answer's meta with only the fields of the expected types: the server checks
 * them on write, but a file written before that (or by another program) must still open.
 */
function storedMeta(meta) {
  const m = meta !== null && typeof meta === "object" ? meta : {};
  const number = (x) => (typeof x === "number" && Number.isFinite(x) ? x : undefined);
  const u = m.usage !== null && typeof m.usage === "object" ? m.usage : {};
  const usage = number(u.prompt_tokens) !== undefined && number(u.completion_tokens) !== undefined
    ? {
      prompt_tokens: u.prompt_tokens,
      completion_tokens: u.completion_tokens,
      completion_tokens_details: { reasoning_tokens: number(u.completion_tokens_details?.reasoning_tokens) ?? 0 },
    }
    : undefined;
  return {
    elapsed_s: number(m.elapsed_s),
    thinking_s: number(m.thinking_s),
    tokens_per_s: number(m.tokens_per_s),
    usage,
    stopped: m.stopped === true,
    error: typeof m.error === "string" ? m.error : undefined,
  };
}

/** Stored messages -> what the model is sent (no reasoning: Qwen3 is not shown its past thinking). */
function forModel(messages) {
  const out = [];
  for (const m of messages) {
    if (m.role === "user" || m.role === "system") out.push({ role: m.role, content: m.content ?? "" });
    else if (m.role === "assistant") {
      const message = { role: "assistant", content: m.content ?? "" };
      if (m.tool_calls?.length) message.tool_calls = m.tool_calls;
      out.push(message);
    } else if (m.role === "tool") {
      out.push({ role: "tool", tool_call_id: m.tool_call_id, name: m.name, content: m.content ?? "" });
    }
  }
  return out;
}

/** One request: streams into `view`; returns the assistant message (or null if nothing came). */
async function runRound(messages, view, signal) {
  const begun = performance.now();
  let first = null;
  let thinkingEnd = null;
  let reasoning = "";
  let content = "";
  const calls = [];
  let finish = null;
  let usage = null;
  let stopped = false;
  let error = null;
  try {
    for await (const chunk of streamChat(requestBody(messages), signal)) {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        if (delta.reasoning_content) {
          first ??= performance.now();
          reasoning += delta.reasoning_content;
          view.addReasoning(delta.reasoning_content);
        }
        if (delta.content) {
          first ??= performance.now();
          if (reasoning && thinkingEnd === null) thinkingEnd = performance.now();
          content += delta.content;
          view.addContent(delta.content);
        }
        for (const piece of delta.tool_calls || []) {
          first ??= performance.now();
          if (reasoning && thinkingEnd === null) thinkingEnd = performance.now();
          const c = (calls[piece.index] ??= { id: "", type: "function", function: { name: "", arguments: "" } });
          c.id ||= piece.id || "";
          c.function.name ||= piece.function?.name || "";
          c.function.arguments += piece.function?.arguments || "";
          view.toolCall(piece.index, c);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") stopped = true;
    else error = e;
  }
  if (error && !reasoning && !content && !calls.length) {
    view.article.remove(); // nothing came: the caller shows the error alone
    return { message: null, error, stopped };
  }
  const end = performance.now();
  const meta = { elapsed_s: round((end - begun) / 1000) };
  if (reasoning) meta.thinking_s = round(((thinkingEnd ?? end) - (first ?? begun)) / 1000);
  if (usage) {
    meta.usage = usage;
    const generating = (end - (first ?? begun)) / 1000;
    if (generating > 0 && usage.completion_tokens > 1) meta.tokens_per_s = round(usage.completion_tokens / generating);
  }
  if (stopped) meta.stopped = true;
  if (error) meta.error = error.message;
  view.finish(meta);
  const message = { role: "assistant", content: content || null, meta };
  if (reasoning) message.reasoning_content = reasoning;
  const finished = calls.filter(Boolean).map((c, i) => ({ ...c, id: c.id || `call_page_${Date.now()}_${i}` }));
  if (finished.length) message.tool_calls = finished;
  return { message, error, stopped, toolRound: finish === "tool_calls" && finished.length > 0 };
}

const round = (x) => Math.round(x * 100) / 100;

async function runTool(toolCall, signal) {
  if (signal.aborted) return "Error: stopped by the user";
  try {
    const out = await call(`/web/api/tools/${encodeURIComponent(toolCall.function.name)}`,
      { method: "POST", body: { arguments: toolCall.function.arguments || "{}" }, signal });
    return out.content;
  } catch (e) {
    return e.name === "AbortError" ? "Error: stopped by the user" : `Error: ${e.message}`;
  }
}

async function sendMessage(text) {
  const controller = new AbortController();
  state.generation = controller;
  setGenerating(true);
  let conversation = state.current;
  const images = state.attachments.map((a) => ({ type: "image_url", image_url: { url: a.url } }));
  state.attachments = [];
  showAttachments();
  const content = images.length ? [...images, { type: "text", text }] : text;
  const turn = [{ role: "user", content }];
  try {
    if (!conversation) {
      const created = await call("/web/api/conversations", { method: "POST", body: {} });
      conversation = state.current = { ...created, messages: [] };
      history.replaceState(null, "", `#${created.id}`);
      state.conversations.unshift(created);
      showList();
    }
    addUserMessage(content);
    const messages = forModel([...conversation.messages, ...turn]);
    if (state.settings.system.trim()) messages.unshift({ role: "system", content: state.settings.system });
    for (let rounds = 1; ; rounds++) {
      const view = new AnswerView();
      const result = await runRound(messages, view, controller.signal);
      if (!result.message) {
        addErrorMessage(result.error.message);
        break;
      }
      turn.push(result.message);
      messages.push(forModel([result.message])[0]);
      if (!result.toolRound || result.stopped || result.error || rounds >= MAX_TOOL_ROUNDS) break;
      for (const toolCall of result.message.tool_calls) {
        const content = await runTool(toolCall, controller.signal);
        view.toolResult(toolCall.id, content);
        const reply = { role: "tool", tool_call_id: toolCall.id, name: toolCall.function.name, content };
        turn.push(reply);
        messages.push(reply);
      }
      if (controller.signal.aborted) break;
    }
    announce(controller.signal.aborted ? "Stopped." : "Answer complete.");
  } catch (e) {
    if (e.name !== "AbortError") addErrorMessage(e.message);
  } finally {
    if (state.generation === controller) state.generation = null;
    setGenerating(false);
  }
  if (turn.length > 1 && conversation) await saveTurn(conversation, turn);
  else if (!controller.signal.aborted && !$("prompt").value) $("prompt").value = text; // nothing came: let the user retry
}

async function saveTurn(conversation, turn) {
  try {
    const summary = await call(`/web/api/conversations/${conversation.id}/messages`,
      { method: "POST", body: { messages: turn } });
    conversation.messages.push(...turn);
    conversation.title = summary.title;
    await refreshList();
  } catch (e) {
    addErrorMessage(`The turn could not be saved: ${e.message}`);
  }
}

function setGenerating(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("composer").setAttribute("aria-busy", on ? "true" : "false");
  if (on) $("stop").focus();
  else if (document.activeElement === document.body || document.activeElement === $("stop")) $("prompt").focus();
}

function stop() {
  state.generation?.abort();
}

// -- layout -------------------------------------------------------------------------

function openSidebar() {
  document.body.classList.add("sidebar-open");
  $("scrim").hidden = false;
  $("open-sidebar").setAttribute("aria-expanded", "true");
  $("new-chat").focus();
}

function closeSidebar() {
  if (!document.body.classList.contains("sidebar-open")) return;
  document.body.classList.remove("sidebar-open");
  $("scrim").hidden = true;
  $("open-sidebar").setAttribute("aria-expanded", "false");
}

function bindUI() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if ((!text && !state.attachments.length) || state.generation) return;
    $("prompt").value = "";
    sendMessage(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  $("attach").addEventListener("click", () => $("attach-file").click());
  $("attach-file").addEventListener("change", async (e) => {
    await attachFiles([...e.target.files]);
    e.target.value = "";
  });
  $("prompt").addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.files ?? [])].filter((f) => f.type.startsWith("image/"));
    if (files.length) {
      e.preventDefault();
      attachFiles(files);
    }
  });
  const composer = $("composer");
  composer.addEventListener("dragover", (e) => {
    if ([...(e.dataTransfer?.items ?? [])].some((i) => i.kind === "file")) {
      e.preventDefault();
      composer.classList.add("dropping");
    }
  });
  composer.addEventListener("dragleave", () => composer.classList.remove("dropping"));
  composer.addEventListener("drop", (e) => {
    composer.classList.remove("dropping");
    if (e.dataTransfer?.files?.length) {
      e.preventDefault();
      attachFiles([...e.dataTransfer.files]);
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape" || document.querySelector("dialog[open]")) return;
    if (state.generation) stop();
    else closeSidebar();
  });
  $("new-chat").addEventListener("click", () => { newChat(); closeSidebar(); });
  $("open-sidebar").addEventListener("click", openSidebar);
  $("close-sidebar").addEventListener("click", () => { closeSidebar(); $("open-sidebar").focus(); });
  $("scrim").addEventListener("click", closeSidebar);
  $("key-cancel").addEventListener("click", () => $("key-dialog").close("cancel"));
  window.addEventListener("hashchange", () => {
    const id = location.hash.slice(1);
    if (id) openConversation(id);
    else if (state.current) newChat(); // back to the page without a conversation
  });
  onKeyNeeded(askForKey);
  bindSettings();
}

async function loadServerInfo() {
  try {
    const models = await call("/v1/models");
    const model = models.data?.[0];
    $("model-name").textContent = model?.id ?? "";
    showCapabilities(model);
  } catch { /* shown by the other calls */ }
  try {
    const tools = await call("/web/api/tools");
    state.tools = tools.data;
    $("tools-toggle").hidden = !tools.data.length && !tools.error;
    $("tools-count").textContent = tools.error ? "(unavailable)" : `(${tools.data.length})`;
    if (tools.error) $("tools-toggle").title = tools.error;
  } catch { /* no tools */ }
}

/** Disable the thinking controls the loaded model ignores, and say why in one line. */
function showCapabilities(model) {
  const capabilities = model?.capabilities;
  if (!Array.isArray(capabilities)) return; // a server that does not say: keep every control
  state.canThink = capabilities.includes("thinking");
  state.thinkSwitch = capabilities.includes("hybrid_thinking");
  state.vision = capabilities.includes("vision");
  $("attach").hidden = !state.vision;
  const note = !state.canThink ? `${model.id} cannot think: thinking and its budget are off.`
    : !state.thinkSwitch ? `${model.id} always thinks: the budget caps it.` : "";
  $("think-note").textContent = note;
  $("think-note").hidden = !note;
  showSettings();
}

async function start() {
  bindUI();
  showSettings();
  try {
    await refreshList();
  } catch (e) {
    addErrorMessage(`Could not load the conversations: ${e.message}`);
  }
  await loadServerInfo();
  const id = location.hash.slice(1);
  if (id) await openConversation(id);
  document.body.dataset.ready = "true"; // for tests and scripts
}

start();
