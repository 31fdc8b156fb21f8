"""`qwenkit serve` as a process: the API key from QWENKIT_API_KEY, and SIGTERM drains."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")


def test_serve_checks_the_key_and_drains_on_sigterm(tiny_checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "QWENKIT_API_KEY": "k-123"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwenkit", "serve", "--model", str(tiny_checkpoint), "--dtype", "float32",
         "--port", str(port), "--served-model-name", "tiny", "--drain-timeout", "30"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.2)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
                "ignore_eos": True, "stream": True}
        assert httpx.post(f"{base}/v1/chat/completions", json=body).status_code == 401
        lines = []
        first = threading.Event()

        def stream():
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60,
                              headers={"Authorization": "Bearer k-123"}) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)  # the stream in flight finishes before the process exits
        reader.join(timeout=60)
        # uvicorn re-raises the signal once it has shut down gracefully.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
        assert any('"finish_reason":"length"' in line for line in lines)
        assert "CPU kernels: " in proc.stdout.read()  # the start-up line names the kernels in use
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
