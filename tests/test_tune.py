"""training.tune: a 2-trial ASHA search over LoRA settings, its restore and the best adapter export."""

from __future__ import annotations

import pytest

from training.tune import LoraSearchConfig, tune_lora


@pytest.mark.slow
def test_two_trial_search_completes_restores_and_exports_the_best_adapter(ray_local, relabelled_pairs, tiny_model,
                                                                         tmp_path):
    cfg = LoraSearchConfig(pairs=str(relabelled_pairs), model=tiny_model, run_dir=str(tmp_path), name="search",
                           cpus_per_worker=0.5, num_samples=2, epochs=2, grace_period=2, steps_per_epoch=5,
                           batch_size=16, ranks=(4,), alphas=(8, 16), lr_min=1e-3, lr_max=3e-3,
                           fine_grained_weights=(0.0,))
    first = tune_lora(cfg)
    table = first["table"]
    assert len(table) == 2 and (table["training_iteration"] == 2).all()
    assert table["recall_mean"].max() > 0.3  # the frozen model scores < 0.2 on these captions
    assert first["best_config"]["alpha"] in (8, 16) and 1e-3 <= first["best_config"]["lr"] <= 3e-3
    assert (first["best_adapter"] / "adapter_model.safetensors").is_file()

    # relaunching the same search goes through Tuner.restore: the finished trials are kept, not rerun
    restored = tune_lora(cfg)
    assert sorted(restored["table"]["trial_id"]) == sorted(table["trial_id"])
    assert restored["table"]["recall_mean"].max() == pytest.approx(table["recall_mean"].max())
