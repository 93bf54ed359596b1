"""Model families behind :func:`vlmlab.models.load_model`, one module each.

A family is a :class:`~vlmlab.backends.base.Backend` registered here by name; specs are routed
to it by their prefix (``open_clip:``, ``hf:``) or, for a local directory, by the config file it
holds. Adding a family means adding a module and a line below.
"""

from __future__ import annotations

from vlmlab.backends.base import Backend, TokenTaps, VisionTower
from vlmlab.backends.hf import HFBackend
from vlmlab.backends.open_clip import OpenClipBackend

# open_clip first: a directory holding both formats (the tiny model) loads through open_clip
BACKENDS: dict[str, Backend] = {b.name: b for b in (OpenClipBackend(), HFBackend())}

__all__ = ["BACKENDS", "Backend", "TokenTaps", "VisionTower", "get_backend"]


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise KeyError(f"unknown model backend {name!r}; known: {', '.join(BACKENDS)}") from None
