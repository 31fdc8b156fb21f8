"""Who may talk to the server from a browser: the Host header and the Origin header.

DNS rebinding: a page on attacker.example can re-point its own name at 127.0.0.1; the
browser then treats this server as the page's own origin and lets it read every answer.
The one thing that gives it away is the `Host` header (``attacker.example:8000``), so a
request is answered only when its Host is a name this server is known by: the loopback
names, the address it listens on and what ``--allowed-hosts`` adds (``*``: any).

Cross-site writes: a page on another origin may still *send* a POST (a form, a no-cors
fetch) without reading the answer. A request that changes state (any method but GET,
HEAD and OPTIONS) to the web page's API, or to any route of a server without an API key,
is refused when its `Origin` is not this server's own. Clients that are not browsers send
no Origin and are not affected; with an API key the API needs the key, which a cross-site
page does not have and cannot add without a CORS preflight this server never grants.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from qwenkit.server.errors import APIError
from qwenkit.server.limits import send_error

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the server on this machine."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The name part of a Host header, lower-cased: "[::1]:8000" -> "::1", "Example:80" -> "example"."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostAllowList:
    """The Host names a server answers to. A server bound to every interface (0.0.0.0, ::)
    also answers to any IP address: a page reached by IP has that IP as its origin, so it
    cannot be a rebound name."""

    def __init__(self, allowed_hosts: Iterable[str] = (), *, bind_host: str = "127.0.0.1"):
        names = {host_name(h) for h in allowed_hosts if h.strip()}
        self.allow_all = "*" in names
        self.any_ip = bind_host.strip("[]") in WILDCARD_BINDS
        self.names = frozenset(names | set(LOOPBACK_HOSTS) | ({host_name(bind_host)} - {""}))

    def allows(self, host_header: str | None) -> bool:
        if self.allow_all or host_header is None:  # no Host: not a browser (HTTP/1.0)
            return True
        name = host_name(host_header)
        return name in self.names or (self.any_ip and _is_ip(name))


def is_same_origin(origin: str, host_header: str | None) -> bool:
    """Whether a browser's Origin ("http://127.0.0.1:8000") names the host and port it sent the request to."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or host_header is None:
        return False  # "null" (a sandboxed frame, a file: page) and the like
    try:
        origin_port = parts.port or _DEFAULT_PORTS[parts.scheme]
        target = urlsplit(f"{parts.scheme}://{host_header.strip()}")
        target_port = target.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError:  # a port that is not a number
        return False
    return (host_name(parts.netloc), origin_port) == (host_name(target.netloc), target_port)


class BrowserGuard:
    """ASGI middleware: the Host allow-list (421) and the same-origin check on writes (403)."""

    def __init__(self, app, *, allowed_hosts: Iterable[str] = (), bind_host: str = "127.0.0.1",
                 has_api_key: bool = False, write_checked_prefixes: tuple[str, ...] = ("/web/",)):
        self.app = app
        self.hosts = HostAllowList(allowed_hosts, bind_host=bind_host)
        self.has_api_key = has_api_key
        self.write_checked_prefixes = write_checked_prefixes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {name: value.decode("latin-1") for name, value in scope["headers"] if name in (b"host", b"origin")}
        host = headers.get(b"host")
        error = self._check_host(host) or self._check_origin(scope, headers.get(b"origin"), host)
        if error is not None:
            return await send_error(scope, send, error)
        await self.app(scope, receive, send)

    def _check_host(self, host: str | None) -> APIError | None:
        if self.hosts.allows(host):
            return None
        name = host_name(host or "")
        return APIError(421, f"this server does not answer to the host name {name!r} (the Host header): a guard "
                             f"against DNS rebinding. To reach it as {name!r}, start it with --allowed-hosts {name}",
                        code="host_not_allowed")

    def _check_origin(self, scope, origin: str | None, host: str | None) -> APIError | None:
        if origin is None or scope["method"] in SAFE_METHODS:
            return None
        if self.has_api_key and not scope["path"].startswith(self.write_checked_prefixes):
            return None
        if is_same_origin(origin, host):
            return None
        return APIError(403, f"a {scope['method']} from another web origin ({origin}) is refused: only pages served "
                             "by this server may change its state", code="cross_origin_request")


def browser_guard(app, config) -> BrowserGuard:
    """`app` behind the checks `config` (a `ServerConfig`) asks for."""
    return BrowserGuard(app, allowed_hosts=config.allowed_hosts or (), bind_host=config.bind_host,
                        has_api_key=bool(config.api_key))


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What to say at start when the server listens beyond this machine with no API key."""
    if api_key or is_loopback(host):
        return None
    return (f"warning: serving on {host} without an API key: anyone who can reach this address can use the "
            "model, and the web page's conversations and tools; set --api-key (or QWENKIT_API_KEY)")
