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

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from training.inspection import InspectConfig
from training.tune import (
    SEARCH_RAY,
    SearchSettings,
    claim_search,
    export_best,
    report_search,
    run_search,
    search_dir,
    trial_base,
)

METRIC = "val_accuracy"


@dataclass(frozen=True)
class InspectSearchConfig(SearchSettings):
    """A condition-classifier search: the search settings, the space searched, and ``trial``, the whole
    :class:`~training.inspection.InspectConfig` every trial starts from (``data=``, ``model=``,
    ``use_gpu=``, ``tuning=`` ... reach it as short keys or ``trial.KEY=``). Early stopping is off in
    trials (``patience=0``): stopping is ASHA's job there."""

    name: str = field(default="inspect_search", metadata={"help": "search name; relaunching it restores the search"})
    grace_period: int = field(default=2, metadata={"help": "epochs before ASHA may stop a trial"})
    focal_alphas: tuple[float, ...] = field(default=(0.25, 0.5, 1.0), metadata={"help": "focal alphas to try"})
    focal_gammas: tuple[float, ...] = field(default=(1.0, 2.0, 3.0), metadata={"help": "focal gammas to try"})
    lr_min: float = field(default=5e-6, metadata={"help": "lowest learning rate (log-uniform)"})
    lr_max: float = field(default=1e-4, metadata={"help": "highest learning rate (log-uniform)"})
    rare_oversamples: tuple[float, ...] = field(default=(1.0, 2.5, 4.0), metadata={"help": "rare-class draw factors"})
    blocked_oversamples: tuple[float, ...] = field(default=(1.0, 3.0, 5.0), metadata={"help": "blocked draw factors"})
    unfrozen_blocks: tuple[int, ...] = field(default=(0, 2, 4, 8), metadata={
        "help": "unfrozen depths to try (trial.tuning=blocks)"})
    trial: InspectConfig = field(default_factory=lambda: InspectConfig(workers=1, epochs=15, patience=0), metadata={
        "help": "the training run of each trial (its searched fields are overwritten per trial)"})


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
    if cfg.trial.tuning == "blocks":
        space["unfrozen_blocks"] = tune.choice(list(cfg.unfrozen_blocks))
    return space


def tune_inspect(cfg: InspectSearchConfig) -> dict[str, Any]:
    """Run (or restore) the search; returns ``{"table", "best_config", "best_metrics", "best_model", "results"}``.

    Needs Ray initialised. ``best_model`` is ``RUN_DIR/NAME/best_model`` (a copy of the best trial's
    model directory). Raises ``ValueError``/``FileNotFoundError`` on a missing data file or model spec.
    """
    from training.inspect_data import read_data_yaml
    from training.inspection import MODEL_DIR, train_inspect

    if not cfg.trial.data or not cfg.trial.model:
        raise ValueError("tune inspect needs data=PATH/data.yaml and model=SPEC")
    base = trial_base(cfg, ("data", "model"))
    spec = read_data_yaml(base.data)
    claim_search(replace(cfg, trial=base), [base.data, spec["root"]])
    root = search_dir(cfg)
    results = run_search(root, base, search_space(cfg), METRIC, num_samples=cfg.num_samples,
                         max_concurrent_trials=cfg.max_concurrent_trials, grace_period=cfg.grace_period,
                         seed=cfg.seed, train_fn=train_inspect)
    frame = results.get_dataframe()
    columns = [c for c in ["trial_id", "config/focal_alpha", "config/focal_gamma", "config/lr",
                           "config/rare_oversample", "config/blocked_oversample", "config/unfrozen_blocks",
                           "training_iteration", "val_macro_f1", "best_val_accuracy", METRIC] if c in frame.columns]
    table = frame[columns].sort_values(METRIC, ascending=False)
    best = results.get_best_result(metric=METRIC, mode="max")
    best_model = export_best(Path(base.run_dir) / f"trial_{best.metrics['trial_id']}" / MODEL_DIR,
                             root / "best_model")
    return {"table": table, "best_config": best.config, "best_metrics": best.metrics, "best_model": best_model,
            "results": results}


def main(argv: list[str] | None = None) -> None:
    """``vlmlab tune inspect``: run or restore the search, print the table and the best model directory."""
    from training.run import job_main

    job_main(InspectSearchConfig, tune_inspect, argv, prog="vlmlab tune inspect",
             description=__doc__.splitlines()[0], report=functools.partial(report_search, best="best_model"),
             config_help="YAML of InspectSearchConfig fields (training/configs/inspect_search.yaml)",
             ray_options=SEARCH_RAY)


if __name__ == "__main__":
    main()
