"""The shared Ray Train launcher: every trainer in ``training/`` runs through :func:`launch`.

A trainer supplies only a ``train_loop(config: dict)`` function (run once per worker) and a
config; this module owns the rest: ``TorchTrainer`` with a ``ScalingConfig``, the DDP or
DeepSpeed strategy, ``RunConfig(storage_path=run dir)``, ``FailureConfig(max_failures)``,
per-epoch checkpoints, resume, ``training_log.json`` and TensorBoard events.

Writing a second trainer (the inspection classifier does exactly this)::

    from training import run

    def train_loop(config: dict) -> None:
        model, optimizer = build(config)         # plain torch objects
        wrapped = run.wrap(model, optimizer, config)   # DDP or DeepSpeed, from config["strategy"]
        start_epoch, step, extra = run.resume(wrapped)  # weights, optimizer (both strategies), scheduler
        log = run.TrainingLog(config, resume_step=step)  # training_log.json + TensorBoard, rank 0 only
        for epoch in range(start_epoch, config["epochs"]):
            for batch in my_batches(run.rank(), run.world_size()):
                loss = compute(wrapped.model, batch)
                if wrapped.backward_step(loss):  # accumulation, clipping, optimizer + scheduler
                    step += 1
                    log.step({"step": step, "epoch": epoch, "total_loss": loss.item()})
            run.report_epoch({"epoch": epoch, ...}, wrapped, epoch, step)

    def train_mine(cfg: MyConfig) -> dict:     # the driver side
        cfg = run.absolute_paths(cfg, ("model", "data"))   # relative paths mean the driver's directory
        settings = run.settings_of(cfg)
        done = run.prepare_run(settings, run.identity(cfg, data=[cfg.data]), cfg.epochs)
        if done is None:                        # None: launch (fresh or resumed); else a finished run
            result = run.launch(train_loop, asdict(cfg), settings)
            done = run.finish_run(settings, result.metrics, {"model": ...}, cfg.epochs)

    main = lambda argv=None: run.job_main(MyConfig, train_mine, argv, prog="vlmlab train mine", report=...)

``config`` always carries the :class:`RunSettings` fields (``strategy``, ``run_dir``,
``zero_stage``, ``grad_accum``, ``use_gpu``...) merged in by :func:`launch`, so the loop can read them.
``report_epoch`` must be called by every worker at the same point (Ray gathers them).

A run is identified by what changes its result (:func:`identity`: the config's fields but where it
runs, the model spec, a fingerprint of its data). ``RUN_DIR/NAME/run.json`` records it: a relaunch
of the same run resumes from its last checkpoint (a killed worker too: ``FailureConfig`` restarts the
workers and :func:`resume` loads the checkpoint in the loop); a finished run is reported, not
retrained; a *different* run under the same name is refused (:class:`RunMismatchError`: use another
``--name`` or ``--fresh``). ``epochs`` is not part of the identity, so raising it extends a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from vlmlab.config import absolute_paths  # noqa: F401 - the trainers' name for it
from vlmlab.fileio import atomic_write_json, utc_now

log = logging.getLogger(__name__)
C = TypeVar("C")

HERE = Path(__file__).parent
STATE_FILE = "state.pt"
OPTIMIZER_FILE = "optimizer.pt"
DEEPSPEED_TAG = "deepspeed"
LOG_FILE = "training_log.json"
RUN_RECORD = "run.json"
RESUMES_FILE = "resumes.jsonl"
STRATEGIES = ("ddp", "deepspeed")
# Fields that say where and how robustly a run executes, not what it learns: they may differ
# between a run and its relaunch. (epochs too: raising it extends a run from its last checkpoint.)
PLACEMENT_FIELDS = frozenset({"run_dir", "name", "fresh", "max_failures", "cpus_per_worker", "epochs"})


class RunMismatchError(ValueError):
    """``RUN_DIR/NAME`` holds another run than the one launched; the message names the differences."""


@dataclass(frozen=True)
class RunSettings:
    """How and where a training run executes (shared by every trainer)."""

    run_dir: str = field(default="runs", metadata={"help": "run directory (Ray storage_path): checkpoints, logs"})
    name: str = field(default="train", metadata={"help": "run name; relaunching the same name resumes it"})
    strategy: str = field(default="ddp", metadata={"help": "ddp | deepspeed"})
    workers: int = field(default=2, metadata={"help": "Ray Train workers"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker (mixed precision on)"})
    cpus_per_worker: float = field(default=1, metadata={"help": "CPUs reserved per worker"})
    zero_stage: int = field(default=1, metadata={"help": "DeepSpeed ZeRO stage: 1 or 2"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_failures: int = field(default=1, metadata={
        "help": "worker failures the run recovers from by restarting from its last checkpoint (FailureConfig)"})
    fresh: bool = field(default=False, metadata={
        "help": "start RUN_DIR/NAME over, deleting what an earlier run left there"})


# --------------------------------------------------------------------------- driver side


def launch(train_loop: Callable[[dict], None], loop_config: dict[str, Any], settings: RunSettings,
           callbacks: list | None = None) -> Any:
    """Run ``train_loop`` on ``settings.workers`` Ray Train workers and return the Ray ``Result``.

    ``callbacks`` are Ray Train ``UserCallback``s, e.g. Tune's ``TuneReportCallback`` when a Tune
    trial launches the run (see ``training/tune.py``).

    Ray must be initialised (or is started locally). ``loop_config`` must be picklable; the
    settings' fields are merged into it. The run lives in ``run_dir/name``; relaunching with
    the same pair resumes from its last checkpoint. Raises ``ValueError`` on a bad strategy.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if settings.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {settings.strategy!r}; use one of {', '.join(STRATEGIES)}")
    if settings.zero_stage not in (1, 2):
        raise ValueError(f"zero_stage must be 1 or 2, got {settings.zero_stage}")
    run_dir = Path(settings.run_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {**loop_config, **asdict(settings), "run_dir": str(run_dir), "log_dir": str(run_dir / settings.name)}
    resources = {"CPU": settings.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=settings.workers, use_gpu=settings.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=settings.name,
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
        ),
    )
    return trainer.fit()


