"""``vlmlab study grid``: zero-shot classification and class retrieval over models x prompt-template sets.

``vlmlab study grid --models SPEC... --templates plain rocks aerial --store STORE... --labels CSV
--out DIR`` (or ``python -m pipelines.studies.grid ...``) runs every (model, template set) cell as
one task on the model's actor (:mod:`pipelines.studies.cells`) and writes, per cell,
``DIR/cells/<model>/<templates>/``: ``predictions.parquet`` (the columns of ``vlmlab classify``),
``metrics.json`` and ``confusion_matrix.png`` (:func:`vlmlab.classify.evaluate_predictions`) and
``clip_benchmark.json`` (CLIP_benchmark's layout: ``dataset``, ``model``, ``pretrained``, ``task``,
``metrics`` with ``acc1``, ``acc5``, ``mean_per_class_recall``, plus macro-F1 and text->image
retrieval mAP of each class prompt). Then ``DIR/summary.csv``, ``DIR/heatmap_accuracy.png``,
``DIR/heatmap_macro_f1.png`` and ``DIR/report.html`` are rebuilt from every cell's file.

Stores and models: a store holds the embeddings of the one model it was extracted with, and a
class prompt must be embedded by that same model. So each model needs its own store of the same
images: pass one ``--store`` per model (each store's manifest names its model; without
``--models`` the grid runs the stores' models), and/or ``--images DIR``, with which a model that
has no store gets one extracted into ``DIR/stores/<model>/`` by ``pipelines.extract`` (resumable,
so a re-run embeds nothing twice). The classification itself reuses :mod:`vlmlab.classify`
(class embeddings through :mod:`vlmlab.prompts`, CLIP's softmax scoring, the label matching and
evaluation). Finished cells are skipped on re-run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.studies.cells import (
    ActorOptions,
    Cell,
    RunSummary,
    StudyError,
    check_specs,
    has_random_weights,
    merge_manifest,
    model_folders,
    run_cells,
    write_manifest,
)
from vlmlab.config import add_config_arguments, config_from_args
from vlmlab.runtime import start_ray

log = logging.getLogger("vlmlab.study")
MANIFEST = "grid.json"
CELL_FILE = "clip_benchmark.json"


@dataclass(frozen=True)
class GridConfig:
    """Options of ``vlmlab study grid``."""

    models: tuple[str, ...] = field(default=(), metadata={"help": "model specs (default: the models of --store)"})
    templates: tuple[str, ...] = field(default=("plain",), metadata={
        "help": "template-set names: plain rocks aerial inspection, or sets of --templates-file"})
    templates_file: str | None = field(default=None, metadata={
        "help": "YAML mapping set names to lists of templates with {} (the class name)"})
    store: tuple[str, ...] = field(default=(), metadata={"help": "embedding stores, one per model"})
    images: str | None = field(default=None, metadata={
        "help": "image folder: models without a --store get one extracted into OUT/stores/<model>"})
    labels: str = field(default="", metadata={"help": "CSV path,label (paths equal to, or ending with, store paths)"})
    classes: tuple[str, ...] = field(default=(), metadata={"help": "class names (default: the labels' values)"})
    where: str | None = field(default=None, metadata={"help": "only store rows matching this metadata filter"})
    out: str = field(default="", metadata={"help": "grid folder (created or resumed)"})
    dataset: str = field(default="", metadata={"help": "dataset name in the JSON (default: the labels file's name)"})
    names: tuple[str, ...] = field(default=(), metadata={"help": "output folder name per model (default: from spec)"})
    actors_per_model: int = field(default=1, metadata={"help": "actors sharing one model's cells (each loads it)"})
    gpus_per_actor: float = field(default=0.25, metadata={"help": "GPU share per model actor when GPUs exist"})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs per model actor (its torch threads on CPU)"})
    address: str | None = field(default=None, metadata={"help": "Ray address (default: RAY_ADDRESS or local)"})


@dataclass(frozen=True)
class ZeroShotCells:
    """The per-model work of the grid (``prepare``/``compute`` on the model actors, ``save`` in the driver)."""

    stores: dict[str, str]  # model spec -> store directory
    template_sets: dict[str, tuple[str, ...]]
    classes: tuple[str, ...]
    labels: str
    where: str | None
    dataset: str

    def prepare(self, encoder: Any, cell: Cell) -> dict[str, Any]:
        """The store's vectors and each row's true label (None where the labels CSV has none)."""
        from vlmlab.classify import match_labels
        from vlmlab.store import EmbeddingStore

        _, vectors, meta = EmbeddingStore.open(self.stores[cell.model]).embeddings(where=self.where)
        table = pd.read_csv(self.labels)
        paths = meta["path"].to_pylist()
        truth = match_labels(paths, table["path"].astype(str).tolist(), table["label"].astype(str).tolist())
        return {"vectors": vectors, "paths": paths, "source": meta["source"].to_pylist(), "truth": truth}

    def compute(self, encoder: Any, state: dict[str, Any], cell: Cell) -> dict[str, Any]:
        """Predictions (``vlmlab classify`` columns) and the rank metrics that need the scores."""
        from vlmlab.classify import class_embeddings, classify_vectors

        class_vectors = class_embeddings(encoder, self.classes, self.template_sets[cell.key])
        cols = classify_vectors(state["vectors"], class_vectors, self.classes, encoder.logit_scale)
        preds = pd.DataFrame({"path": state["paths"], "source": state["source"], **cols})
        cosine = state["vectors"] @ class_vectors.T
        return {"predictions": preds, "ranks": rank_metrics(cosine, state["truth"], self.classes)}

    def save(self, cell: Cell, result: dict[str, Any]) -> None:
        """Write the cell's files; ``clip_benchmark.json`` last (it marks the cell done)."""
        from vlmlab.classify import evaluate_predictions
        from vlmlab.models import resolve_spec

        folder = Path(cell.done).parent
        folder.mkdir(parents=True, exist_ok=True)
        result["predictions"].to_parquet(folder / "predictions.parquet", index=False)
        metrics = evaluate_predictions(result["predictions"], self.labels, folder)
        present = [c for c, m in metrics["per_class"].items() if m["support"] > 0]
        resolved = resolve_spec(cell.model)
        record = {
            "dataset": self.dataset,
            "model": resolved.name if resolved.backend == "open_clip" else cell.model,
            "pretrained": resolved.pretrained or "",
            "task": "zeroshot_classification",
            "language": "en",
            "templates": cell.key,
            "model_spec": cell.model,
            "metrics": {
                "acc1": metrics["accuracy"],
                "acc5": result["ranks"]["acc5"],
                "mean_per_class_recall": float(np.mean([metrics["per_class"][c]["recall"] for c in present])),
                "macro_f1": metrics["macro_f1"],
                "weighted_f1": metrics["weighted_f1"],
                "retrieval_map": result["ranks"]["retrieval_map"],
                "retrieval_r_precision": result["ranks"]["retrieval_r_precision"],
            },
            "images": metrics["matched"],
            "unlabelled_images": metrics["unmatched"],
        }
        tmp = folder / f".{CELL_FILE}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, folder / CELL_FILE)


