"""Ray Tune ASHA search over the NLVR2 LoRA recipe (learning rate, rank): ``vlmlab tune vlm``.

``vlmlab tune vlm --config training/configs/vlm_search.yaml model=SPEC data=DATA`` samples the
learning rate (log-uniform) and LoRA rank (alpha = 2 x rank); every trial is a ``vlm train`` run on
Ray Train whose per-epoch held-out accuracy (``dev_accuracy``, the official metric) ASHA uses to
stop weak trials early. It shares :func:`training.tune.run_search` with ``tune lora``: relaunching
the same ``run_dir``/``name`` restores the search. At the end it prints the results table and
copies the best trial's adapter to ``RUN_DIR/NAME/best_adapter``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.vlm import METRIC


@dataclass(frozen=True)
class VlmSearchConfig:
    """An NLVR2 LoRA search: fixed run settings and the space searched."""

    model: str = field(default="", metadata={"help": "base VLM spec"})
    data: str = field(default="", metadata={"help": "prepared dataset directory"})
    run_dir: str = field(default="runs", metadata={"help": "search storage directory"})
    name: str = field(default="vlm_search", metadata={"help": "search name; relaunching it restores the search"})
    num_samples: int = field(default=6, metadata={"help": "trials"})
    max_concurrent_trials: int = field(default=1, metadata={"help": "trials running at once"})
    workers: int = field(default=1, metadata={"help": "Ray Train workers per trial"})
    cpus_per_worker: float = field(default=1, metadata={"help": "CPUs per Train worker of a trial"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per Train worker"})
    method: str = field(default="lora", metadata={"help": "lora | qlora"})
    epochs: int = field(default=4, metadata={"help": "epochs per trial (ASHA max_t)"})
    grace_period: int = field(default=1, metadata={"help": "epochs before ASHA may stop a trial"})
    steps_per_epoch: int = field(default=0, metadata={"help": "optimizer steps per epoch (0: rows / batch)"})
    batch_size: int = field(default=8, metadata={"help": "examples per worker per step"})
    eval_limit: int = field(default=0, metadata={"help": "held-out examples scored per epoch (0: all)"})
    ranks: tuple[int, ...] = field(default=(8, 16, 32), metadata={"help": "LoRA ranks to try"})
    lr_min: float = field(default=5e-5, metadata={"help": "lowest learning rate (log-uniform)"})
    lr_max: float = field(default=2e-3, metadata={"help": "highest learning rate (log-uniform)"})
    seed: int = field(default=0, metadata={"help": "seed for the trials and the search"})


def search_space(cfg: VlmSearchConfig) -> dict[str, Any]:
    """The Tune ``param_space``: learning rate and rank (alpha follows rank)."""
    from ray import tune

    return {"lr": tune.loguniform(cfg.lr_min, cfg.lr_max), "rank": tune.choice(list(cfg.ranks)),
            "alpha": tune.sample_from(lambda spec: 2 * spec.config.rank)}


def trial_base(cfg: VlmSearchConfig):
    """The :class:`~training.vlm.VlmTrainConfig` every trial starts from."""
    from training.vlm import VlmTrainConfig

    model = str(Path(cfg.model).expanduser().resolve()) if Path(cfg.model).expanduser().is_dir() else cfg.model
    return VlmTrainConfig(model=model, data=str(Path(cfg.data).expanduser().resolve()), method=cfg.method,
                          workers=cfg.workers, cpus_per_worker=cfg.cpus_per_worker, use_gpu=cfg.use_gpu,
                          epochs=cfg.epochs, steps_per_epoch=cfg.steps_per_epoch, batch_size=cfg.batch_size,
                          eval_limit=cfg.eval_limit, seed=cfg.seed, run_dir=str(search_dir(cfg) / "trials"))


def search_dir(cfg: VlmSearchConfig) -> Path:
    """The search's directory: Tune's experiment plus every trial's Train run."""
    return Path(cfg.run_dir).expanduser().resolve() / cfg.name


def tune_vlm(cfg: VlmSearchConfig) -> dict[str, Any]:
    """Run (or restore) the search; returns ``{"table", "best_config", "best_metrics", "best_adapter", "results"}``."""
    from training.tune import run_search
    from training.vlm import train_vlm
    from vlmlab.nlvr_data import NlvrDataset

    if not cfg.model or not cfg.data:
        raise ValueError("tune vlm needs model=SPEC and data=DATA")
    NlvrDataset.open(cfg.data)
    root = search_dir(cfg)
    base = trial_base(cfg)
    results = run_search(root, base, search_space(cfg), METRIC, num_samples=cfg.num_samples,
                         max_concurrent_trials=cfg.max_concurrent_trials, epochs=cfg.epochs,
                         grace_period=cfg.grace_period, seed=cfg.seed, train_fn=train_vlm)
    frame = results.get_dataframe()
    columns = [c for c in ["trial_id", "config/lr", "config/rank", "config/alpha", "training_iteration", METRIC,
                           "dev_consistency"] if c in frame.columns]
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
    """``vlmlab tune vlm``: run or restore the search, print the table and the best adapter."""
    import ray

    from vlmlab.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="vlmlab tune vlm", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file of VlmSearchConfig fields (training/configs/vlm_search.yaml)")
    add_config_arguments(parser, VlmSearchConfig)
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    cfg = config_from_args(VlmSearchConfig, args, args.config, args.overrides)
    ray.init(ignore_reinit_error=True)
    out = tune_vlm(cfg)
    print(out["table"].to_string(index=False))
    print(json.dumps({"best_config": out["best_config"], "best_adapter": str(out["best_adapter"]),
                      "search": asdict(cfg)}, default=str))
    print(f"tensorboard --logdir {search_dir(cfg)}")


if __name__ == "__main__":
    main()
