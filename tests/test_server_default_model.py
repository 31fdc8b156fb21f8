"""One end-to-end case on the embedded default model: `qwenkit serve` answers the real
`openai` and `dashscope` SDKs, streaming and not."""

import pytest

openai = pytest.importorskip("openai")
dashscope = pytest.importorskip("dashscope")

from serving import running_server  # noqa: E402

from qwenkit import AsyncLLM  # noqa: E402
from qwenkit.server import ServerConfig  # noqa: E402

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def server(default_gguf):
    engine = AsyncLLM(str(default_gguf), progress=False)
    with running_server(engine, ServerConfig(served_model_names=["qwen-default"])) as url:
        yield url
    engine.shutdown()


def test_openai_sdk(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="qwen-default", messages=QUESTION, temperature=0, max_tokens=10)
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 10 and reply.usage.completion_tokens > 0
    stream = client.chat.completions.create(model="qwen-default", messages=QUESTION, temperature=0, max_tokens=10,
                                            stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == reply.choices[0].message.content


def test_dashscope_sdk(server, monkeypatch):
    monkeypatch.setattr(dashscope, "base_http_api_url", f"{server}/api/v1")
    response = dashscope.Generation.call(
        model="qwen-default", messages=QUESTION, result_format="message", temperature=0, max_tokens=10,
        api_key="unused",
    )
    assert response.status_code == 200, response
    assert "Paris" in response.output.choices[0].message.content
