"""qwenkit.client against a real `qwenkit serve` on 127.0.0.1 and the in-process engine.

A tiny random Qwen3 answers; `scripted` forces its words (a thought, a tool call, then
an answer) so that reasoning, tool loops and memory are tested apart from model quality.
"""

import asyncio
import json
import logging

import pytest
from pydantic import BaseModel
from tiny import scripted

pytest.importorskip("openai")

from qwenkit.client import (  # noqa: E402
    Advisor, ChatClient, ChatOptions, InMemoryChatMemory, LocalChatModel, MessageChatMemoryAdvisor, OpenAIChatModel,
    ReasoningContentAdvisor, SafeGuardAdvisor, SimpleLoggerAdvisor, SQLiteChatMemory, tool,
)
from qwenkit.server import ServerConfig  # noqa: E402

KEY = "sk-test-key"
MODEL = "tiny-qwen3"
THOUGHT = "<think>\nThe user asks about weather.\n</think>\n\n"
CALL_PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_TWO = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Nowhere"}}\n</tool_call>')
NO_THINK = ChatOptions(temperature=0, max_tokens=300, enable_thinking=False)


@pytest.fixture(scope="module")
def server_config():
    return ServerConfig(served_model_names=[MODEL], api_key=KEY)


@pytest.fixture(scope="module")
def remote(server):
    return OpenAIChatModel(f"{server}/v1", KEY, MODEL, max_retries=0)


WEATHER_CALLS = []


@tool
def get_weather(city: str) -> dict:
    """Current weather of a city."""
    WEATHER_CALLS.append(city)
    if city == "Nowhere":
        raise LookupError(f"no such city: {city}")
    return {"city": city, "sky": "sunny"}


class Weather(BaseModel):
    city: str
    celsius: int


# -- OpenAIChatModel over qwenkit serve ----------------------------------------------


def test_call_separates_reasoning_and_counts_usage(remote, allm):
    client = ChatClient(remote, default_options=ChatOptions(temperature=0, max_tokens=64))
    with scripted(allm, THOUGHT + "It is sunny."):
        response = client.prompt("Weather in Paris?").call().chat_response()
    assert response.content == "It is sunny."
    assert response.reasoning_content == "The user asks about weather."
    assert response.finish_reason == "stop" and response.model == MODEL
    assert 0 < response.usage.reasoning_tokens < response.usage.completion_tokens


def test_stream_content_and_reasoning_advisor(remote, allm):
    client = ChatClient(remote, default_options=ChatOptions(temperature=0, max_tokens=64))
    with scripted(allm, THOUGHT + "It is sunny."):
        plain = client.prompt("Weather?").stream()
        assert "".join(plain.content()) == "It is sunny."
        assert plain.chat_response().reasoning_content == "The user asks about weather."
        folded = client.prompt("Weather?").advisors(ReasoningContentAdvisor()).stream()
        text = "".join(folded.content())
        called = client.prompt("Weather?").advisors(ReasoningContentAdvisor()).call().content()
    assert text == called == "<think>The user asks about weather.</think>It is sunny."


def test_tool_loop_runs_several_calls_and_returns_errors_to_the_model(remote, allm):
    WEATHER_CALLS.clear()
    memory = InMemoryChatMemory()
    client = ChatClient(remote, default_options=NO_THINK, default_tools=[get_weather],
                        default_advisors=[MessageChatMemoryAdvisor(memory)])
    with scripted(allm, CALL_TWO, "Sunny in Paris; Nowhere is unknown."):
        response = client.prompt("Weather in Paris and Nowhere?").call().chat_response()
    assert WEATHER_CALLS == ["Paris", "Nowhere"]
    assert response.content == "Sunny in Paris; Nowhere is unknown." and response.finish_reason == "stop"
    roles = [m["role"] for m in response.messages]
    assert roles == ["assistant", "tool", "tool", "assistant"]
    assert json.loads(response.messages[1]["content"]) == {"city": "Paris", "sky": "sunny"}
    assert response.messages[2]["content"] == "Error: LookupError: no such city: Nowhere"
    assert response.messages[1]["tool_call_id"] == response.messages[0]["tool_calls"][0]["id"]
    # The whole turn is remembered: user, tool round, answer.
    assert [m["role"] for m in memory.get("default")] == ["user"] + roles
    assert response.usage.prompt_tokens > 0


