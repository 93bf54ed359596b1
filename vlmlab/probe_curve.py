"""The few-shot curve: ``vlmlab evaluate probe`` — accuracy, calibration and prediction-set size vs shots.

``vlmlab evaluate probe --store STORE --labels labels.csv --out DIR [--methods logistic knn tip-adapter]
[--shots 0 1 2 4 8 16 all] [--repeats 3]`` splits the labelled store rows once (a ``split`` column
train/val/test in the CSV, else seeded stratified fractions) into a training pool, a calibration part
and a test part. For each method and each K it draws K shots per class from the pool (``repeats``
times with different seeds; K = 0 and ``all`` once), fits the probe (:func:`vlmlab.probe.fit_probe`),
calibrates it on the calibration part and scores the test part: accuracy and macro F1
(:func:`vlmlab.classify.score_labels`), ECE before/after temperature scaling, and the empirical
coverage and mean size of its conformal sets at ``--conformal`` alpha. K = 0 is zero-shot CLIP.

Writes ``DIR/few_shot.json`` and ``DIR/few_shot.png`` (accuracy | ECE | mean set size vs K).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmlab.calibration import DEFAULT_METHOD, Calibration, calibration_report, check_alpha
from vlmlab.probe import METHODS, LabelledRows, fit_probe, parse_shots, sample_shots

CURVE_FILE = "few_shot.json"
CURVE_PNG = "few_shot.png"
DEFAULT_SHOTS = ("0", "1", "2", "4", "8", "16", "all")


@dataclass(frozen=True)
class ProbeCurveConfig:
    """A few-shot curve run (``vlmlab evaluate probe``)."""

    store: str = field(default="", metadata={"help": "embedding store"})
    labels: str = field(default="", metadata={"help": "CSV path,label[,split] (split: train/val/test)"})
    out: str = field(default="", metadata={"help": "folder for few_shot.json and few_shot.png"})
    methods: tuple[str, ...] = field(default=tuple(METHODS), metadata={"help": "probe methods"})
    shots: tuple[str, ...] = field(default=DEFAULT_SHOTS, metadata={"help": "shots per class; 'all' = the pool"})
    repeats: int = field(default=3, metadata={"help": "shot draws per K (K=0 and 'all' run once)"})
    seed: int = field(default=0, metadata={"help": "seed of the split, the shot draws and the CV folds"})
    templates: str = field(default="plain", metadata={"help": "prompt template set of the class names"})
    classes: tuple[str, ...] = field(default=(), metadata={"help": "class names in order (default: sorted labels)"})
    calibration_fraction: float = field(default=0.2, metadata={"help": "share of each class held out to calibrate"})
    test_fraction: float = field(default=0.3, metadata={"help": "share of each class held out to test"})
    conformal: float = field(default=0.1, metadata={"help": "alpha of the prediction sets scored, in (0, 1)"})
    conformal_method: str = field(default=DEFAULT_METHOD, metadata={"help": "conformal score: lac | aps | raps"})
    where: str = field(default="", metadata={"help": "only store rows matching this metadata filter"})
    device: str = field(default="", metadata={"help": "torch device of the text tower"})


def _point(rows: LabelledRows, parts: dict[str, np.ndarray], class_vectors: np.ndarray, logit_scale: float,
           method: str, shots: int | None, seed: int, alpha: float, conformal_method: str) -> dict[str, Any]:
    """One probe fitted on one draw of ``shots`` per class, scored on the test part."""
    from vlmlab.classify import score_labels

    pool, cal, test = parts["train"], parts["calibration"], parts["test"]
    train = pool[sample_shots(rows.labels[pool], shots, seed)]
    started = time.perf_counter()
    probe = fit_probe(rows.vectors[train], rows.labels[train], class_vectors, logit_scale, rows.classes, method, seed)
    fit_seconds = time.perf_counter() - started
    logits = probe.logits(rows.vectors[test])
    names = np.asarray(rows.classes, dtype=object)
    scores = score_labels(names[rows.labels[test]].tolist(), names[logits.argmax(1)].tolist())
    point = {"shots_drawn": int(len(train)), "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"],
             "fit_seconds": fit_seconds, "params": probe.params}
    if len(cal) >= 2:
        record = Calibration.fit(probe.logits(rows.vectors[cal]), rows.labels[cal], rows.classes,
                                 method=conformal_method, alpha=alpha, seed=seed)
        report = calibration_report(logits, rows.labels[test], record, alpha)
        point.update({"temperature": record.temperature, "ece_before": report["ece_before"],
                      "ece_after": report["ece_after"], "coverage": report["conformal"]["coverage"],
                      "mean_set_size": report["conformal"]["mean_set_size"]})
    return point


def few_shot_curve(rows: LabelledRows, parts: dict[str, np.ndarray], class_vectors: np.ndarray, logit_scale: float,
                   methods: Sequence[str] = tuple(METHODS), shots: Sequence[int | None] = (0, 1, 2, 4, 8, 16, None),
                   repeats: int = 3, seed: int = 0, alpha: float = 0.1,
                   conformal_method: str = DEFAULT_METHOD) -> dict[str, list[dict[str, Any]]]:
    """``{method: [one entry per K]}``: each entry has ``shots`` (K or "all"), the mean and std over
    ``repeats`` draws of ``accuracy``/``macro_f1``/``ece_before``/``ece_after``/``coverage``/
    ``mean_set_size``/``fit_seconds``, and the per-draw ``runs``. ``parts`` are
    :func:`vlmlab.probe.split_rows` indices into ``rows``."""
    check_alpha(alpha)
    curves: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown probe method {method!r}; use one of {', '.join(METHODS)}")
        entries = []
        for k in shots:
            draws = 1 if k in (0, None) else repeats
            runs = [_point(rows, parts, class_vectors, logit_scale, method, k, seed + r, alpha, conformal_method)
                    for r in range(draws)]
            entry: dict[str, Any] = {"shots": "all" if k is None else k, "draws": draws}
            for key in ("accuracy", "macro_f1", "ece_before", "ece_after", "coverage", "mean_set_size", "fit_seconds",
                        "shots_drawn"):
                values = [run[key] for run in runs if key in run]
                if values:
                    entry[key] = float(np.mean(values))
                    entry[f"{key}_std"] = float(np.std(values))
            entry["runs"] = runs
            entries.append(entry)
        curves[method] = entries
    return curves


def plot_curve(result: dict[str, Any], out: str | Path) -> Path:
    """PNG of accuracy, ECE (before dotted, after solid) and mean prediction-set size vs shots per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    colours = dict(zip(METHODS, ("#4477aa", "#228833", "#ee6677")))
    labels = None
    for method, entries in result["curves"].items():
        labels = [str(e["shots"]) for e in entries]
        xs = np.arange(len(entries))
        colour = colours.get(method, "black")
        for ax, key in zip(axes, ("accuracy", "ece_after", "mean_set_size")):
            if key not in entries[0]:
                continue
            mean = np.array([e[key] for e in entries])
            std = np.array([e[f"{key}_std"] for e in entries])
            ax.plot(xs, mean, "o-", color=colour, label=method)
            ax.fill_between(xs, mean - std, mean + std, color=colour, alpha=0.15)
        if "ece_before" in entries[0]:
            axes[1].plot(xs, [e["ece_before"] for e in entries], "o:", color=colour, alpha=0.6)
    zero = result["zero_shot"]
    axes[0].axhline(zero["accuracy"], color="grey", ls="--", label=f"zero-shot {zero['accuracy']:.2f}")
    axes[0].axhline(1 / len(result["classes"]), color="grey", ls=":", label="chance")
    alpha = result["alpha"]
    titles = ("test accuracy", "ECE (dotted: before, solid: after temperature)",
              f"mean set size at alpha={alpha} ({result['conformal_method']}, coverage >= {1 - alpha:.2f})")
    for ax, title in zip(axes, titles):
        ax.set_xticks(range(len(labels or [])), labels or [])
        ax.set_xlabel("labelled shots per class")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    axes[2].axhline(1, color="grey", ls=":")
    fig.suptitle(f"{Path(result['store']).name}: {len(result['classes'])} classes, "
                 f"{result['splits']['test']} test rows", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def evaluate_probe(cfg: ProbeCurveConfig) -> dict[str, Any]:
    """Run the curve of ``cfg`` and write ``few_shot.json`` + ``few_shot.png`` into ``cfg.out``; returns the result
    (``curves``, ``zero_shot``, ``classes``, ``splits``, ``json``, ``png``, ...)."""
    from vlmlab.classify import class_embeddings
    from vlmlab.probe import labelled_rows, split_rows
    from vlmlab.search import store_encoder
    from vlmlab.store import EmbeddingStore

    alpha = check_alpha(cfg.conformal)
    shots = [parse_shots(s) for s in cfg.shots]
    store = EmbeddingStore.open(cfg.store)
    rows = labelled_rows(store, cfg.labels, cfg.classes or None, cfg.where or None)
    parts = split_rows(rows, cfg.calibration_fraction, cfg.test_fraction, cfg.seed)
    if not len(parts["test"]):
        raise ValueError("no test rows: give --test-fraction > 0 or test rows in the labels CSV's split column")
    encoder = store_encoder(store, cfg.device or None)
    class_vectors = class_embeddings(encoder, rows.classes, cfg.templates)
    curves = few_shot_curve(rows, parts, class_vectors, encoder.logit_scale, cfg.methods, shots, cfg.repeats,
                            cfg.seed, alpha, cfg.conformal_method)
    zero = next(iter(curves.values()))[0] if 0 in shots else \
        few_shot_curve(rows, parts, class_vectors, encoder.logit_scale, ("logistic",), (0,), 1, cfg.seed, alpha,
                       cfg.conformal_method)["logistic"][0]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "store": str(Path(cfg.store).resolve()), "labels": str(Path(cfg.labels).resolve()), "model": store.model,
        "classes": rows.classes, "templates": cfg.templates, "alpha": alpha, "conformal_method": cfg.conformal_method,
        "splits": {name: int(len(idx)) for name, idx in parts.items()},
        "split_source": "split column" if rows.split is not None else "random (seeded, stratified)",
        "zero_shot": {k: v for k, v in zero.items() if k != "runs"}, "curves": curves, "config": asdict(cfg),
    }
    result["png"] = str(plot_curve(result, out / CURVE_PNG))
    result["json"] = str(out / CURVE_FILE)
    Path(result["json"]).write_text(json.dumps(result, indent=1) + "\n")
    return result


