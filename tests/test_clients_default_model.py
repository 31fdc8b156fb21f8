"""Real clients against a real `qwenkit serve` of the default model (Qwen2.5-Coder-0.5B,
Q4_K_M) on loopback: LangChain's `ChatOpenAI`, the OpenAI Agents SDK (Chat Completions
and Responses), Qwen-Agent's `Assistant`, and the `openai` / `dashscope` SDKs with
`tool_choice: "required"`. Each runs a get-the-weather round trip with the client's own
tool plumbing and `tool_choice` left at its default.

What the 0.5B model does, measured (greedy): it writes the first call as a bare JSON
object or a ```json fence (the server's text-call parsing makes it a tool call), and
after the tool's result it calls the tool again rather than answer (`{"` at logprob
-0.01 after `</tool_response>`). So a round trip here is: call -> the client runs the
tool -> the result goes back -> the server answers it; the agent tests cap their loops
(max_turns / LLM calls) and accept either a final answer or another well-formed call.
"""

import asyncio
import json

import pytest
from serving import running_server

from qwenkit import AsyncLLM
from qwenkit.server import ServerConfig

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow
QUESTION = "What is the weather in Paris?"
MAX_TOKENS = 48
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]


class Weather:
    """The tool every client runs; records the cities it was asked about."""

    def __init__(self):
        self.cities: list[str] = []

    def __call__(self, city: str) -> str:
        self.cities.append(city)
        return f"The weather in {city} is sunny, 22 degrees Celsius."


@pytest.fixture(scope="module")
def server(default_gguf, tmp_path_factory):
    engine = AsyncLLM(str(default_gguf), progress=False)
    db = tmp_path_factory.mktemp("responses") / "responses.sqlite3"
    with running_server(engine, ServerConfig(web=False, responses_db=str(db))) as url:
        yield url
    engine.shutdown()


def _is_weather_call(name: str, arguments: str | dict) -> bool:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    return name == "get_weather" and isinstance(args.get("city"), str)


# -- the openai and dashscope SDKs: tool_choice "required" --------------------------


@pytest.mark.parametrize("parallel", [True, False])
def test_required_returns_the_calls_and_stops(server, parallel):
    """It used to write the same call until max_tokens (finish "length")."""
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.create(model="default", messages=[{"role": "user", "content": QUESTION}],
                                           tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel,
                                           temperature=0, max_tokens=200)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris"})]
    assert choice.message.content is None
    assert reply.usage.completion_tokens < 40


def test_required_stops_on_dashscope(server, monkeypatch):
    dashscope = pytest.importorskip("dashscope")
    monkeypatch.setattr(dashscope, "base_http_api_url", f"{server}/api/v1")
    response = dashscope.Generation.call(model="default", messages=[{"role": "user", "content": QUESTION}],
                                         tools=TOOLS, tool_choice="required", result_format="message",
                                         temperature=0, max_tokens=200, api_key="none")
    assert response.status_code == 200, response
    choice = response.output.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [c["function"]["name"] for c in choice.message.tool_calls] == ["get_weather"]


def test_auto_gets_a_tool_call_from_the_default_model(server):
    """The model writes the call as JSON text; with tools offered it is a tool call."""
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.create(model="default", messages=[{"role": "user", "content": QUESTION}],
                                           tools=TOOLS, temperature=0, max_tokens=MAX_TOKENS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris"})]


# -- LangChain -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(base_url=f"{server}/v1", api_key="none", model="default", temperature=0,
                                       max_tokens=MAX_TOKENS, max_retries=0)


def test_langchain_invoke_and_stream(chat_model):
    question = "What is the capital of France? Answer in one word."
    answer = chat_model.invoke(question)
    assert "Paris" in answer.content
    assert answer.usage_metadata["input_tokens"] > 10
    assert "".join(chunk.content for chunk in chat_model.stream(question)) == answer.content


def test_langchain_bind_tools_round_trip(chat_model):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    weather = Weather()

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return weather(city)

    model = chat_model.bind_tools([get_weather])
    messages = [HumanMessage(QUESTION)]
    first = model.invoke(messages)
    assert [(c["name"], c["args"]) for c in first.tool_calls] == [("get_weather", {"city": "Paris"})]
    messages += [first, *(ToolMessage(get_weather.invoke(c["args"]), tool_call_id=c["id"]) for c in first.tool_calls)]
    second = model.invoke(messages)  # the call's arguments go back as a JSON string
    assert weather.cities == ["Paris"]
    assert second.response_metadata["finish_reason"] in ("stop", "tool_calls", "length")
    assert second.content or second.tool_calls
    assert all(_is_weather_call(c["name"], c["args"]) for c in second.tool_calls)
    assert not second.invalid_tool_calls


def test_langchain_with_structured_output(chat_model):
    from pydantic import BaseModel

    class Capital(BaseModel):
        city: str
        country: str

    answer = chat_model.with_structured_output(Capital).invoke("What is the capital of France?")
    assert isinstance(answer, Capital)
    assert "Paris" in answer.city


