"""The tool loop as a state machine (qwenkit.client.tool_loop), the four ChatClient shells
and the Agent's over a scripted model that repeats a call, and the one accumulator of
streamed tool-call pieces fed the same fragments by the real `openai` and `dashscope`
SDKs from a loopback server. No engine: each test takes milliseconds."""

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from qwenkit.agent import Agent, AnswerEvent, ToolCallEvent, ToolResultEvent
from qwenkit.client import ChatClient, ChatModel, ChatOptions, ChatResponse, ChatResponseChunk, ToolCall, tool
from qwenkit.client.models import DashScopeChatModel, OpenAIChatModel
from qwenkit.client.tool_loop import ANSWER_REQUEST, CallModel, Finish, RunTools, ToolLoop, is_tool_call_echo
from qwenkit.client.types import ResponseAccumulator, ToolCallAccumulator, ToolCallDelta, ToolLoopEnd, Usage

CITIES = []
ECHO = '{"name": "get_weather", "arguments": {"city": "Paris"}}\n{"response": "23°C and sunny"}'


@tool
def get_weather(city: str) -> str:
    """Current weather of a city."""
    CITIES.append(city)
    return "23°C and sunny"


@pytest.fixture(autouse=True)
def _clear():
    CITIES.clear()


def paris(id="call_1", spacing=" ") -> ToolCall:
    return ToolCall(id, "get_weather", '{"city":%s"Paris"}' % spacing)


def calls(*calls: ToolCall) -> ChatResponse:
    return ChatResponse(None, tool_calls=list(calls), finish_reason="tool_calls", usage=Usage(10, 5))


