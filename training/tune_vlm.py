"""Ray Tune ASHA search over the NLVR2 LoRA recipe (learning rate, rank): ``vlmlab tune vlm``.

``vlmlab tune vlm --config training/configs/vlm_search.yaml model=SPEC data=DATA`` samples the
learning rate (log-uniform) and LoRA rank (alpha = 2 x rank); every trial is a ``vlm train`` run on
Ray Train whose per-epoch held-out accuracy (``dev_accuracy``, the official metric) ASHA uses to
stop weak trials early. It shares :func:`training.tune.run_search` and the search record with
``tune lora``: relaunching the same ``run_dir``/``name`` restores the search, another search under
that name is refused (``fresh=true`` replaces it). At the end it prints the results table and
copies the best trial's adapter to ``RUN_DIR/NAME/best_adapter``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from training.tune import SearchSettings
from training.vlm import METRIC, VlmTrainConfig


@dataclass(frozen=True)
class VlmSearchConfig(SearchSettings):
    """An NLVR2 LoRA search: the search settings, the space searched, and ``trial``, the whole
    :class:`~training.vlm.VlmTrainConfig` every trial starts from (``model=``, ``data=``, ``epochs=``,
    ``use_gpu=`` ... reach it as short keys or ``trial.KEY=``)."""

    name: str = field(default="vlm_search", metadata={"help": "search name; relaunching it restores the search"})
    num_samples: int = field(default=6, metadata={"help": "trials"})
    ranks: tuple[int, ...] = field(default=(8, 16, 32), metadata={"help": "LoRA ranks to try"})
    lr_min: float = field(default=5e-5, metadata={"help": "lowest learning rate (log-uniform)"})
    lr_max: float = field(default=2e-3, metadata={"help": "highest learning rate (log-uniform)"})
    trial: VlmTrainConfig = field(default_factory=lambda: VlmTrainConfig(workers=1, epochs=4), metadata={
        "help": "the training run of each trial (its searched fields are overwritten per trial)"})


def search_space(cfg: VlmSearchConfig) -> dict[str, Any]:
    """The Tune ``param_space``: learning rate and rank (alpha follows rank)."""
    from ray import tune

    return {"lr": tune.loguniform(cfg.lr_min, cfg.lr_max), "rank": tune.choice(list(cfg.ranks)),
            "alpha": tune.sample_from(lambda spec: 2 * spec.config.rank)}


def tune_vlm(cfg: VlmSearchConfig) -> dict[str, Any]:
    """Run (or restore) the search; returns ``{"table", "best_config", "best_metrics", "best_adapter", "results"}``.

    Needs Ray initialised. Raises ``ValueError`` (``DatasetError``) on a missing model spec or dataset.
    """
    from pathlib import Path

    from training.tune import claim_search, export_best, run_search, search_dir, trial_base
    from training.vlm import train_vlm
    from vlmlab.nlvr_data import NlvrDataset

    if not cfg.trial.model or not cfg.trial.data:
        raise ValueError("tune vlm needs model=SPEC and data=DATA")
    base = trial_base(cfg, ("model", "data", "prompt"))
    NlvrDataset.open(base.data)
    claim_search(replace(cfg, trial=base), [base.data])
    root = search_dir(cfg)
    results = run_search(root, base, search_space(cfg), METRIC, num_samples=cfg.num_samples,
                         max_concurrent_trials=cfg.max_concurrent_trials, grace_period=cfg.grace_period,
                         seed=cfg.seed, train_fn=train_vlm)
    frame = results.get_dataframe()
    columns = [c for c in ["trial_id", "config/lr", "config/rank", "config/alpha", "training_iteration", METRIC,
                           "dev_consistency"] if c in frame.columns]
    table = frame[columns].sort_values(METRIC, ascending=False)
    best = results.get_best_result(metric=METRIC, mode="max")
    best_adapter = export_best(Path(base.run_dir) / f"trial_{best.metrics['trial_id']}" / "adapter",
                               root / "best_adapter")
    return {"table": table, "best_config": best.config, "best_metrics": best.metrics, "best_adapter": best_adapter,
            "results": results}


def main(argv: list[str] | None = None) -> None:
    """``vlmlab tune vlm``: run or restore the search, print the table, best adapter and tensorboard command."""
    from training.run import job_main
    from training.tune import SEARCH_RAY, report_search

    job_main(VlmSearchConfig, tune_vlm, argv, prog="vlmlab tune vlm", description=__doc__.splitlines()[0],
             report=report_search, config_help="YAML file of VlmSearchConfig fields (training/configs/vlm_search.yaml)",
             ray_options=SEARCH_RAY)


if __name__ == "__main__":
    main()
