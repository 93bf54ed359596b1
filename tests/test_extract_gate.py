"""pipelines.extract.gate: the flow gate's three guarantees, driven step by step in one event loop."""

from __future__ import annotations

import asyncio

from pipelines.extract.gate import FlowGate


async def _pending(task: asyncio.Task) -> bool:
    await asyncio.sleep(0.01)  # let the task run up to its wait; it cannot finish while the gate says no
    return not task.done()


def test_start_together_fair_start_and_bounded_lead():
    async def scenario() -> None:
        gate = FlowGate(encoders=2, readers={"a": 1, "b": 1}, max_ahead={"a": 8, "b": 8}, start_wait_s=600)
        first_a = asyncio.create_task(gate.acquire("a", 4))
        assert await _pending(first_a)  # nobody has loaded yet
        await gate.encoder_ready()
        await gate.encoder_ready()
        await gate.reader_ready("a")
        assert await _pending(first_a)  # b's reader is not there yet
        await gate.reader_ready("b")
        assert await asyncio.wait_for(first_a, 5) is False  # everyone is here: a starts, not late
        second_a = asyncio.create_task(gate.acquire("a", 4))
        assert await _pending(second_a)  # fair start: a waits until b has had its first block
        await gate.acquire("b", 4)
        await asyncio.wait_for(second_a, 5)
        third_a = asyncio.create_task(gate.acquire("a", 4))
        assert await _pending(third_a)  # bounded lead: a holds 8 = max_ahead
        await gate.done("a", 4)
        await asyncio.wait_for(third_a, 5)
        assert await gate.lead() == {"a": 8, "b": 4}

    asyncio.run(scenario())


def test_an_empty_queue_or_a_pool_that_never_comes_releases_the_others():
    async def scenario() -> None:
        gate = FlowGate(encoders=0, readers={"a": 0, "b": 0}, max_ahead={"a": 8, "b": 8}, start_wait_s=600)
        await gate.acquire("a", 4)
        blocked = asyncio.create_task(gate.acquire("a", 4))
        assert await _pending(blocked)
        await gate.release("b", 0, exhausted=True)  # b found the queue empty: a need not wait for it
        await asyncio.wait_for(blocked, 5)
        # a pool that never loads cannot hold the rest past start_wait_s: they start, marked late
        late_gate = FlowGate(encoders=3, readers={"a": 1}, max_ahead={"a": 8}, start_wait_s=0)
        assert await asyncio.wait_for(late_gate.acquire("a", 4), 5) is True

    asyncio.run(scenario())
