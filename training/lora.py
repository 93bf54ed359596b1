"""LoRA contrastive fine-tuning of a CLIP-family model under Ray Train (DDP or DeepSpeed).

``vlmlab train lora --pairs FILE --model SPEC [--strategy ddp|deepspeed] [--workers N] [--use-gpu]``
trains peft LoRA layers on both towers plus the projection heads and temperature, and writes an
adapter directory (``--out``) that ``load_model(SPEC, adapter=DIR)`` applies. The run directory
(``--run-dir``/``--name``) holds checkpoints, ``training_log.json`` and TensorBoard events;
relaunching the same name resumes from the last epoch checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from training import run
from training.losses import contrastive_loss, fine_grained_loss, rare_class_weights
from training.pairs import available_synthetic_ratio, read_pairs, split_pairs, synthetic_ratio_batch


@dataclass(frozen=True)
class LoraTrainConfig(run.RunSettings):
    """A LoRA contrastive fine-tuning job (adds to the run settings of :class:`training.run.RunSettings`)."""

    pairs: str = field(default="", metadata={"help": "pairs file (Parquet or JSONL)"})
    model: str = field(default="", metadata={"help": "base model spec"})
    out: str = field(default="", metadata={"help": "adapter output directory (default: RUN_DIR/NAME/adapter)"})
    rank: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / rank)"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    target_modules: tuple[str, ...] = field(default=(), metadata={"help": "LoRA target modules (default per backend)"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup steps before the cosine decay"})
    epochs: int = field(default=10, metadata={"help": "epochs"})
    steps_per_epoch: int = field(default=0, metadata={"help": "optimizer steps per epoch (0: pairs / batch)"})
    batch_size: int = field(default=32, metadata={"help": "pairs per worker per micro-batch"})
    synthetic_ratio: float = field(default=0.8, metadata={
        "help": "fraction of each batch drawn from synthetic pairs (at most their share of the training pairs)"})
    fine_grained_weight: float = field(default=0.3, metadata={"help": "weight of the FILIP token-patch loss (0: off)"})
    rare_class_weight: float = field(default=2.0, metadata={"help": "largest loss weight of a rare class"})
    holdout_fraction: float = field(default=0.2, metadata={"help": "pairs held out for retrieval recall"})
    seed: int = field(default=0, metadata={"help": "seed for the split, sampling and init"})


class ContrastiveModel(torch.nn.Module):
    """The encoder's model behind one ``forward`` (so DDP/DeepSpeed see the whole step).

    Returns image and text features and, when ``fine_grained`` is on, projected patch and word
    tokens captured from the towers' final layer norms (open_clip models).
    """

    def __init__(self, encoder, fine_grained: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.clip = encoder.model
        self.fine_grained = fine_grained
        # the learnable temperature lives here as a 1-element tensor: DeepSpeed's parameter
        # broadcast cannot view 0-dim tensors; store_temperature() copies it back before saving
        self.logit_scale = torch.nn.Parameter(self.clip.logit_scale.detach().reshape(1).clone())
        self.clip.logit_scale.requires_grad_(False)
        self._tokens: dict[str, torch.Tensor] = {}
        self.taps = encoder.backend.token_taps(self.clip) if fine_grained else None
        if fine_grained:
            if self.taps is None:
                raise ValueError(f"fine_grained_weight > 0 needs per-token outputs, which {encoder.backend.name} "
                                 "models do not expose here (use an open_clip model); set fine_grained_weight=0")
            self.taps.image_norm.register_forward_hook(lambda m, i, o: self._tokens.__setitem__("patches", o))
            self.taps.text_norm.register_forward_hook(lambda m, i, o: self._tokens.__setitem__("words", o))

    def forward(self, pixels: torch.Tensor, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Features of a batch: ``image``/``text`` (B, D) and, if fine-grained, ``patches``/``words``."""
        out = {"image": self.encoder.image_features(pixels), "text": self.encoder.text_features(tokens)}
        if self.fine_grained:
            out["patches"] = self._tokens["patches"][:, 1:] @ self.taps.image_projection
            out["words"] = self._tokens["words"] @ self.taps.text_projection
        return out

    def store_temperature(self) -> None:
        """Copy the trained temperature into the model's own ``logit_scale`` (before saving an adapter)."""
        with torch.no_grad():
            self.clip.logit_scale.copy_(self.logit_scale.reshape(self.clip.logit_scale.shape))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """LambdaLR: linear warmup to the peak lr over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker of a LoRA run: data, model, optimizer, loop, report (see :func:`train_lora`)."""
    from training.evaluate import recall_at_k
    from vlmlab.adapters import add_lora, save_adapter
    from vlmlab.images import read_image
    from vlmlab.models import load_model

    cfg = LoraTrainConfig(**{f.name: config[f.name] for f in fields(LoraTrainConfig) if f.name in config})
    rank, world = run.rank(), run.world_size()
    torch.manual_seed(cfg.seed)
    device = run.device()

    # data: every image preprocessed once (pair sets here are small); held-out pairs never trained on
    train, held_out = split_pairs(read_pairs(cfg.pairs), cfg.holdout_fraction, cfg.seed)
    class_weight = rare_class_weights(train["label"], cfg.rare_class_weight)
    pair_weights = torch.tensor([class_weight.get(label, 1.0) for label in train["label"]])
    sources = train["source"].to_numpy()
    captions = list(train["caption"])

    # model: frozen backbone + LoRA + trainable heads, full precision (autocast does mixed precision on GPU)
    encoder = load_model(cfg.model, device=device, dtype=torch.float32)
    pixels = encoder.preprocess_batch([read_image(p) for p in train["image_path"]])
    held_pixels = encoder.preprocess_batch([read_image(p) for p in held_out["image_path"]])
    add_lora(encoder.model, encoder.backend, cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules or None)
    model = ContrastiveModel(encoder, cfg.fine_grained_weight > 0)
    encoder.model.train()

    # optimizer: AdamW, warmup + cosine over the whole run
    global_batch = cfg.batch_size * world * cfg.grad_accum
    steps_per_epoch = cfg.steps_per_epoch or max(len(train) // global_batch, 1)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    wrapped = run.wrap(model, optimizer, config, lambda opt: warmup_cosine(opt, cfg.warmup_steps, total_steps))

    # resume: trainable weights, optimizer moments, scheduler, step and epoch
    start_epoch, step, _ = run.resume(wrapped)
    log = run.TrainingLog(config, resume_step=step, total_steps=total_steps)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.use_gpu and torch.cuda.is_available())

    for epoch in range(start_epoch, cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch, rank])
        encoder.model.train()
        for _ in range(steps_per_epoch * cfg.grad_accum):
            idx = synthetic_ratio_batch(sources, cfg.synthetic_ratio, cfg.batch_size, rng)
            tokens = encoder.tokenize([captions[i] for i in idx])
            with autocast:
                out = wrapped.model(pixels[idx].to(device), tokens)
                loss, acc = contrastive_loss(out["image"], out["text"], model.logit_scale, pair_weights[idx])
                if cfg.fine_grained_weight > 0:
                    word_mask = tokens["input_ids"].to(device) != 0
                    loss = loss + cfg.fine_grained_weight * fine_grained_loss(
                        out["patches"], out["words"], word_mask, model.logit_scale)
            if wrapped.backward_step(loss):
                step += 1
                log.step({"step": step, "epoch": epoch, "total_loss": float(loss.item()), **acc})

        # held-out retrieval recall (every worker holds the same weights after the synchronised step)
        encoder.model.eval()
        recall = recall_at_k(encoder.encode_images(held_pixels), encoder.encode_texts(list(held_out["caption"])),
                             held_out["caption"]) if len(held_out) else {}
        metrics = {"epoch": epoch, "step": step, "total_loss": float(loss.item()), **recall,
                   "recall_mean": float(np.mean([recall.get("i2t@1", 0.0), recall.get("t2i@1", 0.0)]))}
        log.flush({f"heldout/{k}": v for k, v in recall.items()}, step)
        if rank == 0 and epoch == cfg.epochs - 1:
            model.store_temperature()
            save_adapter(encoder.model, adapter_dir(cfg, config), cfg.model, encoder.backend,
                         {"recall": recall, "step": step, "config": asdict(cfg)})
        run.report_epoch(metrics, wrapped, epoch, step)


