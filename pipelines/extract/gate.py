"""Flow control shared by the per-type pipelines: an async zero-CPU actor every reader asks before pulling.

Readers decode far faster than encoders embed, so without a bound one pool's readers would pull the
shared queue dry into that pool's buffers and the other GPU type would idle. The gate makes three
guarantees, whatever the machine's load and whichever actor happens to start first:

1. **Start together.** No reader pulls until every pool's encoders have loaded their model and every
   pool's readers exist (or ``start_wait_s`` passed: a pool that never comes up cannot hold the others).
2. **Fair start.** A pool that has taken its first block takes no second one until every pool has
   taken a first block (or found the queue empty), so every pool gets work whenever there are at
   least as many blocks as pools.
3. **Bounded lead.** A pool is never more than ``max_ahead`` images ahead of its encoders (images
   reserved but not yet embedded, failed or skipped), so each type takes work at the rate it embeds.

Readers block in :meth:`FlowGate.acquire` (no polling): it returns when the pull is allowed, having
reserved the images; :meth:`release` gives back what the queue did not hold and :meth:`done` what
the encoders finished.
"""

from __future__ import annotations

import asyncio
import time


class FlowGate:
    """The gate's state; run it as ``ray.remote(num_cpus=0)(FlowGate)`` (an async actor)."""

    def __init__(self, encoders: int, readers: dict[str, int], max_ahead: dict[str, int], start_wait_s: float):
        self.expected_encoders = encoders
        self.expected_readers = dict(readers)
        self.encoders_ready = 0
        self.readers_ready = dict.fromkeys(readers, 0)
        self.max_ahead = dict(max_ahead)
        self.ahead = dict.fromkeys(max_ahead, 0)
        self.had_first = dict.fromkeys(max_ahead, False)
        self.start_wait_s = start_wait_s
        self.created = time.monotonic()
        self.started_at: float | None = None
        self.late = False
        self._changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        # created in the actor's own event loop, on first use
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        async with self._condition():
            self._condition().notify_all()

    def _waited_out(self) -> bool:
        return time.monotonic() - self.created > self.start_wait_s

    def _everyone_here(self) -> bool:
        return self.encoders_ready >= self.expected_encoders and all(
            self.readers_ready[p] >= n for p, n in self.expected_readers.items())

    def _may_pull(self, pool: str) -> bool:
        if not self._everyone_here():
            if not self._waited_out():
                return False
            self.late = True
        if self.ahead[pool] >= self.max_ahead[pool]:
            return False
        return not (self.had_first[pool] and not all(self.had_first.values()) and not self._waited_out())

    async def encoder_ready(self) -> None:
        """An encoder actor has loaded its model."""
        self.encoders_ready += 1
        await self._notify()

    async def reader_ready(self, pool: str) -> None:
        """A reader actor of ``pool`` exists and is about to pull."""
        self.readers_ready[pool] += 1
        await self._notify()

    async def acquire(self, pool: str, n: int) -> bool:
        """Block until ``pool`` may pull, then reserve ``n`` images for it. Returns True when the start was
        forced by ``start_wait_s`` (some pool never came up), for the reader to say so once."""
        condition = self._condition()
        async with condition:
            while not self._may_pull(pool):
                # woken by any change; the timeout re-checks the start deadline
                try:
                    await asyncio.wait_for(condition.wait(), timeout=1.0)
                except TimeoutError:
                    pass
            self.ahead[pool] += n
            self.had_first[pool] = True
            if self.started_at is None:
                self.started_at = time.time()
            return self.late

    async def release(self, pool: str, n: int, exhausted: bool = False) -> None:
        """Give back ``n`` reserved images the queue did not hold; ``exhausted``: the queue is empty."""
        self.ahead[pool] -= n
        if exhausted:
            self.had_first[pool] = True  # an empty queue is as good as a first block: nobody waits for it
        await self._notify()

    async def done(self, pool: str, n: int) -> None:
        """``n`` images of ``pool`` are finished (embedded, failed or skipped as unchanged)."""
        self.ahead[pool] -= n
        await self._notify()

    async def work_started(self) -> float | None:
        """Wall-clock time at which the first pull was allowed (every encoder and reader ready)."""
        return self.started_at

    async def lead(self) -> dict[str, int]:
        """Images each pool holds reserved or in flight (for tests and progress lines)."""
        return dict(self.ahead)
