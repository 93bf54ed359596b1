"""Files generated from the ones a user edits (cluster/lab.yaml, k8s/rayservice.yaml): written, or checked."""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(path: Path, text: str, command: str, check: bool) -> None:
    """Write ``text`` to ``path``; with ``check``, exit 1 (naming ``command``, which regenerates it) when the
    file on disk differs instead."""
    if check:
        if not path.exists() or path.read_text() != text:
            print(f"{path} is out of date: run {command}", file=sys.stderr)
            raise SystemExit(1)
        return
    path.write_text(text)
    print(f"wrote {path}")
