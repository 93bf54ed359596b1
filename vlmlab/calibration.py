"""Calibrated probabilities and conformal prediction sets, shared by every classifier vlmlab serves.

Zero-shot CLIP, the probes of :mod:`vlmlab.probe` and the inspection condition classifier all end
in class logits. This module turns those into numbers a person can act on:

- **Temperature scaling** (Guo et al. 2017): one scalar ``T``, ``probs = softmax(logits / T)``,
  fitted by minimising the negative log-likelihood on held-out labelled rows (NLL is convex in
  ``1/T``, so a bounded 1-D search finds the optimum). It never changes the top class.
- **Expected calibration error** over ``ECE_BINS`` = 15 equal-width bins of top-class confidence
  (Guo et al.'s choice), and a reliability-diagram PNG, before and after.
- **Split conformal prediction sets** (Vovk et al.; Angelopoulos & Bates 2021): on ``n``
  calibration rows, the non-conformity score of the true class is computed; the threshold is the
  ``ceil((n + 1)(1 - alpha)) / n`` empirical quantile; the set of a new image is every class whose
  score is at most the threshold. Then ``P(true class in set) >= 1 - alpha`` for an image
  exchangeable with the calibration rows (marginal over images, not per class). Scores:

  * ``lac`` — ``1 - p_y`` (Sadinle et al. 2019): the smallest sets on average; a set can be empty
    when no class is plausible at level alpha.
  * ``aps`` — the probability mass of the classes ranked above ``y`` (Romano et al. 2020):
    adapts the size to the image's difficulty, better per-class coverage.
  * ``raps`` — APS plus ``lambda * max(0, rank - k_reg)`` (Angelopoulos et al. 2021): penalises
    long tails of unlikely classes.

  The default is ``aps``: with a classifier that is nearly always right, LAC still spends its alpha
  on empty sets (10 % of images at alpha = 0.1), which an inspector reads as "unsure"; APS answers
  single classes there and widens the sets only where the classifier spreads its probability.

  Sets are deterministic (the same image always gets the same set, which a served model needs). For
  APS/RAPS that is the paper's randomised score with ``u = 0``: the top class scores 0, so it is in
  every set, and coverage exceeds 1 - alpha only where the top class alone already covers (the
  scores' atom at 0). ``randomized=True`` in the functions below gives the randomised APS/RAPS,
  whose coverage is exact rather than conservative (used to check the guarantee).

A :class:`Calibration` record (``calibration.json``) is saved beside the model it calibrates: the
temperature, the sorted calibration scores of every method (so any alpha can be served without
refitting), the split it was fitted on (rows, seed), the date and a fingerprint of the weights.
Temperature and conformal scores come from disjoint parts of the calibration split, so fitting ``T``
does not spend the exchangeability the guarantee rests on.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("lac", "aps", "raps")
DEFAULT_METHOD = "aps"  # never an empty set, singletons once the classifier is sure (see the module docstring)
ECE_BINS = 15
CALIBRATION_FILE = "calibration.json"
FORMAT_VERSION = 1
TEMPERATURE_BOUNDS = (0.01, 100.0)
GUARANTEE = ("P(true class in prediction_set) >= 1 - alpha, marginally over images exchangeable with the "
             "calibration split (not per class, not per image)")


class CalibrationError(ValueError):
    """A calibration record is missing, stale (other weights) or does not fit the classifier."""


def check_alpha(alpha: Any) -> float:
    """``alpha`` as a float if it is an error rate in (0, 1), else ``ValueError`` saying so."""
    try:
        value = float(alpha)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"alpha (the conformal error rate) must be a number in (0, 1), got {alpha!r}") from exc
    if not 0.0 < value < 1.0 or math.isnan(value):
        raise ValueError(f"alpha (the conformal error rate) must be in (0, 1), e.g. 0.1 for 90% coverage; "
                         f"got {alpha!r}")
    return value


def check_method(method: str) -> str:
    """``method`` if it is a conformal score this module knows, else ``ValueError``."""
    if method not in METHODS:
        raise ValueError(f"unknown conformal method {method!r}; use one of {', '.join(METHODS)}")
    return method


# --------------------------------------------------------------------------- probabilities


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise ``softmax(logits / temperature)`` (N, C) float64."""
    from scipy.special import softmax as _softmax

    return _softmax(np.asarray(logits, np.float64) / float(temperature), axis=1)