def call_for(city: str) -> str:
    return f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}\n</tool_call>'


def test_tool_rounds_are_bounded(remote, allm):
    WEATHER_CALLS.clear()
    client = ChatClient(remote, default_options=NO_THINK, default_tools=[get_weather], max_tool_rounds=2)
    with scripted(allm, call_for("Paris"), call_for("Rome"), call_for("Oslo")):  # a new call every time
        response = client.prompt("Weather?").call().chat_response()
    assert WEATHER_CALLS == ["Paris", "Rome"]
    assert response.finish_reason == "tool_calls" and response.tool_calls[0].name == "get_weather"
    assert response.tool_loop.reason == "max_rounds" and response.tool_loop.rounds == 2


@pytest.mark.parametrize("streamed", [False, True])
def test_a_repeated_call_gets_one_more_call_without_tools(remote, allm, streamed):
    """The model asks again for the call it already made (small models loop so): the tool is
    not run twice; the model is asked once more, without tools, and answers."""
    WEATHER_CALLS.clear()
    client = ChatClient(remote, default_options=NO_THINK, default_tools=[get_weather])
    with scripted(allm, CALL_PARIS, call_for("Paris").replace('"city": "Paris"', '"city":"Paris"'), "Sunny."):
        answer = client.prompt("Weather in Paris?").stream() if streamed else client.prompt("Weather in Paris?").call()
        content = "".join(answer.content()) if streamed else answer.content()
    assert WEATHER_CALLS == ["Paris"]
    assert content == "Sunny."
    assert answer.chat_response().tool_loop.reason == "repeated_call"
    assert [m["content"] for m in answer.chat_response().tool_loop.tool_results] == [
        json.dumps({"city": "Paris", "sky": "sunny"})]


def test_tool_loop_streams(remote, allm):
    WEATHER_CALLS.clear()
    client = ChatClient(remote, default_options=NO_THINK)
    with scripted(allm, CALL_PARIS, "It is sunny in Paris."):
        stream = client.prompt("Weather in Paris?").tools(get_weather).stream()
        text = "".join(stream.content())
    assert text == "It is sunny in Paris." and WEATHER_CALLS == ["Paris"]
    assert [m["role"] for m in stream.chat_response().messages] == ["assistant", "tool", "assistant"]


def test_entity_uses_the_json_schema(remote, allm):
    client = ChatClient(remote, default_options=NO_THINK)
    with scripted(allm, '{"city": "Paris", "celsius": 21}'):
        weather = client.prompt("Weather in Paris as JSON").call().entity(Weather)
    assert weather == Weather(city="Paris", celsius=21)


def test_memory_advisor_sends_history_without_reasoning(remote, allm, tmp_path):
    memory = SQLiteChatMemory(tmp_path / "chat.db")
    seen = []

    class Spy(Advisor):
        order = 10_000

        def before(self, request):
            seen.append(request.prompt_messages())
            return request

    client = ChatClient(remote, default_system="Be brief.", default_options=ChatOptions(temperature=0, max_tokens=64),
                        default_advisors=[MessageChatMemoryAdvisor(memory), Spy()])
    with scripted(allm, THOUGHT + "It is sunny."):
        client.prompt("Weather in Paris?").advisors(conversation_id="a").call().content()
        client.prompt("And tomorrow?").advisors(conversation_id="a").call().content()
        client.prompt("Other chat").advisors(conversation_id="b").call().content()
    assert [m["content"] for m in seen[1]] == ["Be brief.", "Weather in Paris?", "It is sunny.", "And tomorrow?"]
    assert all("reasoning_content" not in m for m in seen[1])
    assert [m["content"] for m in seen[2]] == ["Be brief.", "Other chat"]
    stored = SQLiteChatMemory(tmp_path / "chat.db").get("a")  # reopened
    assert len(stored) == 4 and stored[1]["reasoning_content"] == "The user asks about weather."


