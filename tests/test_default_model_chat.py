"""End to end on the embedded default model (Qwen2.5-Coder-0.5B-Instruct): batched
generation, a tool call parsed from the model's own output, and a JSON-schema answer."""

import json

import jsonschema
import pytest

from qwenkit import LLM, SamplingParams

pytestmark = pytest.mark.slow

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city name"}},
            "required": ["city"],
        },
    },
}]


@pytest.fixture(scope="module")
def llm(default_gguf):
    return LLM(str(default_gguf), progress=False)


def test_tool_call_from_the_model(llm):
    # With tool_choice "auto" this 0.5B model writes the call's JSON without the
    # <tool_call> tags, and with parallel calls allowed it repeats the call until
    # max_tokens; "required" with one call holds it to Qwen's format.
    out = llm.chat([{"role": "user", "content": "What's the weather like in Paris right now?"}],
                   SamplingParams(temperature=0, max_tokens=80), tools=TOOLS, tool_choice="required",
                   parallel_tool_calls=False)
    assert out.finish_reason == "tool_calls", out
    assert out.tool_calls[0].name == "get_weather"
    assert "paris" in json.loads(out.tool_calls[0].arguments)["city"].lower()


def test_json_schema_answer(llm):
    schema = {
        "type": "object",
        "properties": {"language": {"type": "string"}, "year": {"type": "integer"}},
        "required": ["language", "year"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "lang", "schema": schema}}
    out = llm.chat([{"role": "user", "content": "Which programming language did Guido van Rossum create, and when?"}],
                   SamplingParams(temperature=0, max_tokens=60), response_format=fmt)
    data = json.loads(out.content)
    jsonschema.validate(data, schema)
    assert data["language"].lower().startswith("python")


def test_batch_of_chats_matches_one_by_one(llm):
    """Greedy tokens of a batch equal those of each prompt alone, up to near-ties. The
    quantized kernels round activations to int8 and sum in an order set by the number of rows
    (a prompt prefilled alone after a prefix-cache hit takes other paths than the whole batch),
    so the logits differ in their last digits (~0.01-0.2): where the two runs part, the two
    likeliest tokens must have been that close, in both runs."""
    questions = ["What is 2 + 2?", "Name a prime number.", "Say hello in French.", "What is HTTP?"]
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in questions]
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=True, top_logprobs=2)
    batched = [o.outputs[0] for o in llm.generate(prompts, params)]
    alone = [llm.generate(p, params)[0].outputs[0] for p in prompts]
    for b, a in zip(batched, alone):
        if b.token_ids == a.token_ids:
            continue
        i = next(i for i, (x, y) in enumerate(zip(b.token_ids, a.token_ids)) if x != y)
        assert b.token_ids[:i] == a.token_ids[:i]
        for run in (b, a):
            (_, first), (_, second) = run.logprobs[i].top_logprobs[:2]
            assert first - second < 0.25, (i, run.logprobs[i])
