"""The sampling vocabulary, declared once: every field's type, range and name on each surface.

Seven surfaces take sampling values (OpenAI chat and completions, the Responses API,
DashScope, the CLI, `qwenkit.client.ChatOptions`, the web page's conversation store),
and when each spelled its own ranges they drifted (DashScope's temperature had no upper
bound, the Responses API let NaN through). Here a field is one row; the protocols'
request models, the CLI flags and the client's options are built from the rows
(`pydantic_fields`, `add_arguments`), and tests/test_sampling_fields.py holds every
surface to the same ranges. Adding a parameter is one row here plus its use in
`SamplingParams` / the sampler.

No torch, no pydantic at import: the client imports this without the engine.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_INT32 = 2**31 - 1
MAX_N = 16  # completions per request
MAX_TOP_LOGPROBS = 20  # as OpenAI allows
MAX_LOGIT_BIAS = 100.0
MAX_PENALTY = 2.0  # presence_penalty / frequency_penalty range, as OpenAI allows
MAX_TEMPERATURE = 2.0  # OpenAI's and DashScope's range

SURFACES = ("openai", "completions", "responses", "dashscope", "cli", "client")


@dataclass(frozen=True)
class SamplingField:
    """One sampling field. `kind`: "float", "int" (JSON integers: 2.0 is one, true is
    not) or "bool". Bounds are inclusive (`ge`, `le`) or exclusive (`gt`); floats are
    always finite. `names`: surface -> the field's name there (absent: not offered).
    `default`: for a field a model's generation_config.json (or a chat mode's recommended
    values) may set, its neutral value, taken when none of those does; None for the rest."""

    name: str
    kind: str
    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    names: Mapping[str, str] = field(default_factory=dict)
    default: float | None = None

    def check(self, value: Any) -> Any:
        """`value` if it is in this field's type and range, else ValueError naming the field."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{self.name} must be true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{self.name} must be a number, got {value!r}")
        integral = math.isfinite(value) and value == int(value)
        if not math.isfinite(value) or (self.kind == "int" and not integral) or not self.in_range(value):
            raise ValueError(f"{self.name} must be {self.range_text()}, got {value!r}")
        return int(value) if self.kind == "int" else value

    def in_range(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le))

    def range_text(self) -> str:
        if self.kind == "bool":
            return "true or false"
        what = "an integer" if self.kind == "int" else "a finite number"
        low = f">= {_num(self.ge)}" if self.ge is not None else f"> {_num(self.gt)}" if self.gt is not None else None
        high = f"<= {_num(self.le)}" if self.le is not None else None
        bounds = " and ".join(b for b in (low, high) if b)
        return f"{what} {bounds}" if bounds else what

    def probes(self) -> tuple[list[Any], list[Any]]:
        """(values every surface must accept, values every surface must refuse)."""
        if self.kind == "bool":
            return [True, False], ["yes", 1]
        accept = [b for b in (self.ge, self.le) if b is not None]
        if self.gt is not None:
            accept.append(self.gt + 1 if self.le is None else (self.gt + self.le) / 2)
        refuse: list[Any] = ["x"]
        refuse += [b for b in (self.gt,) if b is not None]
        refuse += [self.ge - 1] if self.ge is not None else []
        refuse += [self.le + 1] if self.le is not None else []
        if self.kind == "int":
            accept = [int(v) for v in accept]
            refuse.append(next((v + 0.5 for v in accept if abs(v) < 2**52), 0.5))
        else:
            refuse += [math.nan, math.inf]
        return accept, refuse


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _everywhere(name: str, *, but: Iterable[str] = (), **renamed: str) -> dict[str, str]:
    return {s: renamed.get(s, name) for s in SURFACES if s not in set(but)}


FIELDS: tuple[SamplingField, ...] = (
    SamplingField("temperature", "float", "0 for greedy; default from the model or Qwen3's per-mode values",
                  ge=0, le=MAX_TEMPERATURE, names=_everywhere("temperature"), default=1.0),
    SamplingField("top_p", "float", "nucleus sampling mass", gt=0, le=1, names=_everywhere("top_p"), default=1.0),
    SamplingField("top_k", "int", "keep the k likeliest tokens (0 or -1: all)", ge=-1, le=MAX_INT32,
                  names=_everywhere("top_k"), default=0),
    SamplingField("min_p", "float", "drop tokens below min_p times the likeliest's probability", ge=0, le=1,
                  names=_everywhere("min_p", but=("dashscope",)), default=0.0),
    SamplingField("repetition_penalty", "float", "Hugging Face's repetition penalty (1: off)", gt=0,
                  names=_everywhere("repetition_penalty"), default=1.0),
    SamplingField("presence_penalty", "float", "OpenAI's presence penalty", ge=-MAX_PENALTY, le=MAX_PENALTY,
                  names=_everywhere("presence_penalty", but=("responses",)), default=0.0),
    SamplingField("frequency_penalty", "float", "OpenAI's frequency penalty", ge=-MAX_PENALTY, le=MAX_PENALTY,
                  names=_everywhere("frequency_penalty", but=("dashscope", "responses")), default=0.0),
    SamplingField("seed", "int", "makes sampling reproducible", ge=-(2**63), le=2**63 - 1,
                  names=_everywhere("seed")),
    SamplingField("max_tokens", "int", "most tokens to generate", ge=1, le=MAX_INT32,
                  names=_everywhere("max_tokens", responses="max_output_tokens")),
    SamplingField("min_tokens", "int", "tokens generated before an end of turn may be sampled", ge=0,
                  le=MAX_INT32, names=_everywhere("min_tokens", but=("dashscope", "responses", "cli", "client"))),
    SamplingField("n", "int", "completions per request", ge=1, le=MAX_N,
                  names=_everywhere("n", but=("responses", "cli", "client"))),
    SamplingField("top_logprobs", "int", "likeliest tokens reported with their logprobs", ge=0,
                  le=MAX_TOP_LOGPROBS, names=_everywhere("top_logprobs", but=("completions", "responses", "cli", "client"))),
    SamplingField("thinking_budget", "int", "most thinking tokens before the model must answer (0: none)", ge=0,
                  le=MAX_INT32, names=_everywhere("thinking_budget", but=("completions",))),
    SamplingField("enable_thinking", "bool", "think before answering (Qwen3)",
                  names=_everywhere("enable_thinking", but=("completions", "cli"))),
)
BY_NAME: Mapping[str, SamplingField] = {f.name: f for f in FIELDS}
# The fields a model's generation_config.json may give defaults for (`GenerationConfig.sampling`).
MODEL_DEFAULTS: tuple[SamplingField, ...] = tuple(f for f in FIELDS if f.default is not None)


