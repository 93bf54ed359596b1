"""Few-shot probes on stored embeddings: ``vlmlab train probe`` and the library behind it.

``vlmlab train probe --store STORE --labels labels.csv --out PROBE [--shots K] [--method logistic|knn|tip-adapter]``
fits a classifier on the store's image embeddings (nothing is re-embedded; only the class names go
through the text tower once). Every method starts from zero-shot CLIP, so ``--shots 0`` *is*
zero-shot, with the same probabilities:

- ``logistic`` — multinomial logistic regression whose weights start at, and are regularised
  toward, the prompt-ensembled class embeddings x the logit scale (the zero-shot head, as the
  inspection classifier's head starts): loss = mean cross-entropy + lambda/2 (||W - W_text||^2 + ||b||^2),
  L-BFGS. lambda is chosen by stratified k-fold cross-validation (accuracy, then NLL) on the shots.
- ``knn`` — class-wise nearest neighbours: a class's logit is the logit scale x the mean cosine
  similarity to its ``k`` nearest shots (``k`` cross-validated; a class without shots is
  represented by its text embedding, which is all zero-shot is).
- ``tip-adapter`` — Tip-Adapter (Zhang et al. 2022), training-free: zero-shot logits plus a cache
  model of the shots, ``alpha x (logit_scale/100) x exp(-beta (1 - cos(image, shot))) @ one_hot(shot labels)``
  (the paper's alpha/beta for CLIP's logit scale of 100); alpha and beta cross-validated.

The labelled rows are split (seeded, stratified; or by a ``split`` column train/val/test in the
CSV): K shots per class are drawn from the training part, and a held-out calibration part fits a
temperature and conformal prediction sets (:mod:`vlmlab.calibration`). The probe directory holds
``probe.json`` (method, classes, model, hyperparameters and their cross-validation, rows used),
``probe.npz`` (arrays) and ``calibration.json``; ``vlmlab classify STORE --probe PROBE`` and the Serve
``/classify`` load it (:func:`load_probe`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from threadpoolctl import threadpool_limits

from vlmlab.calibration import CALIBRATION_FILE, DEFAULT_METHOD, Calibration, CalibrationError, check_alpha, softmax
from vlmlab.calibration import METHODS as CONFORMAL_METHODS

if TYPE_CHECKING:
    import pyarrow as pa

    from vlmlab.store import EmbeddingStore

PROBE_FILE = "probe.json"
ARRAYS_FILE = "probe.npz"
FORMAT_VERSION = 1
LOGISTIC_LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
KNN_KS = (1, 2, 3, 5, 8, 13)
TIP_ALPHAS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
TIP_BETAS = (1.0, 2.0, 3.5, 5.5, 8.0)
CV_FOLDS = 5
SPLIT_NAMES = {"train": "train", "val": "calibration", "valid": "calibration", "validation": "calibration",
               "calibration": "calibration", "test": "test"}


@dataclass
class Probe:
    """A fitted probe: class logits (N, C) of L2-normalised image embeddings (N, D) via :meth:`logits`.

    ``class_embeddings`` (C, D) are the prompt-ensembled text embeddings (the zero-shot prior),
    ``params`` the chosen hyperparameters; ``weight``/``bias`` are set for ``logistic``,
    ``support``/``support_labels`` (the shots) for ``knn`` and ``tip-adapter``.
    """

    method: str
    classes: list[str]
    class_embeddings: np.ndarray
    logit_scale: float
    params: dict[str, Any] = field(default_factory=dict)
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    support: np.ndarray | None = None
    support_labels: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration | None = None

    def logits(self, image_vectors: np.ndarray) -> np.ndarray:
        """Class logits (N, C) float64 of (N, D) or (D,) unit image embeddings."""
        x = np.atleast_2d(np.asarray(image_vectors, np.float64))
        return METHODS[self.method].logits(self, x)

    def predict_proba(self, image_vectors: np.ndarray, calibrated: bool = True) -> np.ndarray:
        """Class probabilities (N, C); temperature-scaled when the probe is calibrated and ``calibrated``."""
        logits = self.logits(image_vectors)
        if calibrated and self.calibration is not None:
            return self.calibration.probs(logits)
        return softmax(logits)

    @property
    def shots(self) -> int:
        """Labelled embeddings the probe was fitted on (0: zero-shot)."""
        if self.support_labels is not None:
            return int(len(self.support_labels))
        return int(self.meta.get("train_rows", 0))

    # ---------------------------------------------------------------- files

    def save(self, out: str | Path) -> Path:
        """Write ``probe.json`` + ``probe.npz`` (and ``calibration.json`` when calibrated) into ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        arrays = {"class_embeddings": self.class_embeddings.astype(np.float32)}
        for name in ("weight", "bias", "support", "support_labels"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = value
        for name in ("train_ids", "calibration_ids"):
            if name in self.meta:
                arrays[name] = np.asarray(self.meta[name], np.int64)
        np.savez(out / ARRAYS_FILE, **arrays)
        meta = {k: v for k, v in self.meta.items() if k not in ("train_ids", "calibration_ids")}
        record = {"format_version": FORMAT_VERSION, "method": self.method, "classes": self.classes,
                  "logit_scale": self.logit_scale, "params": self.params, **meta}
        (out / PROBE_FILE).write_text(json.dumps(record, indent=1, default=str) + "\n")
        if self.calibration is not None:
            self.calibration.save(out)
        else:  # a record of earlier arrays would no longer hold
            (out / CALIBRATION_FILE).unlink(missing_ok=True)
        return out


# --------------------------------------------------------------------------- methods


def _one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes)[np.asarray(labels, np.int64)]


