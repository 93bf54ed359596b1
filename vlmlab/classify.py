"""Zero-shot classification of a store's images: ``vlmlab classify`` and the library behind it.

Each class is embedded through a prompt ensemble (:mod:`vlmlab.prompts`); an image's class
probabilities are ``softmax(logit_scale * cosine(image, class))``, as CLIP scores them. With a
hierarchy (``igneous: granite, basalt``) a parent's probability is the sum of its children's.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import pandas as pd

    from vlmlab.models import Encoder, EncoderLike
    from vlmlab.store import EmbeddingStore

log = logging.getLogger(__name__)

PROB_PREFIX = "prob_"
PARENT_PROB_PREFIX = "parent_prob_"


def class_embeddings(encoder: EncoderLike, classes: Sequence[str], templates: str | Sequence[str] | None = "plain"
                     ) -> np.ndarray:
    """L2-normalised (C, D) class embeddings: each class name through every template, averaged."""
    from vlmlab.prompts import ensemble_text_embeddings

    if not classes:
        raise ValueError("no classes given")
    return ensemble_text_embeddings(encoder, list(classes), templates)


def zero_shot_probs(image_vectors: np.ndarray, class_vectors: np.ndarray, logit_scale: float) -> np.ndarray:
    """(N, C) probabilities ``softmax(logit_scale * image @ class.T)`` for (N, D) or (D,) unit vectors."""
    images = np.atleast_2d(np.asarray(image_vectors, np.float32))
    logits = float(logit_scale) * images @ np.asarray(class_vectors, np.float32).T
    logits -= logits.max(axis=1, keepdims=True)  # stable softmax
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)


def parse_hierarchy(specs: Sequence[str]) -> dict[str, list[str]]:
    """``["igneous:granite,basalt", ...]`` -> ``{"igneous": ["granite", "basalt"], ...}``."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        parent, sep, children = spec.partition(":")
        kids = [c.strip() for c in children.split(",") if c.strip()]
        if not sep or not parent.strip() or not kids:
            raise ValueError(f"hierarchy entry {spec!r} is not PARENT:child,child")
        out.setdefault(parent.strip(), []).extend(kids)
    return out


def _parent_groups(classes: Sequence[str], hierarchy: Mapping[str, Sequence[str]]) -> dict[str, list[int]]:
    """Parent -> class column indices; a class no parent lists is its own parent."""
    index = {c: i for i, c in enumerate(classes)}
    groups: dict[str, list[int]] = {}
    seen: dict[str, str] = {}
    for parent, children in hierarchy.items():
        for child in children:
            if child not in index:
                raise ValueError(f"hierarchy child {child!r} (of {parent!r}) is not one of the classes {list(classes)}")
            if child in seen:
                raise ValueError(f"class {child!r} is under two parents: {seen[child]!r} and {parent!r}")
            seen[child] = parent
            groups.setdefault(parent, []).append(index[child])
    for c in classes:
        if c not in seen:
            groups.setdefault(c, []).append(index[c])
    return groups


