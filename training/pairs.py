"""Image-caption pairs for training: reading the pairs file, held-out splits, the synthetic-ratio sampler.

A pairs file is Parquet or JSONL with columns ``image_path`` (relative to the file's directory,
or absolute), ``caption``, ``source`` (``real`` | ``synthetic``) and an optional ``label``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

REQUIRED_COLUMNS = ("image_path", "caption")

log = logging.getLogger(__name__)


def read_pairs(path: str | Path) -> pd.DataFrame:
    """Read a pairs file into a frame with absolute ``image_path`` and ``source``/``label`` filled in.

    Raises ``ValueError`` naming the file when it is missing, of an unknown format, or lacks a column.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"pairs file {path} does not exist; `vlmlab samples --out DIR` writes DIR/pairs.parquet")
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif path.suffix in (".jsonl", ".json"):
        frame = pd.read_json(path, lines=True)
    else:
        raise ValueError(f"pairs file {path}: expected .parquet or .jsonl, got {path.suffix!r}")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"pairs file {path} lacks column(s) {missing}; it has {list(frame.columns)}")
    base = path.parent.resolve()
    frame = frame.copy()
    frame["image_path"] = [str(p if Path(p).is_absolute() else base / p) for p in frame["image_path"]]
    frame["source"] = frame["source"].fillna("real") if "source" in frame else "real"
    frame["label"] = frame["label"].fillna("") if "label" in frame else ""
    return frame.reset_index(drop=True)


def split_pairs(frame: pd.DataFrame, holdout_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split pairs into (train, held_out) by a seeded permutation; the held-out part is never trained on."""
    order = np.random.default_rng(seed).permutation(len(frame))
    n_held = int(round(len(frame) * holdout_fraction))
    return frame.iloc[order[n_held:]].reset_index(drop=True), frame.iloc[order[:n_held]].reset_index(drop=True)


def synthetic_ratio_batch(sources: np.ndarray, synthetic_ratio: float, batch_size: int,
                          rng: np.random.Generator) -> np.ndarray:
    """Indices of one batch drawing ``synthetic_ratio`` of its pairs from synthetic sources.

    Draws without replacement within each source while enough rows exist; when one source is
    empty the whole batch comes from the other.
    """
    synthetic = np.flatnonzero(sources == "synthetic")
    real = np.flatnonzero(sources != "synthetic")
    n_syn = int(round(batch_size * synthetic_ratio)) if len(real) else batch_size
    n_syn = n_syn if len(synthetic) else 0
    picks = []
    for pool, n in ((synthetic, n_syn), (real, batch_size - n_syn)):
        if n:
            picks.append(rng.choice(pool, size=n, replace=n > len(pool)))
    return rng.permutation(np.concatenate(picks))


def available_synthetic_ratio(sources: np.ndarray, synthetic_ratio: float) -> float:
    """``synthetic_ratio`` clamped to the synthetic share of ``sources`` (0 when there are no synthetic rows).

    Batches drawn at a higher share than the pairs hold repeat the few synthetic pairs over and over
    (0.8 of each batch from a 2% synthetic corpus trains on ~40 copies of each); the share that exists
    is used instead, with a warning naming both numbers.
    """
    sources = np.asarray(sources)
    share = float(np.mean(sources == "synthetic")) if len(sources) else 0.0
    if synthetic_ratio <= share:
        return float(synthetic_ratio)
    log.warning("synthetic_ratio %.3g asks for more synthetic pairs than exist: %d of %d pairs (%.3g) are synthetic; "
                "sampling at %.3g instead", synthetic_ratio, int((sources == "synthetic").sum()), len(sources), share,
                share)
    return share
