"""``study grid`` on the shared local Ray: the tiny model's sample store x template sets, per-cell
CLIP_benchmark JSON and metrics, the same predictions as ``vlmlab classify``, resume, and a second
model embedded on the fly from ``--images``."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipelines.studies.cells import StudyError
from pipelines.studies.grid import GridConfig, run_grid


@pytest.fixture(scope="module")
def templates_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("templates") / "templates.yaml"
    path.write_text("# vlmlab study grid --templates-file templates.yaml --templates tiles\n"
                    "tiles: ['a map tile of {}', 'a close-up texture of {} rock']\n")
    return path


@pytest.fixture(scope="module")
def grid(ray_local, sample_store, samples_dir, templates_file, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("grid") / "grid"
    cfg = GridConfig(templates=("plain", "rocks", "tiles"), templates_file=str(templates_file),
                     store=(str(sample_store),), labels=str(samples_dir / "tiles.csv"), out=str(out))
    return out, run_grid(cfg)


def test_grid_cells_metrics_and_report(grid, sample_store, tiny_model, samples_dir):
    out, summary = grid
    assert summary.failed == [] and len(summary.computed) == 3 and summary.actors == 1
    folder = out / "cells" / Path(tiny_model).name
    for key in ("plain", "rocks", "tiles"):
        record = json.loads((folder / key / "clip_benchmark.json").read_text())
        assert record["task"] == "zeroshot_classification" and record["dataset"] == "tiles"
        assert record["model_spec"] == tiny_model and record["images"] == 256
        m = record["metrics"]
        assert set(m) >= {"acc1", "acc5", "mean_per_class_recall", "macro_f1", "retrieval_map", "retrieval_r_precision"}
        # six classes: chance is 1/6; the tiny model was trained on these tiles
        assert m["acc1"] > 0.6 and m["macro_f1"] > 0.5 and m["retrieval_map"] > 0.6
        assert m["acc5"] >= m["acc1"]
        assert (folder / key / "confusion_matrix.png").stat().st_size > 1000
        assert json.loads((folder / key / "metrics.json").read_text())["accuracy"] == m["acc1"]
    table = pd.read_csv(out / "summary.csv")
    assert len(table) == 3 and set(table["templates"]) == {"plain", "rocks", "tiles"}
    assert (out / "heatmap_accuracy.png").is_file() and (out / "heatmap_macro_f1.png").is_file()
    page = (out / "report.html").read_text()
    assert "heatmap_accuracy.png" in page and page.count("<img") == 2 + 3


def test_grid_predictions_are_those_of_classify(grid, sample_store, tiny_model):
    from vlmlab.classify import classify_store
    from vlmlab.models import load_model
    from vlmlab.store import EmbeddingStore

    out, _ = grid
    encoder = load_model(tiny_model, device="cpu")
    classes = ["basalt", "fractured", "granite", "sandstone", "vegetation", "weathered"]
    expected = classify_store(EmbeddingStore.open(sample_store), encoder, classes, "rocks").to_pandas()
    got = pd.read_parquet(out / "cells" / Path(tiny_model).name / "rocks" / "predictions.parquet")
    assert got["path"].tolist() == expected["path"].tolist()
    assert got["label"].tolist() == expected["label"].tolist()
    assert (got["prob"] - expected["prob"]).abs().max() < 1e-5


def test_grid_resumes_and_embeds_a_second_model_from_images(grid, sample_store, samples_dir, tiny_model,
                                                            templates_file):
    out, _ = grid
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*") if p.is_file()}
    cfg = GridConfig(models=(tiny_model, f"hf:{tiny_model}"), templates=("plain", "rocks"),
                     store=(str(sample_store),), images=str(samples_dir / "tiles"),
                     labels=str(samples_dir / "tiles.csv"), out=str(out))
    summary = run_grid(cfg)
    # the tiny model's cells were done; the transformers-format twin gets its own store and cells
    assert {c.key for c in summary.skipped} == {"plain", "rocks"} and len(summary.computed) == 2
    assert {p: p.stat().st_mtime_ns for p in before} == before
    twin = f"hf_{Path(tiny_model).name}"
    assert (out / "stores" / twin / "manifest.json").is_file()
    table = pd.read_csv(out / "summary.csv").set_index(["model", "templates"])
    for key in ("plain", "rocks"):  # same weights through both loaders: the same figures
        assert abs(table.loc[(twin, key), "acc1"] - table.loc[(Path(tiny_model).name, key), "acc1"]) < 0.01


def test_grid_refuses_what_it_cannot_compare(sample_store, samples_dir, tmp_path):
    labels = str(samples_dir / "tiles.csv")
    with pytest.raises(StudyError, match="has no store"):
        run_grid(GridConfig(models=("open_clip:ViT-B-32/openai",), store=(str(sample_store),), labels=labels,
                            out=str(tmp_path / "a")))
    with pytest.raises(StudyError, match="random weights"):
        run_grid(GridConfig(models=("open_clip:ViT-B-32",), labels=labels, out=str(tmp_path / "b")))
    with pytest.raises(StudyError, match="unknown template set"):
        run_grid(GridConfig(templates=("nope",), store=(str(sample_store),), labels=labels, out=str(tmp_path / "c")))