# -- the OpenAI Agents SDK -----------------------------------------------------------


@pytest.mark.parametrize("api, streamed", [("chat_completions", False), ("responses", False), ("responses", True)])
def test_agents_sdk_function_tool(server, api, streamed):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    weather = Weather()

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return weather(city)

    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    model_class = agents.OpenAIChatCompletionsModel if api == "chat_completions" else agents.OpenAIResponsesModel
    agent = agents.Agent(name="weather", instructions="Answer questions about the weather.", tools=[get_weather],
                         model=model_class(model="default", openai_client=client),
                         model_settings=agents.ModelSettings(temperature=0, max_tokens=MAX_TOKENS))

    async def run():
        if not streamed:
            return await agents.Runner.run(agent, QUESTION, max_turns=2)
        result = agents.Runner.run_streamed(agent, QUESTION, max_turns=2)
        async for _ in result.stream_events():
            pass
        return result

    try:
        result = asyncio.run(run())
        responses, final = result.raw_responses, result.final_output
    except agents.MaxTurnsExceeded as e:  # the 0.5B model called the tool again after its result
        responses, final = e.run_data.raw_responses, None
    assert weather.cities[0] == "Paris"
    assert len(responses) == 2  # the model was asked again, with the tool's output
    calls = [item for item in responses[0].output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    second = [item for item in responses[1].output if item.type == "function_call"]
    assert final or second
    assert all(_is_weather_call(c.name, c.arguments) for c in second)


# -- Qwen-Agent ----------------------------------------------------------------------


def test_qwen_agent_assistant_function_tool(server, monkeypatch):
    """Qwen-Agent's default puts the tools in its own system prompt and looks for
    <tool_call> tags in the text, which the 0.5B model never writes (it answers with bare
    JSON, and the server, offered no tools, keeps that as text). `use_raw_api` sends the
    tools to the server, which parses the call, as with vLLM."""
    pytest.importorskip("qwen_agent")
    from qwen_agent.agents import Assistant, fncall_agent
    from qwen_agent.tools.base import BaseTool, register_tool

    weather = Weather()
    monkeypatch.setattr(fncall_agent, "MAX_LLM_CALL_PER_RUN", 2)  # the call, then the answer to its result

    @register_tool("get_weather", allow_overwrite=True)
    class GetWeather(BaseTool):
        description = "Get the current weather in a city."
        parameters = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

        def call(self, params, **kwargs):
            return weather(json.loads(params)["city"])

    bot = Assistant(llm={"model": "default", "model_server": f"{server}/v1", "api_key": "none",
                         "generate_cfg": {"use_raw_api": True, "temperature": 0, "max_tokens": MAX_TOKENS}},
                    function_list=["get_weather"])
    *_, messages = bot.run([{"role": "user", "content": QUESTION}])
    roles = [m["role"] for m in messages]
    assert roles[:2] == ["assistant", "function"] and "assistant" in roles[2:]
    call = messages[0]["function_call"]
    assert (call["name"], json.loads(call["arguments"])) == ("get_weather", {"city": "Paris"})
    assert weather.cities[0] == "Paris"
    assert messages[1]["content"] == "The weather in Paris is sunny, 22 degrees Celsius."
    assert all(_is_weather_call(m["function_call"]["name"], m["function_call"]["arguments"])
               for m in messages[2:] if m.get("function_call"))


# -- qwenkit's own ChatClient and Agent ------------------------------------------------


def test_chat_client_and_agent_end_a_repeated_call_with_an_answer(server):
    """The 0.5B model calls the tool again after its result (above). qwenkit's loops end that
    on purpose: the tool runs once, the outcome says the loop ended on the repeated call (or
    that the model answered), and the last answer, asked for without tools, is never the
    call echoed as text (it used to be `{"name": "get_weather", ...}\\n{"response": ...}`)."""
    from qwenkit.agent import Agent
    from qwenkit.client import ChatClient, ChatOptions, OpenAIChatModel
    from qwenkit.client.tool_loop import is_tool_call_echo

    weather = Weather()

    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return weather(city)

    model = OpenAIChatModel(f"{server}/v1", "none", "default", max_retries=0)
    options = ChatOptions(temperature=0, max_tokens=MAX_TOKENS)
    client = ChatClient(model, default_tools=[get_weather], default_options=options)
    response = client.prompt(QUESTION).call().chat_response()
    result = Agent(model, tools=[get_weather], options=options).run(QUESTION)  # streamed
    assert weather.cities == ["Paris", "Paris"]  # once each
    for outcome, answer in [(response.tool_loop, response.content), (result.outcome, result.answer)]:
        print(outcome.reason, repr(answer), repr(outcome.withheld_content))
        assert outcome.reason in ("repeated_call", "answered") and outcome.rounds == 1
        assert [m["content"] for m in outcome.tool_results] == ["The weather in Paris is sunny, 22 degrees Celsius."]
        assert not is_tool_call_echo(answer, {"get_weather"}) and "get_weather" not in (answer or "")
        assert "sunny" in answer  # measured: "The weather in Paris is sunny, 22 degrees Celsius."