def fields_on(surface: str) -> list[tuple[str, SamplingField]]:
    """(the name on `surface`, the field) for every field that surface offers."""
    if surface not in SURFACES:
        raise ValueError(f"unknown surface {surface!r}; one of {', '.join(SURFACES)}")
    return [(f.names[surface], f) for f in FIELDS if surface in f.names]


def json_int(minimum: int, maximum: int) -> Any:
    """A pydantic type: an integer in [minimum, maximum] as JSON Schema counts them (2.0 is
    one, true and 2.5 are not). The schema is spelled out: pydantic cannot derive it
    through the validator that takes 2.0."""
    from typing import Annotated

    from pydantic import BeforeValidator, Field, WithJsonSchema

    return Annotated[int, BeforeValidator(_integral), Field(ge=minimum, le=maximum),
                     WithJsonSchema({"type": "integer", "minimum": minimum, "maximum": maximum})]


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def pydantic_type(f: SamplingField) -> Any:
    """The pydantic type of one row: typed and bounded as the row says, floats finite."""
    from typing import Annotated

    from pydantic import Field, StrictBool

    if f.kind == "bool":
        return StrictBool
    if f.kind == "int":
        return json_int(int(f.ge if f.ge is not None else f.gt + 1), int(f.le))
    return Annotated[float, Field(ge=f.ge, gt=f.gt, le=f.le, allow_inf_nan=False)]


def names_on(surface: str) -> list[str]:
    """The names of the fields `surface` offers, as it spells them."""
    return [name for name, _ in fields_on(surface)]


def pydantic_fields(surface: str, *, skip: Iterable[str] = ()) -> dict[str, Any]:
    """`pydantic.create_model` keyword arguments for the fields `surface` offers: each
    optional (None: not given), typed and bounded as its row says."""
    from pydantic import Field

    skip = set(skip)
    return {wire_name: (pydantic_type(f) | None, Field(None, description=f.help))
            for wire_name, f in fields_on(surface) if wire_name not in skip}


def add_arguments(parser: Any, *, skip: Iterable[str] = (), defaults: Mapping[str, Any] | None = None) -> None:
    """The CLI's sampling flags (`--top-p` for top_p ...) on an argparse parser; their
    ranges are checked by `check_arguments` once parsed, so that a bad value is the
    CLI's one `error:` line, not argparse's usage text."""
    skip = set(skip)
    defaults = defaults or {}
    for wire_name, f in fields_on("cli"):
        if wire_name in skip:
            continue
        default = defaults.get(wire_name)
        suffix = f"; default {default}" if default is not None else ""
        parser.add_argument(f"--{wire_name.replace('_', '-')}", type=_number(f), default=default,
                            help=f"{f.help} ({f.range_text()}{suffix})")


def _number(f: SamplingField) -> Any:
    def parse(text: str) -> float | int:
        try:
            return float(text) if f.kind == "float" else int(text)
        except ValueError:
            return float(text)  # a float for an integer flag: check_arguments names the range

    parse.__name__ = "number" if f.kind == "float" else "integer"  # argparse's word for a bad value
    return parse


def check_arguments(args: Any) -> None:
    """ValueError naming the first CLI sampling flag of `args` out of its row's range."""
    for wire_name, f in fields_on("cli"):
        value = getattr(args, wire_name, None)
        if value is not None:
            try:
                f.check(value)
            except ValueError:
                flag = "--" + wire_name.replace("_", "-")
                raise ValueError(f"{flag} must be {f.range_text()}, got {value:g}") from None


def check_fields(values: Mapping[str, Any], surface: str) -> None:
    """ValueError naming the first of `values` (surface names) out of its row's range."""
    rows = dict(fields_on(surface))
    for name, value in values.items():
        if value is not None and name in rows:
            rows[name].check(value)