def result(call: ToolCall, content="23°C and sunny") -> dict:
    return {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": content}


def new_loop(max_rounds=8, options=None) -> ToolLoop:
    return ToolLoop([{"role": "user", "content": "Weather in Paris?"}], options or ChatOptions(), [get_weather],
                    max_rounds=max_rounds)


# -- the machine, step by step --------------------------------------------------------


def test_a_repeated_call_ends_the_loop_with_a_call_without_tools():
    loop = new_loop(options=ChatOptions(temperature=0, tool_choice="required", parallel_tool_calls=True))
    first = loop.start()
    assert isinstance(first, CallModel) and first.tools[0]["function"]["name"] == "get_weather"
    assert first.options.tool_choice == "required"
    run = loop.receive_response(calls(paris("call_1")))
    assert isinstance(run, RunTools) and run.calls == [paris("call_1")]
    again = loop.receive_results([result(paris("call_1"))])
    assert isinstance(again, CallModel) and again.tools is not None and again.messages[-1]["role"] == "tool"
    # The same call, its JSON spaced differently: nothing to run, the answer is asked for.
    last = loop.receive_response(calls(paris("call_2", spacing="")))
    assert isinstance(last, CallModel) and last.tools is None
    assert last.options.tool_choice is None and last.options.parallel_tool_calls is None
    assert last.options.temperature == 0
    assert last.messages[-1] == {"role": "user", "content": ANSWER_REQUEST}
    assert last.messages[:-1] == again.messages  # the repeated call is not in the prompt
    done = loop.receive_response(ChatResponse("It is 23°C and sunny.", usage=Usage(20, 7)))
    assert isinstance(done, Finish)
    response = done.response
    assert response.content == "It is 23°C and sunny."
    assert response.tool_loop.reason == ToolLoopEnd.REPEATED_CALL == "repeated_call"
    assert response.tool_loop.rounds == 1
    assert response.tool_loop.tool_results == (result(paris("call_1")),)
    assert response.tool_loop.repeated_calls == (paris("call_2", spacing=""),)
    assert [m["role"] for m in response.messages] == ["assistant", "tool", "assistant"]  # no request line
    assert response.usage == Usage(40, 17)


def test_an_echo_of_a_call_is_withheld_from_the_answer():
    loop = new_loop()
    loop.start()
    loop.receive_results([result(paris())]) if isinstance(loop.receive_response(calls(paris())), RunTools) else None
    loop.receive_response(calls(paris("call_2")))
    done = loop.receive_response(ChatResponse(ECHO, tool_calls=[paris("call_3")]))
    assert done.response.content is None and done.response.tool_calls == []
    assert done.response.tool_loop.withheld_content == ECHO
    assert done.response.messages[-1] == {"role": "assistant", "content": ""}


def test_answered_and_max_rounds_outcomes():
    loop = new_loop()
    loop.start()
    done = loop.receive_response(ChatResponse("Hello."))
    assert done.response.tool_loop.reason == ToolLoopEnd.ANSWERED and done.response.tool_loop.rounds == 0

    loop = new_loop(max_rounds=2)
    loop.start()
    for i, city in enumerate(["Rome", "Oslo"]):
        call = ToolCall(f"c{i}", "get_weather", json.dumps({"city": city}))
        assert isinstance(loop.receive_response(calls(call)), RunTools)
        loop.receive_results([result(call)])
    last = calls(ToolCall("c9", "get_weather", '{"city": "Lima"}'))
    done = loop.receive_response(last)
    assert isinstance(done, Finish)
    assert done.response.tool_loop.reason == ToolLoopEnd.MAX_ROUNDS and done.response.tool_loop.rounds == 2
    assert done.response.finish_reason == "tool_calls" and done.response.tool_calls == last.tool_calls
    assert len(done.response.tool_loop.tool_results) == 2

    no_tools = ToolLoop([{"role": "user", "content": "Hi"}], ChatOptions(), [], max_rounds=8)
    assert no_tools.start().tools is None
    assert no_tools.receive_response(ChatResponse("Hi.")).response.tool_loop is None


def test_identical_calls_run_once_and_a_repeat_beside_a_new_call_reuses_its_result():
    loop = new_loop()
    loop.start()
    run = loop.receive_response(calls(paris("a"), paris("b", spacing="")))
    assert run.calls == [paris("a")]
    loop.receive_results([result(paris("a"))])
    assert loop.turn[-2:] == [result(paris("a")), result(paris("b", spacing=""))]
    rome = ToolCall("c", "get_weather", '{"city": "Rome"}')
    run = loop.receive_response(calls(paris("d"), rome))
    assert run.calls == [rome]
    loop.receive_results([result(rome, "rain")])
    assert loop.reused == [(paris("d"), result(paris("d")))]
    assert [m["tool_call_id"] for m in loop.turn if m["role"] == "tool"] == ["a", "b", "d", "c"]
    with pytest.raises(ValueError, match="expected 0 tool results, got 1"):
        loop.receive_results([result(rome)])


@pytest.mark.parametrize("text, is_echo", [
    (ECHO, True),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', True),
    ('```json\n{"name": "get_weather", "parameters": {"city": "Paris"}}\n```', True),
    ('<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>', True),
    ("It is sunny in Paris.", False),
    ('Sunny. {"name": "get_weather", "arguments": {}}', False),
    ('{"city": "Paris", "sky": "sunny"}', False),  # an answer in JSON (response_format)
    ('{"name": "Paris", "arguments": 1}', False),  # not a tool's name
    ('{"name": "get_weather", "arguments": {}} and then', False),
    ("", False),
])
def test_is_tool_call_echo(text, is_echo):
    assert is_tool_call_echo(text, {"get_weather"}) is is_echo


# -- ChatClient and Agent over a model that repeats its call ---------------------------


class Repeater(ChatModel):
    """Asks for get_weather(Paris) whenever tools are offered; without tools says `final`.
    Streams split the call into pieces (id and name late) and the text into 3-character
    pieces."""

    def __init__(self, final: str):
        self.final = final
        self.requests = []

    def call(self, messages, options=None, *, tools=None):
        self.requests.append((messages, tools, options))
        if tools:
            return calls(paris(f"call_{len(self.requests)}", spacing=" " * (len(self.requests) % 2)))
        return ChatResponse(self.final, usage=Usage(30, 8))

    def stream(self, messages, options=None, *, tools=None):
        response = self.call(messages, options, tools=tools)
        for call in response.tool_calls:
            args = call.arguments
            yield ChatResponseChunk(tool_calls=[ToolCallDelta(0, None, None, args[:4])])
            yield ChatResponseChunk(tool_calls=[ToolCallDelta(0, call.id, call.name, args[4:9])])
            yield ChatResponseChunk(tool_calls=[ToolCallDelta(0, None, None, args[9:])])
        text = response.content or ""
        for i in range(0, len(text), 3):
            yield ChatResponseChunk(content=text[i:i + 3])
        yield ChatResponseChunk(finish_reason=response.finish_reason, usage=response.usage)


def run_client(mode: str, model: ChatModel):
    """(streamed text or None, the ChatResponse) of one request in `mode`."""
    client = ChatClient(model, default_tools=[get_weather], default_options=ChatOptions(tool_choice="auto"))
    request = client.prompt("Weather in Paris?")
    if mode == "call":
        return None, request.call().chat_response()
    if mode == "acall":
        return None, asyncio.run(request.acall()).chat_response()
    if mode == "stream":
        stream = request.stream()
        return "".join(stream.content()), stream.chat_response()

    async def astream():
        stream = request.astream()
        return "".join([text async for text in stream.content()]), stream.chat_response()

    return asyncio.run(astream())


MODES = ["call", "acall", "stream", "astream"]


@pytest.mark.parametrize("mode", MODES)
def test_chat_client_ends_on_a_repeated_call_with_an_answer(mode):
    model = Repeater("It is 23°C and sunny in Paris.")
    streamed, response = run_client(mode, model)
    assert CITIES == ["Paris"]  # run once
    assert [tools is not None for _, tools, _ in model.requests] == [True, True, False]
    messages, _, options = model.requests[-1]
    assert messages[-1] == {"role": "user", "content": ANSWER_REQUEST} and options.tool_choice is None
    assert response.content == "It is 23°C and sunny in Paris."
    assert streamed in (None, response.content)
    outcome = response.tool_loop
    assert outcome.reason == "repeated_call" and outcome.rounds == 1
    assert [m["content"] for m in outcome.tool_results] == ["23°C and sunny"]
    assert [c.name for c in outcome.repeated_calls] == ["get_weather"] and outcome.withheld_content is None
    assert [m["role"] for m in response.messages] == ["assistant", "tool", "assistant"]


@pytest.mark.parametrize("mode", MODES)
def test_chat_client_never_gives_a_call_echo_as_the_answer(mode):
    streamed, response = run_client(mode, Repeater(ECHO))
    assert CITIES == ["Paris"]
    assert response.content is None and response.tool_loop.withheld_content == ECHO
    assert response.tool_loop.reason == ToolLoopEnd.REPEATED_CALL
    assert streamed in (None, "")  # not one piece of the echo was streamed


AGENT_MODES = ["run", "arun", "stream", "astream"]


def run_agent(mode: str, model: ChatModel):
    agent = Agent(model, tools=[get_weather])
    if mode == "run":
        return agent.run("Weather in Paris?").trace
    if mode == "arun":
        return asyncio.run(agent.arun("Weather in Paris?")).trace
    if mode == "stream":
        return list(agent.stream("Weather in Paris?"))

    async def astream():
        return [event async for event in agent.astream("Weather in Paris?")]

    return asyncio.run(astream())


@pytest.mark.parametrize("mode", AGENT_MODES)
@pytest.mark.parametrize("final", ["It is sunny.", ECHO])
def test_agent_ends_on_a_repeated_call(mode, final):
    model = Repeater(final)
    trace = run_agent(mode, model)
    assert CITIES == ["Paris"]
    assert [type(e) for e in trace] == [ToolCallEvent, ToolResultEvent, AnswerEvent]
    answer = trace[-1]
    assert answer.outcome.reason == ToolLoopEnd.REPEATED_CALL and answer.outcome.rounds == 1
    assert answer.text == ("" if final == ECHO else final)
    assert answer.outcome.withheld_content == (ECHO if final == ECHO else None)
    assert model.requests[-1][1] is None


def test_agent_result_carries_the_outcome():
    result = Agent(Repeater("Sunny."), tools=[get_weather], max_rounds=1).run("Weather?")
    assert result.outcome.reason == "repeated_call" and result.answer == "Sunny."
    assert [m["role"] for m in result.messages] == ["assistant", "tool", "assistant"]


# -- one accumulator for both SDKs' streamed tool-call pieces ------------------------

# (index, id, name, arguments): id and name arrive late, arguments in pieces, two calls
# interleaved by index.
PIECES = [
    (0, None, None, '{"ci'),
    (0, "call_a", "get_weather", 'ty": '),
    (1, "call_b", None, '{"a": 1'),
    (0, None, None, '"Paris"}'),
    (1, None, "add", ', "b": 2}'),
]
EXPECTED = [ToolCall("call_a", "get_weather", '{"city": "Paris"}'), ToolCall("call_b", "add", '{"a": 1, "b": 2}')]


def _openai_events():
    def chunk(delta, finish=None, usage=None):
        return {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", "usage": usage,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if delta is not None else []}

    events = [chunk({"role": "assistant", "content": ""})]
    for index, id, name, arguments in PIECES:  # OpenAI leaves out what a piece does not carry
        piece = {"index": index, "function": {"arguments": arguments}}
        if id:
            piece.update(id=id, type="function")
        if name:
            piece["function"]["name"] = name
        events.append(chunk({"tool_calls": [piece]}))
    events += [chunk({}, "tool_calls"), chunk(None, usage={"prompt_tokens": 3, "completion_tokens": 4,
                                                           "total_tokens": 7})]
    return [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]


def _dashscope_events():
    def event(n, tool_calls, finish="null"):
        body = {"output": {"choices": [{"finish_reason": finish, "message": {
            "role": "assistant", "content": "", "tool_calls": tool_calls}}]}, "request_id": "r"}
        if finish != "null":
            body["usage"] = {"input_tokens": 3, "output_tokens": 4}
        return f"id:{n}\nevent:result\n:HTTP_STATUS/200\ndata:{json.dumps(body)}\n\n"

    # DashScope sends every key, "" where a piece carries nothing.
    return [event(n, [{"index": index, "id": id or "", "type": "function",
                       "function": {"name": name or "", "arguments": arguments}}])
            for n, (index, id, name, arguments) in enumerate(PIECES, 1)] + [event(len(PIECES) + 1, [], "tool_calls")]


class _Stream(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        events = _openai_events() if self.path.endswith("/chat/completions") else _dashscope_events()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for e in events:
            self.wfile.write(e.encode())
            self.wfile.flush()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def stream_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _accumulated(model: ChatModel) -> ChatResponse:
    accumulator = ResponseAccumulator()
    for chunk in model.stream([{"role": "user", "content": "go"}]):
        accumulator.add(chunk)
    return accumulator.response()


def test_both_sdks_streams_add_up_to_the_same_calls(stream_server):
    pytest.importorskip("openai")
    pytest.importorskip("dashscope")
    openai = _accumulated(OpenAIChatModel(f"{stream_server}/v1", "k", "m", max_retries=0))
    dashscope = _accumulated(DashScopeChatModel(f"{stream_server}/api/v1", "k", "m"))
    assert openai.tool_calls == dashscope.tool_calls == EXPECTED
    assert openai.finish_reason == dashscope.finish_reason == "tool_calls"
    assert openai.usage == dashscope.usage == Usage(3, 4)


def test_pieces_without_an_index_follow_their_ids():
    accumulator = ToolCallAccumulator()
    for piece in [ToolCallDelta(None, None, None, '{"x'), ToolCallDelta(None, "c1", "f", '": 1}'),
                  ToolCallDelta(None, "c2", "g", "{"), ToolCallDelta(None, "c2", None, "}")]:
        accumulator.add(piece)
    assert accumulator.calls() == [ToolCall("c1", "f", '{"x": 1}'), ToolCall("c2", "g", "{}")]
    nameless = ToolCallAccumulator()
    nameless.add(ToolCallDelta(0, None, None, "{}"))
    (call,) = nameless.calls()
    assert call.id.startswith("call_") and nameless.calls()[0].id == call.id  # given once
