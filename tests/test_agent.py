"""DashScopeChatModel against a real `qwenkit serve`, PromptChatMemoryAdvisor, and the
qwenkit.agent loop on the tiny model, its words forced by `scripted` (as in test_client.py)."""

import asyncio
import json
from dataclasses import replace

import pytest
from tiny import scripted

pytest.importorskip("dashscope")

from qwenkit.agent import (  # noqa: E402
    Agent, AgentResult, AnswerEvent, ThinkingEvent, ToolCallEvent, ToolResultEvent,
)
from qwenkit.client import (  # noqa: E402
    ChatClient, ChatModel, ChatOptions, ChatResponse, InMemoryChatMemory, LocalChatModel, Tool, tool,
)
from qwenkit.client.advisors import PromptChatMemoryAdvisor  # noqa: E402
from qwenkit.client.models import DashScopeChatModel, DashScopeError  # noqa: E402
from qwenkit.client.types import ToolLoopEnd  # noqa: E402
from qwenkit.server import ServerConfig  # noqa: E402

KEY = "sk-test-key"
MODEL = "tiny-qwen3"
THOUGHT = "<think>\nThe user asks about weather.\n</think>\n\n"
CALL_PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
OPTIONS = ChatOptions(temperature=0, max_tokens=300)
NO_THINK = OPTIONS.merged(ChatOptions(enable_thinking=False))

# The two-step agent script: think + call tool A, think + call tool B, answer.
STEP_A = "<think>\nFirst the weather.\n</think>\n\n" + CALL_PARIS
STEP_B = ("<think>\nNow convert 21 C.\n</think>\n\n"
          '<tool_call>\n{"name": "to_fahrenheit", "arguments": {"celsius": 21}}\n</tool_call>')
ANSWER = "<think>\nDone.\n</think>\n\nIt is sunny in Paris, 69.8 F."


@pytest.fixture(scope="module")
def server_config():
    return ServerConfig(served_model_names=[MODEL], api_key=KEY)


@pytest.fixture(scope="module")
def dashscope_model(server):
    return DashScopeChatModel(f"{server}/api/v1", KEY, MODEL)


CALLS = []


@tool
def get_weather(city: str) -> dict:
    """Current weather of a city."""
    CALLS.append(("get_weather", city))
    if city == "Nowhere":
        raise LookupError(f"no such city: {city}")
    return {"city": city, "sky": "sunny", "celsius": 21}


@tool
def to_fahrenheit(celsius: float) -> float:
    """Degrees Celsius in Fahrenheit."""
    CALLS.append(("to_fahrenheit", celsius))
    return round(celsius * 9 / 5 + 32, 1)


# -- DashScopeChatModel over qwenkit serve ---------------------------------------------


def test_dashscope_call_reasoning_and_usage(dashscope_model, allm):
    with scripted(allm, THOUGHT + "It is sunny."):
        response = dashscope_model.call([{"role": "user", "content": "Weather?"}], OPTIONS)
    assert response.content == "It is sunny." and response.reasoning_content == "The user asks about weather."
    assert response.finish_reason == "stop" and response.tool_calls == []
    assert 0 < response.usage.reasoning_tokens < response.usage.completion_tokens
    assert response.usage.prompt_tokens > 0


def test_dashscope_stream_is_incremental(dashscope_model, allm):
    with scripted(allm, THOUGHT + "It is sunny."):
        chunks = list(dashscope_model.stream([{"role": "user", "content": "Weather?"}], OPTIONS))
    assert "".join(c.content for c in chunks) == "It is sunny."
    assert "".join(c.reasoning_content for c in chunks) == "The user asks about weather."
    assert len(chunks) > 2 and chunks[-1].finish_reason == "stop"
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].usage.completion_tokens > 0


