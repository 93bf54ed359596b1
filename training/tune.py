"""Ray Tune search over LoRA settings with ASHA; metric = held-out retrieval recall.

``vlmlab tune lora --config training/configs/lora_search.yaml [key=value ...]`` samples rank,
alpha, learning rate, synthetic ratio and fine-grained weight; every trial is a
``train lora`` run (Ray Train, reporting each epoch to Tune) whose held-out ``recall_mean``
(mean of i2t@1 and t2i@1) ASHA uses to stop weak trials early. An interrupted search resumes
with ``Tuner.restore`` when relaunched with the same ``run_dir``/``name``. At the end it prints a
results table, copies the best trial's adapter to ``RUN_DIR/NAME/best_adapter`` and prints the
``tensorboard --logdir`` command.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

METRIC = "recall_mean"


@dataclass(frozen=True)
class LoraSearchConfig:
    """A LoRA hyperparameter search: the fixed run settings and the space searched."""

    pairs: str = field(default="", metadata={"help": "pairs file (Parquet or JSONL)"})
    model: str = field(default="", metadata={"help": "base model spec"})
    run_dir: str = field(default="runs", metadata={"help": "search storage directory"})
    name: str = field(default="lora_search", metadata={"help": "search name; relaunching it restores the search"})
    num_samples: int = field(default=8, metadata={"help": "trials"})
    max_concurrent_trials: int = field(default=1, metadata={"help": "trials running at once"})
    workers: int = field(default=1, metadata={"help": "Ray Train workers per trial"})
    cpus_per_worker: float = field(default=1, metadata={"help": "CPUs reserved per Train worker of a trial"})
    strategy: str = field(default="ddp", metadata={"help": "ddp | deepspeed"})
    epochs: int = field(default=10, metadata={"help": "epochs per trial (ASHA max_t)"})
    grace_period: int = field(default=1, metadata={"help": "epochs before ASHA may stop a trial"})
    steps_per_epoch: int = field(default=0, metadata={"help": "optimizer steps per epoch (0: pairs / batch)"})
    batch_size: int = field(default=32, metadata={"help": "pairs per worker per step"})
    ranks: tuple[int, ...] = field(default=(4, 8, 16), metadata={"help": "LoRA ranks to try"})
    alphas: tuple[int, ...] = field(default=(8, 16, 32), metadata={"help": "LoRA alphas to try"})
    lr_min: float = field(default=1e-5, metadata={"help": "lowest learning rate (log-uniform)"})
    lr_max: float = field(default=1e-3, metadata={"help": "highest learning rate (log-uniform)"})
    synthetic_ratios: tuple[float, ...] = field(default=(0.7, 0.8, 0.9), metadata={"help": "synthetic ratios"})
    fine_grained_weights: tuple[float, ...] = field(default=(0.0, 0.3), metadata={"help": "FILIP loss weights"})
    seed: int = field(default=0, metadata={"help": "seed for the split, sampling and the search"})


def search_space(cfg: LoraSearchConfig) -> dict[str, Any]:
    """The Tune ``param_space``: the searched :class:`~training.lora.LoraTrainConfig` fields."""
    from ray import tune

    return {
        "rank": tune.choice(list(cfg.ranks)),
        "alpha": tune.choice(list(cfg.alphas)),
        "lr": tune.loguniform(cfg.lr_min, cfg.lr_max),
        "synthetic_ratio": tune.choice(list(cfg.synthetic_ratios)),
        "fine_grained_weight": tune.choice(list(cfg.fine_grained_weights)),
    }


def trial_base(cfg: LoraSearchConfig):
    """The :class:`~training.lora.LoraTrainConfig` every trial starts from (before its sampled values)."""
    from training.lora import LoraTrainConfig

    return LoraTrainConfig(pairs=str(Path(cfg.pairs).expanduser().resolve()), model=cfg.model, workers=cfg.workers,
                      cpus_per_worker=cfg.cpus_per_worker,
                      strategy=cfg.strategy, epochs=cfg.epochs, steps_per_epoch=cfg.steps_per_epoch,
                      batch_size=cfg.batch_size, seed=cfg.seed,
                      run_dir=str(search_dir(cfg) / "trials"))


def search_dir(cfg: LoraSearchConfig) -> Path:
    """The search's directory: Tune's experiment plus every trial's Train run."""
    return Path(cfg.run_dir).expanduser().resolve() / cfg.name