def adapter_dir(cfg: LoraTrainConfig, config: dict[str, Any]) -> Path:
    """Where a run writes its adapter: ``cfg.out`` or ``RUN_DIR/NAME/adapter``."""
    return Path(cfg.out).expanduser().resolve() if cfg.out else Path(config["log_dir"]) / "adapter"


def clamp_synthetic_ratio(cfg: LoraTrainConfig, pairs: pd.DataFrame) -> LoraTrainConfig:
    """``cfg`` with ``synthetic_ratio`` at most the synthetic share of its training split of ``pairs``
    (:func:`training.pairs.available_synthetic_ratio`; warns once, here on the driver, when it clamps)."""
    train, _ = split_pairs(pairs, cfg.holdout_fraction, cfg.seed)  # the split every worker makes
    ratio = available_synthetic_ratio(train["source"].to_numpy(), cfg.synthetic_ratio)
    return cfg if ratio == cfg.synthetic_ratio else replace(cfg, synthetic_ratio=ratio)


def train_lora(cfg: LoraTrainConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Run LoRA fine-tuning on Ray Train; returns ``{"metrics", "adapter", "log_dir", "result"}``.

    Needs Ray initialised (``ray.init`` or a cluster address). Relative paths are resolved here, on the
    driver. A relaunch of the same run resumes it (or reports it, when it already finished); another run
    under the same ``run_dir``/``name`` raises :class:`training.run.RunMismatchError`. Raises
    ``ValueError`` on a missing pairs file or model spec, and Ray's ``TrainingFailedError`` when workers
    fail past ``max_failures``. ``callbacks`` go to :func:`training.run.launch`.
    """
    if not cfg.pairs or not cfg.model:
        raise ValueError("train lora needs --pairs FILE and --model SPEC")
    cfg = run.absolute_paths(cfg, ("pairs", "model", "out"))
    cfg = clamp_synthetic_ratio(cfg, read_pairs(cfg.pairs))  # also fails here, not in a worker, on a bad file
    settings = run.settings_of(cfg)
    log_dir = Path(settings.run_dir).expanduser().resolve() / settings.name
    out = Path(cfg.out) if cfg.out else log_dir / "adapter"
    record = run.prepare_run(settings, run.identity(cfg, data=[cfg.pairs]), cfg.epochs)
    result = None
    if record is None:
        result = run.launch(train_loop, asdict(cfg), settings, callbacks)
        record = run.finish_run(settings, result.metrics, {"adapter": out}, cfg.epochs)
    return {"metrics": record["metrics"], "adapter": out, "log_dir": log_dir, "result": result}


def _report(cfg: LoraTrainConfig, out: dict[str, Any]) -> None:
    print(json.dumps({"metrics": out["metrics"], "adapter": str(out["adapter"])}, default=str))
    print(f"tensorboard --logdir {out['log_dir'] / 'tensorboard'}")


def main(argv: list[str] | None = None) -> None:
    """``vlmlab train lora``: train, then print the final metrics and the adapter directory."""
    run.job_main(LoraTrainConfig, train_lora, argv, prog="vlmlab train lora", description=__doc__.splitlines()[0],
                 report=_report, config_help="YAML file of LoraTrainConfig fields (training/configs/lora.yaml)")


if __name__ == "__main__":
    main()