def test_dashscope_tool_loop_in_chat_client_call_and_stream(dashscope_model, allm):
    CALLS.clear()
    client = ChatClient(dashscope_model, default_options=NO_THINK, default_tools=[get_weather])
    with scripted(allm, CALL_PARIS, "It is sunny in Paris."):
        response = client.prompt("Weather in Paris?").call().chat_response()
    assert response.content == "It is sunny in Paris."
    assert [m["role"] for m in response.messages] == ["assistant", "tool", "assistant"]
    assert response.messages[0]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                                 "arguments": '{"city": "Paris"}'}
    assert response.messages[1]["tool_call_id"] == response.messages[0]["tool_calls"][0]["id"]
    with scripted(allm, CALL_PARIS, "Still sunny."):
        stream = client.prompt("Weather in Paris?").stream()
        assert "".join(stream.content()) == "Still sunny."
    assert CALLS == [("get_weather", "Paris")] * 2
    assert json.loads(stream.chat_response().messages[1]["content"])["sky"] == "sunny"


def test_dashscope_async_and_errors(dashscope_model, allm, server):
    async def main():
        called = await dashscope_model.acall([{"role": "user", "content": "Hi"}], NO_THINK)
        streamed = [c.content async for c in dashscope_model.astream([{"role": "user", "content": "Hi"}], NO_THINK)]
        return called.content, "".join(streamed)

    with scripted(allm, "Hello there."):
        assert asyncio.run(main()) == ("Hello there.", "Hello there.")
    with pytest.raises(DashScopeError) as error:
        DashScopeChatModel(f"{server}/api/v1", "sk-wrong", MODEL).call([{"role": "user", "content": "Hi"}])
    assert error.value.status_code == 401


# -- PromptChatMemoryAdvisor ----------------------------------------------------------


class Recorder(ChatModel):
    """Answers "Reply N." and records the messages it was sent."""

    def __init__(self):
        self.seen = []

    def call(self, messages, options=None, *, tools=None):
        self.seen.append(messages)
        return ChatResponse(content=f"Reply {len(self.seen)}.", reasoning_content="hidden thought")


def test_prompt_memory_advisor_puts_history_in_the_system_text():
    model, memory = Recorder(), InMemoryChatMemory()
    client = ChatClient(model, default_system="Be brief.", default_advisors=[PromptChatMemoryAdvisor(memory)])
    client.prompt("My name is Ann.").call().content()
    assert model.seen[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "My name is Ann."}]
    client.prompt("What is my name?").call().content()
    system, user = model.seen[1]
    assert user == {"role": "user", "content": "What is my name?"}  # the history is not sent as messages
    assert system["role"] == "system" and system["content"].startswith("Be brief.\n\n")
    assert "MEMORY:\nuser: My name is Ann.\nassistant: Reply 1.\n" in system["content"]
    assert "hidden thought" not in system["content"]
    # The turns are stored as MessageChatMemoryAdvisor stores them, reasoning kept.
    stored = memory.get("default")
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[1]["reasoning_content"] == "hidden thought"
    # Another conversation has no memory yet.
    client.prompt("Hi").advisors(conversation_id="other").call().content()
    assert model.seen[2][0] == {"role": "system", "content": "Be brief."}


def test_prompt_memory_advisor_on_the_local_model(llm):
    memory = InMemoryChatMemory()
    client = ChatClient(LocalChatModel(llm), default_options=NO_THINK,
                        default_advisors=[PromptChatMemoryAdvisor(memory)])
    with scripted(llm, "Hello Ann.", "Your name is Ann."):
        assert client.prompt("I am Ann.").call().content() == "Hello Ann."
        assert "".join(client.prompt("Who am I?").stream().content()) == "Your name is Ann."
    assert [m["content"] for m in memory.get("default")] == ["I am Ann.", "Hello Ann.", "Who am I?",
                                                             "Your name is Ann."]


# -- Agent ----------------------------------------------------------------------------


def _without_ids(trace):
    """The events without call ids (random) and without the answer's loop outcome (checked apart)."""
    return [replace(e, id="") if isinstance(e, (ToolCallEvent, ToolResultEvent))
            else replace(e, outcome=None) if isinstance(e, AnswerEvent) else e for e in trace]


