"""How a server answers: `ServerConfig`, read by `create_app` and its routers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    """How the server answers. served_model_names: the names clients may ask for (default:
    the model's own name); the first is the one responses report."""

    served_model_names: list[str] | None = None
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    # http(s) image URLs in messages: fetched (under the image byte limit and this time limit) only when allowed.
    allow_image_urls: bool = False
    image_fetch_timeout_s: float = 10.0
    max_running_requests: int = 64
    max_waiting_requests: int = 256
    retry_after_s: int = 1
    request_timeout_s: float | None = None  # a generation running longer is aborted (504)
    web: bool = True  # the chat page at /
    mcp_config: str | None = None  # path of {"mcpServers": {...}} JSON: tools the web page may call
    chat_db: str | None = None  # SQLite file of the web page's conversations (default: in the qwenkit home)
    responses_db: str | None = None  # SQLite file of stored /v1/responses (default: in the qwenkit home)
    # Host names answered beside the loopback names and bind_host ("*": any); see server/security.py.
    allowed_hosts: list[str] | None = None
    bind_host: str = "127.0.0.1"  # the address served on (`serve` sets it)