def rank_metrics(cosine: np.ndarray, truth: list[str | None], classes: tuple[str, ...]) -> dict[str, float | None]:
    """Top-5 accuracy (None with 5 classes or fewer) and, reading each class prompt as a text query
    over the labelled images, the mean over classes of the average precision and of the R-precision
    (precision among the top R images, R the class's size) of retrieving that class."""
    from sklearn.metrics import average_precision_score

    keep = np.array([t is not None for t in truth], bool)
    scores = np.asarray(cosine)[keep]
    labels = np.array([t for t in truth if t is not None], dtype=object)
    acc5 = None
    if len(classes) > 5 and len(labels):
        top5 = np.argsort(-scores, axis=1)[:, :5]
        names = np.asarray(classes, dtype=object)
        acc5 = float(np.mean([lab in names[row] for lab, row in zip(labels, top5, strict=True)]))
    aps, precisions = [], []
    for j, name in enumerate(classes):
        relevant = labels == name
        if not relevant.any():
            continue
        aps.append(average_precision_score(relevant, scores[:, j]))
        top = np.argsort(-scores[:, j])[:relevant.sum()]
        precisions.append(float(relevant[top].mean()))
    return {"acc5": acc5, "retrieval_map": float(np.mean(aps)) if aps else None,
            "retrieval_r_precision": float(np.mean(precisions)) if precisions else None}


