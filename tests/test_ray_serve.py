"""Replicas on Ray Serve, on a local Ray cluster: two replicas of the tiny model behind
Serve's proxy share concurrent streams; a replica killed mid-stream ends its streams with
an error (not a hang), is replaced, and nothing is left running afterwards."""

import asyncio
import json
import socket
import time
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (the `test` extra has it)")
serve = pytest.importorskip("ray.serve")

from qwenkit.serving import REPLICA_HEADER, build_app  # noqa: E402

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_processes(session_dir: str) -> list[int]:
    """Live processes started for this Ray session (their command lines name its folder)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if session_dir.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def cluster(tiny_checkpoints):
    folder = tiny_checkpoints("qwen3")
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="qwenkit-test")
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(str(folder), num_replicas=2, dtype="float32", server={"web": False}),
              route_prefix="/", name="qwenkit")
    yield f"http://127.0.0.1:{port}", folder.name
    serve.shutdown()
    ray.shutdown()
    deadline = time.time() + 60
    while ray_processes(session_dir) and time.time() < deadline:
        time.sleep(0.5)
    assert not ray_processes(session_dir), "Ray processes outlived ray.shutdown()"


async def stream_chat(client: httpx.AsyncClient, url: str, model: str, max_tokens: int,
                      started: asyncio.Queue | None = None) -> tuple[str, list[dict]]:
    """One streamed chat completion: (the replica that answered, the chunks before [DONE]).
    `started` gets the replica's id once the first chunk has come."""
    body = {"model": model, "messages": [{"role": "user", "content": "Count to ten."}], "stream": True,
            "max_tokens": max_tokens, "ignore_eos": True}
    chunks = []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                return response.headers[REPLICA_HEADER], chunks
            if line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
                if started is not None and len(chunks) == 1:
                    started.put_nowait(response.headers[REPLICA_HEADER])
    raise ConnectionError(f"stream ended without [DONE] after {len(chunks)} chunks")


def test_concurrent_streams_complete_on_both_replicas(cluster):
    url, model = cluster

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(stream_chat(client, url, model, 8) for _ in range(32)))

    results = asyncio.run(main())
    assert len({replica for replica, _ in results}) == 2
    for _, chunks in results:
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_killed_replica_fails_its_streams_and_is_replaced(cluster):
    url, model = cluster
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
    assert len(replicas) == 2

    async def main():
        async with httpx.AsyncClient(timeout=httpx.Timeout(60, read=30)) as client:
            started: asyncio.Queue = asyncio.Queue()
            streams = [asyncio.create_task(stream_chat(client, url, model, 400, started)) for _ in range(8)]
            # Once every stream is under way, kill a replica that serves one of them (a fixed
            # sleep raced the streams' end on a fast machine, and the router may favour one replica).
            serving = [await asyncio.wait_for(started.get(), 60) for _ in streams]
            victim_id = serving[0]
            (victim,) = [a for a in replicas if victim_id in a["name"]]
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
            return victim_id, serving.count(victim_id), await asyncio.gather(*streams, return_exceptions=True)

    start = time.time()
    victim_id, on_victim, results = asyncio.run(main())
    assert time.time() - start < 120  # every stream ended: none hung
    failed = [r for r in results if isinstance(r, Exception)]
    assert failed, f"none of the {on_victim} streams on the killed replica failed"
    assert all(isinstance(e, (httpx.HTTPError, ConnectionError, AssertionError)) for e in failed), failed
    assert all(replica != victim_id for replica, _ in (r for r in results if not isinstance(r, Exception)))
    # Serve starts a new replica; new requests are answered meanwhile and after.
    deadline = time.time() + 180
    while time.time() < deadline:
        status = serve.status().applications["qwenkit"]
        running = status.deployments["qwenkit"].replica_states.get("RUNNING", 0)
        if status.status == "RUNNING" and running == 2:
            break
        time.sleep(1)
    else:
        pytest.fail(f"the killed replica was not replaced: {serve.status()}")
    response = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                          json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert response.status_code == 200
