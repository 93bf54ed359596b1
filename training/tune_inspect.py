"""Ray Tune ASHA search over the condition classifier's recipe; metric = validation accuracy.

``vlmlab tune inspect --config training/configs/inspect_search.yaml data=PATH/data.yaml model=SPEC``
samples focal alpha and gamma, learning rate, the rare/blocked oversampling factors and the
unfrozen depth; every trial is a ``train inspect`` run (Ray Train, one report per epoch) and ASHA
stops weak trials early on ``val_accuracy``. It shares :func:`training.tune.run_search` with
``tune lora`` (restore of an interrupted search included). At the end it prints a results table
and copies the best trial's model directory to ``RUN_DIR/NAME/best_model`` (load it with
:func:`training.inspection.load_classifier`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.tune import run_search

METRIC = "val_accuracy"


@dataclass(frozen=True)
class InspectSearchConfig:
    """A condition-classifier search: the fixed run settings and the space searched."""

    data: str = field(default="", metadata={"help": "YOLO data.yaml"})
    model: str = field(default="", metadata={"help": "base model spec"})
    run_dir: str = field(default="runs", metadata={"help": "search storage directory"})
    name: str = field(default="inspect_search", metadata={"help": "search name; relaunching it restores the search"})
    num_samples: int = field(default=8, metadata={"help": "trials"})
    max_concurrent_trials: int = field(default=1, metadata={"help": "trials running at once"})
    workers: int = field(default=1, metadata={"help": "Ray Train workers per trial"})
    cpus_per_worker: float = field(default=1, metadata={"help": "CPUs reserved per Train worker of a trial"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per Train worker"})
    strategy: str = field(default="ddp", metadata={"help": "ddp | deepspeed"})
    tuning: str = field(default="blocks", metadata={"help": "blocks | lora (unfrozen_blocks is searched for blocks)"})
    epochs: int = field(default=15, metadata={"help": "epochs per trial (ASHA max_t)"})
    grace_period: int = field(default=2, metadata={"help": "epochs before ASHA may stop a trial"})
    steps_per_epoch: int = field(default=0, metadata={"help": "optimizer steps per epoch (0: crops / batch)"})
    batch_size: int = field(default=16, metadata={"help": "crops per worker per step"})
    head_lr_multiplier: float = field(default=1.0, metadata={"help": "head learning rate = lr x this (fixed)"})
    focal_alphas: tuple[float, ...] = field(default=(0.25, 0.5, 1.0), metadata={"help": "focal alphas to try"})
    focal_gammas: tuple[float, ...] = field(default=(1.0, 2.0, 3.0), metadata={"help": "focal gammas to try"})
    lr_min: float = field(default=5e-6, metadata={"help": "lowest learning rate (log-uniform)"})
    lr_max: float = field(default=1e-4, metadata={"help": "highest learning rate (log-uniform)"})
    rare_oversamples: tuple[float, ...] = field(default=(1.0, 2.5, 4.0), metadata={"help": "rare-class draw factors"})
    blocked_oversamples: tuple[float, ...] = field(default=(1.0, 3.0, 5.0), metadata={"help": "blocked draw factors"})
    unfrozen_blocks: tuple[int, ...] = field(default=(0, 2, 4, 8), metadata={"help": "unfrozen depths to try"})
    seed: int = field(default=0, metadata={"help": "seed for sampling and the search"})


def search_space(cfg: InspectSearchConfig) -> dict[str, Any]:
    """The Tune ``param_space``: the searched :class:`~training.inspection.InspectConfig` fields."""
    from ray import tune

    space = {
        "focal_alpha": tune.choice(list(cfg.focal_alphas)),
        "focal_gamma": tune.choice(list(cfg.focal_gammas)),
        "lr": tune.loguniform(cfg.lr_min, cfg.lr_max),
        "rare_oversample": tune.choice(list(cfg.rare_oversamples)),
        "blocked_oversample": tune.choice(list(cfg.blocked_oversamples)),
    }
    if cfg.tuning == "blocks":
        space["unfrozen_blocks"] = tune.choice(list(cfg.unfrozen_blocks))
    return space


def search_dir(cfg: InspectSearchConfig) -> Path:
    """The search's directory: Tune's experiment plus every trial's Train run."""
    return Path(cfg.run_dir).expanduser().resolve() / cfg.name


