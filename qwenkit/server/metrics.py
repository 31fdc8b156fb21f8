"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from qwenkit.chat.types import Usage

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, allm, slots):
        # The hit rate's own running sums: prometheus_client's counters expose their values
        # only through a registry scrape (`_value` is private).
        self._num_prompt_tokens = 0
        self._num_cached_tokens = 0
        r = self.registry = CollectorRegistry()
        self.requests = Counter("qwenkit_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("qwenkit_prompt_tokens", "Prompt tokens processed", registry=r)
        self.cached_tokens = Counter("qwenkit_prompt_cached_tokens", "Prompt tokens served from the prefix cache",
                                     registry=r)
        self.generated_tokens = Counter("qwenkit_generation_tokens", "Tokens generated", registry=r)
        self.reasoning_tokens = Counter("qwenkit_reasoning_tokens", "Generated tokens spent thinking", registry=r)
        self.ttft = Histogram("qwenkit_time_to_first_token_seconds", "Time to the first chunk",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.request_latency = Histogram("qwenkit_request_latency_seconds", "Time from start to the last chunk",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        blocks = allm.llm.engine.block_manager
        Gauge("qwenkit_kv_blocks_total", "KV cache blocks in the pool", registry=r).set_function(
            lambda: blocks.num_blocks)
        Gauge("qwenkit_kv_blocks_in_use", "KV cache blocks held by requests", registry=r).set_function(
            lambda: blocks.num_blocks - blocks.num_free_blocks)
        Gauge("qwenkit_requests_running", "Requests holding a slot", registry=r).set_function(
            lambda: slots.num_running)
        Gauge("qwenkit_requests_waiting", "Requests waiting for a slot", registry=r).set_function(
            lambda: slots.num_waiting)
        spec = allm.llm.engine.spec_stats
        for name, what, read in (
            ("qwenkit_spec_decode_draft_tokens", "Speculative draft tokens checked", lambda: spec.draft_tokens),
            ("qwenkit_spec_decode_accepted_tokens", "Speculative draft tokens kept", lambda: spec.accepted_tokens),
            ("qwenkit_spec_decode_acceptance_rate", "Share of speculative draft tokens kept",
             lambda: spec.acceptance_rate),
            ("qwenkit_spec_decode_tokens_per_step", "Tokens a sequence got per step where it had drafts",
             lambda: spec.tokens_per_step),
        ):
            Gauge(name, what, registry=r).set_function(read)
        Gauge("qwenkit_prefix_cache_hit_rate", "Share of prompt tokens served from the prefix cache",
              registry=r).set_function(self._hit_rate)

    def _hit_rate(self) -> float:
        return self._num_cached_tokens / self._num_prompt_tokens if self._num_prompt_tokens else 0.0

    def response(self, route: str, status: int) -> None:
        """Count a response. `route` is a route template or "unmatched", never a raw path: the
        label set stays bounded whatever paths clients send."""
        self.requests.labels(route, str(status)).inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def latency(self, seconds: float) -> None:
        self.request_latency.observe(seconds)

    def usage(self, usage: Usage) -> None:
        self.tokens(prompt=usage.prompt_tokens, generated=usage.completion_tokens, cached=usage.cached_tokens,
                    reasoning=usage.reasoning_tokens)

    def tokens(self, *, prompt: int, generated: int, cached: int = 0, reasoning: int = 0) -> None:
        self.prompt_tokens.inc(prompt)
        self.generated_tokens.inc(generated)
        self.cached_tokens.inc(cached)
        self._num_prompt_tokens += prompt
        self._num_cached_tokens += cached
        self.reasoning_tokens.inc(reasoning)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
