"""What a server does with requests that go wrong on the way: a client that leaves before
its first token, and refusals that must say why in the log.

A real uvicorn server on 127.0.0.1 over its own tiny random Qwen3 whose prefill is made
slow on purpose: 16 tokens a step and at least 40 ms a step, so a 1,500-token prompt is
~90 steps of prefill, against which "freed within a step" and "not delayed" are counted.
"""

import json
import logging
import socket
import time

import httpx
import pytest
from serving import running_server

from qwenkit.server import ServerConfig

MODEL = "tiny-qwen3"
STEP_S = 0.04
LONG_PROMPT_TOKENS = 1500


@pytest.fixture(scope="module")
def slow_allm(tiny_checkpoint):
    """The engine, slowed to STEP_S a step; `.steps` records each step's request ids."""
    from qwenkit import AsyncLLM

    engine = AsyncLLM(str(tiny_checkpoint), dtype="float32", progress=False, max_num_batched_tokens=16,
                      kv_cache_memory="64MiB", enable_prefix_caching=False)
    runner = engine.llm.engine.runner
    run = runner.run
    engine.steps = []

    def slow_run(batch):
        engine.steps.append({s.seq.request_id for s in batch})
        time.sleep(STEP_S)
        return run(batch)

    runner.run = slow_run
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(slow_allm, tmp_path_factory):
    db = tmp_path_factory.mktemp("db")
    config = ServerConfig(served_model_names=[MODEL], max_running_requests=1, max_waiting_requests=1,
                          chat_db=str(db / "c.sqlite3"), responses_db=str(db / "r.sqlite3"))
    with running_server(slow_allm, config) as url:
        yield url


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def wait_for(condition, timeout: float, what: str) -> float:
    """Seconds until `condition()` holds (polled every 5 ms)."""
    begun = time.perf_counter()
    while not condition():
        assert time.perf_counter() - begun < timeout, f"{what} did not happen within {timeout} s"
        time.sleep(0.005)
    return time.perf_counter() - begun