def settings_of(cfg: Any) -> RunSettings:
    """The :class:`RunSettings` fields of a trainer's config (which extends :class:`RunSettings`)."""
    return RunSettings(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(RunSettings)})


def fingerprint(paths: Iterable[str | Path]) -> dict[str, str]:
    """SHA-256 per data file (a directory: of its files' relative names, sizes and modification times),
    so a relaunch knows whether it trains on the same data."""
    out = {}
    for path in paths:
        path = Path(path)
        digest = hashlib.sha256()
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                stat = f.stat()
                digest.update(f"{f.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        elif path.is_file():
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        else:
            digest.update(b"missing")
        out[str(path)] = digest.hexdigest()
    return out


def identity(cfg: Any, data: Iterable[str | Path] = ()) -> dict[str, Any]:
    """What makes two launches the same run: every config field but :data:`PLACEMENT_FIELDS`, and the
    fingerprint of the ``data`` files (see :func:`fingerprint`)."""
    config = {k: v for k, v in asdict(cfg).items() if k not in PLACEMENT_FIELDS}
    return json.loads(json.dumps({"trainer": type(cfg).__name__, "config": config, "data": fingerprint(data)},
                                 default=str))


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def prepare_run(settings: RunSettings, run_identity: dict[str, Any], epochs: int) -> dict[str, Any] | None:
    """Claim ``RUN_DIR/NAME`` for a launch; returns None to launch (fresh or resumed), or the record of a
    run that already finished these ``epochs`` (nothing to train).

    ``--fresh`` deletes the directory first. A directory holding another run raises
    :class:`RunMismatchError`; so does one whose recorded artefacts have since been deleted.
    """
    log_dir = Path(settings.run_dir).expanduser().resolve() / settings.name
    record_path = log_dir / RUN_RECORD
    if settings.fresh and log_dir.exists():
        log.info("--fresh: deleting the earlier run in %s", log_dir)
        shutil.rmtree(log_dir)
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        changed = _differences(record["identity"], run_identity)
        if changed:
            raise RunMismatchError(
                f"{log_dir} holds another run ({'; '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}); "
                "give this one its own --name, or pass --fresh to replace it")
        if record.get("status") == "finished" and record.get("epochs", -1) >= epochs:
            missing = [str(p) for p in record.get("artefacts", {}).values() if not Path(p).exists()]
            if missing:
                raise RunMismatchError(f"run {log_dir} finished, but its artefacts {missing} are gone; "
                                       "pass --fresh to train it again")
            log.info("run %s already finished %d epochs: nothing to train (--fresh trains it again)", log_dir, epochs)
            return record
        return None
    if log_dir.exists() and any(log_dir.glob("checkpoint_*")):
        raise RunMismatchError(f"{log_dir} holds checkpoints of a run with no {RUN_RECORD} (made before runs were "
                               "identified); give this one its own --name, or pass --fresh to replace it")
    log_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record_path, {"identity": run_identity, "status": "running", "started_at": utc_now()})
    return None


