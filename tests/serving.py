"""A real qwenkit server on a free loopback port, for the tests that talk HTTP to it."""

import contextlib
import socket
import threading
import time

import uvicorn

from qwenkit.server import ServerConfig, create_app


@contextlib.contextmanager
def running_server(allm, config: ServerConfig):
    """A uvicorn server on a free loopback port, on a thread; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(allm, config), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
