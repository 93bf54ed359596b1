"""Progress of long steps (extraction, corpus building, filtering, training, evaluation, index builds):
one helper over tqdm, so every step reports the same way — count, percent, items/s and an ETA.

On a terminal it is tqdm's bar; in a log (a Ray job, CI, a file) it prints one line every
``interval_s`` seconds and a last one at the end, so a long run reads as a steady series of
``extract: 1152/2560 images (45%) 113.2 images/s, ETA 00:12`` lines instead of one line a minute.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm


class Progress:
    """Count ``total`` items of ``unit`` under ``desc``; call :meth:`update` as items finish, :meth:`close` at
    the end (or use it as a context manager). Thread-safe enough for one writer per call."""

    def __init__(self, total: int | None, desc: str, unit: str = "items", interval_s: float = 2.0,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval_s = interval_s
        self.desc, self.unit = desc, unit
        # in a log the bar is kept for its rate and ETA arithmetic only; lines are printed here
        self._sink = None if self.interactive else open(os.devnull, "w")  # noqa: SIM115 - closed in close()
        self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=self.stream if self.interactive else self._sink,
                        mininterval=interval_s, dynamic_ncols=True, leave=True)
        self.last_line = time.monotonic()

    @property
    def n(self) -> int:
        """Items counted so far."""
        return int(self.bar.n)

    def update(self, n: int = 1) -> None:
        """Count ``n`` more finished items (printing a line when ``interval_s`` has passed, in a log)."""
        self.bar.update(n)
        if not self.interactive and time.monotonic() - self.last_line >= self.interval_s:
            self._line()

    def _line(self) -> None:
        self.last_line = time.monotonic()
        print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        """The current state as one line: count, percent, rate and ETA."""
        d = self.bar.format_dict
        rate = d["n"] / d["elapsed"] if d["elapsed"] else 0.0
        total = d["total"]
        text = f"{self.desc}: {d['n']}"
        if total:
            text += f"/{total} {self.unit} ({100 * d['n'] / total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f" {rate:.1f} {self.unit}/s"
        if total and rate > 0:
            text += f", ETA {tqdm.format_interval(max(0.0, (total - d['n']) / rate))}"
        return text

    def close(self) -> None:
        """End the bar (a last line in a log)."""
        if not self.interactive:
            self._line()
        self.bar.close()
        if self._sink is not None:
            self._sink.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def collect_rows(dataset: Any, total: int | None, desc: str, unit: str, key: str | None = None,
                 interval_s: float = 2.0) -> list[dict[str, Any]]:
    """Every row of a Ray ``dataset`` (what ``take_all()`` returns), counted as it streams in: one item per
    row, or with ``key`` one per distinct value of that column (e.g. the source image an augmented row
    came from, when ``total`` counts source images)."""
    rows: list[dict[str, Any]] = []
    seen: set[Any] = set()
    with Progress(total, desc, unit, interval_s) as progress:
        for row in dataset.iter_rows():
            rows.append(row)
            if key is None:
                progress.update()
            elif row[key] not in seen:
                seen.add(row[key])
                progress.update()
    return rows