def test_safeguard_and_logger(remote, allm, caplog):
    caplog.set_level(logging.INFO, logger="qwenkit.client")
    memory = InMemoryChatMemory()
    client = ChatClient(remote, default_advisors=[
        MessageChatMemoryAdvisor(memory), SafeGuardAdvisor(["secret"], "Refused."), SimpleLoggerAdvisor(logging.INFO)])
    assert client.prompt("Tell me the SECRET").call().content() == "Refused."
    assert list(client.prompt("Tell me the secret").stream().content()) == ["Refused."]
    assert memory.get("default") == [] and not caplog.records  # the model and inner advisors never ran
    with scripted(allm, "Fine."):
        assert client.prompt("Hello").options(enable_thinking=False).call().content() == "Fine."
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["request", "response"]
    assert len(memory.get("default")) == 2


def test_async_call_and_stream(remote, allm):
    client = ChatClient(remote, default_options=ChatOptions(temperature=0, max_tokens=64))

    async def main():
        response = (await client.prompt("Weather?").acall()).chat_response()
        texts = [t async for t in client.prompt("Weather?").astream().content()]
        weather = await ChatClient(remote, default_options=NO_THINK).prompt("JSON").aentity(Weather)
        return response, texts, weather

    with scripted(allm, THOUGHT + "It is sunny.", THOUGHT + "It is sunny.", '{"city": "Rome", "celsius": 30}'):
        response, texts, weather = asyncio.run(main())
    assert response.content == "It is sunny." and response.reasoning_content
    assert "".join(texts) == "It is sunny."
    assert weather == Weather(city="Rome", celsius=30)


# -- LocalChatModel -----------------------------------------------------------------


def test_local_model_tool_loop_and_memory(llm):
    WEATHER_CALLS.clear()
    memory = InMemoryChatMemory()
    client = ChatClient(LocalChatModel(llm), default_options=NO_THINK, default_tools=[get_weather],
                        default_advisors=[MessageChatMemoryAdvisor(memory)])
    with scripted(llm, CALL_PARIS, "It is sunny in Paris."):
        assert client.prompt("Weather in Paris?").call().content() == "It is sunny in Paris."
    assert WEATHER_CALLS == ["Paris"]
    with scripted(llm, "Still sunny."):
        text = "".join(client.prompt("And now?").stream().content())
    assert text == "Still sunny."
    assert [m["role"] for m in memory.get("default")] == ["user", "assistant", "tool", "assistant", "user",
                                                          "assistant"]


def test_local_model_reasoning_and_options(llm):
    client = ChatClient(LocalChatModel(llm), default_options=ChatOptions(temperature=0, max_tokens=64))
    with scripted(llm, THOUGHT + "It is sunny."):
        response = client.prompt("Weather?").call().chat_response()
        short = client.prompt("Weather?").options(max_tokens=3).call().chat_response()
    assert response.reasoning_content == "The user asks about weather." and response.content == "It is sunny."
    assert short.finish_reason == "length" and short.usage.completion_tokens == 3


def test_local_model_async_over_llm_and_async_llm(llm, allm):
    async def main(model):
        client = ChatClient(model, default_options=NO_THINK)
        called = (await client.prompt("Hi").acall()).content()
        streamed = "".join([t async for t in client.prompt("Hi").astream().content()])
        return called, streamed

    with scripted(llm, "Hello there."):
        assert asyncio.run(main(LocalChatModel(llm))) == ("Hello there.", "Hello there.")
    with scripted(allm, "Hello there."):
        assert asyncio.run(main(LocalChatModel(allm))) == ("Hello there.", "Hello there.")
        # The sync methods also work over an AsyncLLM (on a private loop).
        assert ChatClient(LocalChatModel(allm), default_options=NO_THINK).prompt("Hi").call().content() == \
            "Hello there."
