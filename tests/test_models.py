"""vlmlab.models: one door to every model, the same embeddings through every spec form."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from tests.conftest import TINY_REPO_ID
from vlmlab.images import read_image
from vlmlab.models import ModelSpecError, load_model, resolve_spec
from vlmlab.samples import ROCK_CLASSES
from vlmlab.tiny import class_prompt, heldout

TEXTS = ["a map tile of speckled granite with pink and grey crystals", "Green vegetation, cover!", "basalt"]


@pytest.fixture(scope="module")
def tiles(samples_dir):
    with open(samples_dir / "tiles.csv") as f:
        rows = list(csv.DictReader(f))
    return rows


def test_every_spec_form_gives_the_same_embeddings(tiny_model, hub_cache, samples_dir, tiles):
    images = [read_image(samples_dir / r["path"]) for r in tiles[:12]]
    specs = [
        tiny_model,
        f"open_clip:local-dir:{tiny_model}",
        f"hf:{tiny_model}",
        f"open_clip:hf-hub:{TINY_REPO_ID}",
        f"hf:{TINY_REPO_ID}",
    ]
    ref_img = ref_txt = None
    for spec in specs:
        enc = load_model(spec)
        assert enc.spec == spec and enc.embed_dim == 64
        assert enc.device.type == "cpu" and enc.dtype == torch.float32
        img, txt = enc.encode_images(images), enc.encode_texts(TEXTS)
        assert img.shape == (12, 64) and img.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5)
        if ref_img is None:
            ref_img, ref_txt, ref_scale = img, txt, enc.logit_scale
            continue
        assert (img * ref_img).sum(1).min() > 0.999, spec
        assert (txt * ref_txt).sum(1).min() > 0.999, spec
        assert enc.logit_scale == pytest.approx(ref_scale, rel=1e-5)
    assert {resolve_spec(s).backend for s in specs} == {"open_clip", "hf"}


def test_preprocessed_tensors_and_pil_images_encode_alike(tiny_model, samples_dir, tiles):
    enc = load_model(tiny_model)
    images = [read_image(samples_dir / r["path"]) for r in tiles[:4]]
    a = enc.encode_images(images)
    b = enc.encode_images(enc.preprocess_batch(images))
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_heldout_tiles_match_their_class_caption(tiny_model, samples_dir, tiles):
    """The tiny model has a real text-image signal on tiles it never trained on."""
    enc = load_model(tiny_model)
    rows = [r for r in tiles if heldout(r["path"])]
    names = list(ROCK_CLASSES)
    img = enc.encode_images([read_image(samples_dir / r["path"]) for r in rows])
    txt = enc.encode_texts([class_prompt(n) for n in names])
    pred = (img @ txt.T).argmax(1)
    acc = float(np.mean([names[p] == r["label"] for p, r in zip(pred, rows, strict=True)]))
    print(f"tiny model held-out top-1 over {len(rows)} tiles: {acc:.1%} (chance {1 / len(names):.1%})")
    assert len(rows) >= 30
    assert acc >= 0.8


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("", "empty model spec"),
        ("no-such-dir/at/all", "unknown model spec"),
        ("open_clip:NoSuchArch-99/openai", "could not load model spec"),
        ("open_clip:ViT-B-32/no-such-tag", "could not load model spec"),
        ("hf:vlmlab/definitely-not-cached", "could not load model spec"),
    ],
)
def test_bad_specs_raise_one_clear_error(spec, fragment):
    with pytest.raises(ModelSpecError) as info:
        load_model(spec)
    message = str(info.value)
    assert fragment in message
    if fragment == "could not load model spec":
        assert "tried" in message and "local directory" in message


def test_directory_without_a_model_is_refused(tmp_path):
    (tmp_path / "readme.txt").write_text("not a model")
    with pytest.raises(ModelSpecError, match="neither open_clip_config.json"):
        load_model(str(tmp_path))


def test_random_weights_architecture_loads_by_name():
    enc = load_model("open_clip:ViT-B-32")
    assert enc.embed_dim == 512 and enc.image_size == 224