def trial_base(cfg: InspectSearchConfig):
    """The :class:`~training.inspection.InspectConfig` every trial starts from (before its sampled values).

    Early stopping is off inside trials (``patience=0``): stopping is ASHA's job there.
    """
    from training.inspection import InspectConfig

    model = str(Path(cfg.model).expanduser().resolve()) if Path(cfg.model).expanduser().is_dir() else cfg.model
    return InspectConfig(data=str(Path(cfg.data).expanduser().resolve()), model=model, workers=cfg.workers,
                         cpus_per_worker=cfg.cpus_per_worker, use_gpu=cfg.use_gpu, strategy=cfg.strategy,
                         tuning=cfg.tuning, epochs=cfg.epochs, steps_per_epoch=cfg.steps_per_epoch,
                         batch_size=cfg.batch_size, head_lr_multiplier=cfg.head_lr_multiplier, patience=0,
                         seed=cfg.seed, run_dir=str(search_dir(cfg) / "trials"))


def tune_inspect(cfg: InspectSearchConfig) -> dict[str, Any]:
    """Run (or restore) the search; returns ``{"table", "best_config", "best_metrics", "best_model", "results"}``.

    Needs Ray initialised. ``best_model`` is ``RUN_DIR/NAME/best_model`` (a copy of the best trial's
    model directory). Raises ``ValueError``/``FileNotFoundError`` on a missing data file or model spec.
    """
    from training.inspect_data import read_data_yaml
    from training.inspection import MODEL_DIR, train_inspect

    if not cfg.data or not cfg.model:
        raise ValueError("tune inspect needs data=PATH/data.yaml and model=SPEC")
    read_data_yaml(cfg.data)
    root = search_dir(cfg)
    base = trial_base(cfg)
    results = run_search(root, base, search_space(cfg), METRIC, num_samples=cfg.num_samples,
                         max_concurrent_trials=cfg.max_concurrent_trials, epochs=cfg.epochs,
                         grace_period=cfg.grace_period, seed=cfg.seed, train_fn=train_inspect)
    frame = results.get_dataframe()
    columns = [c for c in ["trial_id", "config/focal_alpha", "config/focal_gamma", "config/lr",
                           "config/rare_oversample", "config/blocked_oversample", "config/unfrozen_blocks",
                           "training_iteration", "val_macro_f1", "best_val_accuracy", METRIC] if c in frame.columns]
    table = frame[columns].sort_values(METRIC, ascending=False)
    best = results.get_best_result(metric=METRIC, mode="max")
    trained = Path(base.run_dir) / f"trial_{best.metrics['trial_id']}" / MODEL_DIR
    best_model = root / "best_model"
    if trained.is_dir():
        shutil.copytree(trained, best_model, dirs_exist_ok=True)
    else:
        best_model = None
    return {"table": table, "best_config": best.config, "best_metrics": best.metrics, "best_model": best_model,
            "results": results}


def main(argv: list[str] | None = None) -> None:
    """``vlmlab tune inspect``: run or restore the search, print the table and the best model directory."""
    import ray

    from vlmlab.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="vlmlab tune inspect", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML of InspectSearchConfig fields (training/configs/inspect_search.yaml)")
    add_config_arguments(parser, InspectSearchConfig)
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    cfg = config_from_args(InspectSearchConfig, args, args.config, args.overrides)
    ray.init(ignore_reinit_error=True)
    out = tune_inspect(cfg)
    print(out["table"].to_string(index=False))
    print(json.dumps({"best_config": out["best_config"], "best_model": str(out["best_model"]),
                      "search": asdict(cfg)}, default=str))
    print(f"tensorboard --logdir {search_dir(cfg)}")


if __name__ == "__main__":
    main()