def post_raw(url: str, path: str, body: dict, headers: dict | None = None) -> socket.socket:
    """Send a request on a socket of its own and leave it unread."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             f"Content-Length: {len(data)}"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    s = socket.create_connection((host, int(port)))
    s.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + data)
    return s


def long_text(slow_allm, seed: int) -> str:
    """A user message of about LONG_PROMPT_TOKENS tokens (each seed a different one)."""
    words = ["hello", "world", "quick", "brown", "fox", "lazy", "dog", "thinks", "answers"]
    text = " ".join(words[(i * 7 + seed) % len(words)] for i in range(LONG_PROMPT_TOKENS * 3 // 4))
    n = len(slow_allm.tokenizer.encode(text))
    assert LONG_PROMPT_TOKENS * 0.8 < n < 1800, n
    return text


def generating_requests(slow_allm, seed: int) -> dict[str, tuple[str, dict, dict]]:
    text = long_text(slow_allm, seed)
    ids = [5 + (seed + i) % 300 for i in range(LONG_PROMPT_TOKENS)]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4}
    return {
        "completions streamed": ("/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 4, "stream": True}, {}),
        "completions whole": ("/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 4}, {}),
        "chat streamed": ("/v1/chat/completions", {**chat, "stream": True}, {}),
        "chat whole": ("/v1/chat/completions", chat, {}),
        "dashscope streamed": ("/api/v1/services/aigc/text-generation/generation",
                               {"model": MODEL, "input": {"prompt": text}, "parameters": {"max_tokens": 4}},
                               {"X-DashScope-SSE": "enable"}),
        "responses whole": ("/v1/responses", {"model": MODEL, "input": text, "max_output_tokens": 4}, {}),
    }


CASES = ["completions streamed", "completions whole", "chat streamed", "chat whole", "dashscope streamed",
         "responses whole"]


@pytest.mark.parametrize("case", CASES)
def test_a_client_that_leaves_during_the_prefill_frees_it_within_a_step(server, slow_allm, case):
    """Counted in engine steps, not seconds: the machine running the tests may be loaded."""
    engine = slow_allm.llm.engine
    path, body, headers = generating_requests(slow_allm, CASES.index(case))[case]
    s = post_raw(server, path, body, headers)
    try:
        wait_for(lambda: metric(server, "qwenkit_kv_blocks_in_use") >= 4, 10, "the prefill starting")
        (abandoned,) = engine.requests
    finally:
        s.close()
    closed_at = len(slow_allm.steps)
    wait_for(lambda: not engine.requests and metric(server, "qwenkit_kv_blocks_in_use") == 0, 5, "freeing")
    wait_for(lambda: metric(server, "qwenkit_requests_running") == 0, 5, "the slot's release")
    # Aborted within about one step (the one running when the client left); ~90 were to come.
    steps_after = [step for step in slow_allm.steps[closed_at:] if abandoned in step]
    assert len(steps_after) <= 2, len(steps_after)

    # And a request sent next runs at once: in its own few steps, none of them the abandoned prefill's.
    sent_at = len(slow_allm.steps)
    r = httpx.post(server + "/v1/completions", json={"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text
    assert 1 <= len(slow_allm.steps) - sent_at <= 3
    assert all(step == {r.json()["id"]} for step in slow_allm.steps[sent_at:]), slow_allm.steps[sent_at:]
    assert f'route="{path}",status="499"' in httpx.get(server + "/metrics").text


def test_a_client_that_leaves_while_waiting_for_a_slot_gives_up_its_place(server, slow_allm):
    engine = slow_allm.llm.engine
    first = post_raw(server, "/v1/completions", generating_requests(slow_allm, 10)["completions streamed"][1])
    try:
        wait_for(lambda: metric(server, "qwenkit_requests_running") == 1 and engine.requests, 10, "the first running")
        (running,) = engine.requests
        second = post_raw(server, "/v1/completions", generating_requests(slow_allm, 11)["completions whole"][1])
        wait_for(lambda: metric(server, "qwenkit_requests_waiting") == 1, 5, "the second request waiting")
        second.close()
        wait_for(lambda: metric(server, "qwenkit_requests_waiting") == 0, 3, "the waiting place given up")
        assert set(engine.requests) == {running}  # it left on its own, not by getting its turn
    finally:
        first.close()
    wait_for(lambda: not engine.requests, 5, "the first request's abort")


# -- every refusal is logged with the request id and why -------------------------------


def refusal_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "qwenkit.server" and r.levelno == logging.WARNING]


def logged_once(caplog, request_id: str, *words: str) -> str:
    """The one line logged for `request_id` (written as the request ends: maybe just after
    the client has read the answer)."""
    wait_for(lambda: any(request_id in line for line in refusal_lines(caplog)), 5, f"{request_id} logged")
    lines = [line for line in refusal_lines(caplog) if request_id in line]
    assert len(lines) == 1, (request_id, refusal_lines(caplog))
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_refusals_are_logged_with_the_request_id_and_the_reason(server, slow_allm, caplog):
    caplog.set_level(logging.WARNING, logger="qwenkit.server")
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with httpx.Client(base_url=server, timeout=30) as http:
        cases = [
            (http.post("/v1/chat/completions", json={**chat, "temperature": 9}), 400, "temperature"),
            (http.post("/v1/chat/completions", json={**chat, "model": "nope"}), 404, "`nope` does not exist"),
            (http.post("/v1/completions", json={"model": MODEL, "prompt": [5] * 3000}), 400, "context"),
            (http.post("/api/v1/services/aigc/nonexistent", json={}), 404, "unknown"),
            (http.get("/v1/models", headers={"Host": "evil.example"}), 421, "evil.example"),
            (http.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}), 400,
             "not valid JSON"),
        ]
        for r, status, words in cases:
            assert r.status_code == status, r.text
            request_id = r.headers["x-request-id"]
            logged_once(caplog, request_id, str(status), words)
        # The DashScope body's request_id is the logged one.
        assert cases[3][0].json()["request_id"] == cases[3][0].headers["x-request-id"]

        # Slots full: one running, one waiting, the third refused with 429.
        running = post_raw(server, "/v1/completions", generating_requests(slow_allm, 20)["completions streamed"][1])
        waiting = None
        try:
            wait_for(lambda: metric(server, "qwenkit_requests_running") == 1, 10, "the first request running")
            waiting = post_raw(server, "/v1/completions", generating_requests(slow_allm, 21)["completions whole"][1])
            wait_for(lambda: metric(server, "qwenkit_requests_waiting") == 1, 5, "the second request waiting")
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": [5, 6], "max_tokens": 1})
            assert r.status_code == 429
            logged_once(caplog, r.headers["x-request-id"], "429", "busy")
        finally:
            running.close()
            if waiting is not None:
                waiting.close()
        wait_for(lambda: len([line for line in refusal_lines(caplog) if " 499 " in line]) == 2, 5, f"two 499s logged {refusal_lines(caplog)}")
        assert all("cmpl-" in line and "closed the connection" in line
                   for line in refusal_lines(caplog) if " 499 " in line)

        ok = http.post("/v1/completions", json={"model": MODEL, "prompt": [5, 6], "max_tokens": 1})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == ok.json()["id"]
        assert not [line for line in refusal_lines(caplog) if ok.json()["id"] in line]


def test_a_timeout_in_a_stream_is_logged(slow_allm, caplog, tmp_path):
    caplog.set_level(logging.WARNING, logger="qwenkit.server")
    config = ServerConfig(served_model_names=[MODEL], request_timeout_s=0.1, web=False)
    with running_server(slow_allm, config) as url:
        body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 40, "ignore_eos": True, "stream": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200 and "timeout" in r.text
    logged_once(caplog, r.headers["x-request-id"], "504 in the stream", "timeout")


# -- DashScope: the chat route's ranges and bounds; an unknown path ---------------------

DASHSCOPE = "/api/v1/services/aigc/text-generation/generation"


@pytest.mark.parametrize("field, value", [
    ("temperature", 9), ("temperature", 2.01), ("temperature", -0.1), ("temperature", 1.99), ("temperature", 2),
    ("temperature", 0), ("top_p", 0), ("top_p", 1.5), ("top_p", 1), ("top_p", 0.01), ("presence_penalty", 2.5),
    ("presence_penalty", -2), ("top_k", -2), ("top_k", 50), ("repetition_penalty", 0), ("repetition_penalty", 1.1),
    ("seed", -1), ("seed", 2**31), ("n", 0), ("max_tokens", 0), ("thinking_budget", -1),
])
def test_dashscope_takes_the_chat_routes_sampling_ranges(server, field, value):
    """DashScope's documented ranges (temperature [0, 2), top_p (0, 1], presence_penalty
    [-2, 2]) as the OpenAI-compatible route holds them: the same value is refused by both or
    by neither, with a 400 naming the field."""
    with httpx.Client(base_url=server, timeout=30) as http:
        messages = [{"role": "user", "content": "hi"}]
        chat = http.post("/compatible-mode/v1/chat/completions",
                         json={"model": MODEL, "messages": messages, "max_tokens": 1, field: value})
        native = http.post(DASHSCOPE, json={"model": MODEL, "input": {"messages": messages},
                                            "parameters": {"max_tokens": 1, field: value, "result_format": "message"}})
    assert native.status_code == chat.status_code, (native.text, chat.text)
    if native.status_code != 200:
        assert native.status_code == 400
        assert native.json()["code"] == "InvalidParameter" and field in native.json()["message"], native.text


def test_dashscope_without_max_tokens_is_bounded_as_chat_is():
    """No max_tokens: the remaining context, as on the chat route (both leave it to the
    engine, which bounds a request by max_model_len less its prompt)."""
    from qwenkit.server import dashscope_protocol as ds
    from qwenkit.server import openai_protocol as oa

    messages = [{"role": "user", "content": "hi"}]
    native = ds.generation_call(ds.GenerationRequest.model_validate({"input": {"messages": messages}}))
    chat = oa.chat_call(oa.ChatCompletionRequest.model_validate({"messages": messages}))
    assert native.request.sampling_params.max_tokens == chat.request.sampling_params.max_tokens is None


def test_an_unknown_dashscope_path_says_so(server):
    r = httpx.post(server + "/api/v1/services/aigc/nonexistent", json={"model": MODEL})
    assert r.status_code == 404
    body = r.json()
    assert body["code"] == "InvalidURL" and "unknown" in body["message"] and body["request_id"], body
    r = httpx.post(server + DASHSCOPE, json={"model": "nope", "input": {"prompt": "hi"}})
    assert r.status_code == 404 and r.json()["code"] == "ModelNotFound"


# -- metrics through prometheus_client's public API ------------------------------------


def test_the_prefix_cache_hit_rate_is_kept_without_private_counters():
    import inspect
    from types import SimpleNamespace

    from qwenkit.server import metrics
    from qwenkit.server.limits import RequestSlots

    from qwenkit.engine.speculative import SpeculativeStats

    blocks = SimpleNamespace(num_blocks=10, num_free_blocks=7)
    spec = SpeculativeStats(verify_steps=4, draft_tokens=10, accepted_tokens=6, emitted_tokens=10)
    engine = SimpleNamespace(block_manager=blocks, spec_stats=spec)
    m = metrics.Metrics(SimpleNamespace(llm=SimpleNamespace(engine=engine)), RequestSlots(2, 2))

    def sample(name: str) -> float:
        (line,) = [line for line in m.render()[0].decode().splitlines() if line.startswith(name + " ")]
        return float(line.split()[1])

    assert sample("qwenkit_prefix_cache_hit_rate") == 0.0
    m.tokens(prompt=100, generated=5, cached=25)
    m.tokens(prompt=100, generated=5, cached=75)
    assert sample("qwenkit_prefix_cache_hit_rate") == 0.5
    assert sample("qwenkit_prompt_tokens_total") == 200 and sample("qwenkit_kv_blocks_in_use") == 3
    assert sample("qwenkit_spec_decode_acceptance_rate") == 0.6
    assert sample("qwenkit_spec_decode_tokens_per_step") == 2.5
    spec.accepted_tokens += 2  # read at each scrape
    assert sample("qwenkit_spec_decode_accepted_tokens") == 8
    assert "._value" not in inspect.getsource(metrics)


# -- a request cancelled while the engine thread takes it ------------------------------


def test_a_request_cancelled_while_the_engine_adds_it_leaves_the_engine_running(slow_allm):
    """A client that leaves at once cancels its request while the engine thread may be
    running its add_request: the command's future is then cancelled, and setting its result
    must not kill the thread (it did: InvalidStateError, and no request ran after)."""
    import asyncio

    from qwenkit.sampling import SamplingParams

    engine = slow_allm.llm.engine
    gate = __import__("threading").Event()
    add_request = engine.add_request

    def slow_add(*args, **kwargs):
        gate.wait(5)  # held until the caller has given up
        return add_request(*args, **kwargs)

    async def cancelled_then_served() -> list[int]:
        task = asyncio.ensure_future(anext(slow_allm.generate_stream([5, 6, 7], SamplingParams(max_tokens=1))))
        await asyncio.sleep(0.2)  # the engine thread is in slow_add
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        gate.set()
        engine.add_request = add_request
        return [u.finish_reason async for u in slow_allm.generate_stream([5, 6, 7], SamplingParams(max_tokens=1))]

    engine.add_request = slow_add
    try:
        outputs = asyncio.run(asyncio.wait_for(cancelled_then_served(), 20))
    finally:
        engine.add_request = add_request
    assert len(outputs) >= 1 and slow_allm._thread.is_alive()
    wait_for(lambda: not engine.requests, 5, "the cancelled request's abort")
