"""Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE: preprocessing, the vision tower, M-RoPE prefill and
greedy decoding equal to transformers on the same tiny random checkpoints (float32), through the
engine; then every surface that takes images, with its real client (openai and dashscope SDKs,
the CLI, ChatClient, qwenkit chat, the web page in Chromium), and the errors of bad images."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tiny_vl import hf_image_processor, hf_inputs, make_vl_checkpoint, test_image

pytest.importorskip("PIL")


ARCHS = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
_BUILT: dict[str, tuple] = {}


def _built(arch: str, tmp_path_factory) -> tuple:
    """(folder, transformers reference, qwenkit LLM) of the tiny `arch` checkpoint, built once per run."""
    if arch not in _BUILT:
        from qwenkit import LLM

        folder = tmp_path_factory.mktemp(f"tiny_{arch}")
        reference = make_vl_checkpoint(folder, arch=arch)
        llm = LLM(str(folder), dtype="float32", device="cpu", kv_cache_memory="16MiB", progress=False)
        _BUILT[arch] = folder, reference, llm
    return _BUILT[arch]


@pytest.fixture(scope="module", params=ARCHS)
def vl(request, tmp_path_factory):
    """Each VL architecture in turn: (folder, reference, llm)."""
    return _built(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=ARCHS[:2])
def vl_dense(request, tmp_path_factory):
    """The engine invariants (prefix cache, chunking) on the two vision towers; MoE changes neither."""
    return _built(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def vl_checkpoint(tmp_path_factory):
    """Qwen2.5-VL's (folder, reference): the surfaces are tested on one architecture."""
    return _built("qwen2_5_vl", tmp_path_factory)[:2]


@pytest.fixture(scope="module")
def vl_llm(tmp_path_factory):
    return _built("qwen2_5_vl", tmp_path_factory)[2]


SIZES = [(28, 28), (56, 56), (100, 40), (40, 100), (13, 7), (224, 224), (300, 120), (640, 480), (57, 250),
         (99, 99), (1, 50), (200, 3), (29, 29), (111, 57), (500, 500), (84, 168), (17, 313), (450, 61),
         (1000, 30), (77, 1)]


@pytest.mark.parametrize("arch", ARCHS[:2])  # the MoE's processor is Qwen3-VL's
def test_pixel_values_equal_transformers_processor(arch):
    from qwenkit.multimodal import ImageProcessor
    from tiny_vl import PREPROCESSOR

    ours, theirs = ImageProcessor.from_hf(PREPROCESSOR[arch]), hf_image_processor(arch)
    for i, (w, h) in enumerate(SIZES):
        image = test_image(w, h, seed=i)
        pixels, grid = ours.preprocess(image)
        ref = theirs(images=[image], return_tensors="np")
        assert grid == tuple(ref["image_grid_thw"][0].tolist()), (w, h)
        np.testing.assert_array_equal(pixels, ref["pixel_values"], err_msg=f"{w}x{h}")


def _prompt(llm, images, text="Describe."):
    """Token ids of a user turn with `images` then `text`, placeholders expanded, and their MultimodalPrompt."""
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
    prepared = llm.prepare_chat([{"role": "user", "content": content}])
    return prepared.prompt_token_ids, prepared.multimodal


def test_vision_tower_equals_transformers(vl):
    _, reference, vl_llm = vl
    images = [test_image(100, 60, seed=1), test_image(200, 210, seed=2)]
    hf = hf_image_processor(reference.config.model_type)(images=images, return_tensors="pt")
    with torch.no_grad():
        out = reference.model.visual(hf["pixel_values"], grid_thw=hf["image_grid_thw"])
    expected = torch.cat([out.pooler_output, *(getattr(out, "deepstack_features", None) or [])], dim=-1)
    grids = [tuple(g) for g in hf["image_grid_thw"].tolist()]
    got = torch.cat(vl_llm.model.embed_images(hf["pixel_values"], grids))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


