"""Flow control shared by the per-type pipelines: a zero-CPU actor every reader asks before pulling."""

from __future__ import annotations

import time
from typing import Any


class FlowGate:
    """Flow control shared by the pipelines (a zero-CPU actor).

    Readers decode far faster than encoders embed, so without a bound one pool's readers would pull
    the shared queue dry into that pool's buffers and the other GPU type would idle. The gate counts,
    per pool, images pulled and images finished; a reader pulls only while its pool is less than
    ``max_ahead`` images ahead, so each type takes work at the rate it embeds. It also holds readers
    until every pool's encoders have loaded, so no type starts with a head start.
    """

    def __init__(self, expected_encoders: int, max_ahead: dict[str, int]):
        self.expected = expected_encoders
        self.arrived = 0
        self.max_ahead = max_ahead
        self.ahead = dict.fromkeys(max_ahead, 0)
        self.started_at: float | None = None

    def arrive(self) -> None:
        """An encoder actor has loaded its model."""
        self.arrived += 1
        if self.ready() and self.started_at is None:
            self.started_at = time.time()

    def work_started(self) -> float | None:
        """Wall-clock time at which reading began (every encoder loaded, or the first pull)."""
        return self.started_at

    def ready(self) -> bool:
        """Whether every encoder actor of every pool has loaded."""
        return self.arrived >= self.expected

    def may_pull(self, pool: str) -> bool:
        """Whether ``pool`` may take another chunk now."""
        return self.ahead[pool] < self.max_ahead[pool]

    def pulled(self, pool: str, n: int) -> None:
        """``pool`` took ``n`` images from the queue."""
        if self.started_at is None:  # readers that stopped waiting for a pool that never loaded
            self.started_at = time.time()
        self.ahead[pool] += n

    def done(self, pool: str, n: int) -> None:
        """``n`` images of ``pool`` are finished (embedded, failed or skipped as unchanged)."""
        self.ahead[pool] -= n


def wait_until(gate: Any, method: str, *args: Any, timeout_s: float | None = None) -> bool:
    """Poll ``gate.method(*args)`` until it is true (or ``timeout_s`` passes); returns its last answer."""
    import ray

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not ray.get(getattr(gate, method).remote(*args)):
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
