// Talking to the server: its OpenAI-compatible streaming route and the page's own API
// (/web/api). The API key lives in this module's memory, and in localStorage only when
// the user ticks "remember".

const KEY_STORAGE = "qwenkit.apiKey";

let apiKey = localStorage.getItem(KEY_STORAGE);
let askForKey = async () => { throw new ApiError(401, "this server needs an API key"); };

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** `ask(reason)` resolves once the user has given a key (see setApiKey), or rejects. */
export function onKeyNeeded(ask) {
  askForKey = ask;
}

export function setApiKey(key, remember) {
  apiKey = key || null;
  if (remember && apiKey) localStorage.setItem(KEY_STORAGE, apiKey);
  else localStorage.removeItem(KEY_STORAGE);
}

export function hasSavedKey() {
  return localStorage.getItem(KEY_STORAGE) !== null;
}

function headers(json) {
  const out = {};
  if (json) out["content-type"] = "application/json";
  if (apiKey) out.authorization = `Bearer ${apiKey}`;
  return out;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    message = body?.error?.message || body?.message || message;
  } catch { /* not JSON */ }
  return new ApiError(response.status, message);
}

/** fetch() with the key; a 401 asks the user for a key and tries again. */
async function send(path, { method = "GET", body, signal } = {}) {
  for (;;) {
    const response = await fetch(path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
    if (response.status !== 401) return response;
    const error = await errorOf(response);
    await askForKey(apiKey ? "The server refused this key." : "This server needs an API key.", error);
  }
}

/** A JSON call to the server; throws ApiError with the server's message. */
export async function call(path, options = {}) {
  const response = await send(path, options);
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

/** Stream a chat completion: yields the parsed `chat.completion.chunk` objects. */
export async function* streamChat(body, signal) {
  const response = await send("/v1/chat/completions", { method: "POST", body, signal });
  if (!response.ok) throw await errorOf(response);
  yield* events(response);
}

async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new ApiError(400, event.error.message || "the generation failed");
        yield event;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}