def logits_of(probs: np.ndarray) -> np.ndarray:
    """Logits (N, C) with ``softmax(logits) == probs``: ``log(probs)`` (for classifiers that return probabilities)."""
    return np.log(np.clip(np.asarray(probs, np.float64), 1e-300, None))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of integer ``labels`` under ``softmax(logits / temperature)``."""
    from scipy.special import log_softmax

    logp = log_softmax(np.asarray(logits, np.float64) / float(temperature), axis=1)
    return float(-logp[np.arange(len(labels)), np.asarray(labels)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the NLL of ``labels`` (N,) under ``softmax(logits / T)`` (N, C).

    NLL is convex in the inverse temperature, so a bounded scalar search over ``log T`` in
    ``TEMPERATURE_BOUNDS`` finds the global optimum. 1.0 when there are no rows.
    """
    from scipy.optimize import minimize_scalar

    if len(labels) == 0:
        return 1.0
    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(lambda log_t: nll(logits, labels, math.exp(log_t)), bounds=(lo, hi), method="bounded",
                             options={"xatol": 1e-5})
    return float(math.exp(result.x))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Per equal-width confidence bin ((lo, hi], the first also holds 0): ``count``, mean top-class
    ``confidence`` and ``accuracy`` (NaN in empty bins), and the bin ``edges`` (n_bins + 1)."""
    probs = np.asarray(probs, np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore"):
        conf = np.bincount(which, confidence, n_bins) / count
        acc = np.bincount(which, correct.astype(float), n_bins) / count
    return {"edges": edges.tolist(), "count": count.tolist(), "confidence": conf.tolist(), "accuracy": acc.tolist()}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean gap between accuracy and top-class confidence over ``n_bins``
    equal-width bins (0 for perfect calibration, at most 1). 0.0 for no rows."""
    if len(labels) == 0:
        return 0.0
    bins = reliability_bins(probs, labels, n_bins)
    count = np.asarray(bins["count"], float)
    gap = np.abs(np.nan_to_num(np.asarray(bins["accuracy"]) - np.asarray(bins["confidence"])))
    return float((count * gap).sum() / count.sum())


def plot_reliability(panels: Mapping[str, tuple[np.ndarray, np.ndarray]], out: str | Path,
                     n_bins: int = ECE_BINS) -> Path:
    """A reliability-diagram PNG, one panel per ``{title: (probs (N, C), labels (N,))}`` side by side.

    Each panel: accuracy per confidence bin (bars) against the diagonal of perfect calibration, the gap
    to each bin's mean confidence shaded, ECE in the title; below it, how many rows fall in each bin.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(panels), 1)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 5.6), squeeze=False, gridspec_kw={"height_ratios": [3, 1]},
                             sharex="col")
    width = 1.0 / n_bins
    for col, (title, (probs, labels)) in enumerate(panels.items()):
        bins = reliability_bins(probs, labels, n_bins)
        left = np.asarray(bins["edges"][:-1])
        acc = np.nan_to_num(np.asarray(bins["accuracy"]))
        conf = np.asarray(bins["confidence"])
        filled = np.asarray(bins["count"]) > 0
        ax = axes[0, col]
        ax.bar(left[filled], acc[filled], width=width, align="edge", color="#4477aa", edgecolor="black",
               label="accuracy")
        # the gap to the bin's mean confidence: above a bar = over-confident, inside it = under-confident
        ax.bar(left[filled], conf[filled] - acc[filled], bottom=acc[filled], width=width, align="edge",
               fill=False, hatch="//", edgecolor="#cc3344", label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}\nECE {expected_calibration_error(probs, labels, n_bins):.3f} "
                     f"({n_bins} bins, n={len(labels)})", fontsize=10)
        if col == 0:
            ax.legend(loc="upper left", fontsize=8)
        hist = axes[1, col]
        hist.bar(left, bins["count"], width=width, align="edge", color="#888888", edgecolor="black")
        hist.set_xlabel("confidence (top-class probability)")
        hist.set_ylabel("rows")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


# --------------------------------------------------------------------------- conformal scores


def _ranks(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order (N, C): classes by decreasing probability, rank (N, C): 1-based rank of each class)."""
    order = np.argsort(-probs, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(1, probs.shape[1] + 1)[None, :].repeat(len(probs), 0), axis=1)
    return order, rank