EXPECTED = [
    ThinkingEvent("First the weather."),
    ToolCallEvent("", "get_weather", '{"city": "Paris"}'),
    ToolResultEvent("", "get_weather", '{"city": "Paris", "sky": "sunny", "celsius": 21}', False),
    ThinkingEvent("Now convert 21 C."),
    ToolCallEvent("", "to_fahrenheit", '{"celsius": 21}'),
    ToolResultEvent("", "to_fahrenheit", "69.8", False),
    ThinkingEvent("Done."),
    AnswerEvent("It is sunny in Paris, 69.8 F.", "stop"),
]


def test_agent_two_tool_steps_on_the_local_model(llm):
    CALLS.clear()
    agent = Agent(LocalChatModel(llm), tools=[get_weather, to_fahrenheit], system="Use the tools.", options=OPTIONS)
    with scripted(llm, STEP_A, STEP_B, ANSWER):
        result = agent.run("Weather in Paris, in Fahrenheit?")
    assert isinstance(result, AgentResult)
    assert result.answer == "It is sunny in Paris, 69.8 F." and result.finish_reason == "stop"
    assert _without_ids(result.trace) == EXPECTED
    assert CALLS == [("get_weather", "Paris"), ("to_fahrenheit", 21.0)]
    # Each result answers its call.
    calls = [e for e in result.trace if isinstance(e, ToolCallEvent)]
    results = [e for e in result.trace if isinstance(e, ToolResultEvent)]
    assert [c.id for c in calls] == [r.id for r in results] and all(calls[i].id for i in range(2))
    assert [m["role"] for m in result.messages] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert result.usage.completion_tokens > 0
    assert result.outcome == result.trace[-1].outcome
    assert result.outcome.reason == ToolLoopEnd.ANSWERED and result.outcome.rounds == 2
    assert [m["content"] for m in result.outcome.tool_results] == [EXPECTED[2].content, "69.8"]

    with scripted(llm, STEP_A, STEP_B, ANSWER):
        streamed = list(agent.stream("Weather in Paris, in Fahrenheit?"))
    assert _without_ids(streamed) == _without_ids(result.trace)
    assert [e.type for e in streamed] == ["thinking", "tool_call", "tool_result"] * 2 + ["thinking", "answer"]


def test_agent_async_over_dashscope_with_a_coroutine_tool(dashscope_model, allm):
    CALLS.clear()

    async def to_fahrenheit_async(celsius: float) -> float:
        """Convert Celsius to Fahrenheit."""
        await asyncio.sleep(0)
        return to_fahrenheit(celsius)

    agent = Agent(dashscope_model, tools=[get_weather, Tool(to_fahrenheit_async, name="to_fahrenheit")],
                  system="Use the tools.", options=OPTIONS)

    async def main():
        with scripted(allm, STEP_A, STEP_B, ANSWER):
            result = await agent.arun("Weather in Paris, in Fahrenheit?")
        with scripted(allm, STEP_A, STEP_B, ANSWER):
            streamed = [event async for event in agent.astream("Weather in Paris, in Fahrenheit?")]
        return result, streamed

    result, streamed = asyncio.run(main())
    assert _without_ids(result.trace) == EXPECTED == _without_ids(streamed)
    assert CALLS == [("get_weather", "Paris"), ("to_fahrenheit", 21.0)] * 2
    assert [m["role"] for m in result.messages] == ["assistant", "tool", "assistant", "tool", "assistant"]


def test_agent_over_dashscope_returns_tool_errors_to_the_model(dashscope_model, allm):
    CALLS.clear()
    agent = Agent(dashscope_model, tools=[get_weather], options=OPTIONS)
    nowhere = CALL_PARIS.replace("Paris", "Nowhere")
    with scripted(allm, "<think>\nTry it.\n</think>\n\n" + nowhere, "Nowhere is unknown."):
        result = agent.run("Weather in Nowhere?")
    assert _without_ids(result.trace) == [
        ThinkingEvent("Try it."),
        ToolCallEvent("", "get_weather", '{"city": "Nowhere"}'),
        ToolResultEvent("", "get_weather", "Error: LookupError: no such city: Nowhere", True),
        AnswerEvent("Nowhere is unknown.", "stop"),
    ]
    assert result.messages[1]["content"] == "Error: LookupError: no such city: Nowhere"


