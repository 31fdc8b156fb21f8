"""One table of sampling fields (qwenkit/sampling_fields.py), every surface held to it.

Each surface (the OpenAI chat and completions requests, the Responses API, DashScope, the
CLI's flags, the client's ChatOptions, the engine's SamplingParams, the web page's inputs)
must offer exactly the table's fields for it, accept every in-range probe value and refuse
every out-of-range one: the same values everywhere.
"""

from __future__ import annotations

import html.parser
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from qwenkit import sampling_fields as sf
from qwenkit.cli import _parser
from qwenkit.client import ChatOptions
from qwenkit.sampling import SamplingParams
from qwenkit.server import dashscope_protocol as ds
from qwenkit.server import openai_protocol as oa
from qwenkit.server import responses_protocol as rp

ALL_NAMES = {name for f in sf.FIELDS for name in f.names.values()}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def _openai(name, value):
    oa.ChatCompletionRequest.model_validate({**CHAT, name: value})


def _completions(name, value):
    oa.CompletionRequest.model_validate({"prompt": "hi", name: value})


def _responses(name, value):
    rp.ResponsesRequest.model_validate({"input": "hi", name: value})


def _dashscope(name, value):
    ds.GenerationRequest.model_validate({"input": {"prompt": "hi"}, "parameters": {name: value}})


def _client(name, value):
    ChatOptions(**{name: value})


def _cli(name, value):
    flag = f"--{name.replace('_', '-')}"
    text = "nan" if isinstance(value, float) and math.isnan(value) else str(value)
    try:
        args = _parser().parse_args(["run", f"{flag}={text}", "x"])
    except SystemExit as e:  # argparse's error line (not a number at all)
        raise ValueError(f"{flag} {text}") from e
    sf.check_arguments(args)  # what `qwenkit` does before running a command


SURFACES = {"openai": _openai, "completions": _completions, "responses": _responses, "dashscope": _dashscope,
            "client": _client, "cli": _cli}
MODELS = {"openai": oa.ChatCompletionRequest, "completions": oa.CompletionRequest, "responses": rp.ResponsesRequest,
          "dashscope": ds.GenerationParameters, "client": ChatOptions}
CASES = [(surface, name, f) for surface in SURFACES for name, f in sf.fields_on(surface)]


def test_every_surface_is_covered():
    assert set(SURFACES) == set(sf.SURFACES)


@pytest.mark.parametrize("surface", list(MODELS))
def test_a_surface_offers_exactly_its_rows(surface):
    offered = set(MODELS[surface].model_fields) & ALL_NAMES
    # max_tokens and max_completion_tokens are one row on chat (OpenAI's old and new names).
    offered -= {"max_completion_tokens"}
    assert offered == set(sf.names_on(surface))


def test_the_cli_offers_exactly_its_rows():
    flags = {a.dest for a in _parser()._subparsers._group_actions[0].choices["run"]._actions}
    assert flags & ALL_NAMES == set(sf.names_on("cli"))


@pytest.mark.parametrize("surface,name,field", CASES, ids=[f"{s}-{n}" for s, n, _ in CASES])
def test_every_surface_takes_the_same_range(surface, name, field):
    accept, refuse = field.probes()
    if surface == "cli" and field.kind == "bool":
        pytest.skip("the CLI has no boolean sampling flags")
    for value in accept:
        SURFACES[surface](name, value)
    for value in refuse:
        if surface == "cli" and value == "x" and field.kind == "bool":
            continue
        with pytest.raises((ValidationError, ValueError)):
            SURFACES[surface](name, value)
            pytest.fail(f"{surface} took {name}={value!r}, outside {field.range_text()}")


@pytest.mark.parametrize("field", [f for f in sf.FIELDS if hasattr(SamplingParams, f.name) and f.kind != "bool"],
                         ids=lambda f: f.name)
def test_the_engine_takes_the_same_range(field):
    accept, refuse = field.probes()
    extra = {"logprobs": True} if field.name == "top_logprobs" else {}
    for value in accept:
        SamplingParams(**{field.name: value}, **({"max_tokens": None} if field.name == "min_tokens" else {}), **extra)
    for value in refuse:
        with pytest.raises(ValueError, match=field.name):
            SamplingParams(**{field.name: value}, **extra)


class _Inputs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.inputs: dict[str, dict[str, str]] = {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "input" and attrs.get("id"):
            self.inputs[attrs["id"]] = attrs


def test_the_web_page_inputs_stay_in_range():
    page = _Inputs()
    page.feed((Path(sf.__file__).parent / "server/web/static/index.html").read_text())
    checked = 0
    for name, f in sf.BY_NAME.items():
        attrs = page.inputs.get(name)
        if attrs is None:
            continue
        for bound in ("min", "max"):
            if bound in attrs:
                assert f.in_range(float(attrs[bound])), f"the page's {name} {bound}={attrs[bound]}"
                checked += 1
        if "max" not in attrs and f.le is not None and f.le < sf.MAX_INT32:
            pytest.fail(f"the page's {name} has no max; the table's is {f.le}")
    assert checked >= 4


def test_a_new_row_reaches_every_surface():
    """Adding a parameter is a row in the table: the protocols, the CLI and the client take
    it, with its range, without another edit (checked in a fresh interpreter)."""
    script = """
import json
from qwenkit import sampling_fields as sf
row = sf.SamplingField("foo_level", "float", "a new knob", ge=0, le=3, names=sf._everywhere("foo_level"))
sf.FIELDS = (*sf.FIELDS, row)
sf.BY_NAME = {**sf.BY_NAME, "foo_level": row}
from qwenkit.cli import _parser
from qwenkit.client import ChatOptions
from qwenkit.server import dashscope_protocol as ds, openai_protocol as oa, responses_protocol as rp
out = {
    "openai": oa.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                                       "foo_level": 2}).foo_level,
    "responses": rp.ResponsesRequest.model_validate({"input": "x", "foo_level": 2}).foo_level,
    "dashscope": ds.GenerationParameters.model_validate({"foo_level": 2}).foo_level,
    "client": ChatOptions(foo_level=2).foo_level,
    "cli": _parser().parse_args(["run", "--foo-level", "2", "x"]).foo_level,
}
try:
    oa.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "foo_level": 4})
    out["refused"] = False
except Exception:
    out["refused"] = True
print(json.dumps(out))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {"openai": 2, "responses": 2, "dashscope": 2, "client": 2, "cli": 2, "refused": True}