def fit_logistic(x: np.ndarray, y: np.ndarray, prior: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """(weight (C, D), bias (C,)) minimising mean cross-entropy + lam/2 (||W - prior||^2 + ||b||^2).

    ``prior`` (C, D) is the zero-shot head (text embeddings x logit scale); with no rows the answer is
    the prior itself. L-BFGS from the prior; the problem is strictly convex.
    """
    from scipy.optimize import minimize
    from scipy.special import log_softmax

    num_classes, dim = prior.shape
    if len(y) == 0:
        return prior.copy(), np.zeros(num_classes)
    targets = _one_hot(y, num_classes)
    n = len(y)

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: num_classes * dim].reshape(num_classes, dim), theta[num_classes * dim:]
        logp = log_softmax(x @ w.T + b, axis=1)
        delta = w - prior
        loss = -(targets * logp).sum() / n + lam / 2 * ((delta**2).sum() + (b**2).sum())
        g = (np.exp(logp) - targets) / n
        return loss, np.concatenate([(g.T @ x + lam * delta).ravel(), g.sum(0) + lam * b])

    start = np.concatenate([prior.ravel(), np.zeros(num_classes)])
    result = minimize(loss_and_grad, start, jac=True, method="L-BFGS-B", options={"maxiter": 1000, "gtol": 1e-7})
    theta = result.x
    return theta[: num_classes * dim].reshape(num_classes, dim), theta[num_classes * dim:]


def knn_logits(x: np.ndarray, class_embeddings: np.ndarray, logit_scale: float, support: np.ndarray,
               support_labels: np.ndarray, k: int) -> np.ndarray:
    """Class-wise kNN logits (N, C): logit scale x mean cosine to the class's ``k`` nearest shots
    (its text embedding when it has none: with no shots at all this is zero-shot)."""
    out = np.empty((len(x), len(class_embeddings)))
    sims = x @ support.T if len(support) else np.zeros((len(x), 0))
    for c in range(len(class_embeddings)):
        mine = sims[:, support_labels == c] if len(support) else sims
        if mine.shape[1] == 0:
            out[:, c] = x @ class_embeddings[c]
            continue
        kk = min(int(k), mine.shape[1])
        out[:, c] = -np.partition(-mine, kk - 1, axis=1)[:, :kk].mean(axis=1)
    return logit_scale * out


