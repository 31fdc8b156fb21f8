"""AsyncLLM: concurrent streams equal the synchronous results; leaving a stream aborts it."""

import asyncio

import pytest

from qwenkit import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"}]


def test_concurrent_chat_streams_equal_sync(allm):
    async def one(i):
        chunks = [c async for c in allm.chat_stream(conversation(i), GREEDY, enable_thinking=False)]
        return "".join(c.delta.content for c in chunks), chunks[-1]

    async def main():
        return await asyncio.gather(*(one(i) for i in range(4)))

    results = asyncio.run(main())
    for i, (content, last) in enumerate(results):
        expected = allm.llm.chat(conversation(i), GREEDY, enable_thinking=False)
        assert content == (expected.content or "")
        assert last.finish_reason == expected.finish_reason
        assert last.usage.completion_tokens == expected.usage.completion_tokens


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