def template_sets(names: tuple[str, ...], templates_file: str | None) -> dict[str, tuple[str, ...]]:
    """Template sets by name: the project's (:data:`vlmlab.prompts.TEMPLATE_SETS`) and the file's."""
    from vlmlab.config import load_yaml
    from vlmlab.prompts import TEMPLATE_SETS, templates_for

    available = dict(TEMPLATE_SETS)
    if templates_file:
        for name, templates in load_yaml(templates_file).items():
            templates = [templates] if isinstance(templates, str) else list(templates)
            available[str(name)] = templates_for(templates)  # checks every template has {}
    unknown = [n for n in names if n not in available]
    if unknown:
        raise StudyError(f"unknown template set(s) {unknown}: use {', '.join(available)} or define them in a "
                         "--templates-file (YAML: name: [templates with {}])")
    return {n: tuple(available[n]) for n in names}


def stores_for_models(cfg: GridConfig, keys: tuple[str, ...] = ()) -> tuple[dict[str, str], dict[str, str]]:
    """``({model spec: store}, {model spec: folder})``: each model's store among ``--store``, else one
    extracted from ``--images`` into ``OUT/stores/<folder>`` (brought up to date unless every cell
    ``keys`` of that model is already finished)."""
    from vlmlab.models import resolve_spec
    from vlmlab.store import EmbeddingStore

    given = {}
    for path in cfg.store:
        manifest = EmbeddingStore.open(path).manifest
        if manifest.get("adapter"):
            raise StudyError(f"store {path} was extracted with an adapter; the grid compares base models: "
                             "classify it with `vlmlab classify`")
        given[path] = manifest["model"]
    models = list(cfg.models) or list(dict.fromkeys(given.values()))
    if not models:
        raise StudyError("give --models, or --store STORE... whose models the grid runs")
    check_specs(models)
    random = [m for m in models if has_random_weights(m)]
    if random:
        raise StudyError(f"{random} ha{'s' if len(random) == 1 else 've'} random weights, drawn anew by every process, "
                         "so a store and an actor would hold different models: save one draw to a local directory "
                         "and pass that (see bench/study.py)")
    folders = model_folders(models, cfg.names)
    out = {}
    for spec in models:
        match = [p for p, m in given.items() if resolve_spec(m) == resolve_spec(spec)]
        if match:
            out[spec] = match[0]
        elif cfg.images:
            from pipelines.extract import ExtractConfig, extract

            target = Path(cfg.out) / "stores" / folders[spec]
            cells = Path(cfg.out) / "cells" / folders[spec]
            if keys and (target / "manifest.json").is_file() and all((cells / k / CELL_FILE).exists() for k in keys):
                out[spec] = str(target)  # nothing left to compute with it
                continue
            start_ray(cfg.address)
            print(f"[study] embedding {cfg.images} with {spec} into {target}", flush=True)
            print(extract(ExtractConfig(images=cfg.images, model=spec, out=str(target))).line(), flush=True)
            out[spec] = str(target)
        else:
            raise StudyError(f"model {spec!r} has no store among --store ({', '.join(cfg.store) or 'none'}); pass "
                             "--images IMAGES to embed them with each model, or extract one with `vlmlab extract`")
    return out, folders


def run_grid(cfg: GridConfig) -> RunSummary:
    """Compute every missing (model, template set) cell, then rebuild the summary, heatmaps and report."""
    if not cfg.out:
        raise StudyError("--out DIR is required")
    if not cfg.labels or not Path(cfg.labels).is_file():
        raise StudyError(f"--labels must name a CSV path,label (got {cfg.labels!r})")
    labels = pd.read_csv(cfg.labels)
    if not {"path", "label"} <= set(labels.columns):
        raise StudyError(f"{cfg.labels} needs columns path,label; it has {list(labels.columns)}")
    classes = tuple(cfg.classes) or tuple(sorted(labels["label"].astype(str).unique()))
    if len(classes) < 2:
        raise StudyError(f"need at least two classes, got {list(classes)}")
    sets = template_sets(tuple(cfg.templates), cfg.templates_file)
    stores, folders = stores_for_models(cfg, tuple(sets))
    out = Path(cfg.out)
    dataset = cfg.dataset or Path(cfg.labels).stem
    record = {"dataset": dataset, "labels": str(Path(cfg.labels).resolve()), "classes": list(classes),
              "where": cfg.where, "templates": {k: list(v) for k, v in sets.items()},
              "models": {folders[s]: {"spec": s, "store": str(Path(p).resolve())} for s, p in stores.items()}}
    manifest = merge_manifest(out / MANIFEST, record, fixed=("labels", "classes", "where"),
                              named=("templates", "models"))
    write_manifest(out / MANIFEST, manifest)
    cells = [Cell(spec, folders[spec], key, str(out / "cells" / folders[spec] / key / CELL_FILE))
             for spec in stores for key in sets]
    task = ZeroShotCells(stores, sets, classes, str(Path(cfg.labels).resolve()), cfg.where, dataset)
    if any(not Path(c.done).exists() for c in cells):
        start_ray(cfg.address)
    summary = run_cells(cells, task, ActorOptions(cfg.actors_per_model, cfg.gpus_per_actor, cfg.cpus_per_actor))
    write_grid_report(out)
    return summary


