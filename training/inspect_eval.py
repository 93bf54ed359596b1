"""Evaluate a condition classifier on a split of its YOLO dataset, zero-shot CLIP side by side.

``vlmlab evaluate inspect --run RUN_DIR --split test [--data data.yaml]`` crops every labelled
object of the split (:func:`training.inspect_data.crop_instance`, the run's margin) and scores:

- the fine-tuned classifier (``RUN_DIR/model``),
- zero-shot CLIP on the same base model (prompt-ensembled class names, the classifier's step 0),
- spatial-prompt zero-shot ("a photo of toe drain normal at bottom of image", the crop's own bin),
- spatial + context zero-shot ("..., with rock toe, slope drain nearby", the other objects in the image),

each with overall accuracy, macro/weighted F1, per-class, per-condition (normal/blocked/damaged),
per-object-type and per-spatial-bin accuracy and the accuracy over rare classes. Writes
``evaluation.json`` and ``confusion_matrix.png`` (zero-shot | fine-tuned) into the run directory.

Calibration (:mod:`vlmlab.calibration`): a temperature for the fine-tuned classifier and for zero-shot
is fitted on the ``calibration_split`` (``val``), and ECE before/after on the evaluated split goes into
``evaluation.json["calibration"]`` with ``reliability.png``; the fine-tuned record (with its conformal
scores) is saved as ``RUN/model/calibration.json``, which ``vlmlab inspect --conformal`` and the Serve
``/inspect`` use. With ``--conformal ALPHA``, ``evaluation.json["conformal"]`` reports both models'
prediction sets on the split: empirical coverage and mean set size overall and per class, and the
condition sets within each object's true type (what ``vlmlab inspect`` flags ``needs_review``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.inspect_data import (
    BIN_PHRASES,
    NO_CONDITION,
    Instance,
    condition_vocabulary,
    crop_all,
    read_instances,
    split_class_name,
)

EVALUATION_FILE = "evaluation.json"
CONFUSION_FILE = "confusion_matrix.png"
RELIABILITY_FILE = "reliability.png"
SPATIAL_TEMPLATE = "a photo of {}."  # the lab's spatial prompts: "a photo of toe drain normal at bottom of image"
HEADLINE = ("accuracy", "macro_f1", "weighted_f1", "rare_accuracy", "blocked_accuracy")


@dataclass(frozen=True)
class InspectEvalConfig:
    """What to evaluate."""

    run: str = field(default="", metadata={"help": "run directory (RUN_DIR/NAME) or its model/ directory"})
    split: str = field(default="test", metadata={"help": "dataset split: train | val | test"})
    data: str = field(default="", metadata={"help": "YOLO data.yaml (default: the one the run trained on)"})
    out: str = field(default="", metadata={"help": "where evaluation.json and the PNG go (default: the run directory)"})
    rare_fraction: float = field(default=0.5, metadata={"help": "rare = fewer train examples than this x the largest"})
    batch_size: int = field(default=64, metadata={"help": "crops per forward pass"})
    device: str = field(default="", metadata={"help": "torch device (default: CUDA if visible, else CPU)"})
    conformal: float | None = field(default=None, metadata={"help": "alpha in (0, 1): report prediction sets "
                                                                     "(coverage >= 1 - alpha) on the split"})
    conformal_method: str = field(default="aps", metadata={"help": "conformal score: lac | aps | raps"})
    calibration_split: str = field(default="val", metadata={"help": "split the temperature and sets are fitted on"})
    save_calibration: bool = field(default=True, metadata={"help": "save RUN/model/calibration.json"})
    seed: int = field(default=0, metadata={"help": "seed of the temperature/conformal halves of the calibration split"})


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, instances: Sequence[Instance],
                          classes: Sequence[str], rare: Sequence[str] = ()) -> dict[str, Any]:
    """Accuracy, macro/weighted F1 and accuracy per class, condition, object type and spatial bin.

    ``y_true``/``y_pred`` are class ids (N,) of ``instances`` in order. Per-class accuracy is the
    class's recall; per-condition/-object/-bin accuracy is the fraction of that group's instances
    whose full class is right. ``rare_accuracy`` pools the ``rare`` classes; ``object_type_accuracy``
    and ``condition_accuracy`` score one half of the label each.
    """
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    labels = np.arange(len(classes))
    present = np.unique(y_true)
    correct = y_true == y_pred
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class = {classes[c]: {"accuracy": float(recall[c]), "precision": float(precision[c]), "f1": float(f1[c]),
                              "support": int(support[c])} for c in labels if support[c]}

    def grouped(key) -> dict[str, float]:
        groups: dict[str, list[bool]] = {}
        for inst, ok in zip(instances, correct):
            groups.setdefault(key(inst), []).append(bool(ok))
        return {name: float(np.mean(oks)) for name, oks in sorted(groups.items())}

    per_condition = {k: v for k, v in grouped(lambda i: i.condition).items() if k != NO_CONDITION}
    conditions = condition_vocabulary(classes)
    split_pred = [split_class_name(classes[p], conditions) for p in y_pred]
    rare_mask = np.isin(y_true, [classes.index(r) for r in rare])
    return {
        "n": int(len(y_true)),
        "accuracy": float(correct.mean()) if len(correct) else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=present, average="weighted", zero_division=0)),
        "rare_accuracy": float(correct[rare_mask].mean()) if rare_mask.any() else None,
        "blocked_accuracy": per_condition.get("blocked"),
        "object_type_accuracy": float(np.mean([p[0] == i.object_type for p, i in zip(split_pred, instances)])),
        "condition_accuracy": float(np.mean([p[1] == i.condition for p, i in zip(split_pred, instances)])),
        "per_class": per_class,
        "per_condition": per_condition,
        "per_object_type": grouped(lambda i: i.object_type),
        "per_spatial_bin": grouped(lambda i: i.spatial_bin),
    }


def spatial_zero_shot(encoder, image_embeddings: np.ndarray, instances: Sequence[Instance], classes: Sequence[str],
                      with_context: bool = False) -> np.ndarray:
    """Zero-shot class ids (N,) from prompts that name each crop's spatial bin (and its context objects).

    Crop i is scored against "a photo of {class} {bin phrase}[, with {context} nearby]" for every
    class, with its own bin and context, so position is given, not guessed. ``image_embeddings``
    (N, D) are the encoder's L2-normalised crop embeddings.
    """
    from vlmlab.prompts import ensemble_text_embeddings

    cache: dict[tuple[str, str], np.ndarray] = {}
    pred = np.zeros(len(instances), dtype=np.int64)
    for n, inst in enumerate(instances):
        context = inst.context if with_context else ""
        key = (inst.spatial_bin, context)
        if key not in cache:
            suffix = f" {BIN_PHRASES[inst.spatial_bin]}" + (f", with {context} nearby" if context else "")
            cache[key] = ensemble_text_embeddings(encoder, [c + suffix for c in classes], SPATIAL_TEMPLATE)
        pred[n] = int(np.argmax(cache[key] @ image_embeddings[n]))
    return pred


def plot_confusion(matrices: dict[str, np.ndarray], classes: Sequence[str], out: Path) -> Path:
    """One PNG with a row-normalised confusion matrix per model, side by side (titles = dict keys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(matrices), figsize=(6.5 * len(matrices), 6), squeeze=False)
    for ax, (title, matrix) in zip(axes[0], matrices.items()):
        rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for (r, c), count in np.ndenumerate(matrix):
            if count:
                ax.text(c, r, str(count), ha="center", va="center", fontsize=8,
                        color="white" if rates[r, c] > 0.5 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def evaluate_inspect(cfg: InspectEvalConfig) -> dict[str, Any]:
    """Score the run's classifier and zero-shot CLIP on ``cfg.split``; write and return the evaluation dict.

    Keys: ``fine_tuned``, ``zero_shot``, ``spatial_zero_shot``, ``context_zero_shot`` (each a
    :func:`classification_report`), ``side_by_side`` (headline figures per model), ``confusion_matrix``
    (counts, rows = true class), ``classes``, ``rare_classes``, ``split``, ``data``, ``json``, ``png``.
    Raises ``FileNotFoundError`` when the run has no model or the data file is missing.
    """
    from sklearn.metrics import confusion_matrix

    from training.inspection import build_classifier, kept_model, load_classifier, model_dir_of
    from vlmlab.calibration import plot_reliability

    model_dir = model_dir_of(cfg.run)
    classifier = load_classifier(model_dir, device=cfg.device or None)
    data = cfg.data or classifier.meta.get("data", "")
    if not data:
        raise ValueError(f"{model_dir} does not record its data file; pass --data PATH/data.yaml")
    classes = classifier.classes
    instances = read_instances(data, cfg.split)
    if not instances:
        raise ValueError(f"the {cfg.split!r} split of {data} has no labelled objects")
    pixels = classifier.encoder.preprocess_batch(crop_all(instances, classifier.crop_margin))
    y_true = np.array([inst.class_id for inst in instances])
    counts = np.bincount([inst.class_id for inst in read_instances(data, "train")], minlength=len(classes))
    rare = [classes[c] for c in range(len(classes)) if 0 < counts[c] < cfg.rare_fraction * counts.max()]

    meta = classifier.meta
    zero_shot = build_classifier(meta["base_spec"], classes, meta["templates"], "blocks", 0,
                                 crop_margin=classifier.crop_margin, device=cfg.device or None)
    models = {"zero_shot": zero_shot, "fine_tuned": classifier}
    probs = {name: model.predict_pixels(pixels, cfg.batch_size) for name, model in models.items()}
    predictions = {name: p.argmax(1) for name, p in probs.items()}
    calibration = calibrate_and_score(cfg, models, probs, y_true, model_dir, data, classes)
    image_embeddings = zero_shot.encoder.encode_images(pixels, cfg.batch_size)
    predictions["spatial_zero_shot"] = spatial_zero_shot(zero_shot.encoder, image_embeddings, instances, classes)
    predictions["context_zero_shot"] = spatial_zero_shot(zero_shot.encoder, image_embeddings, instances, classes,
                                                         with_context=True)
    reports = {name: classification_report(y_true, pred, instances, classes, rare)
               for name, pred in predictions.items()}
    matrices = {name: confusion_matrix(y_true, predictions[name], labels=np.arange(len(classes)))
                for name in ("zero_shot", "fine_tuned")}

    out_dir = Path(cfg.out).expanduser().resolve() if cfg.out else model_dir.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_confusion({f"{name.replace('_', '-')} ({cfg.split}, acc {reports[name]['accuracy']:.2f})": m
                          for name, m in matrices.items()}, classes, out_dir / CONFUSION_FILE)
    evaluation = {
        "split": cfg.split, "data": str(Path(data).expanduser().resolve()), "model_dir": str(model_dir),
        "base_spec": meta["base_spec"], "classes": classes, "rare_classes": rare,
        # which model the run kept: "zero-shot" means training never beat the zero-shot head on validation
        **kept_model(model_dir),
        **reports,
        "side_by_side": {metric: {name: reports[name][metric] for name in reports} for metric in HEADLINE},
        "confusion_matrix": {name: m.tolist() for name, m in matrices.items()},
        "png": str(png), "config": asdict(cfg),
    }
    evaluation.update(calibration["report"])
    evaluation["calibration"]["reliability_png"] = str(plot_reliability(calibration["panels"],
                                                                        out_dir / RELIABILITY_FILE))
    path = out_dir / EVALUATION_FILE
    path.write_text(json.dumps(evaluation, indent=1))
    evaluation["json"] = str(path)
    return evaluation


def calibrate_and_score(cfg: InspectEvalConfig, models: dict[str, Any], probs: dict[str, np.ndarray], y: np.ndarray,
                        model_dir: Path, data: str, classes: Sequence[str]) -> dict[str, Any]:
    """Fit a temperature (and conformal scores) per model on ``cfg.calibration_split``, score them on the
    evaluated split (``probs`` (N, C) per model, true class ids ``y``); save the fine-tuned record beside
    its weights when ``cfg.save_calibration``.

    Returns ``{"report": {"calibration": ..., "conformal": ...}, "panels": reliability-diagram panels}``.
    """
    from training.inspection import WEIGHTS_FILE
    from vlmlab.calibration import Calibration, calibration_report, check_alpha, coverage_report, logits_of, softmax

    alpha = None if cfg.conformal is None else check_alpha(cfg.conformal)
    if cfg.calibration_split == cfg.split:
        raise ValueError(f"calibrating and evaluating on the same split ({cfg.split!r}) would overstate coverage; "
                         "pass another --calibration-split")
    classifier = models["fine_tuned"]
    held = read_instances(data, cfg.calibration_split)
    held_pixels = classifier.encoder.preprocess_batch(crop_all(held, classifier.crop_margin))
    held_y = np.array([inst.class_id for inst in held])
    conditions = condition_vocabulary(classes)
    types = np.array([split_class_name(c, conditions)[0] for c in classes])
    report: dict[str, Any] = {"calibration": {"split": cfg.calibration_split, "rows": len(held)}}
    panels = {}
    for name, model in models.items():
        logits = logits_of(probs[name])
        record = Calibration.fit(logits_of(model.predict_pixels(held_pixels, cfg.batch_size)), held_y, classes,
                                 method=cfg.conformal_method, alpha=alpha or 0.1, seed=cfg.seed,
                                 split=f"{cfg.calibration_split} of {data}",
                                 weights_file=model_dir / WEIGHTS_FILE if model is classifier else None)
        scored = calibration_report(logits, y, record, alpha)
        label = name.replace("_", "-")
        panels[f"{label}, before (T = 1)"] = (softmax(logits), y)
        panels[f"{label}, after (T = {record.temperature:.2f})"] = (record.probs(logits), y)
        if alpha is not None:
            sets = record.sets(record.probs(logits), alpha)
            within = sets & (types[None, :] == types[y][:, None])  # the true object type's classes
            report.setdefault("conformal", {"alpha": alpha, "method": cfg.conformal_method, "split": cfg.split})
            report["conformal"][name] = {**scored.pop("conformal"),
                                         "within_object_type": coverage_report(within, y, classes),
                                         "needs_review": float((within.sum(1) != 1).mean())}
        report["calibration"][name] = scored
        if model is classifier and cfg.save_calibration:
            report["calibration"]["saved"] = str(record.save(model_dir))
    return {"report": report, "panels": panels}


def side_by_side_table(evaluation: dict[str, Any]) -> str:
    """The headline figures as a plain-text table, one column per model."""
    names = list(evaluation["side_by_side"]["accuracy"])
    lines = [f"{'metric':<18}" + "".join(f"{n:>20}" for n in names)]
    for metric, row in evaluation["side_by_side"].items():
        cells = "".join(f"{'-' if row[n] is None else f'{row[n]:.3f}':>20}" for n in names)
        lines.append(f"{metric:<18}{cells}")
    return "\n".join(lines)


def calibration_table(evaluation: dict[str, Any]) -> str:
    """ECE before/after temperature scaling (and, with --conformal, coverage and set size) per model."""
    cal, conformal = evaluation["calibration"], evaluation.get("conformal")
    lines = [f"{'calibration':<18}{'temperature':>12}{'ECE before':>12}{'ECE after':>12}"
             + (f"{'coverage':>10}{'set size':>10}{'review':>8}" if conformal else "")]
    for name in ("zero_shot", "fine_tuned"):
        row = cal[name]
        line = f"{name:<18}{row['temperature']:>12.3f}{row['ece_before']:>12.3f}{row['ece_after']:>12.3f}"
        if conformal:
            sets = conformal[name]
            line += f"{sets['coverage']:>10.3f}{sets['mean_set_size']:>10.2f}{sets['needs_review']:>8.2f}"
        lines.append(line)
    if conformal:
        lines.append(f"(prediction sets at alpha={conformal['alpha']} ({conformal['method']}): coverage >= "
                     f"{1 - conformal['alpha']:.2f} guaranteed; temperature and sets fitted on {cal['split']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``vlmlab evaluate inspect``: print the side-by-side table and where the JSON and PNG went."""
    from vlmlab.calibration import check_alpha, check_method
    from vlmlab.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="vlmlab evaluate inspect", description=__doc__.splitlines()[0])
    add_config_arguments(parser, InspectEvalConfig)
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    cfg = config_from_args(InspectEvalConfig, args, None, args.overrides)
    if not cfg.run:
        parser.error("--run RUN_DIR is required")
    try:
        if cfg.conformal is not None:
            check_alpha(cfg.conformal)
        check_method(cfg.conformal_method)
    except ValueError as exc:
        parser.error(str(exc))
    evaluation = evaluate_inspect(cfg)
    if evaluation["kept"] == "zero-shot":
        print(f"!!! {evaluation['model_dir']} holds the zero-shot head: its training never beat zero-shot on "
              "validation, so 'fine_tuned' below is zero-shot CLIP !!!")
    print(side_by_side_table(evaluation))
    print(calibration_table(evaluation))
    print(json.dumps({"json": evaluation["json"], "png": evaluation["png"],
                      "reliability_png": evaluation["calibration"]["reliability_png"]}))


if __name__ == "__main__":
    main()
