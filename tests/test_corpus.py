"""``vlmlab corpus build``: layout, determinism, stats, errors, Parquet twin, VLM captions through Ray Data."""

import csv
import hashlib
import json
import shutil

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.corpus import CorpusConfig, augmentation_report, build_corpus, expand_real
from vlmlab.cli import main as cli_main


@pytest.fixture(scope="module")
def corpus_inputs(samples_dir, tmp_path_factory):
    """Eight sample tiles with their captions, plus one corrupt file."""
    root = tmp_path_factory.mktemp("corpus-inputs")
    rows = list(csv.DictReader(open(samples_dir / "tiles.csv")))[::31][:8]
    for r in rows:
        (root / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(samples_dir / r["path"], root / r["path"])
    (root / "corrupt.png").write_bytes(b"\x89PNG not really")
    with open(root / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def corpus(ray_local, corpus_inputs, samples_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "c"
    cfg = CorpusConfig(images=str(corpus_inputs), out=str(out), captions=str(corpus_inputs / "captions.csv"),
                       augmentations=3, synthetic="compose", n=5, inspection=str(samples_dir / "inspection"))
    return out, build_corpus(cfg)


def test_stats_add_up_and_files_exist(corpus):
    out, dataset = corpus
    stats, pairs = dataset["stats"], dataset["pairs"]
    assert stats["real_original"] == 8 and stats["synthetic"] == 5
    # every augmentation asked is made (distinct); any shortfall is counted with its reason
    augmentation = dataset["augmentation"]
    assert augmentation["asked"] == 8 * 3 and augmentation["kept"] == stats["real_augmented"]
    assert augmentation["missing"] == augmentation["asked"] - stats["real_augmented"]
    assert sum(r["count"] for r in augmentation["reasons"].values()) == augmentation["missing"]
    assert stats["real_augmented"] >= 8 * 3 - 1
    assert stats["zoom_crops"] == 8
    assert sum(stats.values()) == len(pairs) == dataset["total"]
    assert len({p["image_id"] for p in pairs}) == len(pairs)
    for p in pairs:
        assert (out / p["image_path"]).is_file() and (out / "metadata" / f"{p['image_id']}.json").is_file()
        assert p["caption_sources"]["m2b"] in p["caption"]
    assert [e["path"] for e in dataset["errors"]] == ["corrupt.png"]
    originals = [p for p in pairs if p["kind"] == "original"]
    assert all(p["caption_sources"]["given"] and p["label"] for p in originals)
    composed = [p for p in pairs if p["source"] == "synthetic"]
    assert all((out / p["image_path"]).with_suffix(".txt").exists() for p in composed)


def test_parquet_twin_has_the_samples_columns(corpus, samples_dir):
    out, dataset = corpus
    table = pq.read_table(out / "pairs.parquet")
    samples_cols = pq.read_table(samples_dir / "pairs.parquet").column_names
    assert table.column_names[:len(samples_cols)] == samples_cols
    assert table.column_names[len(samples_cols):] == ["image_id", "caption_sources"]
    assert table.num_rows == len(dataset["pairs"])
    assert sorted(table.column("source").unique().to_pylist()) == ["real", "synthetic"]
    first = table.slice(0, 1).to_pylist()[0]
    assert (out / first["image_path"]).exists() and json.loads(first["caption_sources"])["m2b"]


def test_same_inputs_and_seed_give_the_same_corpus(corpus, corpus_inputs, samples_dir, tmp_path, capsys):
    out, dataset = corpus
    cli_main(["corpus", "build", str(corpus_inputs), "--out", str(tmp_path / "again"), "--captions",
              str(corpus_inputs / "captions.csv"), "--augmentations", "3", "--synthetic", "compose", "--n", "5",
              "--inspection", str(samples_dir / "inspection")])
    printed = json.loads(capsys.readouterr().out)
    again = json.loads((tmp_path / "again" / "dataset.json").read_text())
    assert printed["corpus_hash"] == again["corpus_hash"] == dataset["corpus_hash"]
    assert [p["image_id"] for p in again["pairs"]] == [p["image_id"] for p in dataset["pairs"]]
    p = dataset["pairs"][-1]
    assert (tmp_path / "again" / p["image_path"]).read_bytes() == (out / p["image_path"]).read_bytes()
    other = build_corpus(CorpusConfig(images=str(corpus_inputs), out=str(tmp_path / "seed1"), augmentations=1,
                                      zoom=False, seed=1))
    assert other["corpus_hash"] != dataset["corpus_hash"] and other["stats"]["real_original"] == 8


def test_bad_flags_fail_before_any_work(corpus_inputs, tmp_path):
    with pytest.raises(ValueError, match="choose from compose, diffusion"):
        build_corpus(CorpusConfig(images=str(corpus_inputs), out=str(tmp_path / "x"), synthetic="gan", n=2))
    with pytest.raises(ValueError, match="--inspection DIR"):
        build_corpus(CorpusConfig(images=str(corpus_inputs), out=str(tmp_path / "x"), synthetic="compose", n=2))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_corpus(CorpusConfig(images=str(tmp_path / "missing"), out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_vlm_captions_flow_into_the_corpus(ray_local, corpus_inputs, tmp_path):
    from pipelines.captions import build_tiny_vlm

    vlm = build_tiny_vlm(tmp_path / "tiny-vlm")
    images = tmp_path / "two"
    shutil.copytree(corpus_inputs / "tiles", images)
    for extra in sorted(images.rglob("*.png"))[2:]:
        extra.unlink()
    dataset = build_corpus(CorpusConfig(images=str(images), out=str(tmp_path / "c"), augmentations=1, zoom=False,
                                        vlm=str(vlm), batch_size=2))
    assert dataset["stats"]["real_original"] == 2
    for p in dataset["pairs"]:
        assert "vlm" in p["caption_sources"] and isinstance(p["caption_sources"]["vlm"], str)
        assert set(p["caption_sources"]) == {"vlm", "m2b"}  # no given caption: none was supplied


def test_zoom_crops_follow_a_detector_when_given(tiny_detector, samples_dir):
    """With YOLO weights, zoom crops are cut around the detector's boxes and captioned with its class
    (a one-epoch detector at a low confidence, so boxes exist; their quality is not the point)."""
    from pipelines.corpus import detector_zoom_crops
    from vlmlab.testing.samples import INSPECTION_CLASSES

    scene = Image.open(sorted((samples_dir / "inspection" / "images" / "train").glob("*.jpg"))[0]).convert("RGB")
    crops = detector_zoom_crops(scene, "an earthen dam", str(tiny_detector), conf=0.001, max_crops=2)
    assert len(crops) == 2
    for crop, caption in crops:
        assert crop.size == scene.size
        assert caption.startswith("close-up of ") and caption.endswith(" of an earthen dam")
        assert any(name in caption for name in INSPECTION_CLASSES) and " in the " in caption


def test_augmentations_asked_are_made_distinct_or_the_shortfall_is_explained(corpus_inputs):
    tiles = sorted(p for p in corpus_inputs.rglob("*.png") if p.name != "corrupt.png")
    grey = corpus_inputs.parent / "grey.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(grey)  # flips, rotations and crops are itself
    paths = [*tiles, grey]
    batch = {"path": [str(p) for p in paths], "relpath": [p.name for p in paths], "caption": [""] * len(paths),
             "label": [None] * len(paths)}
    out = expand_real(batch, augmentations=40, seed=0, zoom=False)
    rows = [dict(zip(out, values, strict=True)) for values in zip(*out.values(), strict=True)]
    for r in rows:
        r["image_id"] = hashlib.sha1(r["image"]).hexdigest()
    assert len({r["image_id"] for r in rows}) == len(rows)  # nothing made twice, nothing equal to its original
    per_tile = {p.name: sum(r["parent"] == p.name and r["kind"] == "augmented" for r in rows) for p in tiles}
    assert set(per_tile.values()) == {40}  # the sample tiles have 40 distinct augmentations each
    grey_short = next(r["augmentations_short"] for r in rows if r["parent"] == "grey.png" and r["kind"] == "original")
    made_grey = sum(r["parent"] == "grey.png" and r["kind"] == "augmented" for r in rows)
    assert 0 < made_grey < 40 and grey_short == 40 - made_grey  # only jitter changes a flat grey image
    report = augmentation_report(rows, 40, kept=len(rows) - len(paths))
    assert report["asked"] == 40 * len(paths) and report["missing"] == grey_short
    assert report["short"] == [{"path": "grey.png", "missing": grey_short}]
    assert "flip and rotate give one image each" in report["reasons"]["no_new_distinct_augmentation"]["why"]
