"""training.lora + training.run: LoRA runs under Ray Train (DDP, DeepSpeed), resume, adapters on load."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from training.evaluate import EvaluateConfig, evaluate_retrieval
from training.lora import LoraTrainConfig, train_lora
from training.run import read_training_log

LOG_FIELDS = {"step", "epoch", "total_loss", "acc_i2t", "acc_t2i"}


@pytest.fixture(scope="module")
def lora_config(relabelled_pairs, tiny_model, tmp_path_factory) -> LoraTrainConfig:
    return LoraTrainConfig(pairs=str(relabelled_pairs), model=tiny_model, run_dir=str(tmp_path_factory.mktemp("runs")),
                      name="ddp", strategy="ddp", workers=2, epochs=2, steps_per_epoch=10, batch_size=16, lr=3e-3,
                      warmup_steps=2, fine_grained_weight=0.3, seed=0)


@pytest.fixture(scope="module")
def ddp_run(ray_local, lora_config):
    return train_lora(lora_config)


@pytest.mark.slow
def test_ddp_run_raises_heldout_recall_through_load_model(ddp_run, lora_config):
    recall = evaluate_retrieval(EvaluateConfig(model=lora_config.model, adapter=str(ddp_run["adapter"]),
                                               pairs=lora_config.pairs, holdout_fraction=0.2, seed=0))
    base, adapted = recall["base"], recall["adapted"]
    print("held-out recall base", base, "adapted", adapted)
    # the frozen model matches images to their true class, so the renamed captions are ~never first
    assert base["i2t@1"] < 0.2 and base["t2i@1"] < 0.2
    assert adapted["i2t@1"] > base["i2t@1"] + 0.35
    assert adapted["t2i@1"] > base["t2i@1"] + 0.35
    # the in-loop held-out figures are what load_model(spec, adapter=...) reproduces
    assert abs(ddp_run["metrics"]["i2t@1"] - adapted["i2t@1"]) < 1e-6


@pytest.mark.slow
def test_ddp_run_writes_log_checkpoints_and_tensorboard(ddp_run, lora_config):
    rows = read_training_log(lora_config.run_dir, lora_config.name)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert LOG_FIELDS <= set(rows[0])
    assert np.mean([r["total_loss"] for r in rows[-5:]]) < np.mean([r["total_loss"] for r in rows[:5]])
    assert ddp_run["metrics"]["step"] == 20
    assert list((ddp_run["log_dir"] / "tensorboard").glob("events.out.tfevents.*"))
    assert len(list(ddp_run["log_dir"].glob("checkpoint_2*"))) == 2
    meta = json.loads((ddp_run["adapter"] / "vlmlab_adapter.json").read_text())
    assert meta["base_spec"] == lora_config.model and meta["step"] == 20


@pytest.mark.slow
def test_relaunched_run_resumes_from_its_last_checkpoint(ddp_run, lora_config):
    resumed = train_lora(replace(lora_config, epochs=3))
    assert resumed["metrics"]["epoch"] == 2 and resumed["metrics"]["step"] == 30
    rows = read_training_log(lora_config.run_dir, lora_config.name)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert {r["epoch"] for r in rows[20:]} == {2}


@pytest.mark.slow
def test_deepspeed_zero2_runs_with_two_workers(ray_local, lora_config):
    out = train_lora(replace(lora_config, name="deepspeed", strategy="deepspeed", zero_stage=2, epochs=1,
                             steps_per_epoch=6, fine_grained_weight=0.0))
    rows = read_training_log(lora_config.run_dir, "deepspeed")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert np.isfinite([r["total_loss"] for r in rows]).all()
    assert out["metrics"]["i2t@1"] > 0.3  # the renamed captions are learnt (frozen model: < 0.2)
    assert (out["adapter"] / "adapter_model.safetensors").is_file()
    # the lab's earlier file names sit beside the peft adapter, with the same LoRA tensors
    import torch
    from safetensors.torch import load_file

    seed = torch.load(out["adapter"] / "lora_final.pt", weights_only=True)
    assert seed.keys() == load_file(out["adapter"] / "adapter_model.safetensors").keys()
    assert (out["adapter"] / "projection_heads_final.pt").is_file()


def test_bad_strategy_and_missing_pairs_fail_early(lora_config, tmp_path):
    with pytest.raises(ValueError, match="pairs file"):
        train_lora(replace(lora_config, pairs=str(tmp_path / "none.parquet")))
    from training.run import RunSettings, launch

    with pytest.raises(ValueError, match="unknown strategy"):
        launch(lambda c: None, {}, RunSettings(run_dir=str(tmp_path), strategy="fsdp"))


def test_synthetic_ratio_is_clamped_to_the_synthetic_share_with_one_warning(caplog):
    import pandas as pd

    from training.lora import clamp_synthetic_ratio
    from training.pairs import synthetic_ratio_batch

    # 2% synthetic (2 of 100), the default ratio 0.8: batches come out 2% synthetic, not 80%
    pairs = pd.DataFrame({"image_path": [f"{i}.png" for i in range(100)], "caption": ["c"] * 100,
                          "source": ["synthetic"] * 2 + ["real"] * 98, "label": [""] * 100})
    cfg = LoraTrainConfig(pairs="p.parquet", model="m", holdout_fraction=0.0, batch_size=50)
    with caplog.at_level("WARNING", logger="training.pairs"):
        clamped = clamp_synthetic_ratio(cfg, pairs)
    assert clamped.synthetic_ratio == pytest.approx(0.02)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "0.8" in warnings[0] and "2 of 100" in warnings[0] and "0.02" in warnings[0]
    idx = synthetic_ratio_batch(pairs["source"].to_numpy(), clamped.synthetic_ratio, 50, np.random.default_rng(0))
    assert (pairs["source"].to_numpy()[idx] == "synthetic").sum() == 1
    # no synthetic rows: the ratio means 0; a ratio the corpus can give is kept as it is
    caplog.clear()
    assert clamp_synthetic_ratio(cfg, pairs.assign(source="real")).synthetic_ratio == 0.0
    half = pairs.assign(source=["synthetic", "real"] * 50)
    assert clamp_synthetic_ratio(replace(cfg, synthetic_ratio=0.3), half) == replace(cfg, synthetic_ratio=0.3)
