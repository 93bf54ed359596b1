"""vlmlab.testing.samples: deterministic sample data with the lab's layouts and statistics."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter

import numpy as np
import yaml

from vlmlab.images import tile_xyz
from vlmlab.testing.samples import INSPECTION_CLASSES, ROCK_CLASSES, SamplesConfig, build_samples

SMALL = SamplesConfig(grid=6, synthetic=6, scenes=8, scene_size=320)


def _digest(root, pattern="**/*"):
    h = hashlib.sha1()
    for p in sorted(root.glob(pattern)):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    build_samples(tmp_path / "a", SMALL)
    build_samples(tmp_path / "b", SMALL)
    build_samples(tmp_path / "c", SamplesConfig(**{**SMALL.__dict__, "seed": 1}))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a", "tiles/**/*.png") != _digest(tmp_path / "c", "tiles/**/*.png")


def test_rock_tiles_are_slippy_tiles_with_coherent_classes(samples_dir):
    with open(samples_dir / "tiles.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 256
    assert set(r["label"] for r in rows) == set(ROCK_CLASSES)
    for r in rows:
        assert tile_xyz(r["path"]) == (int(r["z"]), int(r["x"]), int(r["y"]))
        assert (samples_dir / r["path"]).is_file() and r["caption"]
    label = {(int(r["x"]), int(r["y"])): r["label"] for r in rows}
    same = [label[(x, y)] == label[(x + 1, y)] for (x, y) in label if (x + 1, y) in label]
    assert np.mean(same) > 0.5  # neighbours share a class far more often than 1/6


def test_inspection_set_is_yolo_with_layout_and_imbalance(samples_dir):
    root = samples_dir / "inspection"
    data = yaml.safe_load((root / "data.yaml").read_text())
    assert data["nc"] == 9 and [data["names"][i] for i in range(9)] == INSPECTION_CLASSES
    counts, centres = Counter(), {}
    n_images = 0
    for split in ("train", "valid", "test"):
        images = sorted((root / "images" / split).glob("*.jpg"))
        assert images, split
        for img in images:
            n_images += 1
            lines = (root / "labels" / split / f"{img.stem}.txt").read_text().split("\n")
            for line in filter(None, lines):
                c, cx, cy, w, h = line.split()
                c, cx, cy, w, h = int(c), float(cx), float(cy), float(w), float(h)
                assert 0 <= cx - w / 2 and cx + w / 2 <= 1 and 0 <= cy - h / 2 and cy + h / 2 <= 1
                counts[c] += 1
                centres.setdefault(INSPECTION_CLASSES[c].split(" ")[0], []).append(cy)
    assert set(counts) == set(range(9))
    assert 3.5 <= sum(counts.values()) / n_images <= 7
    assert 4 <= max(counts.values()) / min(counts.values()) <= 12
    assert 0.66 <= np.mean(centres["toe"]) <= 0.79
    assert 0.44 <= np.mean(centres["slope"]) <= 0.52
    assert np.mean(centres["rock"]) < np.mean(centres["toe"])


def test_photos_and_pairs(samples_dir):
    import pyarrow.parquet as pq

    assert len(list((samples_dir / "photos").glob("*.png"))) == 3
    pairs = pq.read_table(samples_dir / "pairs.parquet").to_pylist()
    assert {p["source"] for p in pairs} == {"real", "synthetic"}
    assert all((samples_dir / p["image_path"]).is_file() and p["caption"] for p in pairs)


def test_samples_without_scenes_still_write_a_valid_inspection_layout(tmp_path):
    # `vlmlab tiny --out DIR` (no --samples) builds tiles with scenes=0: its inspection writer must still
    # make the folder it writes data.yaml into
    build_samples(tmp_path, SamplesConfig(grid=4, synthetic=0, scenes=0))
    data = yaml.safe_load((tmp_path / "inspection" / "data.yaml").read_text())
    assert data["names"] and (tmp_path / "tiles.csv").is_file()
