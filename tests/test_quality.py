"""``vlmlab corpus filter``: bad pairs rank at the bottom and are dropped, every class keeps pairs; hue-free
quality, colour-checked captions, warnings; report, PNG and Parquet outputs."""

import csv
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from pipelines.captions import colour_family, to_array
from pipelines.corpus import CorpusConfig, build_corpus
from pipelines.quality import FilterConfig, filter_corpus, image_quality, parse_weights, sanity_score
from vlmlab.cli import main as cli_main
from vlmlab.testing.samples import copy_tiles

BAD = ("black.png", "blurred.png", "miscaptioned.png")
# Per (source, class) group of the fixture: floor(0.7 * size) kept. fractured 8 -> 5, granite 3 + blurred +
# miscaptioned -> 3, sandstone 3 -> 2, vegetation 2 + black -> 2, weathered 2 -> 1.
KEPT = 13


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
    assert report["pairs"] == 21 and report["kept"] == KEPT and report["dropped"] == 21 - KEPT
    assert sorted(parent[w["image_id"]] for w in report["worst"][:3]) == sorted(BAD)
    worst = {parent[w["image_id"]]: w["scores"] for w in report["worst"][:3]}
    assert worst["black.png"]["quality"] == 0.0
    assert worst["blurred.png"]["sharpness"] < 0.3
    assert worst["miscaptioned.png"]["clip"] < 0.3 and worst["miscaptioned.png"]["sanity"] == 0.0
    best_good = max(w["scores"]["score"] for w in report["worst"][:3])
    assert best_good < report["thresholds"]["score_cutoff"]
    kept = json.loads((out / "filtered" / "filtered_dataset.json").read_text())
    assert not {parent[p["image_id"]] for p in kept["pairs"]} & set(BAD)
    real = report["by_source"]["real"]
    assert (real["kept"], real["dropped"], real["dropped_by_floor"]) == (KEPT, 21 - KEPT, 0)
    assert {g: r["kept"] for g, r in report["by_class"].items()} == {
        "real/fractured": 5, "real/granite": 3, "real/sandstone": 2, "real/vegetation": 2, "real/weathered": 1}
    assert report["warnings"] == []
    assert report["components"]["clip"]["median"] > 0.5  # matched captions score high after normalisation
    assert (out / "filtered" / "score_distributions.png").stat().st_size > 5000


def test_filtered_parquet_reads_relative_to_itself(filtered_corpus, samples_dir):
    out, _ = filtered_corpus
    table = pq.read_table(out / "filtered" / "pairs.parquet")
    assert table.num_rows == KEPT
    assert table.column_names[:4] == pq.read_table(samples_dir / "pairs.parquet").column_names
    assert all((out / "filtered" / p).is_file() for p in table.column("image_path").to_pylist())


def test_lora_pairs_reader_reads_the_filtered_corpus(filtered_corpus):
    from pathlib import Path

    from training.pairs import read_pairs

    out, _ = filtered_corpus
    frame = read_pairs(out / "filtered" / "pairs.parquet")
    assert len(frame) == KEPT and set(frame["source"]) == {"real"}
    assert all(Path(p).is_file() for p in frame["image_path"]) and frame["caption"].str.len().min() > 10


def test_a_class_losing_more_than_half_is_warned_about(filtered_corpus, tiny_model, tmp_path, caplog):
    out, _ = filtered_corpus
    corpus = tmp_path / "c"
    shutil.copytree(out, corpus, ignore=shutil.ignore_patterns("filtered"))
    with caplog.at_level("WARNING", logger="pipelines.quality"):
        report = filter_corpus(FilterConfig(corpus=str(corpus), model=tiny_model, keep=0.4))
    # floor(0.4 * n) per class: fractured 8 -> 3, granite 5 -> 2, sandstone and vegetation 3 -> 1, weathered
    # 2 -> 0, topped up to the --min-per-class floor of 1 (1 of 2 dropped is half, not more: no warning).
    assert {g: r["kept"] for g, r in report["by_class"].items()} == {
        "real/fractured": 3, "real/granite": 2, "real/sandstone": 1, "real/vegetation": 1, "real/weathered": 1}
    warned = [w.split(":")[0] for w in report["warnings"]]
    assert warned == ["class real/fractured", "class real/granite", "class real/sandstone", "class real/vegetation",
                      "source real"]
    assert "13 of 21 pairs dropped" in report["warnings"][-1]
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [m for m in logged if m.startswith("vlmlab corpus filter: ")] == [
        f"vlmlab corpus filter: {w}" for w in report["warnings"]]
    saved = json.loads((corpus / "filtered" / "quality_report.json").read_text())
    assert saved["warnings"] == report["warnings"]