def test_prefill_logits_equal_transformers(vl):
    from qwenkit.models.attention import AttentionMetadata

    _, reference, vl_llm = vl
    images = [test_image(90, 50, seed=3), test_image(60, 120, seed=4)]
    ids, mm = _prompt(vl_llm, images)
    with torch.no_grad():
        expected = reference(**hf_inputs(reference, ids, images)).logits[0]
        model = vl_llm.model
        h = model.model.embed_tokens(torch.tensor(ids))
        embeds = model.embed_images(torch.cat([i.pixel_values for i in mm.images]), [i.grid_thw for i in mm.images])
        width, rows, features = h.shape[1], [], []
        for o, e in zip(mm.offsets, embeds):
            h[o:o + len(e)] = e[:, :width]
            rows.append(torch.arange(o, o + len(e)))
            features.append(e[:, width:].reshape(len(e), -1, width))
        extra = {}
        if features[0].shape[1]:  # Qwen3-VL's DeepStack features
            extra["deepstack"] = torch.cat(rows), torch.cat(features).transpose(0, 1)
        kv = model.allocate_kv_cache(len(ids))
        hidden = model.model.forward_layers(h, mm.positions, kv, AttentionMetadata.contiguous(start=0, num_tokens=len(ids)),
                                            **extra)
        got = model.compute_logits(hidden)
    assert (got - expected).abs().max().item() <= 1e-4


GREEDY = dict(temperature=0.0, max_tokens=32, ignore_eos=True)