def class_scores(probs: np.ndarray, method: str = "lac", randomized: bool = False,
                 rng: np.random.Generator | None = None, raps_lambda: float = 0.01, raps_k_reg: int = 1) -> np.ndarray:
    """Non-conformity score (N, C) of every class of every row; lower means more plausible.

    ``lac``: ``1 - p``. ``aps``: the probability mass of the classes ranked above the class (0 for the
    top class), plus ``u * p`` with one ``u ~ U(0, 1)`` per row from ``rng`` when ``randomized``.
    ``raps``: the APS score plus ``raps_lambda * max(0, rank - raps_k_reg)`` (rank 1 = top class).
    """
    probs = np.asarray(probs, np.float64)
    check_method(method)
    if method == "lac":
        return 1.0 - probs
    order, rank = _ranks(probs)
    cum = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    above = np.take_along_axis(cum, rank - 1, axis=1) - probs  # mass of the classes ranked above
    # u = 0: the deterministic score (the top class scores 0, so it is in every set); u ~ U(0, 1): exact coverage
    u = (rng or np.random.default_rng()).random((len(probs), 1)) if randomized else 0.0
    scores = above + u * probs
    if method == "raps":
        scores = scores + raps_lambda * np.maximum(0, rank - raps_k_reg)
    return scores


def conformal_threshold(scores: np.ndarray, alpha: float) -> float:
    """The split-conformal threshold of calibration ``scores`` (n,): the ``ceil((n+1)(1-alpha))``-th
    smallest score; ``inf`` (every class in every set) when that exceeds ``n`` (too few rows for alpha)."""
    alpha = check_alpha(alpha)
    scores = np.sort(np.asarray(scores, np.float64))
    n = len(scores)
    k = math.ceil((n + 1) * (1 - alpha) - 1e-9)  # the epsilon keeps 90.0000001 from rounding up to 91
    return math.inf if k > n else float(scores[k - 1])


def min_rows_for(alpha: float) -> int:
    """The fewest calibration rows that give a finite threshold at ``alpha``: ``ceil(1/alpha) - 1``."""
    return math.ceil(1 / check_alpha(alpha) - 1e-9) - 1


def prediction_sets(probs: np.ndarray, threshold: float, method: str = "lac", randomized: bool = False,
                    rng: np.random.Generator | None = None, raps_lambda: float = 0.01,
                    raps_k_reg: int = 1) -> np.ndarray:
    """Boolean membership (N, C): class ``c`` is in row ``i``'s set when its score is at most ``threshold``.

    Deterministic APS/RAPS sets always hold the top class (it scores 0); LAC and randomised sets may be empty.
    """
    return class_scores(probs, method, randomized, rng, raps_lambda, raps_k_reg) <= threshold


def true_class_scores(probs: np.ndarray, labels: np.ndarray, method: str = "lac", randomized: bool = False,
                      rng: np.random.Generator | None = None, raps_lambda: float = 0.01,
                      raps_k_reg: int = 1) -> np.ndarray:
    """Score (n,) of each calibration row's true class: what :func:`conformal_threshold` takes."""
    scores = class_scores(probs, method, randomized, rng, raps_lambda, raps_k_reg)
    return scores[np.arange(len(labels)), np.asarray(labels)]