def test_agent_rounds_are_bounded(llm):
    CALLS.clear()
    agent = Agent(LocalChatModel(llm), tools=[get_weather], options=NO_THINK, max_rounds=2)
    with scripted(llm, CALL_PARIS, CALL_PARIS.replace("Paris", "Rome"), CALL_PARIS.replace("Paris", "Oslo")):
        result = agent.run("Weather?")  # a new call every time
    assert CALLS == [("get_weather", "Paris"), ("get_weather", "Rome")]
    assert result.finish_reason == "tool_calls" and _without_ids(result.trace)[-1] == AnswerEvent("", "tool_calls")
    assert result.outcome.reason == ToolLoopEnd.MAX_ROUNDS and result.outcome.rounds == 2
    assert [e.type for e in result.trace] == ["tool_call", "tool_result"] * 2 + ["answer"]


def test_agent_ends_on_a_repeated_call_on_the_local_model(llm):
    """The model asks again for the call it made: the tool is not run twice; it is asked
    once more without tools and answers (scripted here; tests/test_tool_loop.py has the
    four shells over a fake model, tests/test_clients_default_model.py the real model)."""
    CALLS.clear()
    agent = Agent(LocalChatModel(llm), tools=[get_weather], options=NO_THINK)
    with scripted(llm, CALL_PARIS, CALL_PARIS, "Sunny in Paris."):
        result = agent.run("Weather in Paris?")
    assert CALLS == [("get_weather", "Paris")]
    assert result.answer == "Sunny in Paris." and result.outcome.reason == ToolLoopEnd.REPEATED_CALL
    assert [e.type for e in result.trace] == ["tool_call", "tool_result", "answer"]


def test_agent_unknown_tool_and_options():
    class Asks(ChatModel):
        def __init__(self):
            self.rounds = 0

        def stream(self, messages, options=None, *, tools=None):
            from qwenkit.client.types import ChatResponseChunk, ToolCallDelta

            self.rounds += 1
            if self.rounds == 1:
                yield ChatResponseChunk(tool_calls=[ToolCallDelta(0, "c1", "missing", "{}")],
                                        finish_reason="tool_calls")
            else:
                assert messages[-1] == {"role": "tool", "tool_call_id": "c1", "name": "missing",
                                        "content": "Error: no tool named 'missing'"}
                yield ChatResponseChunk(content="ok", finish_reason="stop")

    result = Agent(Asks(), tools=[get_weather]).run("go")  # an unknown name among known tools
    assert result.trace[1] == ToolResultEvent("c1", "missing", "Error: no tool named 'missing'", True)
    assert result.answer == "ok"



def test_agent_takes_tools_from_mcp_servers():
    import sys
    from pathlib import Path

    server = str(Path(__file__).with_name("mcp_echo_server.py"))
    config = {"mcpServers": {"echo": {"command": sys.executable, "args": [server]}}}

    class CallsAdd:
        def __init__(self):
            self.rounds = 0

        def stream(self, messages, options=None, *, tools=None):
            from qwenkit.client.types import ChatResponseChunk, ToolCallDelta

            self.rounds += 1
            assert {t["function"]["name"] for t in tools} >= {"add", "echo"}
            if self.rounds == 1:
                yield ChatResponseChunk(tool_calls=[ToolCallDelta(0, "c1", "add", '{"a": 19, "b": 23}')],
                                        finish_reason="tool_calls")
            else:
                yield ChatResponseChunk(content=f"The sum is {messages[-1]['content']}.", finish_reason="stop")

    with Agent(CallsAdd(), mcp_servers=config) as agent:
        result = agent.run("add 19 and 23")
    assert result.trace[1] == ToolResultEvent("c1", "add", "42", False)
    assert result.answer == "The sum is 42."