def finish_run(settings: RunSettings, metrics: dict[str, Any] | None, artefacts: dict[str, str | Path],
               epochs: int, **extra: Any) -> dict[str, Any]:
    """Record a finished run (its last metrics and artefact paths) in ``run.json`` and return the record.

    Raises ``RuntimeError`` if an artefact the run should have written does not exist: a command never
    reports a path it did not write.
    """
    missing = [str(p) for p in artefacts.values() if not Path(p).exists()]
    if missing:
        raise RuntimeError(f"the run finished without writing {missing}; see {settings.run_dir}/{settings.name}")
    record_path = Path(settings.run_dir).expanduser().resolve() / settings.name / RUN_RECORD
    record = json.loads(record_path.read_text())
    record.update(status="finished", epochs=epochs, finished_at=utc_now(), metrics=metrics or {},
                  artefacts={k: str(v) for k, v in artefacts.items()}, **extra)
    atomic_write_json(record_path, record)
    return record


def job_main(config_cls: type[C], run_fn: Callable[[C], Any], argv: list[str] | None, *, prog: str,
             description: str, report: Callable[[C, Any], None], config_help: str = "", needs_ray: bool = True,
             ray_options: dict[str, Any] | None = None) -> None:
    """The command-line shell of a training verb: ``--config FILE``, one flag per config field,
    ``key=value`` overrides (``section.key=value`` for sections), Ray started or joined (``ray_options``
    apply to a local Ray, see :func:`vlmlab.runtime.start_ray`), then ``report(cfg, run_fn(cfg))``."""
    from vlmlab.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help=config_help or f"YAML file of {config_cls.__name__} fields")
    add_config_arguments(parser, config_cls)
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    cfg = config_from_args(config_cls, args, args.config, args.overrides)
    if needs_ray:
        from vlmlab.runtime import start_ray

        start_ray(**(ray_options or {}))
    report(cfg, run_fn(cfg))


def read_training_log(run_dir: str | Path, name: str) -> list[dict[str, Any]]:
    """The ``training_log.json`` rows of a run (step, epoch, total_loss, acc_i2t, ...)."""
    path = Path(run_dir) / name / LOG_FILE
    return json.loads(path.read_text()) if path.is_file() else []


# --------------------------------------------------------------------------- worker side


def rank() -> int:
    """This worker's global rank (0 outside Ray Train)."""
    import ray.train

    try:
        return ray.train.get_context().get_world_rank()
    except Exception:  # noqa: BLE001 - called outside a Train worker (unit tests)
        return 0


def world_size() -> int:
    """Number of workers (1 outside Ray Train)."""
    import ray.train

    try:
        return ray.train.get_context().get_world_size()
    except Exception:  # noqa: BLE001 - called outside a Train worker (unit tests)
        return 1


def device() -> torch.device:
    """The torch device Ray Train assigned to this worker."""
    import ray.train.torch

    return ray.train.torch.get_device()


def restore_state() -> dict[str, Any] | None:
    """The state dict saved by the last :func:`report_epoch` of this run, or None on a fresh run."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)


def resume(wrapped: WrappedModel) -> tuple[int, int, dict[str, Any]]:
    """Load this run's last checkpoint into ``wrapped`` (trainable weights, optimizer moments under DDP and
    DeepSpeed alike, LR scheduler); returns ``(first epoch to run, optimizer steps so far, extra state)``
    — ``(0, 0, {})`` on a fresh run. ``extra`` holds what :func:`report_epoch` was given as ``extra``."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0, {}
    with checkpoint.as_directory() as directory:
        directory = Path(directory)
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
        wrapped.load_trainable(state["model"])
        wrapped.load_optimizer(directory)
        if wrapped.scheduler is not None and state.get("scheduler") is not None:
            wrapped.scheduler.load_state_dict(state["scheduler"])
    log.info("resumed at epoch %d, step %d", state["epoch"] + 1, state["step"])
    if rank() == 0:  # a line per resume (a killed worker, a relaunched driver): where the run picked up
        log_dir = Path(ray.train.get_context().get_storage().experiment_fs_path)
        with open(log_dir / RESUMES_FILE, "a") as f:
            f.write(json.dumps({"at": utc_now(), "epoch": state["epoch"] + 1, "step": state["step"]}) + "\n")
    return state["epoch"] + 1, state["step"], state.get("extra", {})


