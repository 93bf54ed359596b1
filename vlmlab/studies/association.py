"""Model-vs-human colour-concept association metrics, per concept and aggregated.

For one concept, the model's scores ``s`` over the N palette colours are compared with the human
ratings ``r`` of the same colours:

- ``pearson``, ``spearman``: correlation of ``s`` with ``r`` (both invariant to the scale and offset
  of the scores, so computed on the raw values).
- ``tv``: total variation distance ``1/2 * sum |p - q|`` between the two *distributions* over colours.
- ``emd``: earth mover's distance between the distributions with the colours placed at their
  palette positions 1..N (``scipy.stats.wasserstein_distance``; in units of palette positions).
- ``emd_lab``: the same with the colours placed at their CIELAB coordinates (ground distance ΔE*ab,
  ``scipy.stats.wasserstein_distance_nd``): moving mass to a perceptually close colour costs little,
  which palette positions (the UW-71 order walks the a*-b* plane row by row) do not capture.
- ``entropy_diff``: ``H(p_model) - H(p_human)`` in bits; positive when the model's distribution is
  flatter (less peaked) than the human one.

Distributions: ``p = (x - min x) / sum(x - min x)`` for scores and ratings alike (uniform when the
row is constant). Why: cosine similarities of CLIP-family models sit in a narrow band (about
0.15-0.35) on a concept-dependent offset that says nothing about colour, so normalising raw
cosines (as the lab's earlier code effectively did) makes every concept look nearly uniform and
TV/EMD mostly measure the offset. Shifting the minimum to zero keeps exactly the differences
between colours; dividing by the sum makes the row a distribution. The same map applied to human
ratings changes them little (each concept has colours rated near 0) and makes "scores equal to
ratings" give TV 0 exactly. A softmax would instead need a temperature the human data does not
supply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from vlmlab.studies.scores import ScoreMatrix

METRIC_COLUMNS = ["model", "style", "concept", "pearson", "spearman", "tv", "emd", "entropy_diff"]
FIT_METRICS = ["pearson", "spearman", "tv", "emd", "emd_lab", "entropy_diff"]


def to_distribution(values: np.ndarray) -> np.ndarray:
    """Min-shift then sum-normalise a row of scores into a distribution over colours."""
    x = np.asarray(values, np.float64)
    shifted = x - x.min()
    total = shifted.sum()
    return shifted / total if total > 0 else np.full(len(x), 1 / len(x))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either row is constant."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.pearsonr(a, b).statistic)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation; NaN when either row is constant."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Total variation distance ``1/2 * sum |p - q|`` of two distributions (0 equal, 1 disjoint)."""
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())


def earth_movers(p: np.ndarray, q: np.ndarray, positions: np.ndarray | None = None) -> float:
    """Earth mover's distance between distributions ``p`` and ``q`` over colours at ``positions``:
    1-D positions (default palette positions 1..N) or (N, k) coordinates (e.g. CIELAB)."""
    if positions is None:
        positions = np.arange(1, len(p) + 1, dtype=np.float64)
    positions = np.asarray(positions, np.float64)
    if positions.ndim == 1:
        return float(stats.wasserstein_distance(positions, positions, p, q))
    return float(stats.wasserstein_distance_nd(positions, positions, p, q))


def entropy_bits(p: np.ndarray) -> float:
    """Shannon entropy of a distribution in bits (log2 N for a uniform one)."""
    p = np.asarray(p, np.float64)
    nz = p[p > 0]
    return float(-(nz * np.log2(nz)).sum())


def concept_metrics(scores: np.ndarray, ratings: np.ndarray, lab: np.ndarray | None = None) -> dict[str, float]:
    """Every per-concept metric of a model's row ``scores`` against the human row ``ratings``."""
    scores, ratings = np.asarray(scores, np.float64), np.asarray(ratings, np.float64)
    if scores.shape != ratings.shape:
        raise ValueError(f"scores over {scores.shape[0]} colours vs ratings over {ratings.shape[0]}")
    p, q = to_distribution(scores), to_distribution(ratings)
    h_model, h_human = entropy_bits(p), entropy_bits(q)
    return {
        "pearson": pearson(scores, ratings),
        "spearman": spearman(scores, ratings),
        "tv": total_variation(p, q),
        "emd": earth_movers(p, q),
        "emd_lab": earth_movers(p, q, lab) if lab is not None else float("nan"),
        "entropy_diff": h_model - h_human,
        "entropy_model": h_model,
        "entropy_human": h_human,
        "top_colour_model": int(np.argmax(scores)) + 1,
        "top_colour_human": int(np.argmax(ratings)) + 1,
    }


def align(scores: ScoreMatrix, ratings: ScoreMatrix) -> list[tuple[str, int, int]]:
    """``(concept, score row, rating row)`` for the concepts both matrices hold (case-insensitive)."""
    if scores.colours != ratings.colours:
        raise ValueError(f"scores have {scores.colours} colours, the ratings {ratings.colours}: "
                         "both must list the same palette in the same order")
    rating_rows = ratings.index()
    return [(c, i, rating_rows[c.strip().lower()]) for i, c in enumerate(scores.concepts)
            if c.strip().lower() in rating_rows]


def metrics_table(model: str, style: str, scores: ScoreMatrix, ratings: ScoreMatrix,
                  categories: Mapping[str, str], lab: np.ndarray | None = None) -> pd.DataFrame:
    """One row per concept the two matrices share: :data:`METRIC_COLUMNS` first, then ``category``,
    ``emd_lab``, the two entropies and the top colour of each side."""
    rows = []
    for concept, i, j in align(scores, ratings):
        row = {"model": model, "style": style, "concept": concept}
        row |= concept_metrics(scores.values[i], ratings.values[j], lab)
        row["category"] = categories.get(concept.strip().lower(), "other")
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    extra = [c for c in frame.columns if c not in METRIC_COLUMNS]
    return frame[METRIC_COLUMNS + extra]


def _correlate(x: pd.Series, y: pd.Series, fn) -> float:
    ok = x.notna() & y.notna()
    if ok.sum() < 3 or np.ptp(x[ok]) < 1e-9 or np.ptp(y[ok]) < 1e-9:  # a constant fit correlates with nothing
        return float("nan")
    return float(fn(x[ok], y[ok]).statistic)


def summarise(metrics: pd.DataFrame, covariates: Sequence[str] = ()) -> pd.DataFrame:
    """Means by model x style x category (plus category ``all``): every fit metric, its spread, and
    the correlation over concepts of the fit (Pearson r) with the human entropy (``fit_entropy_*``:
    do peaked human distributions get fit better?) and with each covariate column (e.g.
    ``concreteness``)."""
    rows = []
    for (model, style), cell in metrics.groupby(["model", "style"], sort=False):
        groups = [("all", cell)] + list(cell.groupby("category", sort=True))
        for category, group in groups:
            row = {"model": model, "style": style, "category": category, "n_concepts": len(group)}
            for metric in FIT_METRICS:
                row[metric] = float(group[metric].mean())
            row["pearson_sd"] = float(group["pearson"].std(ddof=1)) if len(group) > 1 else float("nan")
            row["fit_entropy_pearson"] = _correlate(group["pearson"], group["entropy_human"], stats.pearsonr)
            row["fit_entropy_spearman"] = _correlate(group["pearson"], group["entropy_human"], stats.spearmanr)
            for column in covariates:
                row[f"fit_{column}_spearman"] = _correlate(group["pearson"], group[column], stats.spearmanr)
            rows.append(row)
    return pd.DataFrame(rows)