def run_trial(sampled: dict[str, Any], base, train_fn: Callable | None = None) -> None:
    """One Tune trial: a training run (``train_fn(config, callbacks)``, default ``train lora``) of
    ``base`` with the sampled fields, whose per-epoch reports reach Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    if train_fn is None:
        from training.lora import train_lora as train_fn

    trial_cfg = replace(base, name=f"trial_{tune.get_context().get_trial_id()}", **sampled)
    train_fn(trial_cfg, callbacks=[TuneReportCallback()])


def run_search(root: Path, base, param_space: dict[str, Any], metric: str, *, num_samples: int,
               max_concurrent_trials: int, epochs: int, grace_period: int, seed: int,
               train_fn: Callable | None = None):
    """Run (or, when ``root`` holds an interrupted search, restore) an ASHA search; returns Tune's ``ResultGrid``.

    Shared by every ``vlmlab tune`` verb: each trial is ``train_fn(replace(base, **sampled), callbacks)``
    (a Ray Train run of ``base.workers`` workers, trial runs under ``base.run_dir``, ``base.epochs`` long);
    ASHA maximises ``metric`` (reported once per epoch). Raises ``RuntimeError`` if every trial failed.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    # the trial function only waits on its Train run, whose workers hold the CPUs (Tune needs a
    # non-empty request, hence a sliver)
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base, train_fn=train_fn), {"CPU": 0.1})
    if tune.Tuner.can_restore(str(root)):
        tuner = tune.Tuner.restore(str(root), trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=metric, mode="max", num_samples=num_samples,
                max_concurrent_trials=max_concurrent_trials,
                # max_t one past the last epoch: a trial that reaches it ends on its own, so Ray Train shuts
                # its workers down and frees their placement group; a trial the scheduler kills relies on
                # Train's PlacementGroupCleaner, which needs the state API (absent without a dashboard)
                scheduler=ASHAScheduler(max_t=epochs + 1, grace_period=grace_period, reduction_factor=2),
                search_alg=tune.search.BasicVariantGenerator(random_state=seed),
            ),
            run_config=tune.RunConfig(name=root.name, storage_path=str(root.parent)),
        )
    results = tuner.fit()
    errors = [r.error for r in results if r.error]
    if len(errors) == len(results):
        raise RuntimeError(f"every trial of {root} failed; first error: {errors[0]}")
    return results


def tune_lora(cfg: LoraSearchConfig) -> dict[str, Any]:
    """Run (or restore) the search; returns ``{"table", "best_config", "best_metrics", "best_adapter"}``.

    Needs Ray initialised. Trials run ``max_concurrent_trials`` at a time, each on ``workers``
    Ray Train workers of one CPU. Raises ``ValueError`` on a missing pairs file or model spec.
    """
    from training.pairs import read_pairs

    if not cfg.pairs or not cfg.model:
        raise ValueError("tune lora needs pairs=FILE and model=SPEC")
    read_pairs(cfg.pairs)
    root = search_dir(cfg)
    base = trial_base(cfg)
    results = run_search(root, base, search_space(cfg), METRIC, num_samples=cfg.num_samples,
                         max_concurrent_trials=cfg.max_concurrent_trials, epochs=cfg.epochs,
                         grace_period=cfg.grace_period, seed=cfg.seed)
    frame = results.get_dataframe()
    columns = [c for c in ["trial_id", "config/rank", "config/alpha", "config/lr", "config/synthetic_ratio",
                           "config/fine_grained_weight", "training_iteration", "i2t@1", "t2i@1", METRIC]
               if c in frame.columns]
    table = frame[columns].sort_values(METRIC, ascending=False)
    best = results.get_best_result(metric=METRIC, mode="max")
    trained = Path(base.run_dir) / f"trial_{best.metrics['trial_id']}" / "adapter"
    best_adapter = root / "best_adapter"
    if trained.is_dir():
        shutil.copytree(trained, best_adapter, dirs_exist_ok=True)
    else:  # ASHA stopped every trial before its last epoch: no trial wrote an adapter
        best_adapter = None
    return {"table": table, "best_config": best.config, "best_metrics": best.metrics, "best_adapter": best_adapter,
            "results": results}


def main(argv: list[str] | None = None) -> None:
    """``vlmlab tune lora``: run or restore the search, print the table, best adapter and tensorboard command."""
    import ray

    from vlmlab.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="vlmlab tune lora", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file of LoraSearchConfig fields (training/configs/lora_search.yaml)")
    add_config_arguments(parser, LoraSearchConfig)
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    cfg = config_from_args(LoraSearchConfig, args, args.config, args.overrides)
    ray.init(ignore_reinit_error=True)
    out = tune_lora(cfg)
    print(out["table"].to_string(index=False))
    print(json.dumps({"best_config": out["best_config"], "best_adapter": str(out["best_adapter"]),
                      "search": asdict(cfg)}, default=str))
    print(f"tensorboard --logdir {search_dir(cfg)}")


if __name__ == "__main__":
    main()
