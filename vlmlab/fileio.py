"""Atomic file writes and timestamps shared by the store, the index and every job that leaves files.

A file is written to a hidden temporary name beside its target and renamed into place, so a
reader never sees it half-written and a killed writer leaves at most an ignorable ``.tmp``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def utc_now() -> str:
    """The current UTC time as ISO 8601 with seconds (``2026-12-01T23:55:54+00:00``)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def utc_stamp() -> str:
    """A UTC timestamp that sorts in write order and is safe in file names (microseconds)."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")


def temporary_path(path: Path) -> Path:
    """A unique hidden temporary name beside ``path`` (``.NAME.<random>.tmp``)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to write a temporary file, then rename it to ``path``; returns ``path``."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (trailing newline) to ``path`` atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def atomic_write_table(table: Any, path: str | Path, **parquet_options: Any) -> Path:
    """Write a pyarrow table as Parquet to ``path`` atomically."""
    import pyarrow.parquet as pq

    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, **parquet_options))
