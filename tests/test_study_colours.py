"""``study colours run`` on the shared local Ray with the tiny model over every style, resume, and
``study colours analyze`` on those files and on constructed matrices with known answers; the report
page in headless Chromium."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.studies.cells import StudyError
from pipelines.studies.colours import ColourStudyConfig, run_colour_study
from vlmlab.palette import load_palette
from vlmlab.studies.analyze import AnalyzeConfig, analyze
from vlmlab.studies.association import METRIC_COLUMNS
from vlmlab.studies.scores import read_matrix
from vlmlab.testing.ratings import synthetic_ratings

REPO = Path(__file__).resolve().parents[1]
STYLES = ("1", "2", "3", "4", "control", "ensemble", "graded")


@pytest.fixture(scope="module")
def ratings_file(tmp_path_factory) -> Path:
    """Synthetic ratings of the lab's 20 concepts x the 71 UW-71 colours, headed V1..V71 as the lab's
    file is (colours are matched by position), values in [0, 1] with exactly 0 and 1 present."""
    concepts, values = synthetic_ratings(load_palette().lab, seed=1)
    values[0, 0], values[0, 1] = 0.0, 1.0
    frame = pd.DataFrame(values, columns=[f"V{k}" for k in range(1, 72)])
    frame.insert(0, "", concepts)
    path = tmp_path_factory.mktemp("ratings") / "ratings.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def study(ray_local, tiny_model, ratings_file, tmp_path_factory) -> Path:
    """A study folder: the tiny model over the five built-in styles and two user styles."""
    out = tmp_path_factory.mktemp("study") / "colours"
    cfg = ColourStudyConfig(models=(tiny_model,), styles=STYLES, out=str(out), ratings=str(ratings_file),
                            styles_file=str(REPO / "vlmlab/studies/example_styles.yaml"))
    summary = run_colour_study(cfg)
    assert summary.failed == [] and len(summary.computed) == len(STYLES)
    return out


@pytest.fixture(scope="module")
def analysed(study, ratings_file) -> Path:
    out = study / "analysis"
    analyze(AnalyzeConfig(scores=str(study), ratings=str(ratings_file), out=str(out)))
    return out


def test_run_writes_score_matrices_and_patches(study, tiny_model):
    from vlmlab.models import load_model
    from vlmlab.studies.styles import DEFAULT_CATEGORIES

    folder = study / "scores" / Path(tiny_model).name
    assert sorted(p.stem for p in folder.glob("*.csv")) == sorted(STYLES)
    one = read_matrix(folder / "1.csv")
    assert one.concepts == list(DEFAULT_CATEGORIES) and one.values.shape == (20, 71)
    assert (folder / "1.csv").read_text().splitlines()[0] == "concept," + ",".join(str(k) for k in range(1, 72))
    patches = sorted((study / "patches").glob("*.png"))
    assert len(patches) == 71
    from PIL import Image

    grey = Image.open(study / "patches" / "27.png")
    assert grey.size == (224, 224) and grey.getcolors() == [(224 * 224, (119, 119, 119))]
    # the job's matrix is what the model gives directly (cosine of patch and prompt embeddings)
    encoder = load_model(tiny_model, device="cpu")
    images = encoder.encode_images([Image.open(p) for p in patches])
    text = encoder.encode_texts([f"The color of the image represents the word {c}." for c in one.concepts])
    assert np.abs(one.values - text @ images.T).max() < 1e-4
    graded = read_matrix(folder / "4.csv").values
    assert graded.min() >= 0 and graded.max() <= 1 and np.ptp(graded) > 0
    control = read_matrix(folder / "control.csv").values
    assert np.allclose(control, control[0])  # concept-blind: one row for all
    palette = pd.read_csv(study / "palette.csv")
    assert len(palette) == 71 and palette["clipped"].sum() == 0


def test_resume_computes_nothing_and_touches_no_file(study, tiny_model, ratings_file, tmp_path):
    files = sorted(p for p in study.rglob("*") if p.is_file() and "analysis" not in p.parts)
    before = {p: p.stat().st_mtime_ns for p in files}
    cfg = ColourStudyConfig(models=(tiny_model,), styles=STYLES, out=str(study), ratings=str(ratings_file),
                            styles_file=str(REPO / "vlmlab/studies/example_styles.yaml"))
    summary = run_colour_study(cfg)
    assert summary.computed == [] and len(summary.skipped) == len(STYLES) and summary.actors == 0
    assert {p: p.stat().st_mtime_ns for p in files} == before
    # a deleted cell is recomputed alone, to the same numbers
    cell = study / "scores" / Path(tiny_model).name / "2.csv"
    saved = cell.read_text()
    cell.unlink()
    summary = run_colour_study(cfg)
    assert [c.key for c in summary.computed] == ["2"] and len(summary.skipped) == len(STYLES) - 1
    assert np.allclose(read_matrix(cell).values, np.array([r.split(",")[1:] for r in saved.splitlines()[1:]],
                                                          float), atol=1e-6)
    # a broken model fails its cells with the loader's reason; the finished cells are untouched
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    (broken / "open_clip_model.safetensors").write_bytes(b"not weights")
    summary = run_colour_study(ColourStudyConfig(models=(tiny_model, str(broken)), styles=("1", "3"),
                                                 out=str(study), ratings=str(ratings_file)))
    assert len(summary.skipped) == 2 and {c.key for c, _ in summary.failed} == {"1", "3"}
    assert all("could not load model spec" in why for _, why in summary.failed)
    assert not (study / "scores" / "broken-model" / "1.csv").exists()
    # another concept list into the same folder is refused, not mixed in
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("apple\nbanana\n")
    with pytest.raises(StudyError, match="concept list"):
        run_colour_study(ColourStudyConfig(models=(tiny_model,), styles=("1",), out=str(study),
                                           concepts=str(concepts)))


def test_analyze_the_run(analysed, study):
    metrics = pd.read_csv(analysed / "metrics.csv")
    assert list(metrics.columns[:8]) == METRIC_COLUMNS
    assert len(metrics) == 20 * len(STYLES) and set(metrics["style"].astype(str)) == set(STYLES)
    assert metrics["pearson"].between(-1, 1).all() and metrics["tv"].between(0, 1).all()
    assert (metrics["emd"] >= 0).all() and (metrics["emd_lab"] > 0).all()
    summary = pd.read_csv(analysed / "summary.csv")
    assert set(summary["category"]) == {"all", "fruits", "vegetables", "activities", "features"}
    assert (summary.loc[summary["category"] == "all", "n_concepts"] == 20).all()
    disc = pd.read_csv(analysed / "discriminability.csv")
    per_cell = disc.groupby(["model", "style"]).size()
    assert (per_cell == 190 + 4 + 1).all()  # concept pairs, categories, all
    everything = disc[disc["kind"] == "all"]
    # humans' own best palette is at least as decodable (by them) as any model's
    assert (everything["capacity_human"] >= everything["capacity_model_palette_human"] - 1e-9).all()
    figures = analysed / "figures"
    for name in ("heatmap_pearson.png", "ranking.png", "discriminability.png", "capacity.png", "palette.png"):
        assert (figures / name).stat().st_size > 5000, name
    assert len(list((figures / "associations").rglob("*.png"))) == len(STYLES)


def test_analyze_known_answers(ratings_file, tmp_path):
    ratings = read_matrix(ratings_file)
    scores = tmp_path / "scores" / "oracle"
    scores.mkdir(parents=True)
    frame = pd.read_csv(ratings_file)
    for name, values in {"same": ratings.values, "affine": 0.3 * ratings.values + 0.2,
                         "reversed": -ratings.values}.items():
        out = frame.copy()
        out.iloc[:, 1:] = values
        out.to_csv(scores / f"{name}.csv", index=False)
    paths = analyze(AnalyzeConfig(scores=str(tmp_path), ratings=str(ratings_file), out=str(tmp_path / "out")))
    metrics = pd.read_csv(paths["metrics"])
    assert list(metrics.columns[:8]) == METRIC_COLUMNS and len(metrics) == 60
    for style in ("same", "affine"):
        rows = metrics[metrics["style"] == style]
        assert np.allclose(rows["pearson"], 1) and np.allclose(rows["spearman"], 1)
        assert np.allclose(rows[["tv", "emd", "emd_lab", "entropy_diff"]], 0, atol=1e-6)
    rows = metrics[metrics["style"] == "reversed"]
    assert np.allclose(rows["spearman"], -1) and np.allclose(rows["pearson"], -1)
    assert (rows["tv"] > 0.2).all()
    disc = pd.read_csv(paths["discriminability"])
    same = disc[disc["style"] == "same"]
    assert np.allclose(same["ds_pearson"], 1) and np.allclose(same["assignment_agreement"], 1)
    assert np.allclose(same["capacity_model"], same["capacity_human"])
    # one CSV computed elsewhere, named on the command line
    single = analyze(AnalyzeConfig(scores=str(scores / "same.csv"), ratings=str(ratings_file),
                                   out=str(tmp_path / "single"), model_name="elsewhere", style="s1"))
    one = pd.read_csv(single["metrics"])
    assert set(one["model"]) == {"elsewhere"} and set(one["style"]) == {"s1"} and np.allclose(one["pearson"], 1)


def test_report_opens_in_headless_chromium_with_its_images(analysed):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.conftest import all_images_loaded, headless_chromium

    with headless_chromium() as driver:
        driver.get((analysed / "report.html").as_uri())
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) >= 5 + len(STYLES)
        WebDriverWait(driver, 60).until(all_images_loaded)
        assert "models vs humans" in driver.title
        assert driver.find_elements(By.TAG_NAME, "table")
        shot = REPO / "bench" / "out" / "study_report.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot))
