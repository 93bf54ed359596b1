"""Zero-shot classification of a store's images: ``vlmlab classify`` and the library behind it.

Each class is embedded through a prompt ensemble (:mod:`vlmlab.prompts`); an image's class
probabilities are ``softmax(logit_scale * cosine(image, class))``, as CLIP scores them. With a
hierarchy (``igneous: granite, basalt``) a parent's probability is the sum of its children's.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import pandas as pd

    from vlmlab.models import Encoder, EncoderLike
    from vlmlab.store import EmbeddingStore

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
    probs = zero_shot_probs(image_vectors, class_vectors, logit_scale)
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
    cols: dict[str, Any] = {"id": pa.array(ids, pa.int64()), "path": meta["path"], "source": meta["source"]}
    for name in parts[0]:
        values = np.concatenate([np.asarray(p[name]) for p in parts]) if len(ids) else np.zeros(0)
        cols[name] = pa.array(values.tolist(), pa.string()) if name in ("label", "parent_label") else \
            pa.array(values.astype(np.float32), pa.float32())
    return pa.table(cols)


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


def evaluate_predictions(preds: pa.Table | pd.DataFrame | str | Path, labels_csv: str | Path,
                         out_dir: str | Path, label_column: str = "label") -> dict[str, Any]:
    """Score predictions (``path`` and ``label`` columns) against a ``path,label`` CSV.

    Paths are matched as :func:`match_labels` says; rows with no label are left out and counted.
    Writes ``metrics.json`` and ``confusion_matrix.png`` (rows true, columns predicted) to
    ``out_dir``; returns the metrics: accuracy, per-class precision/recall/F1/support, macro and
    weighted F1, the confusion matrix and its class order, matched/unmatched counts.
    """
    import pandas as pd
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

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
    y_true = [truth[i] for i in keep]
    y_pred = frame[label_column].astype(str).iloc[keep].tolist()
    classes = sorted(set(y_true) | set(y_pred))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=classes)
    metrics = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=classes, average="weighted", zero_division=0)),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(classes)},
        "classes": classes,
        "confusion_matrix": cm.tolist(),
        "matched": len(keep),
        "unmatched": len(truth) - len(keep),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_confusion_matrix(cm, classes, out / "confusion_matrix.png", title=f"accuracy {metrics['accuracy']:.3f}")
    return metrics


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
    --out preds.parquet [--labels labels.csv] [--metrics-dir DIR] [--where ...]``."""
    import pyarrow.parquet as pq

    from vlmlab.store import EmbeddingStore

    parser = argparse.ArgumentParser(prog="vlmlab classify", description=__doc__.split("\n")[0])
    parser.add_argument("store_dir", metavar="STORE", help="embedding store")
    parser.add_argument("--classes", nargs="+", required=True, help="class names (as put into the prompts)")
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
    args = parser.parse_args(argv)
    if len(args.classes) < 2:
        parser.error("give at least two --classes")
    from vlmlab.search import store_encoder

    store = EmbeddingStore.open(args.store_dir)
    encoder = store_encoder(store, args.device, args.model)
    templates = args.templates[0] if len(args.templates) == 1 else args.templates
    preds = classify_store(store, encoder, args.classes, templates, parse_hierarchy(args.hierarchy) or None,
                           where=args.where, model_override=args.model is not None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(preds, out)
    counts = preds.to_pandas()["label"].value_counts()
    print(f"{len(preds)} images classified -> {out}")
    print("  " + ", ".join(f"{c}: {n}" for c, n in counts.items()))
    if args.labels:
        metrics = evaluate_predictions(preds, args.labels, args.metrics_dir or out.parent)
        print(f"accuracy {metrics['accuracy']:.3f}, macro F1 {metrics['macro_f1']:.3f}, weighted F1 "
              f"{metrics['weighted_f1']:.3f} on {metrics['matched']} labelled images "
              f"({metrics['unmatched']} without a label); metrics in {args.metrics_dir or out.parent}")


if __name__ == "__main__":
    main()
