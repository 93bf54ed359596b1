"""``vlmlab corpus filter``: bad pairs rank at the bottom and are dropped; report, PNG and Parquet outputs."""

import csv
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from pipelines.captions import to_array
from pipelines.corpus import CorpusConfig, build_corpus
from pipelines.quality import image_quality, parse_weights, sanity_score
from vlmlab.cli import main as cli_main

BAD = ("black.png", "blurred.png", "miscaptioned.png")


@pytest.fixture(scope="module")
def filtered_corpus(ray_local, samples_dir, tiny_model, tmp_path_factory):
    """Eighteen sample tiles plus a black, a blurred and a mis-captioned image; built, then filtered."""
    root = tmp_path_factory.mktemp("quality-inputs")
    every = list(csv.DictReader(open(samples_dir / "tiles.csv")))
    rows = every[::9][:18]
    for r in rows:
        (root / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(samples_dir / r["path"], root / r["path"])
    veg = next(r for r in rows if r["label"] == "vegetation")
    rock = next(r for r in rows if r["label"] == "granite")
    Image.new("RGB", (128, 128)).save(root / "black.png")
    Image.open(samples_dir / rock["path"]).filter(ImageFilter.GaussianBlur(4)).save(root / "blurred.png")
    spare = next(r for r in every if r["label"] == "vegetation" and r not in rows)
    shutil.copy(samples_dir / spare["path"], root / "miscaptioned.png")  # green plants captioned as granite
    extra = [{**veg, "path": "black.png"}, {**rock, "path": "blurred.png"}, {**rock, "path": "miscaptioned.png"}]
    with open(root / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows + extra)
    out = tmp_path_factory.mktemp("quality") / "c"
    dataset = build_corpus(CorpusConfig(images=str(root), out=str(out), captions=str(root / "captions.csv"),
                                        augmentations=0, zoom=False))
    cli_main(["corpus", "filter", str(out), "--model", tiny_model, "--keep", "0.7"])
    return out, dataset


def test_bad_pairs_rank_last_and_are_dropped(filtered_corpus):
    out, dataset = filtered_corpus
    parent = {p["image_id"]: p["parent"] for p in dataset["pairs"]}
    report = json.loads((out / "filtered" / "quality_report.json").read_text())
    assert report["pairs"] == 21 and report["kept"] == round(0.7 * 21) and report["dropped"] == 21 - report["kept"]
    assert sorted(parent[w["image_id"]] for w in report["worst"][:3]) == sorted(BAD)
    worst = {parent[w["image_id"]]: w["scores"] for w in report["worst"][:3]}
    assert worst["black.png"]["quality"] == 0.0
    assert worst["blurred.png"]["sharpness"] < 0.3
    assert worst["miscaptioned.png"]["clip"] < 0.3 and worst["miscaptioned.png"]["sanity"] == 0.0
    best_good = max(w["scores"]["score"] for w in report["worst"][:3])
    assert best_good < report["thresholds"]["score_cutoff"]
    kept = json.loads((out / "filtered" / "filtered_dataset.json").read_text())
    assert not {parent[p["image_id"]] for p in kept["pairs"]} & set(BAD)
    assert report["by_source"]["real"] == {"kept": report["kept"], "dropped": report["dropped"], "dropped_by_floor": 0}
    assert report["components"]["clip"]["median"] > 0.5  # matched captions score high after normalisation
    assert (out / "filtered" / "score_distributions.png").stat().st_size > 5000


def test_filtered_parquet_reads_relative_to_itself(filtered_corpus, samples_dir):
    out, _ = filtered_corpus
    table = pq.read_table(out / "filtered" / "pairs.parquet")
    assert table.num_rows == round(0.7 * 21)
    assert table.column_names[:4] == pq.read_table(samples_dir / "pairs.parquet").column_names
    assert all((out / "filtered" / p).is_file() for p in table.column("image_path").to_pylist())


def test_lora_pairs_reader_reads_the_filtered_corpus(filtered_corpus):
    from pathlib import Path

    from training.pairs import read_pairs

    out, _ = filtered_corpus
    frame = read_pairs(out / "filtered" / "pairs.parquet")
    assert len(frame) == round(0.7 * 21) and set(frame["source"]) == {"real"}
    assert all(Path(p).is_file() for p in frame["image_path"]) and frame["caption"].str.len().min() > 10


def test_filter_rejects_bad_input(tmp_path):
    from pipelines.quality import FilterConfig, filter_corpus

    with pytest.raises(FileNotFoundError, match="vlmlab corpus build"):
        filter_corpus(FilterConfig(corpus=str(tmp_path), model="unused"))
    (tmp_path / "dataset.json").write_text("{}")
    with pytest.raises(ValueError, match="--keep"):
        filter_corpus(FilterConfig(corpus=str(tmp_path), model="unused", keep=1.5))


def test_quality_and_sanity_components():
    rng = np.random.default_rng(0)
    sharp = np.clip(0.5 + rng.normal(0, 0.15, (64, 64, 3)), 0, 1).astype(np.float32)
    assert image_quality(sharp) == {"brightness": 1.0, "contrast": 1.0, "sharpness": 1.0}
    black = image_quality(np.zeros((64, 64, 3), np.float32))
    assert black == {"brightness": 0.0, "contrast": 0.0, "sharpness": 0.0}
    green = to_array(Image.new("RGB", (48, 48), (40, 160, 50)))
    assert sanity_score(green, "green grass", "green grass", None) == (1.0, 2)
    assert sanity_score(green, "dark basalt", "dark basalt", None) == (0.0, 1)
    assert sanity_score(green, "an inspection scene with a, b", "an inspection scene with a, b", 3)[0] == 0.0
    assert parse_weights("2,1,1").tolist() == [0.5, 0.25, 0.25]
    with pytest.raises(ValueError, match="three"):
        parse_weights("1,2")
