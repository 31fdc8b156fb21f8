"""qwenkit replicas on Ray Serve: N copies of `qwenkit serve`'s app behind Ray Serve's HTTP
proxy, each replica one engine (possibly tensor-parallel over the GPUs Ray gives it).

    from ray import serve
    from qwenkit.serving import build_app
    serve.run(build_app("Qwen/Qwen3-8B", num_replicas=2, tensor_parallel_size=2))

or `qwenkit serve --ray --replicas 2`. Every replica serves the same routes as `qwenkit
serve` (OpenAI Chat Completions and Responses, DashScope, streaming), built inside the
replica (`serve.ingress` with a builder), and answers `X-Qwenkit-Replica` with its id.

- Resources: a replica asks Ray for `tensor_parallel_size` GPUs in one placement-group
  bundle (on one node: its ranks are processes it starts, which see the bundle's GPUs), or
  CPUs on a machine without GPUs.
- Health: Serve calls `check_health`; a replica whose tensor-parallel rank died fails it
  and Serve replaces the replica. Its requests in flight end with an error.
- Autoscaling: `autoscaling_config` (min/max replicas, target ongoing requests) is passed
  to Serve as it is.
- Conversation affinity: a request with header `serve_multiplexed_model_id: <conversation
  id>` goes, where Serve can, to a replica that served that id before and so holds its
  prefix in its KV cache (Serve's model-multiplexing routing: each replica remembers its
  last `max_sessions_per_replica` ids).
"""

from __future__ import annotations

import os
from typing import Any

REPLICA_HEADER = "X-Qwenkit-Replica"


class _ReplicaApp:
    """ASGI: `qwenkit serve`'s app with this replica's id on every response; owns the engine."""

    def __init__(self, app, allm, replica: str, remember_session):
        self.app, self.allm, self.replica, self.remember_session = app, allm, replica.encode(), remember_session

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from ray import serve

        if session := serve.get_multiplexed_model_id():
            await self.remember_session(session)  # routing now prefers this replica for the session

        async def tagged(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER.lower().encode(), self.replica)]
            await send(message)

        return await self.app(scope, receive, tagged)


def _make_app(model: str, llm_kwargs: dict, server_kwargs: dict, max_sessions: int) -> _ReplicaApp:
    """Runs inside the replica: the engine and `qwenkit serve`'s app over it."""
    from ray import serve

    from qwenkit.async_llm import AsyncLLM
    from qwenkit.server import ServerConfig, create_app

    allm = AsyncLLM(model, progress=False, **llm_kwargs)
    app = create_app(allm, ServerConfig(**server_kwargs))
    try:
        replica = serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica
        replica = str(os.getpid())

    @serve.multiplexed(max_num_models_per_replica=max_sessions)
    async def remember_session(session_id: str) -> str:
        return session_id  # nothing to load: the KV cache fills as the conversation runs

    return _ReplicaApp(app, allm, replica, remember_session)


def build_app(
    model: str = "default",
    *,
    num_replicas: int | str = 1,
    autoscaling_config: dict[str, Any] | None = None,
    tensor_parallel_size: int = 1,
    device: str | None = None,
    server: dict[str, Any] | None = None,
    max_sessions_per_replica: int = 1024,
    ray_actor_options: dict[str, Any] | None = None,
    name: str = "qwenkit",
    **llm_kwargs: Any,
):
    """A Ray Serve application of `num_replicas` qwenkit replicas (or `autoscaling_config`'s
    bounds). `server`: `ServerConfig` fields; the rest are `LLM` arguments."""
    from ray import serve

    llm_kwargs = dict(llm_kwargs, tensor_parallel_size=tensor_parallel_size, device=device)
    server_kwargs = dict(server or {})

    def builder():  # a plain function: Serve calls it in each replica
        return _make_app(model, llm_kwargs, server_kwargs, max_sessions_per_replica)

    class QwenkitReplica:
        def check_health(self) -> None:
            """Raises when the engine cannot run (a tensor-parallel rank is gone)."""
            self.app.allm.llm.check_health()

        def __del__(self):
            app = getattr(self, "_asgi_app", None)
            if app is not None:
                app.allm.shutdown()

    gpus = tensor_parallel_size if (device or _default_device()) == "cuda" else 0
    options = dict(ray_actor_options or {})
    deployment_options: dict[str, Any] = {"name": name, "ray_actor_options": options}
    if gpus:
        deployment_options.update(placement_group_bundles=[{"GPU": gpus, "CPU": 1}],
                                  placement_group_strategy="STRICT_PACK")
    else:
        options.setdefault("num_cpus", tensor_parallel_size)
    if autoscaling_config is not None:
        deployment_options["autoscaling_config"] = autoscaling_config
    else:
        deployment_options["num_replicas"] = num_replicas
    ingress = serve.ingress(builder)(QwenkitReplica)
    return serve.deployment(ingress, **deployment_options).bind()


def _default_device() -> str:
    """Where replicas run when no device is given: CUDA if this cluster has GPUs."""
    import ray

    return "cuda" if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def serve_on_ray(model: str, *, replicas: int, host: str, port: int, address: str | None, server, **llm_kwargs) -> None:
    """`qwenkit serve --ray`: join (or start) a Ray cluster, run `replicas` replicas behind
    Serve's proxy on host:port, and serve until SIGINT / SIGTERM."""
    import dataclasses
    import signal
    import sys
    import threading

    import ray
    from ray import serve

    ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    print(f"qwenkit: starting {replicas} replica(s) of {model} on Ray Serve...", file=sys.stderr, flush=True)
    serve.run(build_app(model, num_replicas=replicas, server=dataclasses.asdict(server), **llm_kwargs),
              route_prefix="/", name="qwenkit")
    print(f"qwenkit: serving at http://{host}:{port}/v1 with {replicas} replica(s)", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