def classify_vectors(image_vectors: np.ndarray, class_vectors: np.ndarray, classes: Sequence[str],
                     logit_scale: float, hierarchy: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """Columns (as arrays) of per-class probs, ``label``, ``prob`` and, with a hierarchy,
    per-parent probs, ``parent_label``, ``parent_prob``."""
    return prob_columns(zero_shot_probs(image_vectors, class_vectors, logit_scale), classes, hierarchy)


def prob_columns(probs: np.ndarray, classes: Sequence[str],
                 hierarchy: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """:func:`classify_vectors`' columns from class probabilities (N, C) of any classifier (zero-shot, a probe)."""
    probs = np.asarray(probs)
    names = np.asarray(list(classes), dtype=object)
    cols: dict[str, Any] = {f"{PROB_PREFIX}{c}": probs[:, j] for j, c in enumerate(classes)}
    top = probs.argmax(axis=1)
    cols["label"] = names[top].tolist()
    cols["prob"] = probs[np.arange(len(probs)), top]
    if hierarchy:
        groups = _parent_groups(classes, hierarchy)
        parents = list(groups)
        parent_probs = np.stack([probs[:, groups[p]].sum(axis=1) for p in parents], axis=1)
        for j, p in enumerate(parents):
            cols[f"{PARENT_PROB_PREFIX}{p}"] = parent_probs[:, j]
        ptop = parent_probs.argmax(axis=1)
        cols["parent_label"] = [parents[j] for j in ptop]
        cols["parent_prob"] = parent_probs[np.arange(len(parent_probs)), ptop]
    return cols


def classify_store(store: EmbeddingStore, encoder: Encoder, classes: Sequence[str],
                   templates: str | Sequence[str] | None = "plain",
                   hierarchy: Mapping[str, Sequence[str]] | None = None, where: str | None = None,
                   chunk_rows: int = 65_536, model_override: bool = False) -> pa.Table:
    """Zero-shot predictions for every store row (matching ``where``).

    Columns: ``id``, ``path``, ``source``, ``prob_<class>`` per class, ``label`` (top class),
    ``prob`` (its probability), and with ``hierarchy`` ``parent_prob_<parent>``,
    ``parent_label``, ``parent_prob``. ``encoder`` must be the store's model (compared by resolved
    identity); ``model_override``: the caller vouches that it is, under another spec (``--model``).
    """
    if len(set(classes)) != len(classes):
        raise ValueError(f"class names must be distinct: {list(classes)}")
    from vlmlab.models import same_spec

    if not model_override and not same_spec(encoder.spec, store.model):
        raise ValueError(f"the store holds embeddings of {store.model!r}; the encoder is {encoder.spec!r}")
    ids, vectors, meta = store.embeddings(where=where)
    class_vectors = class_embeddings(encoder, classes, templates)
    parts = [classify_vectors(vectors[s:s + chunk_rows], class_vectors, classes, encoder.logit_scale, hierarchy)
             for s in range(0, max(1, len(ids)), chunk_rows)]
    cols = {name: np.concatenate([np.asarray(p[name]) for p in parts]) if len(ids) else np.zeros(0)
            for name in parts[0]}
    return predictions_table(ids, meta, cols)


def predictions_table(ids: np.ndarray, meta: pa.Table, cols: Mapping[str, Any]) -> pa.Table:
    """The predictions table: ``id``, ``path``, ``source`` of the store rows, then ``cols`` (label columns
    as strings, ``prediction_set`` as lists of class names, ``set_size`` as int32, the rest float32)."""
    table: dict[str, Any] = {"id": pa.array(ids, pa.int64()), "path": meta["path"], "source": meta["source"]}
    for name, values in cols.items():
        if name in ("label", "parent_label"):
            table[name] = pa.array(list(values), pa.string())
        elif name == "prediction_set":
            table[name] = pa.array(list(values), pa.list_(pa.string()))
        elif name == "set_size":
            table[name] = pa.array(np.asarray(values, np.int32), pa.int32())
        else:
            table[name] = pa.array(np.asarray(values, np.float32), pa.float32())
    return pa.table(table)


# --------------------------------------------------------------------------- evaluation


def match_labels(pred_paths: Sequence[str], label_paths: Sequence[str], labels: Sequence[str]) -> list[str | None]:
    """The label of each predicted (store) path, or None.

    A labels.csv path matches a store path when they are equal, or when one ends with the other
    at a path-component boundary: ``tiles/17/1/2.png`` (relative to a parent folder) matches the
    store path ``17/1/2.png``, and so does ``/data/tiles/17/1/2.png``. A suffix two labelled
    files share is ambiguous and matches neither.
    """
    by_suffix: dict[str, str | None] = {}
    exact = {}
    for path, label in zip(label_paths, labels, strict=True):
        path = str(path).replace("\\", "/")
        exact[path] = label
        parts = path.strip("/").split("/")
        for i in range(len(parts)):
            suffix = "/".join(parts[i:])
            by_suffix[suffix] = label if by_suffix.get(suffix, label) == label else None
    out: list[str | None] = []
    for path in pred_paths:
        path = str(path).replace("\\", "/")
        if path in exact:
            out.append(exact[path])
            continue
        found = by_suffix.get(path.strip("/"))
        if found is None:  # the label path may be the shorter one
            parts = path.strip("/").split("/")
            found = next((exact[s] for s in ("/".join(parts[i:]) for i in range(1, len(parts))) if s in exact), None)
        out.append(found)
    return out


def _as_frame(preds: pa.Table | pd.DataFrame | str | Path) -> pd.DataFrame:
    import pandas as pd

    if isinstance(preds, (str, Path)):
        return pd.read_parquet(preds)
    if isinstance(preds, pa.Table):
        return preds.to_pandas()
    return preds


def known_labels(classes: Sequence[str], hierarchy: Mapping[str, Sequence[str]] | None = None) -> dict[str, str]:
    """Label -> the prediction column it is scored against: each class -> ``label`` and, with a
    hierarchy, each parent -> ``parent_label`` (a row labelled ``igneous`` is right when the predicted
    class is one of igneous' children)."""
    known = dict.fromkeys(classes, "label")
    if hierarchy:
        known.update((parent, "parent_label") for parent in _parent_groups(classes, hierarchy) if parent not in known)
    return known


def evaluate_predictions(preds: pa.Table | pd.DataFrame | str | Path, labels_csv: str | Path,
                         out_dir: str | Path, label_column: str = "label", classes: Sequence[str] | None = None,
                         hierarchy: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """Score predictions (``path`` and ``label`` columns) against a ``path,label`` CSV.

    Paths are matched as :func:`match_labels` says; rows with no label are left out and counted.
    With ``classes``, a label that is none of them (nor, with ``hierarchy``, a parent, scored
    against ``parent_label``) cannot be predicted, so its rows are left out too, with a warning, and
    counted in ``unknown_labels`` (label -> rows); no labelled row left is a ``ValueError``.
    Writes ``metrics.json`` and ``confusion_matrix.png`` (rows true, columns predicted) to
    ``out_dir``; returns the metrics: accuracy, per-class precision/recall/F1/support, macro and
    weighted F1, the confusion matrix and its class order, matched/unmatched counts.
    """
    import pandas as pd

    frame = _as_frame(preds)
    truth_table = pd.read_csv(labels_csv)
    missing = {"path", "label"} - set(truth_table.columns)
    if missing:
        raise ValueError(f"{labels_csv} needs columns path,label; missing {sorted(missing)}")
    truth = match_labels(frame["path"].tolist(), truth_table["path"].astype(str).tolist(),
                         truth_table["label"].astype(str).tolist())
    keep = [i for i, t in enumerate(truth) if t is not None]
    if not keep:
        raise ValueError(f"no predicted path matches a path in {labels_csv} (e.g. {frame['path'].iloc[0]!r} vs "
                         f"{truth_table['path'].iloc[0]!r}); paths must be equal or one must end with the other")
    matched = len(keep)
    columns = known_labels(classes, hierarchy) if classes is not None else None
    unknown: dict[str, int] = {}
    if columns is not None:
        for i in keep:
            if truth[i] not in columns:
                unknown[truth[i]] = unknown.get(truth[i], 0) + 1
        keep = [i for i in keep if truth[i] in columns]
        if unknown:
            log.warning("%s: %d labelled rows left out of the metrics, their labels are not among the classes %s: "
                        "%s", labels_csv, sum(unknown.values()), list(columns),
                        ", ".join(f"{label!r} ({n})" for label, n in sorted(unknown.items())))
        if not keep:
            raise ValueError(f"none of the {matched} labelled rows of {labels_csv} has a label among the classes "
                             f"{list(columns)} (labels found: {sorted(unknown)}); pass the CSV's labels as --classes "
                             "or map them with --hierarchy PARENT:child,...")
    y_true = [truth[i] for i in keep]
    scored_by = [label_column if columns is None or columns[truth[i]] == "label" else "parent_label" for i in keep]
    predicted = {column: frame[column].astype(str).tolist() for column in set(scored_by)}
    y_pred = [predicted[column][i] for column, i in zip(scored_by, keep, strict=True)]
    metrics = {**score_labels(y_true, y_pred), "matched": len(keep), "unmatched": len(truth) - matched,
               "unknown_labels": dict(sorted(unknown.items()))}
    order, cm = metrics["classes"], np.asarray(metrics["confusion_matrix"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_confusion_matrix(cm, order, out / "confusion_matrix.png", title=f"accuracy {metrics['accuracy']:.3f}")
    return metrics


def confidence_report(preds: pa.Table | pd.DataFrame, labels_csv: str | Path, classes: Sequence[str],
                      out_dir: str | Path) -> dict[str, Any]:
    """ECE and ``reliability.png`` of uncalibrated predictions (``prob_<class>`` columns) against a
    ``path,label`` CSV; rows labelled outside ``classes`` are left out (as in :func:`evaluate_predictions`;
    a parent label has no single class probability to score). There is no calibration split here:
    ``--calibrate``/``--conformal`` fit a temperature on held-out labels for the before/after figures."""
    import pandas as pd

    from vlmlab.calibration import ECE_BINS, expected_calibration_error, plot_reliability

    frame, table = _as_frame(preds), pd.read_csv(labels_csv)
    truth = match_labels(frame["path"].tolist(), table["path"].astype(str).tolist(),
                         table["label"].astype(str).tolist())
    keep = [i for i, t in enumerate(truth) if t in classes]
    probs = frame[[f"{PROB_PREFIX}{c}" for c in classes]].to_numpy()[keep]
    y = np.array([list(classes).index(truth[i]) for i in keep], dtype=np.int64)
    png = plot_reliability({"uncalibrated (T = 1)": (probs, y)}, Path(out_dir) / "reliability.png")
    return {"ece": expected_calibration_error(probs, y), "ece_bins": ECE_BINS, "n": len(keep), "png": str(png),
            "note": "uncalibrated; --calibrate or --conformal fits a temperature on held-out labels"}


def score_labels(y_true: Sequence[Any], y_pred: Sequence[Any]) -> dict[str, Any]:
    """Accuracy, macro/weighted F1, per-class precision/recall/F1/support and the confusion matrix
    (rows true, columns predicted, over the sorted classes seen in either) of two label sequences."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    classes = sorted(set(y_true) | set(y_pred))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=classes, average="weighted", zero_division=0)),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(classes)},
        "classes": classes,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
    }


def plot_confusion_matrix(cm: np.ndarray, classes: Sequence[str], out: str | Path, title: str = "") -> Path:
    """Write a confusion-matrix PNG (rows: true class, columns: predicted), counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    size = max(4.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = cm.max() if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    """``vlmlab classify STORE --classes a b c [--templates rocks] [--hierarchy igneous:granite,basalt ...]
    --out preds.parquet [--labels labels.csv] [--metrics-dir DIR] [--where ...]`` or ``vlmlab classify STORE
    --probe PROBE --out preds.parquet [--conformal ALPHA]``."""
    import pyarrow.parquet as pq

    from vlmlab.calibration import DEFAULT_METHOD, METHODS, check_alpha
    from vlmlab.store import EmbeddingStore

    parser = argparse.ArgumentParser(prog="vlmlab classify", description=__doc__.split("\n")[0])
    parser.add_argument("store_dir", metavar="STORE", help="embedding store")
    parser.add_argument("--classes", nargs="+", default=None,
                        help="class names (as put into the prompts); not needed with --probe")
    parser.add_argument("--templates", nargs="+", default=["plain"],
                        help="prompt template set (plain, rocks, aerial, inspection) or templates with {}")
    parser.add_argument("--hierarchy", nargs="+", default=[], metavar="PARENT:a,b",
                        help="parent classes, e.g. igneous:granite,basalt (parent prob = sum of children's)")
    parser.add_argument("--where", default=None, help="only rows matching this metadata filter")
    parser.add_argument("--out", required=True, help="predictions parquet to write")
    parser.add_argument("--labels", default=None,
                        help="CSV path,label to score against (paths equal to, or ending with, store paths)")
    parser.add_argument("--metrics-dir", default=None,
                        help="where metrics.json and confusion_matrix.png go (default: next to --out)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--model", default=None, help="embed the class prompts with this spec instead of the store's "
                                                      "recorded one (the same model at another path)")
    # calibrated probabilities and prediction sets (vlmlab.calibration)
    parser.add_argument("--probe", default=None,
                        help="probe directory of `vlmlab train probe`: its classes and calibrated probabilities")
    parser.add_argument("--calibrate", action="store_true",
                        help="zero-shot: fit a temperature on --calibration-fraction of --labels (metrics on the rest)")
    parser.add_argument("--conformal", type=float, default=None, metavar="ALPHA",
                        help="add prediction_set: classes holding the true one with probability >= 1-ALPHA, "
                             "ALPHA in (0, 1); zero-shot needs --labels to calibrate on")
    parser.add_argument("--conformal-method", default=None, choices=METHODS,
                        help=f"conformal score (default: the probe's, else {DEFAULT_METHOD})")
    parser.add_argument("--calibration-fraction", type=float, default=0.3,
                        help="zero-shot with --conformal: share of each labelled class held out to calibrate "
                             "(metrics use the rest; default 0.3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration split (default 0)")
    args = parser.parse_args(argv)
    if args.conformal is not None:
        try:
            check_alpha(args.conformal)
        except ValueError as exc:
            parser.error(str(exc))
    if not args.probe and len(args.classes or []) < 2:
        parser.error("give at least two --classes (or a --probe)")
    if (args.conformal is not None or args.calibrate) and not args.probe and not args.labels:
        parser.error("zero-shot calibration and prediction sets are fitted on labelled images: add --labels CSV "
                     "(or use a --probe of `vlmlab train probe`, which is calibrated)")
    store = EmbeddingStore.open(args.store_dir)
    templates = args.templates[0] if len(args.templates) == 1 else args.templates
    hierarchy = parse_hierarchy(args.hierarchy) or None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics_dir = Path(args.metrics_dir) if args.metrics_dir else out.parent
    probe = None
    if args.probe:
        from vlmlab.probe import load_probe

        probe = load_probe(args.probe)
        if args.classes and list(args.classes) != probe.classes:
            parser.error(f"--classes {args.classes} differ from the probe's classes {probe.classes}; drop --classes")
    elif args.conformal is not None or args.calibrate:
        from vlmlab.probe import train_probe

        # calibrated zero-shot is the 0-shot probe: saved, so it can be served as it was evaluated
        probe = train_probe(store.root, args.labels, metrics_dir / "zero_shot_probe", 0, "logistic", args.seed,
                            templates, args.classes, args.calibration_fraction, args.conformal_method or DEFAULT_METHOD,
                            args.conformal or 0.1, args.where, args.device)
        print(f"zero-shot calibrated on {probe.meta['calibration_rows']} held-out labelled images "
              f"-> {metrics_dir / 'zero_shot_probe'} (serve it with probe=...)")
    if probe is not None:
        from vlmlab.probe import predict_store

        preds, _, _ = predict_store(store, probe, hierarchy, args.where, args.conformal, args.conformal_method)
    else:
        from vlmlab.search import store_encoder

        encoder = store_encoder(store, args.device, args.model)
        preds = classify_store(store, encoder, args.classes, templates, hierarchy, where=args.where,
                               model_override=args.model is not None)
    pq.write_table(preds, out)
    counts = preds.to_pandas()["label"].value_counts()
    print(f"{len(preds)} images classified -> {out}")
    print("  " + ", ".join(f"{c}: {n}" for c, n in counts.items()))
    if args.conformal is not None:
        sizes = preds["set_size"].to_numpy()
        print(f"prediction sets at alpha={args.conformal} over all {len(sizes)} images: mean size {sizes.mean():.2f}, "
              f"{(sizes == 1).mean():.0%} single-class, {(sizes == 0).mean():.0%} empty")
    if args.labels:
        if probe is not None:
            from vlmlab.probe import score_probe

            metrics = score_probe(store, probe, preds, args.labels, metrics_dir, args.conformal,
                                  args.conformal_method, args.where)
        else:
            metrics = evaluate_predictions(preds, args.labels, metrics_dir, classes=args.classes, hierarchy=hierarchy)
            metrics["calibration"] = confidence_report(preds, args.labels, args.classes, metrics_dir)
            (metrics_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"accuracy {metrics['accuracy']:.3f}, macro F1 {metrics['macro_f1']:.3f}, weighted F1 "
              f"{metrics['weighted_f1']:.3f} on {metrics['matched']} labelled images "
              f"({metrics['unmatched']} without a label); metrics in {metrics_dir}")
        if metrics.get("unknown_labels"):
            print(f"left out: labels not among the classes: {metrics['unknown_labels']}")
        calibration = metrics.get("calibration", {})
        if "ece" in calibration:
            print(f"ECE {calibration['ece']:.3f} uncalibrated ({metrics_dir / 'reliability.png'}; "
                  "--calibrate fits a temperature on held-out labels)")
        if "ece_before" in calibration:
            cal = calibration
            print(f"ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f} with temperature {cal['temperature']:.3f} "
                  f"({metrics_dir / 'reliability.png'})")
            if "conformal" in cal:
                sets = cal["conformal"]
                print(f"held-out coverage {sets['coverage']:.3f}, mean set size {sets['mean_set_size']:.2f} "
                      f"(guarantee >= {1 - args.conformal:.2f}; with {sets['calibration_rows']} calibration rows "
                      f"expect {sets['expected_coverage']:.3f} +- {sets['coverage_sd']:.3f})")


if __name__ == "__main__":
    main()
