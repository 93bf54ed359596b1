"""vlmlab.models: one door to every model, the same embeddings through every spec form."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from tests.conftest import TINY_REPO_ID
from vlmlab.images import read_image
from vlmlab.models import ModelSpecError, load_model, resolve_spec
from vlmlab.testing.samples import ROCK_CLASSES
from vlmlab.testing.tiny import class_prompt, heldout

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


@pytest.mark.parametrize("form", ["open_clip", "hf"])
def test_int8_image_tower_stays_close_to_float32(tiny_model, samples_dir, tiles, form):
    spec = tiny_model if form == "open_clip" else f"hf:{tiny_model}"
    images = [read_image(samples_dir / r["path"]) for r in tiles[:32]]
    exact = load_model(spec)
    int8 = load_model(spec, dtype="int8")
    assert int8.precision == "int8" and exact.precision == "float32"
    quantised = [m for m in int8.model.modules() if type(m).__module__.startswith("torch.ao.nn.quantized")]
    float_linears = [n for n, m in int8.model.named_modules() if type(m) is torch.nn.Linear]
    assert quantised, "nothing was quantised"
    # every Linear of the image tower is int8 (open_clip's attention projections included)
    assert not [n for n in float_linears if n.startswith(("visual.", "vision_model."))]
    tower = int8.model.visual if form == "open_clip" else int8.model.vision_model
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in tower.modules())
    cos = (int8.encode_images(images) * exact.encode_images(images)).sum(1)
    print(f"{form}: int8 vs float32 cosine min {cos.min():.6f} mean {cos.mean():.6f}")
    assert cos.min() > 0.999
    # the text tower stays float32 and still works
    np.testing.assert_allclose(int8.encode_texts(TEXTS), exact.encode_texts(TEXTS), atol=1e-6)


def test_unknown_or_misplaced_precisions_are_refused(tiny_model):
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        load_model(tiny_model, dtype="int4")
    with pytest.raises(ValueError, match="int8 runs on CPU only"):
        load_model(tiny_model, device="cuda", dtype="int8")


@pytest.mark.parametrize("batch_first", [True, False])
def test_projected_attention_reproduces_multihead_attention(batch_first):
    from vlmlab.quantize import ProjectedSelfAttention

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    causal = torch.triu(torch.ones(7, 7, dtype=torch.bool), diagonal=1)  # True = masked, as MHA reads it
    projected = ProjectedSelfAttention(mha)
    with torch.no_grad():
        for mask in (None, causal, torch.zeros(7, 7).masked_fill(causal, float("-inf"))):
            expected = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
            torch.testing.assert_close(projected(x, x, x, attn_mask=mask)[0], expected, atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError, match="self-attention"):
            projected(x, x.clone(), x)


def test_int8_merges_lora_layers_first(tiny_model, samples_dir, tiles):
    from vlmlab.adapters import add_lora
    from vlmlab.quantize import ProjectedSelfAttention, quantize_int8

    images = [read_image(samples_dir / r["path"]) for r in tiles[:16]]
    enc = load_model(tiny_model)
    add_lora(enc.model, enc.backend, rank=4)
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero; give the adapter a real effect
        for name, param in enc.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    with_lora = enc.encode_images(images)
    plain = load_model(tiny_model).encode_images(images)
    assert (with_lora * plain).sum(1).min() < 0.999, "the adapter changes nothing: the test would prove nothing"
    quantize_int8(enc.model, enc.backend.vision.module)
    assert not any(hasattr(m, "lora_A") for m in enc.model.modules())
    assert any(isinstance(m, ProjectedSelfAttention) for m in enc.model.visual.modules())
    assert (enc.encode_images(images) * with_lora).sum(1).min() > 0.999
