"""training.tune: ASHA searches over LoRA settings, their restore, concurrency and the best adapter export."""

from __future__ import annotations

import pytest

from training.lora import LoraTrainConfig
from training.tune import LoraSearchConfig, concurrent_trials, tune_lora
from vlmlab.config import build_config


@pytest.mark.slow
def test_two_trial_search_completes_restores_and_exports_the_best_adapter(ray_local, relabelled_pairs, tiny_model,
                                                                         tmp_path):
    # short keys (pairs=, model=, epochs= ...) reach the trial's training config, as on the command line
    cfg = build_config(LoraSearchConfig, {
        "pairs": str(relabelled_pairs), "model": tiny_model, "run_dir": str(tmp_path), "name": "search",
        "cpus_per_worker": 0.5, "num_samples": 2, "epochs": 2, "grace_period": 2, "steps_per_epoch": 5,
        "batch_size": 16, "ranks": (4,), "alphas": (8, 16), "lr_min": 1e-3, "lr_max": 3e-3,
        "fine_grained_weights": (0.0,)})
    assert cfg.trial.pairs == str(relabelled_pairs) and cfg.trial.epochs == 2 and cfg.run_dir == str(tmp_path)
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


def test_concurrency_is_sized_to_the_cluster():
    one_cpu = LoraTrainConfig(workers=1, cpus_per_worker=1)
    assert concurrent_trials(3, one_cpu, {"CPU": 2}) == 1  # 1.1 CPU per trial: one fits on 2 CPUs
    assert concurrent_trials(3, LoraTrainConfig(workers=1, cpus_per_worker=0.5), {"CPU": 2}) == 3
    assert concurrent_trials(4, LoraTrainConfig(workers=2, use_gpu=True), {"CPU": 16, "GPU": 4}) == 2
    assert concurrent_trials(1, one_cpu, {"CPU": 0.5}) == 1  # never below one


@pytest.mark.slow
def test_three_trials_on_two_cpus_finish(ray_local, relabelled_pairs, tiny_model, tmp_path):
    # more concurrent trials asked for than the 2 CPUs hold: they run as many at a time as fit, all finish
    cfg = LoraSearchConfig(run_dir=str(tmp_path), name="three", num_samples=3, max_concurrent_trials=3,
                           grace_period=1, ranks=(4,), alphas=(8,), lr_min=1e-3, lr_max=2e-3,
                           fine_grained_weights=(0.0,),
                           trial=LoraTrainConfig(pairs=str(relabelled_pairs), model=tiny_model, workers=1,
                                                 cpus_per_worker=1, epochs=1, steps_per_epoch=2, batch_size=8))
    out = tune_lora(cfg)
    assert len(out["table"]) == 3 and (out["table"]["training_iteration"] == 1).all()
