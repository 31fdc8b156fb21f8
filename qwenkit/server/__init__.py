"""`qwenkit serve`: OpenAI- and DashScope-compatible HTTP APIs over `AsyncLLM`.

`create_app(allm, ServerConfig(...))` builds the ASGI app; `serve(...)` runs it with
uvicorn. The protocol modules (`openai_protocol`, `dashscope_protocol`) are pure
translation between request/response JSON and engine calls.
"""

from __future__ import annotations

from qwenkit.server.app import ServerConfig, create_app


def serve(allm, config: ServerConfig | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          drain_timeout_s: float = 30.0, log_level: str = "info", on_ready=None) -> None:
    """Serve until SIGINT / SIGTERM; in-flight requests get `drain_timeout_s` to finish.
    `on_ready(port)` is called once the server listens (with the port it bound)."""
    import dataclasses

    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and not self.should_exit and on_ready is not None:
                on_ready(self.servers[0].sockets[0].getsockname()[1])

    config = dataclasses.replace(config or ServerConfig(), bind_host=host)
    server = Server(uvicorn.Config(
        create_app(allm, config), host=host, port=port, log_level=log_level,
        timeout_graceful_shutdown=drain_timeout_s,
    ))
    try:
        server.run()
    finally:
        allm.shutdown()


__all__ = ["ServerConfig", "create_app", "serve"]