def curve_table(result: dict[str, Any]) -> str:
    """Mean test accuracy (and mean set size) per method and K as a plain-text table."""
    shots = [str(e["shots"]) for e in next(iter(result["curves"].values()))]
    lines = [f"{'accuracy':<12}" + "".join(f"{k:>8}" for k in shots)]
    for method, entries in result["curves"].items():
        lines.append(f"{method:<12}" + "".join(f"{e['accuracy']:>8.3f}" for e in entries))
    if "mean_set_size" in next(iter(result["curves"].values()))[0]:
        lines.append(f"{'set size':<12}" + "".join(f"{k:>8}" for k in shots) + f"   (alpha={result['alpha']})")
        for method, entries in result["curves"].items():
            lines.append(f"{method:<12}" + "".join(f"{e['mean_set_size']:>8.2f}" for e in entries))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``vlmlab evaluate probe``: print the curve table and where the JSON and PNG went."""
    from vlmlab.config import ConfigError, add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="vlmlab evaluate probe", description=__doc__.splitlines()[0])
    add_config_arguments(parser, ProbeCurveConfig)
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(ProbeCurveConfig, args, None, args.overrides)
        check_alpha(cfg.conformal)
        [parse_shots(s) for s in cfg.shots]
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc))
    if not (cfg.store and cfg.labels and cfg.out):
        parser.error("--store, --labels and --out are required")
    result = evaluate_probe(cfg)
    print(curve_table(result))
    print(json.dumps({"json": result["json"], "png": result["png"]}))


if __name__ == "__main__":
    main()