def _vision_ids(llm) -> list[int]:
    return [llm.tokenizer.token_to_id(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")]


def _generate(llm, requests):
    """Run (prompt ids, MultimodalPrompt or None) requests together; their generated ids and cached
    counts. The vision markers are banned from the output (random weights may pick them; transformers
    would read a generated <|image_pad|> as an image's)."""
    from qwenkit.sampling import SamplingParams

    engine = llm.engine
    params = SamplingParams(**GREEDY, logit_bias={i: -100 for i in _vision_ids(llm)})
    for k, (ids, mm) in enumerate(requests):
        engine.add_request(f"r{k}", ids, params, multimodal=mm)
    out = {f"r{k}": [] for k in range(len(requests))}
    cached = {}
    while engine.has_unfinished_requests():
        for update in engine.step():
            out[update.request_id].extend(t.token_id for t in update.outputs)
            cached[update.request_id] = update.num_cached_tokens
    return [out[f"r{k}"] for k in range(len(requests))], [cached[f"r{k}"] for k in range(len(requests))]


def _reference_greedy(reference, ids, images, generated):
    """transformers' logits over prompt + `generated` (teacher forced): its greedy choice at each step
    and the largest logit gap to the runner-up (how safely argmax decides)."""
    with torch.no_grad():
        logits = reference(**hf_inputs(reference, ids + generated, images)).logits[0, len(ids) - 1:-1]
    c = reference.config
    logits[:, [c.vision_start_token_id, c.vision_end_token_id, c.image_token_id, c.video_token_id]] -= 100
    top2 = logits.topk(2, dim=-1).values
    return logits.argmax(-1).tolist(), (top2[:, 0] - top2[:, 1]).min().item()


def _messages(images, text="What is in the picture?", history=()):
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
    return [*history, {"role": "user", "content": content}]


def test_greedy_tokens_equal_transformers_two_images_later_turn_and_a_mixed_batch(vl):
    _, reference, vl_llm = vl
    one = [test_image(120, 80, seed=5)]
    two = [test_image(64, 64, seed=6), test_image(150, 60, seed=7)]
    history = ({"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "Hi! Send me a picture."})
    cases = [(one, _messages(one)), (two, _messages(two, "Compare them.")), (one, _messages(one, history=history)),
             ([], [{"role": "user", "content": "Only text here."}])]
    requests = []
    for images, messages in cases:
        p = vl_llm.prepare_chat(messages)
        assert (p.multimodal is None) == (not images)
        requests.append((p.prompt_token_ids, p.multimodal))
    batched, _ = _generate(vl_llm, requests)
    for (images, _), (ids, mm), tokens in zip(cases, requests, batched):
        expected, margin = _reference_greedy(reference, ids, images, tokens)
        assert len(tokens) == 32
        assert tokens == expected, f"margin {margin}"
    # Alone: the same tokens as in the batch.
    assert _generate(vl_llm, [requests[1]])[0][0] == batched[1]


def test_prefix_cache_hit_on_a_repeated_image_and_miss_on_another(vl_dense):
    _, reference, vl_llm = vl_dense
    image, other = test_image(200, 100, seed=8), test_image(200, 100, seed=9)
    first = vl_llm.prepare_chat(_messages([image]))
    again = vl_llm.prepare_chat(_messages([image]))
    different = vl_llm.prepare_chat(_messages([other]))
    assert first.prompt_token_ids == different.prompt_token_ids  # the same placeholders
    encoded = vl_llm.engine.runner.encoder_cache.num_encoded
    (cold,), _ = _generate(vl_llm, [(first.prompt_token_ids, first.multimodal)])
    (warm,), (cached,) = _generate(vl_llm, [(again.prompt_token_ids, again.multimodal)])
    assert warm == cold and cached >= first.multimodal.offsets[0] + first.multimodal.images[0].num_tokens
    assert vl_llm.engine.runner.encoder_cache.num_encoded == encoded + 1  # the tower ran once for both
    (tokens,), (cached,) = _generate(vl_llm, [(different.prompt_token_ids, different.multimodal)])
    assert cached <= different.multimodal.offsets[0]  # only the text before the image is shared
    expected, _ = _reference_greedy(reference, different.prompt_token_ids, [other], tokens)
    assert tokens == expected


def test_chunked_prefill_splitting_images_equals_whole(vl_dense):
    from qwenkit import LLM

    folder, reference, _ = vl_dense
    llm = LLM(str(folder), dtype="float32", device="cpu", kv_cache_memory="16MiB", progress=False,
              max_num_batched_tokens=7, enable_prefix_caching=False)
    images = [test_image(100, 90, seed=10), test_image(70, 140, seed=11)]
    p = llm.prepare_chat(_messages(images))
    assert any(n % 7 for n in (i.num_tokens for i in p.multimodal.images))
    (tokens,), _ = _generate(llm, [(p.prompt_token_ids, p.multimodal)])
    expected, _ = _reference_greedy(reference, p.prompt_token_ids, images, tokens)
    assert tokens == expected


def test_text_only_model_refuses_an_image(llm):
    from qwenkit.multimodal import ImageError

    with pytest.raises(ImageError, match="does not read images"):
        llm.chat(_messages([test_image(30, 30)]))


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    import base64

    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def vl_server(vl_checkpoint):
    from serving import running_server

    from qwenkit import AsyncLLM
    from qwenkit.server import ServerConfig

    allm = AsyncLLM(str(vl_checkpoint[0]), dtype="float32", device="cpu", kv_cache_memory="16MiB", progress=False)
    with running_server(allm, ServerConfig()) as url:
        yield url, allm
    allm.shutdown()


def test_openai_sdk_chat_and_responses_with_a_base64_image(vl_server, vl_llm):
    openai = pytest.importorskip("openai")
    url, _ = vl_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    image = test_image(120, 90, seed=12)
    data_url = _data_url(_png(image))
    reply = client.chat.completions.create(model="default", max_tokens=12, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                     {"type": "text", "text": "What is in the picture?"}]}])
    from qwenkit.sampling import SamplingParams

    expected = vl_llm.chat(_messages([image]), SamplingParams(max_tokens=12, temperature=0.0))
    assert reply.choices[0].message.content == expected.content
    assert reply.usage.prompt_tokens == len(vl_llm.prepare_chat(_messages([image])).prompt_token_ids)
    response = client.responses.create(model="default", max_output_tokens=12, temperature=0, input=[
        {"role": "user", "content": [{"type": "input_image", "image_url": data_url, "detail": "auto"},
                                     {"type": "input_text", "text": "What is in the picture?"}]}])
    assert response.output_text == expected.content


def _bomb() -> bytes:
    from PIL import Image

    return _png(Image.new("1", (9000, 9000)))  # 81 megapixels in a few kB


def _truncated() -> bytes:
    data = _png(test_image(200, 200, seed=13))
    return data[: len(data) // 2]


@pytest.mark.parametrize("url, message", [
    (_data_url(b"not an image at all"), "not an image format"),
    ("data:image/png;base64,!!!", "not valid base64"),
    ("truncated", "could not be decoded"),
    ("bomb", "pixels"),
    ("http://127.0.0.1:1/cat.png", "not fetched"),
    ("/etc/passwd", "must be a data: URL"),
])
def test_bad_images_are_openai_400s_and_the_server_still_answers(vl_server, url, message):
    openai = pytest.importorskip("openai")
    url = {"truncated": _data_url(_truncated()), "bomb": _data_url(_bomb())}.get(url, url)
    client = openai.OpenAI(base_url=f"{vl_server[0]}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
    assert message in e.value.body["message"]
    ok = client.chat.completions.create(model="default", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_image_over_the_byte_limit(vl_llm):
    from qwenkit.multimodal import ImageError, ImageLimits, decode_image

    data = _png(test_image(64, 64))
    with pytest.raises(ImageError, match="limit is 100 bytes"):
        decode_image(data, ImageLimits(max_bytes=100))


def test_text_only_model_answers_an_image_part_with_a_400(allm):
    openai = pytest.importorskip("openai")
    from serving import running_server

    from qwenkit.server import ServerConfig

    with running_server(allm, ServerConfig()) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="default", max_tokens=2, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(_png(test_image(30, 30)))}},
                                             {"type": "text", "text": "hi"}]}])
    assert "does not read images" in e.value.body["message"]