def tip_adapter_logits(x: np.ndarray, class_embeddings: np.ndarray, logit_scale: float, support: np.ndarray,
                       support_labels: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """Tip-Adapter logits (N, C): zero-shot logits + ``alpha (logit_scale/100) exp(-beta (1 - x S^T)) L``."""
    logits = logit_scale * x @ class_embeddings.T
    if len(support) == 0:
        return logits
    affinity = np.exp(-beta * (1.0 - x @ support.T))
    return logits + alpha * logit_scale / 100.0 * affinity @ _one_hot(support_labels, len(class_embeddings))


@dataclass(frozen=True)
class ProbeMethod:
    """One probe method: its hyperparameter grid (and defaults when there are too few shots to
    cross-validate), held-out logits for given params, and the fitted state + logits of a probe."""

    grid: Callable[[np.ndarray], list[dict[str, Any]]]
    default: dict[str, Any]
    heldout_logits: Callable[[dict[str, Any], np.ndarray, np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]
    fit_state: Callable[[dict[str, Any], np.ndarray, np.ndarray, np.ndarray, float], dict[str, Any]]
    logits: Callable[[Probe, np.ndarray], np.ndarray]


def _logistic_heldout(params, x, y, x_val, text, scale):
    w, b = fit_logistic(x, y, text * scale, params["lambda"])
    return x_val @ w.T + b


def _min_class_count(y: np.ndarray) -> int:
    return int(np.unique(y, return_counts=True)[1].min()) if len(y) else 0


METHODS: dict[str, ProbeMethod] = {
    "logistic": ProbeMethod(
        grid=lambda y: [{"lambda": lam} for lam in LOGISTIC_LAMBDAS],
        default={"lambda": 0.01},
        heldout_logits=_logistic_heldout,
        fit_state=lambda p, x, y, text, scale: dict(zip(("weight", "bias"),
                                                        fit_logistic(x, y, text * scale, p["lambda"]))),
        logits=lambda probe, x: x @ probe.weight.T + probe.bias,
    ),
    "knn": ProbeMethod(
        grid=lambda y: [{"k": k} for k in KNN_KS if k <= max(_min_class_count(y), 1)],
        default={"k": 1},
        heldout_logits=lambda p, x, y, x_val, text, scale: knn_logits(x_val, text, scale, x, y, p["k"]),
        fit_state=lambda p, x, y, text, scale: {"support": x, "support_labels": y},
        logits=lambda probe, x: knn_logits(x, probe.class_embeddings, probe.logit_scale, probe.support,
                                           probe.support_labels, probe.params["k"]),
    ),
    "tip-adapter": ProbeMethod(
        grid=lambda y: [{"alpha": a, "beta": b} for a in TIP_ALPHAS for b in TIP_BETAS],
        default={"alpha": 1.0, "beta": 5.5},  # the paper's ImageNet values
        heldout_logits=lambda p, x, y, x_val, text, scale: tip_adapter_logits(x_val, text, scale, x, y, p["alpha"],
                                                                              p["beta"]),
        fit_state=lambda p, x, y, text, scale: {"support": x, "support_labels": y},
        logits=lambda probe, x: tip_adapter_logits(x, probe.class_embeddings, probe.logit_scale, probe.support,
                                                   probe.support_labels, probe.params["alpha"],
                                                   probe.params["beta"]),
    ),
}


def cross_validate(method: str, x: np.ndarray, y: np.ndarray, class_embeddings: np.ndarray, logit_scale: float,
                   seed: int = 0, folds: int = CV_FOLDS) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(best params, table of every candidate's CV accuracy and NLL) of ``method`` on shots ``x``/``y``.

    Stratified k-fold (k = min(``folds``, fewest shots of a class)); the best candidate has the highest
    mean held-out accuracy, ties broken by the lower NLL. With fewer than two shots of some class
    there is nothing to hold out, and the method's defaults are returned with an empty table.
    """
    from scipy.special import log_softmax
    from sklearn.model_selection import StratifiedKFold

    spec = METHODS[method]
    smallest = _min_class_count(y)
    if smallest < 2 or len(np.unique(y)) < 2:
        return dict(spec.default), []
    splitter = StratifiedKFold(n_splits=min(folds, smallest), shuffle=True, random_state=seed)
    splits = list(splitter.split(x, y))
    table = []
    for params in spec.grid(y):
        accs, nlls = [], []
        for train, val in splits:
            logits = spec.heldout_logits(params, x[train], y[train], x[val], class_embeddings, logit_scale)
            accs.append(float((logits.argmax(1) == y[val]).mean()))
            nlls.append(float(-log_softmax(logits, axis=1)[np.arange(len(val)), y[val]].mean()))
        table.append({**params, "cv_accuracy": float(np.mean(accs)), "cv_nll": float(np.mean(nlls))})
    best = max(table, key=lambda row: (row["cv_accuracy"], -row["cv_nll"]))
    return {k: best[k] for k in spec.default}, table


def fit_probe(x: np.ndarray, y: np.ndarray, class_embeddings: np.ndarray, logit_scale: float, classes: Sequence[str],
              method: str = "logistic", seed: int = 0, params: Mapping[str, Any] | None = None) -> Probe:
    """A :class:`Probe` of ``method`` on shots ``x`` (N, D unit vectors) with integer labels ``y`` (N,).

    ``class_embeddings`` (C, D) are the zero-shot class embeddings, ``logit_scale`` the model's. N = 0
    gives zero-shot CLIP exactly. Hyperparameters are ``params`` when given, else cross-validated
    (:func:`cross_validate`); ``meta["cv"]`` keeps the table.
    """
    if method not in METHODS:
        raise ValueError(f"unknown probe method {method!r}; use one of {', '.join(METHODS)}")
    x = np.asarray(x, np.float64).reshape(-1, class_embeddings.shape[1])
    y = np.asarray(y, np.int64)
    text = np.asarray(class_embeddings, np.float64)
    started = time.perf_counter()
    # Problems this small run 10x faster on one BLAS thread than on threads contending for busy cores.
    with threadpool_limits(1):
        if params is not None:
            chosen, table = dict(params), []
        else:
            chosen, table = cross_validate(method, x, y, text, logit_scale, seed)
        state = METHODS[method].fit_state(chosen, x, y, text, logit_scale)
    meta = {"cv": table, "params_from": "given" if params is not None else "cross-validation" if table else
            "defaults (fewer than 2 shots of some class: nothing to cross-validate)",
            "fit_seconds": round(time.perf_counter() - started, 4), "train_rows": int(len(y))}
    return Probe(method=method, classes=list(classes), class_embeddings=text, logit_scale=float(logit_scale),
                 params=chosen, meta=meta, **state)


# --------------------------------------------------------------------------- labelled store rows


@dataclass
class LabelledRows:
    """The store rows a labels CSV names: ``ids`` (N,), ``vectors`` (N, D), integer ``labels`` (N,)
    into ``classes``, ``paths`` and the CSV's optional ``split`` column (None when absent)."""

    ids: np.ndarray
    vectors: np.ndarray
    labels: np.ndarray
    classes: list[str]
    paths: list[str]
    split: list[str | None] | None = None


def labelled_rows(store: EmbeddingStore, labels_csv: str | Path, classes: Sequence[str] | None = None,
                  where: str | None = None) -> LabelledRows:
    """Store rows with a label in ``labels_csv`` (``path,label[,split]``; paths matched as
    :func:`vlmlab.classify.match_labels` does). ``classes`` default to the sorted distinct labels;
    a label outside given ``classes`` is an error."""
    import pandas as pd

    from vlmlab.classify import match_labels

    table = pd.read_csv(labels_csv)
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise ValueError(f"{labels_csv} needs columns path,label; missing {sorted(missing)}")
    ids, vectors, meta = store.embeddings(where=where)
    paths = meta["path"].to_pylist()
    csv_paths = table["path"].astype(str).tolist()
    found = match_labels(paths, csv_paths, table["label"].astype(str).tolist())
    keep = [i for i, label in enumerate(found) if label is not None]
    if not keep:
        raise ValueError(f"no store path matches a path in {labels_csv} (e.g. {paths[:1]} vs {csv_paths[:1]})")
    names = list(classes) if classes else sorted({found[i] for i in keep})
    unknown = sorted({found[i] for i in keep} - set(names))
    if unknown:
        raise ValueError(f"{labels_csv} has labels {unknown} that are not among the classes {names}")
    split = None
    if "split" in table.columns:
        split_of = match_labels(paths, csv_paths, table["split"].astype(str).str.lower().tolist())
        split = [SPLIT_NAMES.get(split_of[i] or "", None) for i in keep]
    return LabelledRows(ids=ids[keep], vectors=vectors[keep], labels=np.array([names.index(found[i]) for i in keep]),
                        classes=names, paths=[paths[i] for i in keep], split=split)


def split_rows(rows: LabelledRows, calibration_fraction: float = 0.25, test_fraction: float = 0.0,
               seed: int = 0) -> dict[str, np.ndarray]:
    """Row indices of the ``train``, ``calibration`` and ``test`` parts.

    A ``split`` column in the labels CSV decides (train / val|valid|calibration / test); otherwise each
    class is split at random (seeded) in those fractions, the rest going to ``train``.
    """
    if rows.split is not None:
        parts = {name: np.array([i for i, s in enumerate(rows.split) if s == name], np.int64)
                 for name in ("train", "calibration", "test")}
        if not len(parts["train"]):
            raise ValueError("the labels CSV's split column names no train rows")
        return parts
    if calibration_fraction < 0 or test_fraction < 0 or calibration_fraction + test_fraction >= 1:
        raise ValueError(f"calibration ({calibration_fraction}) and test ({test_fraction}) fractions must be >= 0 "
                         "and leave rows to train on")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {"train": [], "calibration": [], "test": []}
    for c in np.unique(rows.labels):
        mine = rng.permutation(np.flatnonzero(rows.labels == c))
        n_test, n_cal = round(test_fraction * len(mine)), round(calibration_fraction * len(mine))
        parts["test"] += mine[:n_test].tolist()
        parts["calibration"] += mine[n_test:n_test + n_cal].tolist()
        parts["train"] += mine[n_test + n_cal:].tolist()
    return {name: np.sort(np.array(idx, np.int64)) for name, idx in parts.items()}


def sample_shots(labels: np.ndarray, shots: int | None, seed: int = 0) -> np.ndarray:
    """Indices of ``shots`` examples per class of integer ``labels`` (all of a class that has fewer;
    every row for ``None``). Draws are nested: with the same seed, the K-shot set holds the smaller ones."""
    labels = np.asarray(labels)
    if shots is None:
        return np.arange(len(labels))
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    picked = []
    for c in np.unique(labels):
        order = np.random.default_rng([seed, int(c)]).permutation(np.flatnonzero(labels == c))
        picked += order[:shots].tolist()
    return np.sort(np.array(picked, np.int64))


def parse_shots(value: str | int | None) -> int | None:
    """``"all"``/None -> None (every training row); ``"8"`` -> 8."""
    if value is None or str(value).lower() == "all":
        return None
    try:
        shots = int(value)
    except ValueError as exc:
        raise ValueError(f"shots must be a whole number or 'all', got {value!r}") from exc
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    return shots


# --------------------------------------------------------------------------- train / load / predict


def train_probe(store_dir: str | Path, labels_csv: str | Path, out: str | Path, shots: int | None = None,
                method: str = "logistic", seed: int = 0, templates: str | Sequence[str] = "plain",
                classes: Sequence[str] | None = None, calibration_fraction: float = 0.25,
                conformal_method: str = DEFAULT_METHOD, alpha: float = 0.1, where: str | None = None,
                device: str | None = None) -> Probe:
    """Fit a probe on a store's labelled embeddings, calibrate it and save it to ``out``; returns it.

    ``shots`` per class (None: every training row) are drawn with ``seed`` from the training part of
    :func:`split_rows`; the calibration part fits the temperature and the conformal scores (``alpha``
    and ``conformal_method`` are the defaults the probe serves). Only the class names are embedded.
    """
    from vlmlab.classify import class_embeddings
    from vlmlab.search import store_encoder
    from vlmlab.store import EmbeddingStore

    check_alpha(alpha)
    store = EmbeddingStore.open(store_dir)
    rows = labelled_rows(store, labels_csv, classes, where)
    parts = split_rows(rows, calibration_fraction, 0.0, seed)
    train = parts["train"][sample_shots(rows.labels[parts["train"]], shots, seed)]
    encoder = store_encoder(store, device)
    text = class_embeddings(encoder, rows.classes, templates)
    probe = fit_probe(rows.vectors[train], rows.labels[train], text, encoder.logit_scale, rows.classes, method, seed)
    counts = np.bincount(rows.labels[train], minlength=len(rows.classes))
    probe.meta.update({
        "model": store.model, "adapter": store.manifest.get("adapter"), "store": str(Path(store_dir).resolve()),
        "labels": str(Path(labels_csv).resolve()), "templates": templates,
        "shots": shots if shots is not None else "all",
        "shots_per_class": dict(zip(rows.classes, counts.tolist())), "seed": seed, "where": where,
        "split_source": f"val rows of {Path(labels_csv).name} (split column)" if rows.split is not None else
        f"random {calibration_fraction} of each class of {Path(labels_csv).name} (seed {seed})",
        "calibration_rows": int(len(parts["calibration"])), "train_pool_rows": int(len(parts["train"])),
        "train_ids": rows.ids[train].tolist(), "calibration_ids": rows.ids[parts["calibration"]].tolist(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    })
    probe.save(out)  # the arrays first: the calibration record fingerprints them
    cal = parts["calibration"]
    if len(cal) >= 2:
        probe.calibration = Calibration.fit(probe.logits(rows.vectors[cal]), rows.labels[cal], rows.classes,
                                            method=conformal_method, alpha=alpha, seed=seed,
                                            split=probe.meta["split_source"], ids=rows.ids[cal],
                                            weights_file=Path(out) / ARRAYS_FILE)
        probe.calibration.save(out)
    return probe


def load_probe(directory: str | Path) -> Probe:
    """The probe saved in ``directory`` by :func:`train_probe` (with its calibration when it has one)."""
    directory = Path(directory).expanduser()
    if not (directory / PROBE_FILE).is_file():
        raise FileNotFoundError(f"no probe at {directory}: expected {PROBE_FILE} there "
                                "(make one with `vlmlab train probe`)")
    record = json.loads((directory / PROBE_FILE).read_text())
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory / PROBE_FILE} has format {record.get('format_version')!r}, not {FORMAT_VERSION}")
    with np.load(directory / ARRAYS_FILE) as arrays:
        data = {k: arrays[k] for k in arrays.files}
    own = ("format_version", "method", "classes", "logit_scale", "params")
    meta = {k: v for k, v in record.items() if k not in own}
    for name in ("train_ids", "calibration_ids"):
        if name in data:
            meta[name] = data.pop(name).tolist()
    probe = Probe(method=record["method"], classes=record["classes"],
                  class_embeddings=data.pop("class_embeddings").astype(np.float64),
                  logit_scale=float(record["logit_scale"]), params=record["params"], meta=meta,
                  **{k: data[k] for k in ("weight", "bias", "support", "support_labels") if k in data})
    probe.calibration = Calibration.load(directory, directory / ARRAYS_FILE)
    if probe.calibration is not None:
        probe.calibration.check_classes(probe.classes)
    return probe


def check_probe_model(probe: Probe, model: str, adapter: str | None = None) -> None:
    """``ValueError`` unless ``probe`` was fitted on embeddings of ``model`` (+ ``adapter``)."""
    from vlmlab.models import same_spec

    if not same_spec(str(probe.meta.get("model")), model) or probe.meta.get("adapter") != adapter:
        raise ValueError(f"the probe was fitted on embeddings of {probe.meta.get('model')!r}"
                         f"{' + adapter ' + str(probe.meta['adapter']) if probe.meta.get('adapter') else ''}; "
                         f"these are {model!r}{' + adapter ' + adapter if adapter else ''}")


def predict_store(store: EmbeddingStore, probe: Probe, hierarchy: Mapping[str, Sequence[str]] | None = None,
                  where: str | None = None, alpha: float | None = None,
                  method: str | None = None) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """``(predictions table, logits (N, C), ids (N,))`` of ``probe`` on every store row (matching ``where``).

    The table has :func:`vlmlab.classify.classify_store`'s columns, probabilities calibrated when the
    probe is; with ``alpha`` also ``prediction_set`` (class names) and ``set_size``. ``CalibrationError``
    when ``alpha`` is asked of an uncalibrated probe.
    """
    from vlmlab.classify import predictions_table, prob_columns

    manifest = store.manifest
    check_probe_model(probe, manifest["model"], manifest.get("adapter"))
    ids, vectors, meta = store.embeddings(where=where)
    logits = probe.logits(vectors) if len(ids) else np.zeros((0, len(probe.classes)))
    probs = probe.predict_proba(vectors) if len(ids) else logits
    cols = prob_columns(probs, probe.classes, hierarchy)
    if alpha is not None:
        if probe.calibration is None:
            raise CalibrationError("this probe has no calibration (its calibration split was empty); "
                                   "train it again with --calibration-fraction > 0")
        members = probe.calibration.sets(probs, alpha, method)
        names = np.asarray(probe.classes, dtype=object)
        cols["prediction_set"] = [names[row].tolist() for row in members]
        cols["set_size"] = members.sum(axis=1)
    return predictions_table(ids, meta, cols), logits, ids


def score_probe(store: EmbeddingStore, probe: Probe, preds: pa.Table, labels_csv: str | Path, out_dir: str | Path,
                alpha: float | None = None, method: str | None = None, where: str | None = None) -> dict[str, Any]:
    """Metrics of a probe's ``preds`` on the labelled rows it neither trained nor calibrated on.

    :func:`vlmlab.classify.evaluate_predictions` on those rows (``metrics.json``, confusion matrix),
    plus, for a calibrated probe, ``calibration`` (:func:`vlmlab.calibration.calibration_report`: ECE
    before/after, with ``alpha`` coverage and set sizes per class) and ``reliability.png`` in ``out_dir``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from vlmlab.calibration import calibration_report, plot_reliability
    from vlmlab.classify import evaluate_predictions

    seen = np.asarray(probe.meta.get("train_ids", []) + probe.meta.get("calibration_ids", []), np.int64)
    held = preds.filter(pc.invert(pc.is_in(preds["id"], value_set=pa.array(seen, pa.int64()))))
    rows = labelled_rows(store, labels_csv, probe.classes, where)
    keep = ~np.isin(rows.ids, seen)
    if not keep.any():
        raise ValueError(f"every labelled row of {labels_csv} was used to fit or calibrate the probe; "
                         "score it against other labels")
    metrics = evaluate_predictions(held, labels_csv, out_dir)
    metrics["left_out"] = {"rows": int(len(seen)), "why": "the probe was fitted or calibrated on them"}
    if probe.calibration is not None:
        logits, y = probe.logits(rows.vectors[keep]), rows.labels[keep]
        report = calibration_report(logits, y, probe.calibration, alpha, method)
        cal = probe.calibration
        report["png"] = str(plot_reliability({"before (T = 1)": (softmax(logits), y),
                                              f"after (T = {cal.temperature:.2f})": (cal.probs(logits), y)},
                                             Path(out_dir) / "reliability.png"))
        metrics["calibration"] = report
        (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    """``vlmlab train probe --store STORE --labels CSV --out PROBE [--shots K] [--method ...]``."""
    parser = argparse.ArgumentParser(prog="vlmlab train probe", description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="embedding store (no image is re-embedded)")
    parser.add_argument("--labels", required=True,
                        help="CSV path,label[,split]: paths equal to or ending with store paths; split train/val/test")
    parser.add_argument("--out", required=True, help="probe directory to write")
    parser.add_argument("--shots", default="all", help="labelled examples per class, or 'all' (default: all)")
    parser.add_argument("--method", default="logistic", choices=list(METHODS), help="probe method (default logistic)")
    parser.add_argument("--classes", nargs="+", default=None,
                        help="class names in output order (default: the sorted labels); they go into the prompts")
    parser.add_argument("--templates", nargs="+", default=["plain"],
                        help="prompt template set (plain, rocks, aerial, inspection) or templates with {}")
    parser.add_argument("--calibration-fraction", type=float, default=0.25,
                        help="fraction of each class held out to calibrate (ignored with a split column; default 0.25)")
    parser.add_argument("--conformal", type=float, default=0.1,
                        help="default error rate alpha of the probe's prediction sets, in (0, 1) (default 0.1)")
    parser.add_argument("--conformal-method", default=DEFAULT_METHOD, choices=CONFORMAL_METHODS,
                        help=f"default conformal score (default {DEFAULT_METHOD})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits, the shots and the CV folds")
    parser.add_argument("--where", default=None, help="only store rows matching this metadata filter")
    parser.add_argument("--device", default=None, help="torch device for the text tower (default: cuda if available)")
    args = parser.parse_args(argv)
    try:
        shots = parse_shots(args.shots)
        check_alpha(args.conformal)
    except ValueError as exc:
        parser.error(str(exc))
    templates = args.templates[0] if len(args.templates) == 1 else args.templates
    probe = train_probe(args.store, args.labels, args.out, shots, args.method, args.seed, templates, args.classes,
                        args.calibration_fraction, args.conformal_method, args.conformal, args.where, args.device)
    print(f"{args.method} probe on {probe.shots} labelled embeddings ({probe.meta['params_from']}: {probe.params}), "
          f"{len(probe.classes)} classes -> {args.out}")
    if probe.calibration is not None:
        cal = probe.calibration
        print(f"calibrated on {cal.split['rows']} held-out rows: temperature {cal.temperature:.3f}; "
              f"{cal.method} sets at alpha={cal.alpha} hold the true class with probability >= {1 - cal.alpha:.2f}")
    print(f"vlmlab classify {args.store} --probe {args.out} --out preds.parquet --conformal {args.conformal}")


if __name__ == "__main__":
    main()
