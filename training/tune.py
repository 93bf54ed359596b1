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

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from training.lora import LoraTrainConfig

log = logging.getLogger(__name__)

METRIC = "recall_mean"
# A local Ray for a search keeps its dashboard: Ray Train frees the placement group of a run that ASHA
# stops only through the dashboard's state API, and a leaked group starves every later trial.
SEARCH_RAY = {"include_dashboard": True}
# the trial function only waits on its Train run, whose workers hold the CPUs (Tune needs a
# non-empty request, hence a sliver)
TRIAL_CPU = 0.1


@dataclass(frozen=True)
class SearchSettings:
    """Where a search runs and how many trials it runs how (shared by every ``vlmlab tune`` verb's config)."""

    run_dir: str = field(default="runs", metadata={"help": "search storage directory"})
    name: str = field(default="search", metadata={"help": "search name; relaunching it restores the search"})
    num_samples: int = field(default=8, metadata={"help": "trials"})
    max_concurrent_trials: int = field(default=1, metadata={
        "help": "trials running at once (at most what the cluster's CPUs/GPUs hold)"})
    grace_period: int = field(default=1, metadata={"help": "epochs before ASHA may stop a trial"})
    seed: int = field(default=0, metadata={"help": "seed of the search's sampling"})
    fresh: bool = field(default=False, metadata={"help": "start the search over, deleting RUN_DIR/NAME"})


@dataclass(frozen=True)
class LoraSearchConfig(SearchSettings):
    """A LoRA hyperparameter search: the search settings, the space searched, and ``trial``, the whole
    :class:`~training.lora.LoraTrainConfig` every trial starts from (``pairs=``, ``model=``, ``epochs=``,
    ``use_gpu=`` ... reach it as short keys or ``trial.KEY=``)."""

    name: str = field(default="lora_search", metadata={"help": "search name; relaunching it restores the search"})
    ranks: tuple[int, ...] = field(default=(4, 8, 16), metadata={"help": "LoRA ranks to try"})
    alphas: tuple[int, ...] = field(default=(8, 16, 32), metadata={"help": "LoRA alphas to try"})
    lr_min: float = field(default=1e-5, metadata={"help": "lowest learning rate (log-uniform)"})
    lr_max: float = field(default=1e-3, metadata={"help": "highest learning rate (log-uniform)"})
    synthetic_ratios: tuple[float, ...] = field(default=(0.7, 0.8, 0.9), metadata={"help": "synthetic ratios"})
    fine_grained_weights: tuple[float, ...] = field(default=(0.0, 0.3), metadata={"help": "FILIP loss weights"})
    trial: LoraTrainConfig = field(default_factory=lambda: LoraTrainConfig(workers=1), metadata={
        "help": "the training run of each trial (its searched fields are overwritten per trial)"})


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


def search_dir(cfg: Any) -> Path:
    """The search's directory: Tune's experiment plus every trial's Train run."""
    return Path(cfg.run_dir).expanduser().resolve() / cfg.name


def trial_base(cfg: Any, path_fields: tuple[str, ...]) -> Any:
    """``cfg.trial`` with its paths made absolute (trials run in other directories) and its runs kept
    under the search directory."""
    from training.run import absolute_paths

    return replace(absolute_paths(cfg.trial, path_fields), run_dir=str(search_dir(cfg) / "trials"))


SEARCH_RECORD = "search.json"
# may differ between a search and its relaunch: where it runs and how many trials at once
SEARCH_PLACEMENT = frozenset({"run_dir", "name", "fresh", "max_concurrent_trials"})


def claim_search(cfg: Any, data: list[str]) -> None:
    """Claim ``RUN_DIR/NAME`` for this search: a relaunch of the same search restores it; another search
    under the same name is refused (:class:`training.run.RunMismatchError`: use another name or
    ``fresh=true``, which deletes the old one first)."""
    from training.run import RunMismatchError, _differences, fingerprint

    root = search_dir(cfg)
    config = {k: v for k, v in asdict(cfg).items() if k not in SEARCH_PLACEMENT}
    config["trial"] = {k: v for k, v in config["trial"].items() if k not in ("run_dir", "name", "fresh")}
    identity = json.loads(json.dumps({"search": type(cfg).__name__, "config": config, "data": fingerprint(data)},
                                     default=str))
    if cfg.fresh and root.exists():
        log.info("fresh=true: deleting the earlier search in %s", root)
        shutil.rmtree(root)
    record = root / SEARCH_RECORD
    if record.is_file():
        changed = _differences(json.loads(record.read_text())["identity"], identity)
        if changed:
            raise RunMismatchError(f"{root} holds another search ({'; '.join(changed[:6])}"
                                   f"{' ...' if len(changed) > 6 else ''}); give this one its own name=, or pass "
                                   "fresh=true to replace it")
        return
    if root.exists() and any(root.iterdir()):
        raise RunMismatchError(f"{root} holds a search with no {SEARCH_RECORD}; give this one its own name=, or "
                               "pass fresh=true to replace it")
    root.mkdir(parents=True, exist_ok=True)
    from vlmlab.fileio import atomic_write_json, utc_now

    atomic_write_json(record, {"identity": identity, "started_at": utc_now()})