def test_cli_run_with_images_and_a_bad_image(vl_checkpoint, vl_llm, tmp_path, capsys):
    import json

    from qwenkit.cli import main
    from qwenkit.sampling import SamplingParams

    image = test_image(100, 70, seed=14)
    (tmp_path / "a.png").write_bytes(_png(image))
    args = ["run", "--model", str(vl_checkpoint[0]), "--device", "cpu", "--dtype", "float32",
            "--temperature", "0", "--max-tokens", "6", "--json"]
    assert main([*args, "--image", str(tmp_path / "a.png"), "--image", str(tmp_path / "a.png"), "Compare them."]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = vl_llm.chat(_messages([image, image], "Compare them."), SamplingParams(max_tokens=6, temperature=0.0))
    assert out["content"] == expected.content
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert main([*args, "--image", str(tmp_path / "bad.png"), "hi"]) != 0
    assert "error:" in capsys.readouterr().err


def test_capabilities_report_vision(vl_llm, llm):
    from qwenkit.capabilities import model_capabilities

    assert "vision" in model_capabilities(vl_llm).names()
    assert "vision" not in model_capabilities(llm).names()


@pytest.fixture(scope="module")
def image_host():
    """A loopback HTTP server of one PNG at /cat.png (anything else 404): its base URL and the image."""
    import http.server
    import threading

    image = test_image(80, 120, seed=15)
    body = _png(image)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/cat.png" else 404)
            self.send_header("Content-Length", str(len(body) if self.path == "/cat.png" else 0))
            self.end_headers()
            if self.path == "/cat.png":
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", image
    server.shutdown()


def test_image_urls_fetched_only_when_the_server_allows_it(vl_server, image_host, vl_llm):
    openai = pytest.importorskip("openai")
    from serving import running_server

    from qwenkit.sampling import SamplingParams
    from qwenkit.server import ServerConfig

    host, image = image_host
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{host}/cat.png"}},
                                             {"type": "text", "text": "What is in the picture?"}]}]
    refusing = openai.OpenAI(base_url=f"{vl_server[0]}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="--allow-image-urls"):
        refusing.chat.completions.create(model="default", max_tokens=4, messages=messages)
    with running_server(vl_server[1], ServerConfig(allow_image_urls=True)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="default", max_tokens=8, temperature=0, messages=messages)
        expected = vl_llm.chat(_messages([image]), SamplingParams(max_tokens=8, temperature=0.0))
        assert reply.choices[0].message.content == expected.content
        missing = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{host}/nope.png"}}]}]
        with pytest.raises(openai.BadRequestError, match="HTTP 404"):
            client.chat.completions.create(model="default", max_tokens=4, messages=missing)
    import asyncio

    from qwenkit.multimodal import ImageError
    from qwenkit.multimodal.fetch import fetch_image

    with pytest.raises(ImageError, match="over the limit of 100 bytes"):
        asyncio.run(fetch_image(f"{host}/cat.png", max_bytes=100, timeout_s=5))


def test_dashscope_sdk_multimodal_conversation(vl_server, vl_llm, monkeypatch):
    dashscope = pytest.importorskip("dashscope")
    from qwenkit.sampling import SamplingParams

    monkeypatch.setattr(dashscope, "base_http_api_url", f"{vl_server[0]}/api/v1")
    image = test_image(90, 90, seed=16)
    messages = [{"role": "user", "content": [{"image": _data_url(_png(image))}, {"text": "What is in the picture?"}]}]
    response = dashscope.MultiModalConversation.call(model="default", messages=messages, api_key="unused",
                                                     max_tokens=8, temperature=0)
    assert response.status_code == 200, response
    expected = vl_llm.chat(_messages([image]), SamplingParams(max_tokens=8, temperature=0.0))
    assert response.output.choices[0].message.content == [{"text": expected.content}]
    bad = [{"role": "user", "content": [{"image": _data_url(b"junk")}, {"text": "hi"}]}]
    response = dashscope.MultiModalConversation.call(model="default", messages=bad, api_key="unused", max_tokens=2)
    assert response.status_code == 400 and "not an image format" in response.message


def test_chat_client_user_media_local_and_remote(vl_server, vl_llm, tmp_path):
    from qwenkit.client import ChatClient, LocalChatModel, Media, OpenAIChatModel
    from qwenkit.sampling import SamplingParams

    image = test_image(100, 100, seed=17)
    (tmp_path / "photo.png").write_bytes(_png(image))
    media = [Media.from_file(tmp_path / "photo.png")]
    expected = vl_llm.chat(_messages([image]), SamplingParams(max_tokens=8, temperature=0.0)).content
    options = {"max_tokens": 8, "temperature": 0}
    local = ChatClient(LocalChatModel(vl_llm), default_options=options)
    assert local.prompt().user("What is in the picture?", media=media).call().content() == expected
    remote = ChatClient(OpenAIChatModel(f"{vl_server[0]}/v1", "unused"), default_options=options)
    assert remote.prompt().user("What is in the picture?", media=media).call().content() == expected
    with pytest.raises(ValueError, match="not an image file"):
        Media.from_file(tmp_path / "notes.txt")


def test_qwenkit_chat_attaches_an_image(vl_llm, tmp_path):
    import io

    from qwenkit.chat_cli import ChatSession, _Style
    from qwenkit.client import ChatClient, InMemoryChatMemory, LocalChatModel, MessageChatMemoryAdvisor
    from qwenkit.sampling import SamplingParams

    image = test_image(64, 96, seed=18)
    (tmp_path / "photo.png").write_bytes(_png(image))
    memory = InMemoryChatMemory()
    client = ChatClient(LocalChatModel(vl_llm), default_options={"max_tokens": 8, "temperature": 0},
                        default_advisors=[MessageChatMemoryAdvisor(memory)])
    out = io.StringIO()
    session = ChatSession(client, memory, conversation_id="c", enable_thinking=None, thinking_budget=None,
                          out=out, style=_Style(False))
    session.command("/image /no/such.png")
    assert "/image:" in out.getvalue() and not session.attachments
    session.command(f"/image {tmp_path / 'photo.png'}")
    session.turn("What is in the picture?")
    expected = vl_llm.chat(_messages([image]), SamplingParams(max_tokens=8, temperature=0.0)).content
    assert out.getvalue().endswith(expected + "\n")
    session.show_history()
    assert "user: [image] What is in the picture?" in out.getvalue()


def test_bench_image_prints_time_to_first_token_beside_transformers(vl_checkpoint, capsys):
    import json

    from qwenkit.cli import main

    assert main(["bench", "--model", str(vl_checkpoint[0]), "--device", "cpu", "--dtype", "float32", "--image",
                 "--image-size", "128", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["size"] == 128 and result["image_tokens"] > 0
    assert result["ttft_s"]["median"] > 0 and result["transformers_ttft_s"]["median"] > 0
    from qwenkit.bench import ImageBenchResult, Measurement

    line = ImageBenchResult("m", 128, 16, 40, Measurement([0.5, 0.7]), Measurement([1.0, 1.2])).line()
    assert line == ("m: one 128x128 image (16 image tokens of 40): time to first token 0.600 (min 0.500, "
                    "max 0.700) s; transformers 1.100 (min 1.000, max 1.200) s (1.83x)")


def test_show_reports_vision_without_loading(vl_checkpoint, capsys):
    from qwenkit.cli import main

    assert main(["show", str(vl_checkpoint[0])]) == 0
    out = capsys.readouterr().out
    assert "vision" in out and "qwen2_5_vl" in out


@pytest.fixture(scope="module")
def browser():
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api", reason="the page test needs Playwright")
    chromium = os.environ.get("QWENKIT_CHROMIUM", "/usr/bin/chromium")
    if not shutil.which(chromium):
        pytest.skip(f"the page test needs Chromium at {chromium}")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        yield browser
        browser.close()


def test_web_page_attaches_an_image_shows_it_and_keeps_it(vl_server, browser, tmp_path):
    import json

    from serving import running_server

    from qwenkit.server import ServerConfig

    (tmp_path / "photo.png").write_bytes(_png(test_image(120, 80, seed=19)))
    config = ServerConfig(chat_db=str(tmp_path / "chats.sqlite3"))
    with running_server(vl_server[1], config) as url:
        page = browser.new_context(viewport={"width": 1100, "height": 760}).new_page()
        page.set_default_timeout(30_000)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{url}/")
        page.wait_for_selector("body[data-ready]")
        page.locator("#attach").wait_for()  # shown: the model reads images
        page.set_input_files("#attach-file", str(tmp_path / "photo.png"))
        page.locator("#attachments img.thumb").wait_for()
        page.get_by_label("Message", exact=True).fill("What is in the picture?")
        with page.expect_request("**/v1/chat/completions") as sent:
            page.get_by_label("Message", exact=True).press("Enter")
        body = json.loads(sent.value.post_data)
        parts = body["messages"][-1]["content"]
        assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
        assert parts[-1] == {"type": "text", "text": "What is in the picture?"}
        page.locator("article.assistant[aria-busy=false]").wait_for()
        assert page.locator("article.user img.thumb").count() == 1
        assert page.locator("#attachments").is_hidden()
        page.wait_for_function("location.hash.length > 1")
        page.wait_for_timeout(500)  # the turn is saved after the answer
        page.reload()
        page.wait_for_selector("body[data-ready]")
        page.locator("article.user img.thumb").wait_for()  # kept with the conversation
        assert "What is in the picture?" in page.locator("article.user").inner_text()
        assert errors == []


def test_published_qwen2_5_vl_config_layout_loads_the_same(vl_checkpoint, vl_llm, tmp_path):
    """Qwen/Qwen2.5-VL-*-Instruct's config.json: the text keys at the top, rope_scaling
    {"type": "mrope", "mrope_section": ...}, torch_dtype; read as transformers 5's nested one."""
    import json
    import shutil

    from qwenkit import LLM
    from qwenkit.sampling import SamplingParams

    folder = tmp_path / "published"
    shutil.copytree(vl_checkpoint[0], folder)
    config = json.loads((folder / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    config.update({k: v for k, v in text.items() if k != "model_type"})
    config["rope_theta"] = rope["rope_theta"]
    config["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    config["torch_dtype"] = config.pop("dtype")
    config["vision_config"]["in_chans"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    published = LLM(str(folder), dtype="float32", device="cpu", kv_cache_memory="16MiB", progress=False)
    assert published.config == vl_llm.config
    image = test_image(70, 50, seed=20)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    assert published.chat(_messages([image]), params).content == vl_llm.chat(_messages([image]), params).content