def test_filter_rejects_bad_input(tmp_path):
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


@pytest.fixture(scope="module")
def sample_corpus(ray_local, samples_dir, tiny_model, tmp_path_factory):
    """Every fifth sample tile (all six classes) and six composed scenes; built, then filtered with defaults."""
    root = tmp_path_factory.mktemp("sample-corpus-inputs")
    rows = copy_tiles(samples_dir, root, slice(None, None, 5))
    out = tmp_path_factory.mktemp("sample-corpus") / "c"
    build_corpus(CorpusConfig(images=str(root), out=str(out), captions=str(root / "captions.csv"), augmentations=0,
                              zoom=False, synthetic="compose", n=6, inspection=str(samples_dir / "inspection")))
    cli_main(["corpus", "filter", str(out), "--model", tiny_model])
    return out, {r["label"] for r in rows}


def test_every_class_and_source_keeps_pairs_by_default(sample_corpus):
    out, labels = sample_corpus
    report = json.loads((out / "filtered" / "quality_report.json").read_text())
    assert report["thresholds"]["keep_per_class"] is True and len(labels) == 6
    real = {g.split("/")[1]: r for g, r in report["by_class"].items() if g.startswith("real/")}
    assert set(real) == labels
    for label, r in real.items():  # floor(0.7 * n) of each class: about 70 %, never none
        assert r["kept"] == max(int(0.7 * r["pairs"] + 1e-9), 1), label
    assert report["by_source"]["real"]["kept"] > 0 and report["by_source"]["synthetic"]["kept"] > 0
    # Vegetation is sound texture: its quality is on a par with rock of similar sharpness (sandstone).
    veg, sand = real["vegetation"]["mean"], real["sandstone"]["mean"]
    assert abs(veg["sharpness"] - sand["sharpness"]) < 0.1 and veg["quality"] > sand["quality"] - 0.03
    assert veg["contrast"] > 0.95
    kept = json.loads((out / "filtered" / "filtered_dataset.json").read_text())["pairs"]
    assert {p["label"] for p in kept if p["source"] == "real"} == labels


def test_quality_is_hue_free():
    """The same texture in grey and recoloured saturated green at the same luma scores the same."""
    rng = np.random.default_rng(0)
    texture = np.asarray(Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).resize((96, 96)),
                         np.float32) / 255
    y = 0.35 + 0.12 * (texture - 0.5)  # luma std about 0.03: below full contrast, where a bias would show
    grey = np.repeat(y[..., None], 3, -1)
    # (0.5, s, 0.5) * y with 0.299 * 0.5 + 0.587 * s + 0.114 * 0.5 = 1: the same luma, saturated green
    green = y[..., None] * np.array([0.5, (1 - 0.413 * 0.5) / 0.587, 0.5], np.float32)
    assert np.allclose(green @ np.array([0.299, 0.587, 0.114]), y, atol=1e-5)
    assert colour_family(green.reshape(-1, 3).mean(0)) == "green"
    assert colour_family(grey.reshape(-1, 3).mean(0)) == "grey"
    q_grey, q_green = image_quality(grey), image_quality(green)
    assert 0.3 < q_grey["contrast"] < 0.99
    for key in q_grey:
        assert q_green[key] == pytest.approx(q_grey[key], abs=1e-3), key


def test_a_wrong_colour_word_lowers_sanity(samples_dir):
    rows = list(csv.DictReader(open(samples_dir / "tiles.csv")))
    tile = {label: to_array(Image.open(samples_dir / next(r for r in rows if r["label"] == label)["path"]))
            for label in ("vegetation", "sandstone", "granite")}
    for label, right, wrong in (("vegetation", "dense green plants", "dense blue plants"),
                                ("sandstone", "layered sandstone with tan bands", "layered sandstone with grey bands"),
                                ("granite", "granite with pink and grey crystals", "granite with green crystals")):
        assert sanity_score(tile[label], right, right, None)[0] == 1.0, label
        assert sanity_score(tile[label], wrong, wrong, None)[0] < 1.0, label
    # The M2B sentence is checked on its own: pink granite read "mostly brown" fails, a true given caption
    # does not rescue it.
    caption = "granite with pink and grey crystals; rough textured rock, mostly brown (soil or sandstone), dense edges"
    assert sanity_score(tile["granite"], caption, "granite with pink and grey crystals", None)[0] == 0.0
    assert sanity_score(tile["sandstone"], "rock, mostly brown (soil or sandstone)", "sandstone", None) == (1.0, 2)