def coverage_report(sets: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Empirical coverage and set sizes of boolean ``sets`` (N, C) against ``labels`` (N,).

    ``coverage`` (fraction of rows whose set holds the true class), ``mean_set_size``,
    ``empty_sets``/``singletons`` (fractions), ``size_histogram`` (rows per size 0..C) and
    ``per_class`` (by true class: ``coverage``, ``mean_set_size``, ``support``).
    """
    sets = np.asarray(sets, bool)
    labels = np.asarray(labels)
    covered = sets[np.arange(len(labels)), labels] if len(labels) else np.zeros(0, bool)
    sizes = sets.sum(axis=1)
    per_class = {}
    for c, name in enumerate(classes):
        mine = labels == c
        if mine.any():
            per_class[name] = {"coverage": float(covered[mine].mean()), "mean_set_size": float(sizes[mine].mean()),
                               "support": int(mine.sum())}
    n = max(len(labels), 1)
    return {
        "n": int(len(labels)),
        "coverage": float(covered.mean()) if len(labels) else 0.0,
        "mean_set_size": float(sizes.mean()) if len(labels) else 0.0,
        "empty_sets": float((sizes == 0).sum() / n),
        "singletons": float((sizes == 1).sum() / n),
        "size_histogram": np.bincount(sizes, minlength=len(classes) + 1).tolist(),
        "per_class": per_class,
    }


# --------------------------------------------------------------------------- the record


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 (hex) of a file: ties a calibration record to the exact weights it was fitted on."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class Calibration:
    """Temperature + conformal calibration of one classifier (``classes`` in its column order).

    ``scores`` holds, per method, the sorted true-class scores of the conformal rows (computed on
    temperature-scaled probabilities), so :meth:`threshold` serves any alpha. ``alpha``/``method``
    are the defaults a caller gets when it names none. ``split`` says what the record was fitted on.
    """

    classes: list[str]
    temperature: float
    scores: dict[str, list[float]]
    method: str = DEFAULT_METHOD
    alpha: float = 0.1
    raps_lambda: float = 0.01
    raps_k_reg: int = 1
    split: dict[str, Any] = field(default_factory=dict)
    temperature_fit: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""
    created_at: str = field(default_factory=_now)
    format_version: int = FORMAT_VERSION

    # ---------------------------------------------------------------- fitting

    @classmethod
    def fit(cls, logits: np.ndarray, labels: np.ndarray, classes: Sequence[str], *, method: str = DEFAULT_METHOD,
            alpha: float = 0.1, temperature_fraction: float = 0.5, seed: int = 0, split: str = "calibration",
            raps_lambda: float = 0.01, raps_k_reg: int | None = None, ids: Sequence[int] | None = None,
            weights_file: str | Path | None = None) -> Calibration:
        """Fit on a labelled calibration split: ``logits`` (N, C), integer ``labels`` (N,).

        A seeded random ``temperature_fraction`` of the rows fits the temperature (and RAPS's
        ``k_reg`` when None: the ``1 - alpha`` quantile of the true class's rank there); the rest give
        the conformal scores. ``ids`` (store ids, optional) are recorded with the split;
        ``weights_file`` is fingerprinted so a record never outlives the weights it was fitted on.
        """
        alpha, method = check_alpha(alpha), check_method(method)
        logits = np.asarray(logits, np.float64)
        labels = np.asarray(labels, np.int64)
        n = len(labels)
        if n < 2:
            raise ValueError(f"calibration needs at least 2 labelled rows in the {split!r} split, got {n}")
        if logits.shape != (n, len(classes)):
            raise ValueError(f"logits have shape {logits.shape}; expected ({n}, {len(classes)}) for {len(classes)} "
                             "classes")
        if not 0.0 < temperature_fraction < 1.0:
            raise ValueError(f"temperature_fraction must be in (0, 1), got {temperature_fraction}")
        order = np.random.default_rng(seed).permutation(n)
        m = min(max(1, round(temperature_fraction * n)), n - 1)
        tune, conformal = order[:m], order[m:]
        temperature = fit_temperature(logits[tune], labels[tune])
        raw, calibrated = softmax(logits), softmax(logits, temperature)
        if raps_k_reg is None:
            _, rank = _ranks(calibrated[tune])
            true_rank = rank[np.arange(len(tune)), labels[tune]]
            raps_k_reg = int(np.quantile(true_rank, 1 - alpha, method="higher"))
        scores = {name: np.sort(true_class_scores(calibrated[conformal], labels[conformal], name,
                                                  raps_lambda=raps_lambda, raps_k_reg=raps_k_reg)).tolist()
                  for name in METHODS}
        split_info: dict[str, Any] = {"name": split, "rows": n, "temperature_rows": int(m),
                                      "conformal_rows": int(n - m), "seed": seed}
        if ids is not None:
            ids = np.asarray(ids)
            split_info["temperature_ids"] = ids[tune].tolist()
            split_info["conformal_ids"] = ids[conformal].tolist()
        temperature_fit = {"nll_before": nll(logits[tune], labels[tune]),
                           "nll_after": nll(logits[tune], labels[tune], temperature),
                           "ece_before": expected_calibration_error(raw[tune], labels[tune]),
                           "ece_after": expected_calibration_error(calibrated[tune], labels[tune]),
                           "accuracy": float((raw.argmax(1) == labels).mean()), "ece_bins": ECE_BINS}
        return cls(classes=list(classes), temperature=temperature, scores=scores, method=method, alpha=alpha,
                   raps_lambda=raps_lambda, raps_k_reg=int(raps_k_reg), split=split_info,
                   temperature_fit=temperature_fit,
                   weights_sha256=file_fingerprint(weights_file) if weights_file else "")

    # ---------------------------------------------------------------- use

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, C): ``softmax(logits / temperature)``."""
        return softmax(logits, self.temperature)

    def threshold(self, alpha: float | None = None, method: str | None = None) -> float:
        """The conformal threshold at ``alpha`` (default: the record's) for ``method`` (default: the record's)."""
        return conformal_threshold(self.scores[check_method(method or self.method)],
                                   self.alpha if alpha is None else alpha)

    def sets(self, calibrated_probs: np.ndarray, alpha: float | None = None, method: str | None = None) -> np.ndarray:
        """Boolean prediction sets (N, C) of temperature-scaled probabilities (from :meth:`probs`)."""
        method = check_method(method or self.method)
        return prediction_sets(calibrated_probs, self.threshold(alpha, method), method,
                               raps_lambda=self.raps_lambda, raps_k_reg=self.raps_k_reg)

    def guarantee(self, alpha: float | None = None, method: str | None = None) -> dict[str, Any]:
        """What a prediction set at ``alpha`` promises, JSON-ready (for responses and reports)."""
        alpha = check_alpha(self.alpha if alpha is None else alpha)
        method = check_method(method or self.method)
        threshold = self.threshold(alpha, method)
        n = len(self.scores[method])
        out = {"alpha": alpha, "method": method, "coverage_at_least": round(1 - alpha, 6),
               "threshold": threshold if math.isfinite(threshold) else None, "calibration_rows": n,
               "calibration_split": self.split.get("name"), "seed": self.split.get("seed"),
               "temperature": self.temperature, "calibrated_at": self.created_at, "statement": GUARANTEE}
        if not math.isfinite(threshold):
            out["note"] = (f"{n} calibration rows are too few for alpha={alpha} (needs {min_rows_for(alpha)}): "
                           "every class is in every set")
        return out

    def check_classes(self, classes: Sequence[str]) -> None:
        """``CalibrationError`` unless ``classes`` are the record's, in the same order."""
        if list(classes) != self.classes:
            raise CalibrationError(f"the calibration record is for classes {self.classes}, not {list(classes)}")

    # ---------------------------------------------------------------- files

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable record."""
        return asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Calibration:
        """Rebuild from :meth:`to_dict` output; ``CalibrationError`` on a record of another format."""
        if record.get("format_version") != FORMAT_VERSION:
            raise CalibrationError(f"calibration record format {record.get('format_version')!r} is not "
                                   f"{FORMAT_VERSION}; refit it")
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in record.items() if k in names})

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/calibration.json``; returns its path."""
        path = Path(directory) / CALIBRATION_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path, weights_file: str | Path | None = None) -> Calibration | None:
        """The record in ``directory/calibration.json``, or None when there is none.

        With ``weights_file``, a record fitted on other weights raises :class:`CalibrationError`
        (retraining into the same directory must not keep a stale guarantee).
        """
        path = Path(directory) / CALIBRATION_FILE
        if not path.is_file():
            return None
        try:
            record = cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise CalibrationError(f"cannot read {path}: {exc}") from exc
        if weights_file and record.weights_sha256 and record.weights_sha256 != file_fingerprint(weights_file):
            raise CalibrationError(f"{path} was fitted on other weights than {weights_file}; calibrate again")
        return record


# --------------------------------------------------------------------------- reports


def calibration_report(logits: np.ndarray, labels: np.ndarray, record: Calibration, alpha: float | None = None,
                       method: str | None = None) -> dict[str, Any]:
    """How ``record`` does on held-out rows (``logits`` (N, C), ``labels`` (N,)): accuracy, NLL and ECE
    before/after temperature scaling and, with ``alpha``, the prediction sets' :func:`coverage_report`
    plus the guarantee they were made under."""
    raw, calibrated = softmax(logits), record.probs(logits)
    report: dict[str, Any] = {
        "n": int(len(labels)), "temperature": record.temperature, "ece_bins": ECE_BINS,
        "accuracy": float((raw.argmax(1) == labels).mean()) if len(labels) else 0.0,
        "ece_before": expected_calibration_error(raw, labels),
        "ece_after": expected_calibration_error(calibrated, labels),
        "nll_before": nll(logits, labels) if len(labels) else 0.0,
        "nll_after": nll(logits, labels, record.temperature) if len(labels) else 0.0,
    }
    if alpha is not None:
        sets = record.sets(calibrated, alpha, method)
        report["conformal"] = {**record.guarantee(alpha, method), **coverage_report(sets, labels, record.classes),
                               **expected_coverage(len(record.scores[method or record.method]), len(labels), alpha)}
    return report


def expected_coverage(n: int, m: int, alpha: float) -> dict[str, float]:
    """What the coverage of m test rows should look like after calibrating on n rows at ``alpha``:
    ``expected_coverage`` k/(n+1) and ``coverage_sd``, the spread of one such figure (BetaBinomial(m, k,
    n+1-k)/m, exact for continuous scores), so a measured coverage can be read against sampling error."""
    from scipy import stats

    k = math.ceil((n + 1) * (1 - check_alpha(alpha)) - 1e-9)
    if k > n or m == 0:
        return {"expected_coverage": 1.0, "coverage_sd": 0.0}
    return {"expected_coverage": k / (n + 1), "coverage_sd": float(stats.betabinom(m, k, n + 1 - k).std() / m)}
