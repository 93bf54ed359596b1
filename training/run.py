"""The shared Ray Train launcher: every trainer in ``training/`` runs through :func:`launch`.

A trainer supplies only a ``train_loop(config: dict)`` function (run once per worker) and a
config; this module owns the rest: ``TorchTrainer`` with a ``ScalingConfig``, the DDP or
DeepSpeed strategy, ``RunConfig(storage_path=run dir)``, ``FailureConfig(max_failures)``,
per-epoch checkpoints, resume, ``training_log.json`` and TensorBoard events.

Writing a second trainer (the inspection classifier does exactly this)::

    from training import run

    def train_loop(config: dict) -> None:
        state = run.restore_state()              # None on a fresh run, else what you saved
        model, optimizer = build(config)         # plain torch objects
        wrapped = run.wrap(model, optimizer, config)   # DDP or DeepSpeed, from config["strategy"]
        if state:
            wrapped.load_trainable(state["model"])
        log = run.TrainingLog(config)           # training_log.json + TensorBoard, rank 0 only
        for epoch in range(start_epoch, config["epochs"]):
            for batch in my_batches(run.rank(), run.world_size()):
                loss = compute(wrapped.model, batch)
                wrapped.backward_step(loss)     # accumulation, clipping, optimizer + scheduler
                log.step({"step": ..., "epoch": epoch, "total_loss": loss.item()})
            run.report_epoch({"epoch": epoch, ...}, {"model": wrapped.trainable_state(), ...})

    result = run.launch(train_loop, loop_config, run.RunSettings(run_dir=..., strategy="ddp"))

``config`` always carries the :class:`RunSettings` fields (``strategy``, ``run_dir``,
``zero_stage``, ``grad_accum``, ``use_gpu``...) merged in by :func:`launch`, so the loop can read them.
``report_epoch`` must be called by every worker at the same point (Ray gathers them); only
rank 0's state is saved. A relaunch with the same ``run_dir`` and ``name`` resumes from the last
checkpoint: ``restore_state()`` returns it, and :class:`TrainingLog` keeps earlier steps.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
STATE_FILE = "state.pt"
LOG_FILE = "training_log.json"
STRATEGIES = ("ddp", "deepspeed")


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
    max_failures: int = field(default=0, metadata={"help": "worker failures to recover from (FailureConfig)"})


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


def report_epoch(metrics: dict[str, Any], state: dict[str, Any]) -> None:
    """Report an epoch's metrics with a checkpoint holding ``state`` (saved from rank 0 only).

    Every worker must call this at the same point. ``state`` is any ``torch.save``-able dict
    (trainable weights, optimizer state, step, epoch); :func:`restore_state` returns it.
    """
    import ray.train
    from ray.train import Checkpoint

    if rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / STATE_FILE)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


class TrainingLog:
    """``training_log.json`` and TensorBoard scalars of a run, written by rank 0 only.

    On resume, rows with a step above ``resume_step`` (written after the checkpoint) are
    dropped so the log continues from the checkpoint without duplicates.
    """

    def __init__(self, config: dict[str, Any], resume_step: int = 0) -> None:
        self.active = rank() == 0
        self.path = Path(config["log_dir"]) / LOG_FILE
        self.rows: list[dict[str, Any]] = []
        self.writer = None
        if not self.active:
            return
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
