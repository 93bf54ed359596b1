"""training.evaluate: recall@k both ways, and the base-vs-adapted retrieval table of the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.evaluate import main, recall_at_k
from vlmlab.adapters import AdapterError, add_lora, save_adapter
from vlmlab.models import load_model


def test_recall_at_k_counts_hits_against_unique_captions():
    eye = np.eye(3, dtype=np.float32)
    captions = ["a", "b", "c", "a"]
    images = np.stack([eye[0], eye[1], eye[0], eye[2]])  # image 2 looks like "a" but is captioned "c"
    texts = np.stack([eye[0], eye[1], eye[2], eye[0]])
    recall = recall_at_k(images, texts, captions, ks=(1, 2))
    assert recall["i2t@1"] == pytest.approx(2 / 4)  # images 0 and 1 hit; 2 and 3 miss
    assert recall["t2i@1"] == pytest.approx(2 / 3)  # "a" and "b" find their images first, "c" does not
    assert recall["i2t@2"] >= recall["i2t@1"]


@pytest.fixture(scope="module")
def random_adapter(tiny_model, tmp_path_factory):
    encoder = load_model(tiny_model)
    add_lora(encoder.model, encoder.backend, rank=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in encoder.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return save_adapter(encoder.model, tmp_path_factory.mktemp("adapter"), tiny_model, encoder.backend)


def test_adapter_through_load_model_changes_embeddings_reproducibly(tiny_model, random_adapter, samples_dir):
    texts = ["a tile of basalt", "a tile of granite"]
    base = load_model(tiny_model).encode_texts(texts)
    adapted = load_model(tiny_model, adapter=random_adapter)
    again = load_model(tiny_model, adapter=random_adapter).encode_texts(texts)
    assert adapted.adapter == str(random_adapter.resolve())
    assert (np.sum(base * adapted.encode_texts(texts), axis=1) < 0.99).all()
    assert (np.sum(again * adapted.encode_texts(texts), axis=1) > 0.999).all()
    assert not any(p.requires_grad for p in adapted.model.parameters())
    with pytest.raises(AdapterError, match="not an adapter directory"):
        load_model(tiny_model, adapter=samples_dir)


def test_lora_on_transformers_clip_trains_only_adapters_and_heads(tiny_model):
    encoder = load_model(f"hf:{tiny_model}")
    total = sum(p.numel() for p in encoder.model.parameters())
    add_lora(encoder.model, encoder.backend, rank=4, alpha=8)
    trainable = {n for n, p in encoder.model.named_parameters() if p.requires_grad}
    assert any("q_proj.lora_A" in n for n in trainable) and any("fc2.lora_B" in n for n in trainable)
    assert "text_projection.weight" in trainable and "logit_scale" in trainable
    assert sum(dict(encoder.model.named_parameters())[n].numel() for n in trainable) < 0.05 * total


def test_evaluate_cli_prints_base_and_adapted_recall(tiny_model, random_adapter, samples_dir, capsys):
    main(["--model", tiny_model, "--adapter", str(random_adapter), "--pairs", str(samples_dir / "pairs.parquet"),
          "holdout_fraction=0.25"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["metric", "base", "adapted"]
    recall = json.loads(out.strip().splitlines()[-1])["recall"]
    assert set(recall["base"]) == {f"{d}@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    for name in ("base", "adapted"):
        assert 0 <= recall[name]["i2t@1"] <= recall[name]["i2t@5"] <= recall[name]["i2t@10"] <= 1
    assert recall["adapted"] != recall["base"]