def report_epoch(metrics: dict[str, Any], wrapped: WrappedModel, epoch: int, step: int,
                 extra: dict[str, Any] | None = None) -> None:
    """Report an epoch's metrics with a checkpoint that :func:`resume` restores.

    Every worker must call this at the same point. Rank 0 saves the trainable weights, scheduler,
    epoch, step and ``extra`` (any ``torch.save``-able dict, e.g. best-model tracking); the optimizer
    is saved by rank 0 under DDP and by every rank under DeepSpeed (each holds its ZeRO partition),
    into the one checkpoint directory Ray Train assembles from all workers' files.
    """
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wrapped.save_optimizer(tmp)
        if rank() == 0:
            state = {"model": wrapped.trainable_state(), "epoch": epoch, "step": step, "extra": extra or {},
                     "scheduler": wrapped.scheduler.state_dict() if wrapped.scheduler is not None else None}
            torch.save(state, tmp / STATE_FILE)
        if any(tmp.iterdir()):
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(tmp)))
        else:
            ray.train.report(metrics)


class TrainingLog:
    """``training_log.json`` and TensorBoard scalars of a run, written by rank 0 only.

    On resume, rows with a step above ``resume_step`` (written after the checkpoint) are
    dropped so the log continues from the checkpoint without duplicates. With ``total_steps`` the
    steps are also reported as progress lines (steps/s, ETA; :class:`vlmlab.progress.Progress`).
    """

    def __init__(self, config: dict[str, Any], resume_step: int = 0, total_steps: int | None = None) -> None:
        self.active = rank() == 0
        self.path = Path(config["log_dir"]) / LOG_FILE
        self.rows: list[dict[str, Any]] = []
        self.writer = None
        self.progress = None
        if not self.active:
            return
        if total_steps:
            from vlmlab.progress import Progress

            self.progress = Progress(total_steps, f"train {config.get('name', '')}".strip(), "steps")
            self.progress.update(resume_step)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file() and resume_step > 0:
            self.rows = [row for row in json.loads(self.path.read_text()) if row["step"] <= resume_step]
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(config["log_dir"]) / "tensorboard"))

    def step(self, row: dict[str, Any]) -> None:
        """Record one optimizer step's row (must hold ``step``); scalars go to TensorBoard too."""
        if not self.active:
            return
        self.rows.append(row)
        if self.progress is not None:
            self.progress.update(1)
        for key, value in row.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, row["step"])

    def flush(self, scalars: dict[str, float] | None = None, step: int = 0) -> None:
        """Write the log file (and optional epoch-level ``scalars`` to TensorBoard) now."""
        if not self.active:
            return
        for key, value in (scalars or {}).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rows, indent=1))
        os.replace(tmp, self.path)


