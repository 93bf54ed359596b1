"""Synthetic stages: compose (YOLO copy-paste) and diffusion (tiny local Stable Diffusion) on CPU."""

import json

import numpy as np
import pytest

from pipelines.synthetic import CHAIN, ComposeStage, DiffusionStage, build_tiny_diffusion, decode_png, read_yolo_objects
from vlmlab.testing.samples import INSPECTION_CLASSES


def test_compose_labels_are_valid_and_rare_classes_gain(samples_dir):
    stage = ComposeStage(str(samples_dir / "inspection"), str(samples_dir / "photos"), seed=0, size=160)
    batch = stage({"index": np.arange(24)})
    placed = []
    for data, yolo, caption in zip(batch["image"], batch["yolo"], batch["caption"]):
        assert decode_png(data).size == (160, 160)
        lines = [ln.split() for ln in yolo.strip().split("\n")]
        assert len(lines) == len(caption.split(", "))  # one caption phrase per labelled object
        for c, cx, cy, w, h in lines:
            cx, cy, w, h = map(float, (cx, cy, w, h))
            assert 0 <= int(c) < len(INSPECTION_CLASSES)
            assert 0 < w <= 1 and 0 < h <= 1
            assert cx - w / 2 >= -1e-6 and cx + w / 2 <= 1 + 1e-6 and cy - h / 2 >= -1e-6 and cy + h / 2 <= 1 + 1e-6
            placed.append(int(c))
    source = np.bincount([o[1] for o in read_yolo_objects(samples_dir / "inspection")], minlength=9)
    ours = np.bincount(placed, minlength=9)
    rare, common = int(np.argmin(np.where(source > 0, source, 10**9))), int(np.argmax(source))
    # Up-sampling: the rarest class's share among composed objects beats its share in the source set.
    assert ours[rare] / ours.sum() > 2 * source[rare] / source.sum()
    assert ours[common] / ours.sum() < source[common] / source.sum()
    again = stage({"index": np.arange(3)})
    assert list(again["image"]) == list(batch["image"][:3])  # index-seeded: reproducible


def test_chain_documents_implemented_stages():
    assert [k for k, v in CHAIN.items() if v] == ["vlm_caption", "diffusion"]


@pytest.mark.slow
def test_diffusion_stage_in_corpus_build(ray_local, samples_dir, tiny_model, tmp_path):
    from pipelines.corpus import CorpusConfig, build_corpus

    pipe = build_tiny_diffusion(tmp_path / "tiny-sd", tiny_model)
    direct = DiffusionStage(str(pipe), ["a rock"], seed=0, steps=2, size=32)({"index": np.array([0, 0])})
    assert direct["image"][0] == direct["image"][1]
    assert np.asarray(decode_png(direct["image"][0])).std() > 1.0  # not a blank image
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes((samples_dir / "photos" / "gravel.png").read_bytes())
    cfg = CorpusConfig(images=str(images), out=str(tmp_path / "corpus"), augmentations=0, zoom=False,
                       synthetic="diffusion", n=3, diffusion_model=str(pipe), diffusion_steps=2, diffusion_size=32,
                       batch_size=2)
    dataset = build_corpus(cfg)
    assert dataset["stats"]["synthetic"] == 3 and dataset["stats"]["real_original"] == 1
    syn = [p for p in dataset["pairs"] if p["source"] == "synthetic"]
    assert all((tmp_path / "corpus" / p["image_path"]).exists() for p in syn)
    meta = json.loads((tmp_path / "corpus" / "metadata" / f"{syn[0]['image_id']}.json").read_text())
    assert meta["width"] == 32 and meta["caption_sources"]["given"] == "a rock surface"
