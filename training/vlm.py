"""Supervised LoRA / Q-LoRA fine-tuning of a VLM on NLVR2 under Ray Train: ``vlmlab vlm train``.

``vlmlab vlm train --model SPEC --data DATA --method lora|qlora [--rank 16 --alpha 32 --targets ...]
--run-dir R --name N [--workers K --use-gpu --strategy ddp|deepspeed]`` teaches the model to answer
"True"/"False" after the lab's prompt: the loss covers the answer and end-of-turn tokens only
(:meth:`vlmlab.backends.qwen2_vl.VLM.sft_batch`). LoRA targets are named explicitly, since peft
has no default for qwen2_vl: the language model's ``q_proj k_proj v_proj o_proj gate_proj up_proj
down_proj`` (``--targets``) and optionally the vision tower's ``qkv proj fc1 fc2``
(``--vision-targets``). ``--method qlora`` loads the base in 4-bit NF4 with double quantization
(bitsandbytes, CUDA only; refused with the reason elsewhere).

The loop is the project's own (one ``train_loop`` on :mod:`training.run`, like the CLIP LoRA
trainer) rather than TRL's ``SFTTrainer``: it shares the launcher's DDP/DeepSpeed wrapping,
checkpoint/resume and TensorBoard log with every other trainer, scores dev accuracy and
consistency with the official metric each epoch, and keeps checkpoints to the adapter and
optimizer state (no base weights). A relaunch with the same ``--run-dir``/``--name`` resumes from
the last epoch's checkpoint. The final adapter (``RUN_DIR/NAME/adapter``, a standard peft adapter
directory plus ``vlmlab_adapter.json``) loads with ``--adapter`` in eval, playground and the endpoint.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import run

LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_TARGETS = ("qkv", "proj", "fc1", "fc2")
METHODS = ("lora", "qlora")
METRIC = "dev_accuracy"


@dataclass(frozen=True)
class VlmTrainConfig(run.RunSettings):
    """An NLVR2 fine-tuning job (adds to the run settings of :class:`training.run.RunSettings`)."""

    model: str = field(default="", metadata={"help": "base VLM spec (hub id, hf:ID or local directory)"})
    data: str = field(default="", metadata={"help": "prepared dataset directory (vlmlab vlm data)"})
    train_split: str = field(default="train", metadata={"help": "split to train on"})
    eval_split: str = field(default="dev", metadata={"help": "held-out split scored every epoch"})
    method: str = field(default="lora", metadata={"help": "lora | qlora (4-bit NF4 base, CUDA only)"})
    rank: int = field(default=16, metadata={"help": "LoRA rank"})
    alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / rank)"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    targets: tuple[str, ...] = field(default=LM_TARGETS, metadata={"help": "language-model LoRA targets"})
    vision_targets: tuple[str, ...] = field(default=(), metadata={"help": "vision-tower LoRA targets (qkv proj "
                                                                         "fc1 fc2); default none"})
    lr: float = field(default=2e-4, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup steps before the cosine decay"})
    epochs: int = field(default=3, metadata={"help": "epochs"})
    steps_per_epoch: int = field(default=0, metadata={"help": "optimizer steps per epoch (0: rows / global batch)"})
    batch_size: int = field(default=8, metadata={"help": "examples per worker per micro-batch"})
    eval_limit: int = field(default=0, metadata={"help": "score only the first N held-out examples (0: all)"})
    eval_batch_size: int = field(default=32, metadata={"help": "examples per scoring forward pass"})
    prompt: str = field(default="", metadata={"help": "prompt template file; default: the dataset's"})
    out: str = field(default="", metadata={"help": "adapter output directory (default: RUN_DIR/NAME/adapter)"})
    seed: int = field(default=0, metadata={"help": "seed for LoRA init and batch order"})


def target_pattern(targets: tuple[str, ...], vision_targets: tuple[str, ...]) -> str:
    """peft ``target_modules`` regex naming the language-model and vision-tower Linear layers explicitly.

    Qwen2-VL's vision blocks also call a Linear ``proj``; anchoring each name to its tower keeps a
    language-model target from catching a vision layer and the other way round.
    """
    unknown = [t for t in targets if t not in LM_TARGETS] + [t for t in vision_targets if t not in VISION_TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}: language model {', '.join(LM_TARGETS)}; "
                         f"vision tower {', '.join(VISION_TARGETS)}")
    if not targets and not vision_targets:
        raise ValueError("no LoRA targets given")
    parts = []
    if targets:
        parts.append(r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(map(re.escape, targets)) + ")")
    if vision_targets:
        parts.append(r".*visual\.blocks\.\d+\.(attn|mlp)\.(" + "|".join(map(re.escape, vision_targets)) + ")")
    return "|".join(f"({p})" for p in parts)


def add_vlm_lora(vlm: Any, cfg: VlmTrainConfig) -> torch.nn.Module:
    """Wrap ``vlm.model`` in a peft LoRA model (Q-LoRA: after ``prepare_model_for_kbit_training``)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = vlm.model
    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=target_pattern(tuple(cfg.targets), tuple(cfg.vision_targets)),
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    vlm.model = model
    return model


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """LambdaLR: linear warmup to the peak lr, then cosine decay to 10% of it at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def score_split(vlm: Any, rows: list[dict[str, Any]], prompt: str, batch_size: int,
                model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Official accuracy/consistency (+ per phenomenon) of logits-mode predictions on ``rows`` (with images)."""
    from vlmlab.images import decode_image
    from vlmlab.nlvr import format_prompt, nlvr_metrics

    predictions = {}
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            enc = vlm.encode([format_prompt(prompt, r["sentence"]) for r in chunk],
                             [[decode_image(r["image0"]), decode_image(r["image1"])] for r in chunk])
            logits = vlm.answer_logits(enc, model)
            for r, true_wins in zip(chunk, (logits[:, 0] >= logits[:, 1]).tolist()):
                predictions[r["identifier"]] = "True" if true_wins else "False"
    return nlvr_metrics(predictions, rows, by="phenomenon")


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: data, model, optimizer, loop, report (see :func:`train_vlm`)."""
    from vlmlab.backends.qwen2_vl import load_vlm
    from vlmlab.images import decode_image
    from vlmlab.nlvr import format_prompt
    from vlmlab.nlvr_data import NlvrDataset

    cfg = VlmTrainConfig(**{f.name: config[f.name] for f in fields(VlmTrainConfig) if f.name in config})
    rank, world = run.rank(), run.world_size()
    torch.manual_seed(cfg.seed)
    device = run.device()

    # data: this worker's share of the training parts (image bytes kept encoded, decoded per batch);
    # rank 0 also holds the held-out rows it scores each epoch
    dataset = NlvrDataset.open(cfg.data)
    prompt = config["prompt_template"]
    parts = dataset.parts(cfg.train_split)
    mine = parts[rank::world] or parts
    import pyarrow.parquet as pq

    train = [r for p in mine for r in pq.read_table(p).to_pylist()]
    held_out = []
    if rank == 0:
        held_out = dataset.rows(cfg.eval_split)
        held_out = held_out[:cfg.eval_limit] if cfg.eval_limit else held_out

    # model: the base through the VLM door (4-bit for Q-LoRA), LoRA on the named targets
    dtype = torch.float32 if device.type == "cpu" else None
    vlm = load_vlm(cfg.model, device=device, dtype=dtype, quantization="nf4" if cfg.method == "qlora" else None)
    model = add_vlm_lora(vlm, cfg)
    model.train()

    # optimizer: AdamW on the LoRA weights, warmup + cosine over the whole run
    global_batch = cfg.batch_size * world * cfg.grad_accum
    steps_per_epoch = cfg.steps_per_epoch or max(dataset.splits[cfg.train_split] // global_batch, 1)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    wrapped = run.wrap(model, optimizer, config, lambda opt: warmup_cosine(opt, cfg.warmup_steps, total_steps))

    # resume: LoRA weights, optimizer (DDP and DeepSpeed alike) and scheduler, epoch and step
    start_epoch, step, _ = run.resume(wrapped)
    resumed_from = step  # 0 on a fresh run
    log = run.TrainingLog(config, resume_step=step)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.use_gpu and torch.cuda.is_available())

    for epoch in range(start_epoch, cfg.epochs):
        order = np.random.default_rng([cfg.seed, epoch, rank]).permutation(len(train))
        model.train()
        for micro in range(steps_per_epoch * cfg.grad_accum):
            idx = [order[(micro * cfg.batch_size + k) % len(order)] for k in range(cfg.batch_size)]
            rows = [train[i] for i in idx]
            batch = vlm.sft_batch([format_prompt(prompt, r["sentence"]) for r in rows],
                                  [[decode_image(r["image0"]), decode_image(r["image1"])] for r in rows],
                                  [r["label"] for r in rows])
            with autocast:
                loss = wrapped.model(**batch).loss
            if wrapped.backward_step(loss):
                step += 1
                log.step({"step": step, "epoch": epoch, "total_loss": float(loss.item()),
                          "lr": float(optimizer.param_groups[0]["lr"])})

        # held-out accuracy and consistency, scored by rank 0 on the unwrapped model
        metrics: dict[str, Any] = {"epoch": epoch, "step": step, "total_loss": float(loss.item()),
                                   "resumed_from_step": resumed_from}
        if rank == 0:
            wrapped.module.eval()
            held = score_split(vlm, held_out, prompt, cfg.eval_batch_size, wrapped.module) if held_out else {}
            metrics.update({METRIC: held.get("accuracy", 0.0), "dev_consistency": held.get("consistency", 0.0),
                            "dev_n": held.get("n", 0)})
            log.flush({"heldout/accuracy": metrics[METRIC], "heldout/consistency": metrics["dev_consistency"]}, step)
            if epoch == cfg.epochs - 1:
                save_vlm_adapter(wrapped.module, adapter_dir(cfg, config), cfg, {**metrics, "heldout": held})
        run.report_epoch(metrics, wrapped, epoch, step)


def adapter_dir(cfg: VlmTrainConfig, config: dict[str, Any]) -> Path:
    """Where a run writes its adapter: ``cfg.out`` or ``RUN_DIR/NAME/adapter``."""
    return Path(cfg.out).expanduser().resolve() if cfg.out else Path(config["log_dir"]) / "adapter"


def save_vlm_adapter(model: torch.nn.Module, out: Path, cfg: VlmTrainConfig, metrics: dict[str, Any]) -> Path:
    """Save the peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``) and ``vlmlab_adapter.json``."""
    from vlmlab.backends.qwen2_vl import ADAPTER_META

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    meta = {"base_spec": cfg.model, "method": cfg.method, "targets": list(cfg.targets),
            "vision_targets": list(cfg.vision_targets), "rank": cfg.rank, "alpha": cfg.alpha,
            "metrics": metrics, "config": asdict(cfg)}
    (out / ADAPTER_META).write_text(json.dumps(meta, indent=1, default=str) + "\n")
    return out


def train_vlm(cfg: VlmTrainConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Fine-tune on Ray Train; returns ``{"metrics", "adapter", "log_dir", "result"}``.

    Needs Ray initialised. Fails early (``ValueError``/``DatasetError``/``VLMSpecError``) on a bad
    dataset, split, method, target list, or Q-LoRA where no CUDA GPU is available.
    """
    from vlmlab.backends.qwen2_vl import quantization_config, resolve_vlm_spec
    from vlmlab.nlvr import check_prompt_template
    from vlmlab.nlvr_data import NlvrDataset

    if not cfg.model or not cfg.data:
        raise ValueError("vlm train needs --model SPEC and --data DATA")
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; use one of {', '.join(METHODS)}")
    resolve_vlm_spec(cfg.model)
    target_pattern(tuple(cfg.targets), tuple(cfg.vision_targets))
    if cfg.method == "qlora":  # refuse here, not inside a worker, where 4-bit cannot run
        device = torch.device("cuda") if cfg.use_gpu and torch.cuda.is_available() else torch.device("cpu")
        quantization_config("nf4", device, torch.bfloat16)
    dataset = NlvrDataset.open(cfg.data)
    dataset.parts(cfg.train_split), dataset.parts(cfg.eval_split)  # unknown splits fail here
    cfg = run.absolute_paths(cfg, ("model", "data", "prompt", "out"))
    prompt = check_prompt_template(Path(cfg.prompt).read_text()) if cfg.prompt else dataset.prompt
    settings = run.settings_of(cfg)
    log_dir = Path(settings.run_dir).expanduser().resolve() / settings.name
    out = Path(cfg.out) if cfg.out else log_dir / "adapter"
    data = [cfg.data, cfg.prompt] if cfg.prompt else [cfg.data]
    record = run.prepare_run(settings, run.identity(cfg, data=data), cfg.epochs)
    result = None
    if record is None:
        result = run.launch(train_loop, {**asdict(cfg), "prompt_template": prompt}, settings, callbacks)
        record = run.finish_run(settings, result.metrics, {"adapter": out}, cfg.epochs)
    return {"metrics": record["metrics"], "adapter": out, "log_dir": log_dir, "result": result}


def _report(cfg: VlmTrainConfig, out: dict[str, Any]) -> None:
    print(json.dumps({"metrics": out["metrics"], "adapter": str(out["adapter"])}, default=str))
    print(f"tensorboard --logdir {out['log_dir'] / 'tensorboard'}")


def main(argv: list[str] | None = None) -> None:
    """``vlmlab vlm train``: train, then print the final metrics, the adapter and the tensorboard command."""
    run.job_main(VlmTrainConfig, train_vlm, argv, prog="vlmlab vlm train",
                 description=__doc__.splitlines()[0], report=_report,
                 config_help="YAML file of VlmTrainConfig fields (training/configs/vlm.yaml)")


if __name__ == "__main__":
    main()
