"""qwenkit: the Qwen3 system, running locally.

`from qwenkit import LLM, SamplingParams`. The engine (and torch) is imported on first
use, so the lighter parts of the package import without it.
"""

from qwenkit.engine.threads import default_wait_policy

__version__ = "0.1.0"
__all__ = ["AsyncLLM", "LLM", "RequestOutput", "SamplingParams"]

default_wait_policy()  # before anything loads torch's libgomp (docs/decode.md#threads)


def __getattr__(name: str):
    if name in ("LLM", "RequestOutput"):
        from qwenkit import llm

        return getattr(llm, name)
    if name == "AsyncLLM":
        from qwenkit.async_llm import AsyncLLM

        return AsyncLLM
    if name == "SamplingParams":
        from qwenkit.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'qwenkit' has no attribute {name!r}")
