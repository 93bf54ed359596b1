"""Semantic discriminability (Mukherjee, Yin, Sherman, Lessard & Schloss, "Context Matters: A Theory
of Semantic Discriminability for Perceptual Encoding Systems", IEEE TVCG 2022).

For colours i, j and concepts A, B with mean associations W (in [0, 1]):

    s  = 1.4 * W * (1 - W)                      (spread of each of the four associations)
    ΔW = W_iA + W_jB - W_iB - W_jA               (net evidence for i->A, j->B over i->B, j->A)
    z  = ΔW / sqrt(s_iA² + s_jB² + s_iB² + s_jA²)
    ΔS = |2 Φ(z) - 1|                             (Φ the standard normal CDF)

as in the authors' code (SchlossVRL/semantic-discriminability, ``FruitTable.m``). When all four
associations are 0 or 1 the spread is 0 and ΔS is 1 if ΔW != 0 (perfectly decodable), else 0.

Model associations enter ΔS after a min-max rescaling of the whole concept x colour matrix to
[0, 1] (one map for all concepts, so the differences between concepts are kept; ΔW itself is
unchanged up to scale by any shift of a concept's or a colour's row).

**Capacity** of a concept set: the palette colours assigned one per concept (distinct colours) that
maximise the total *contrast merit* ``W_cA - mean_{B != A} W_cB`` (Hungarian algorithm,
``scipy.optimize.linear_sum_assignment``), and the mean (and minimum) ΔS over the set's concept
pairs under that assignment. The contrast merit, rather than the raw association, is what makes an
assignment decodable: two concepts both most associated with grey would both get grey-ish colours
by raw association, whereas for a pair the contrast merit is exactly ΔW, the numerator of ΔS.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from scipy.optimize import linear_sum_assignment
from scipy.special import erf

from vlmlab.studies.association import align
from vlmlab.studies.scores import ScoreMatrix

SPREAD = 1.4
MERITS = ("contrast", "association")


def semantic_distance(w_ia: np.ndarray, w_jb: np.ndarray, w_ib: np.ndarray, w_ja: np.ndarray) -> np.ndarray:
    """ΔS of colour pair (i, j) for concepts (A, B), elementwise over arrays of associations in [0, 1]."""
    w = [np.asarray(x, np.float64) for x in (w_ia, w_jb, w_ib, w_ja)]
    delta_w = w[0] + w[1] - w[2] - w[3]
    spread = np.sqrt(sum((SPREAD * x * (1 - x)) ** 2 for x in w))
    with np.errstate(invalid="ignore"):
        no_spread = np.where(delta_w == 0, 0.0, np.sign(delta_w) * np.inf)
        z = np.where(spread > 0, delta_w / np.where(spread > 0, spread, 1.0), no_spread)
    # |2Φ(z) - 1| = |erf(z / √2)|; erf(±inf) = ±1
    return np.abs(erf(z / np.sqrt(2)))


def rescale_unit(values: np.ndarray) -> np.ndarray:
    """Min-max map of a whole matrix to [0, 1] (all 0.5 when constant)."""
    values = np.asarray(values, np.float64)
    span = np.ptp(values)
    return (values - values.min()) / span if span > 0 else np.full(values.shape, 0.5)


def pair_distances(assoc: np.ndarray, a: int, b: int) -> np.ndarray:
    """ΔS over every colour pair i < j (``np.triu_indices(N, 1)`` order) for concepts rows a, b of
    the (C, N) association matrix."""
    i, j = np.triu_indices(assoc.shape[1], 1)
    return semantic_distance(assoc[a, i], assoc[b, j], assoc[b, i], assoc[a, j])


def best_assignment(assoc: np.ndarray, rows: Sequence[int], merit: str = "contrast") -> np.ndarray:
    """Distinct colour columns (one per row in ``rows``) maximising the total merit (Hungarian)."""
    block = np.asarray(assoc, np.float64)[list(rows)]
    if merit == "contrast" and len(rows) > 1:
        block = block - (block.sum(axis=0, keepdims=True) - block) / (len(rows) - 1)
    elif merit not in MERITS:
        raise ValueError(f"merit {merit!r}: expected one of {', '.join(MERITS)}")
    if len(rows) > block.shape[1]:
        raise ValueError(f"{len(rows)} concepts cannot get distinct colours from a palette of {block.shape[1]}")
    r, c = linear_sum_assignment(block, maximize=True)
    return c[np.argsort(r)]


def assignment_distances(assoc: np.ndarray, rows: Sequence[int], colours: Sequence[int]) -> np.ndarray:
    """ΔS of every concept pair of ``rows`` when concept ``rows[k]`` is shown as colour ``colours[k]``."""
    out = []
    for (ka, a), (kb, b) in itertools.combinations(enumerate(rows), 2):
        i, j = colours[ka], colours[kb]
        out.append(float(semantic_distance(assoc[a, i], assoc[b, j], assoc[b, i], assoc[a, j])))
    return np.asarray(out)


def _corr(x: np.ndarray, y: np.ndarray, fn) -> float:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(fn(x, y).statistic)


def check_ratings(ratings: ScoreMatrix) -> None:
    """Human associations must be in [0, 1] for ΔS (its spread term is 1.4 W (1 - W))."""
    if ratings.values.min() < 0 or ratings.values.max() > 1:
        raise ValueError(f"ratings range from {ratings.values.min():g} to {ratings.values.max():g}; semantic "
                         "discriminability needs associations in [0, 1]: rescale the ratings file")


def discriminability_table(model: str, style: str, scores: ScoreMatrix, ratings: ScoreMatrix,
                           categories: Mapping[str, str], merit: str = "contrast") -> pd.DataFrame:
    """ΔS from the model vs from humans, per concept set: every concept pair (``kind`` pair), every
    category with at least two concepts (``category``) and all shared concepts (``all``).

    Columns: ``ds_pearson``/``ds_spearman`` (model vs human ΔS over colour pairs and the set's concept
    pairs), mean ΔS of each, ``capacity_human`` (human assignment under human ΔS),
    ``capacity_model`` (model assignment under model ΔS), ``capacity_model_palette_human`` (the
    model's assignment judged by human ΔS: would people decode the palette the model picks?), their
    minima, ``assignment_agreement`` (share of concepts both give the same colour) and both colour
    lists (1-based palette indices, in concept order).
    """
    check_ratings(ratings)
    shared = align(scores, ratings)
    if len(shared) < 2:
        return pd.DataFrame()
    names = [c for c, _, _ in shared]
    human = ratings.values[[j for _, _, j in shared]]
    machine = rescale_unit(scores.values[[i for _, i, _ in shared]])
    pairs = {}
    for a, b in itertools.combinations(range(len(names)), 2):
        pairs[(a, b)] = (pair_distances(human, a, b), pair_distances(machine, a, b))

    sets: list[tuple[str, str, list[int]]] = [("pair", f"{names[a]}+{names[b]}", [a, b]) for a, b in pairs]
    by_category: dict[str, list[int]] = {}
    for k, concept in enumerate(names):
        by_category.setdefault(categories.get(concept.strip().lower(), "other"), []).append(k)
    sets += [("category", cat, rows) for cat, rows in sorted(by_category.items()) if len(rows) > 1]
    sets.append(("all", "all", list(range(len(names)))))

    out = []
    for kind, label, rows in sets:
        keys = list(itertools.combinations(rows, 2))
        ds_h = np.concatenate([pairs[k][0] for k in keys])
        ds_m = np.concatenate([pairs[k][1] for k in keys])
        colours_h = best_assignment(human, rows, merit)
        colours_m = best_assignment(machine, rows, merit)
        cap_h = assignment_distances(human, rows, colours_h)
        cap_m = assignment_distances(machine, rows, colours_m)
        cap_mh = assignment_distances(human, rows, colours_m)
        out.append({
            "model": model, "style": style, "kind": kind, "concept_set": label, "n_concepts": len(rows),
            "ds_pearson": _corr(ds_m, ds_h, stats.pearsonr), "ds_spearman": _corr(ds_m, ds_h, stats.spearmanr),
            "ds_human_mean": float(ds_h.mean()), "ds_model_mean": float(ds_m.mean()),
            "capacity_human": float(cap_h.mean()), "capacity_human_min": float(cap_h.min()),
            "capacity_model": float(cap_m.mean()),
            "capacity_model_palette_human": float(cap_mh.mean()),
            "capacity_model_palette_human_min": float(cap_mh.min()),
            "assignment_agreement": float(np.mean(colours_h == colours_m)),
            "colours_human": " ".join(str(c + 1) for c in colours_h),
            "colours_model": " ".join(str(c + 1) for c in colours_m),
        })
    return pd.DataFrame(out)