def grid_summary(out: str | Path) -> pd.DataFrame:
    """One row per finished cell under ``out/cells`` (read from the cells' ``clip_benchmark.json``)."""
    rows = []
    for path in sorted(Path(out).glob(f"cells/*/*/{CELL_FILE}")):
        record = json.loads(path.read_text())
        rows.append({"model": path.parent.parent.name, "templates": path.parent.name,
                     **record["metrics"], "images": record["images"]})
    return pd.DataFrame(rows)


def write_grid_report(out: str | Path) -> Path:
    """``summary.csv``, the accuracy and macro-F1 heatmaps and ``report.html`` from the cell files."""
    from vlmlab.report import Report
    from vlmlab.studies import figures

    out = Path(out)
    manifest = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else {}
    summary = grid_summary(out)
    if not summary.empty:  # template sets in the order they were first asked for
        rank = {name: k for k, name in enumerate(manifest.get("templates", {}))}
        summary = (summary.assign(_rank=summary["templates"].map(lambda t: rank.get(t, len(rank))))
                   .sort_values(["model", "_rank", "templates"]).drop(columns="_rank").reset_index(drop=True))
    summary.to_csv(out / "summary.csv", index=False, float_format="%.6g")
    report = Report("Zero-shot grid: models x prompt-template sets", out)
    if summary.empty:
        report.note("no finished cells yet")
        return report.write()
    report.note(f"Dataset {manifest.get('dataset', '?')}: {summary['images'].max()} labelled images, classes "
                f"{', '.join(manifest.get('classes', []))}. acc1 = accuracy; macro_f1 over classes; retrieval_map = "
                "mean average precision of ranking the images by each class prompt.")
    report.figure(figures.heatmap(summary, "model", "templates", "acc1", out / "heatmap_accuracy.png",
                                  "zero-shot accuracy", 0, 1), "Accuracy per model and template set.")
    report.figure(figures.heatmap(summary, "model", "templates", "macro_f1", out / "heatmap_macro_f1.png",
                                  "macro F1", 0, 1), "Macro-F1 per model and template set.")
    report.table(summary)
    report.heading("Template sets")
    for name, templates in manifest.get("templates", {}).items():
        report.note(f"{name}: " + " | ".join(templates))
    report.heading("Confusion matrices")
    for path in sorted(out.glob("cells/*/*/confusion_matrix.png")):
        report.figure(path, f"{path.parent.parent.name} / {path.parent.name}")
    return report.write()


def main(argv: list[str] | None = None) -> None:
    """``vlmlab study grid --models SPEC... --templates plain rocks --store STORE... --labels CSV --out DIR``."""
    parser = argparse.ArgumentParser(prog="vlmlab study grid", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file with any of the options below")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    add_config_arguments(parser, GridConfig)
    args = parser.parse_args(argv)
    cfg = config_from_args(GridConfig, args, args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from vlmlab.store import StoreError

    try:
        summary = run_grid(cfg)
    except (StudyError, StoreError, ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"vlmlab study grid: {exc}") from exc
    print(summary.line())
    table = pd.read_csv(Path(cfg.out) / "summary.csv")
    metrics = [c for c in ("acc1", "acc5", "mean_per_class_recall", "macro_f1", "retrieval_map") if c in table]
    table[metrics] = table[metrics].astype(float)
    print(table[["model", "templates", *metrics, "images"]].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"report: {Path(cfg.out) / 'report.html'}")
    if summary.failed:
        raise SystemExit("failed cells:\n" + "\n".join(f"  {c.folder} / {c.key}: {why}" for c, why in summary.failed))


if __name__ == "__main__":
    main()