def concurrent_trials(wanted: int, base: Any, cluster: dict[str, float]) -> int:
    """At most ``wanted`` trials, and no more than the cluster's CPUs (and GPUs) can hold at once: a trial
    needs ``workers x cpus_per_worker`` CPUs (and ``workers`` GPUs with ``use_gpu``) plus the trial's own
    sliver. Starting more would leave trials waiting for resources the running ones hold."""
    per_trial_cpu = base.workers * base.cpus_per_worker + TRIAL_CPU
    fits = int(cluster.get("CPU", 0) // per_trial_cpu)
    if getattr(base, "use_gpu", False):
        fits = min(fits, int(cluster.get("GPU", 0) // base.workers))
    fits = max(1, fits)
    if wanted > fits:
        log.warning("max_concurrent_trials %d > the %d trial(s) this cluster holds at once (%s CPU per trial): "
                    "running %d at a time", wanted, fits, per_trial_cpu, fits)
    return min(wanted, fits)


def run_trial(sampled: dict[str, Any], base, train_fn: Callable | None = None) -> None:
    """One Tune trial: a training run (``train_fn(config, callbacks)``, default ``train lora``) of
    ``base`` with the sampled fields, whose per-epoch reports reach Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    if train_fn is None:
        from training.lora import train_lora as train_fn

    trial_cfg = replace(base, name=f"trial_{tune.get_context().get_trial_id()}", **sampled)
    train_fn(trial_cfg, callbacks=[TuneReportCallback()])


def run_search(root: Path, base: Any, param_space: dict[str, Any], metric: str, *, num_samples: int,
               max_concurrent_trials: int, grace_period: int, seed: int, train_fn: Callable | None = None):
    """Run (or, when ``root`` holds an interrupted search, restore) an ASHA search; returns Tune's ``ResultGrid``.

    Shared by every ``vlmlab tune`` verb: each trial is ``train_fn(replace(base, **sampled), callbacks)``
    (a Ray Train run of ``base.workers`` workers, trial runs under ``base.run_dir``, ``base.epochs`` long);
    ASHA maximises ``metric`` (reported once per epoch). At most ``max_concurrent_trials`` run at once,
    fewer where the cluster holds fewer (:func:`concurrent_trials`). Raises ``RuntimeError`` if every
    trial failed.
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base, train_fn=train_fn), {"CPU": TRIAL_CPU})
    if tune.Tuner.can_restore(str(root)):
        tuner = tune.Tuner.restore(str(root), trainable, resume_errored=True)
    else:
        concurrent = concurrent_trials(max_concurrent_trials, base, ray.cluster_resources())
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=metric, mode="max", num_samples=num_samples,
                # rungs only below the last epoch, and no stop at max_t: a trial that gets there ends on its
                # own, so Ray Train shuts its workers down and frees their placement group (a run the
                # scheduler kills relies on Train's PlacementGroupCleaner, which needs the dashboard's
                # state API: the tune verbs start their local Ray with it)
                scheduler=ASHAScheduler(max_t=base.epochs, grace_period=min(grace_period, base.epochs),
                                        reduction_factor=2, stop_last_trials=False),
                # TuneConfig.max_concurrent_trials is ignored once a search algorithm is given: the limit
                # belongs to the generator itself
                search_alg=tune.search.BasicVariantGenerator(random_state=seed, max_concurrent=concurrent),
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

    Needs Ray initialised. Trials run ``max_concurrent_trials`` at a time (as the cluster allows), each
    on ``trial.workers`` Ray Train workers. Raises ``ValueError`` on a missing pairs file or model spec.
    """
    from training.pairs import read_pairs

    if not cfg.trial.pairs or not cfg.trial.model:
        raise ValueError("tune lora needs pairs=FILE and model=SPEC")
    base = trial_base(cfg, ("pairs", "model"))
    read_pairs(base.pairs)
    claim_search(replace(cfg, trial=base), [base.pairs])
    root = search_dir(cfg)
    results = run_search(root, base, search_space(cfg), METRIC, num_samples=cfg.num_samples,
                         max_concurrent_trials=cfg.max_concurrent_trials, grace_period=cfg.grace_period,
                         seed=cfg.seed)
    frame = results.get_dataframe()
    columns = [c for c in ["trial_id", "config/rank", "config/alpha", "config/lr", "config/synthetic_ratio",
                           "config/fine_grained_weight", "training_iteration", "i2t@1", "t2i@1", METRIC]
               if c in frame.columns]
    table = frame[columns].sort_values(METRIC, ascending=False)
    best = results.get_best_result(metric=METRIC, mode="max")
    best_adapter = export_best(Path(base.run_dir) / f"trial_{best.metrics['trial_id']}" / "adapter",
                               root / "best_adapter")
    return {"table": table, "best_config": best.config, "best_metrics": best.metrics, "best_adapter": best_adapter,
            "results": results}


def export_best(trained: Path, target: Path) -> Path | None:
    """Copy the best trial's artefact directory to ``target``; None when ASHA stopped every trial before
    its last epoch (no trial wrote one)."""
    if not trained.is_dir():
        return None
    shutil.copytree(trained, target, dirs_exist_ok=True)
    return target


def report_search(cfg: Any, out: dict[str, Any], best: str = "best_adapter") -> None:
    """What every ``vlmlab tune`` verb prints: the results table, the best config and artefact (``out[best]``,
    None when ASHA stopped every trial early) with the search's config, and the TensorBoard command."""
    print(out["table"].to_string(index=False))
    print(json.dumps({"best_config": out["best_config"], best: str(out[best]) if out[best] else None,
                      "search": asdict(cfg)}, default=str))
    print(f"tensorboard --logdir {search_dir(cfg)}")


def main(argv: list[str] | None = None) -> None:
    """``vlmlab tune lora``: run or restore the search, print the table, best adapter and tensorboard command."""
    from training.run import job_main

    job_main(LoraSearchConfig, tune_lora, argv, prog="vlmlab tune lora", description=__doc__.splitlines()[0],
             report=report_search,
             config_help="YAML file of LoraSearchConfig fields (training/configs/lora_search.yaml)",
             ray_options=SEARCH_RAY)


if __name__ == "__main__":
    main()