@dataclass
class WrappedModel:
    """A model and optimizer wrapped for the chosen strategy; one backward/step call for both."""

    model: torch.nn.Module  # call this for forward (DDP module or DeepSpeed engine)
    module: torch.nn.Module  # the unwrapped model
    optimizer: torch.optim.Optimizer
    scheduler: Any
    strategy: str
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    micro_step: int = 0

    def backward_step(self, loss: torch.Tensor) -> bool:
        """Backward one micro-batch; step optimizer and scheduler every ``grad_accum`` micro-batches.

        Returns True when an optimizer step happened.
        """
        self.micro_step += 1
        if self.strategy == "deepspeed":
            # the engine scales by its own gradient_accumulation_steps and steps at the boundary
            boundary = self.model.is_gradient_accumulation_boundary()
            self.model.backward(loss)
            self.model.step()
            if boundary and self.scheduler is not None:
                self.scheduler.step()
            return boundary
        (loss / self.grad_accum).backward()
        if self.micro_step % self.grad_accum:
            return False
        params = [p for p in self.module.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return True

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """CPU copies of the trainable parameters (what a checkpoint needs to resume the weights)."""
        return {n: p.detach().cpu().clone() for n, p in self.module.named_parameters() if p.requires_grad}

    def save_optimizer(self, directory: Path) -> None:
        """Write the optimizer state into ``directory``: ``optimizer.pt`` from rank 0 under DDP (every rank
        holds the same moments); DeepSpeed's own checkpoint of each rank's ZeRO partition (no frozen weights)."""
        if self.strategy == "deepspeed":
            self.model.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, save_latest=False,
                                       exclude_frozen_parameters=True)
        elif rank() == 0:
            torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)

    def load_optimizer(self, directory: Path) -> None:
        """Restore what :meth:`save_optimizer` wrote (a checkpoint without it leaves the optimizer fresh)."""
        if self.strategy == "deepspeed":
            if (directory / DEEPSPEED_TAG).is_dir():
                self.model.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_module_strict=False,
                                           load_optimizer_states=True, load_lr_scheduler_states=False)
        elif (directory / OPTIMIZER_FILE).is_file():
            self.optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location="cpu",
                                                      weights_only=False))

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        """Load :meth:`trainable_state` output back into the model (and every worker's copy)."""
        params = dict(self.module.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise KeyError(f"checkpoint holds parameters the model lacks: {missing[:5]}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))


def wrap(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any],
         scheduler_fn: Callable[[torch.optim.Optimizer], Any] | None = None) -> WrappedModel:
    """Wrap ``model``/``optimizer`` for ``config["strategy"]`` (DDP or DeepSpeed ZeRO 1/2).

    The model must already sit on :func:`device`. ``scheduler_fn(optimizer)`` builds the LR
    scheduler: a torch scheduler on the optimizer passed here, for both strategies. DeepSpeed reads
    ``training/deepspeed_zero{stage}.json`` with the micro-batch and accumulation filled in from
    ``config["batch_size"]`` and ``config["grad_accum"]``; on CPU it uses its CPU accelerator
    over the gloo process group Ray Train already set up.
    """
    grad_accum = int(config.get("grad_accum", 1))
    if config.get("strategy", "ddp") == "deepspeed":
        import deepspeed

        ds_config = json.loads((HERE / f"deepspeed_zero{int(config.get('zero_stage', 1))}.json").read_text())
        ds_config["train_micro_batch_size_per_gpu"] = int(config.get("batch_size", 8))
        ds_config["gradient_accumulation_steps"] = grad_accum
        if config.get("use_gpu") and torch.cuda.is_available():
            ds_config["bf16" if torch.cuda.is_bf16_supported() else "fp16"] = {"enabled": True}
        deepspeed.init_distributed(dist_backend="nccl" if config.get("use_gpu") else "gloo")
        # DeepSpeed broadcasts every parameter as bytes, which 0-dim tensors (CLIP's frozen
        # logit_scale) cannot be viewed as: give them one dimension for the broadcast only
        scalars = [p for p in model.parameters() if p.dim() == 0]
        if any(p.requires_grad for p in scalars):
            raise ValueError("DeepSpeed cannot train 0-dim parameters; keep trainable scalars as shape (1,)")
        for p in scalars:
            p.data = p.data.reshape(1)
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
        )
        for p in scalars:
            p.data = p.data.reshape(())
        # ZeRO's wrapper is no torch Optimizer, but it steps the client optimizer's param_groups,
        # so a torch scheduler on the client optimizer sets the learning rate it uses
        scheduler = scheduler_fn(optimizer) if scheduler_fn else None
        return WrappedModel(engine, engine.module, ds_optimizer, scheduler, "deepspeed", grad_accum)
    import ray.train.torch

    wrapped = ray.train.torch.prepare_model(model, move_to_device=False)
    module = wrapped.module if hasattr(wrapped, "module") else wrapped
    scheduler = scheduler_fn(optimizer) if scheduler_fn else None
    return WrappedModel(wrapped, module, optimizer, scheduler, "ddp", grad_accum)


@dataclass
class BestTracker:
    """Best-model keeping and early stopping on one validation metric (higher is better).

    Call :meth:`update` once per epoch with the metric; it returns True when the epoch is a new best
    (save the model then). :attr:`should_stop` turns True after ``patience`` epochs without a gain
    of more than ``min_delta`` (``patience`` 0: never stop). Every worker sees the same metric, so
    every worker reaches the same decision. :meth:`state`/:meth:`load` go into epoch checkpoints so a
    resumed run keeps counting.
    """

    patience: int = 0
    min_delta: float = 0.0
    best: float = float("-inf")
    best_epoch: int = -1
    stale_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's metric; True when it beats the best so far."""
        if value > self.best + self.min_delta:
            self.best, self.best_epoch, self.stale_epochs = float(value), epoch, 0
            return True
        self.stale_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        """True once ``patience`` epochs in a row brought no improvement."""
        return self.patience > 0 and self.stale_epochs >= self.patience

    def state(self) -> dict[str, float]:
        """What a checkpoint stores to resume the tracking."""
        return {"best": self.best, "best_epoch": self.best_epoch, "stale_epochs": self.stale_epochs}

    def load(self, state: dict[str, float]) -> None:
        """Restore :meth:`state` output."""
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])
        self.stale_epochs = int(state["stale_epochs"])
