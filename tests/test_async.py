"""AsyncLLM: concurrent streams equal the synchronous results; leaving a stream aborts it."""

import asyncio

import pytest

from qwenkit import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"}]


@pytest.fixture(scope="module")
def deterministic_allm(tiny_checkpoint):
    """Batch-invariant steps (docs/determinism.md): a request's tokens are then the same alone
    or batched with others, which is what comparing concurrent streams with lone requests
    assumes. Without it, the float GEMMs' low bits depend on the row count and can flip a
    near-tie of the random tiny model's greedy choice."""
    from qwenkit import AsyncLLM

    engine = AsyncLLM(str(tiny_checkpoint), dtype="float32", progress=False, deterministic=True)
    yield engine
    engine.shutdown()


def test_concurrent_chat_streams_equal_sync(deterministic_allm):
    """Four concurrent streams equal each conversation's non-streamed chat run alone. Both go
    through the AsyncLLM: its thread owns the engine. (This test once called `allm.llm.chat`,
    which steps the same engine from the test's thread: when the engine thread woke within the
    request (every 0.5 s when idle; a slow, loaded machine), both threads stepped it and the
    engine thread took some of the request's tokens, so the lone chat came out shorter.)"""
    allm = deterministic_allm

    async def one(i):
        chunks = [c async for c in allm.chat_stream(conversation(i), GREEDY, enable_thinking=False)]
        return "".join(c.delta.content for c in chunks), chunks[-1]

    async def main():
        concurrent = await asyncio.gather(*(one(i) for i in range(4)))
        alone = [await allm.chat(conversation(i), GREEDY, enable_thinking=False) for i in range(4)]
        return concurrent, alone

    results, expected = asyncio.run(main())
    for (content, last), want in zip(results, expected):
        assert content == (want.content or "")
        assert last.finish_reason == want.finish_reason
        assert last.usage.completion_tokens == want.usage.completion_tokens == GREEDY.max_tokens


def test_leaving_a_stream_frees_its_blocks(allm):
    engine = allm.llm.engine
    total = engine.block_manager.num_blocks

    async def main():
        stream = allm.generate_stream(list(range(5, 60)), SamplingParams(max_tokens=200, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()
        await asyncio.sleep(0.3)

    asyncio.run(main())
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == total


def test_abort_ends_a_waiting_stream(allm):
    async def main():
        seen = []

        async def consume():
            async for update in allm.generate_stream(
                list(range(5, 40)), SamplingParams(max_tokens=500, ignore_eos=True), request_id="to-abort"
            ):
                seen.append(update)

        task = asyncio.create_task(consume())
        while not seen:
            await asyncio.sleep(0.01)
        assert await allm.abort("to-abort")
        await asyncio.wait_for(task, timeout=10)
        return seen

    seen = asyncio.run(main())
    assert 0 < len(seen) < 500
    assert allm.llm.engine.block_manager.num_free_blocks == allm.llm.engine.block_manager.num_blocks


def test_bad_request_raises_in_the_caller(allm):
    async def main():
        async for _ in allm.generate_stream([5] * 5000, SamplingParams(max_tokens=1)):
            pass

    with pytest.raises(ValueError, match="context"):
        asyncio.run(main())
