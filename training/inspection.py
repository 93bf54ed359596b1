"""Condition classifier for inspection crops: a CLIP image tower + a head that starts as zero-shot.

``vlmlab train inspect --data data.yaml --model SPEC [--config training/configs/inspect.yaml] [key=value ...]``
fine-tunes on the object crops of a YOLO dataset (:mod:`training.inspect_data`): the image tower
with its last ``unfrozen_blocks`` blocks trainable (or LoRA, ``tuning=lora``), the text tower
frozen, and a linear head initialised from the prompt-ensembled text embeddings of the class names
times the model's logit scale, so that before the first step the classifier *is* zero-shot CLIP.
Loss: weighted focal loss (per-class alpha = ``focal_alpha`` x inverse-frequency weight, ``gamma``);
batches oversample rare classes and conditions; AdamW + OneCycleLR. It runs on Ray Train through
:func:`training.run.launch` (DDP or DeepSpeed), checkpoints every epoch, stops early when
validation accuracy stalls and keeps the best epoch's model in ``RUN_DIR/NAME/model/``, which
:func:`load_classifier` reads (the detector -> classifier pipeline and Serve use it).

(The module is ``inspection``, not ``inspect``: a ``training/inspect.py`` would shadow the standard
library's ``inspect`` whenever ``training/`` itself is on ``sys.path``.)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from training import run
from vlmlab.backends import Backend

MODEL_DIR = "model"
WEIGHTS_FILE = "classifier.pt"
META_FILE = "classifier.json"
TUNING_MODES = ("blocks", "lora")


@dataclass(frozen=True)
class InspectConfig(run.RunSettings):
    """A condition-classifier fine-tuning job (adds to :class:`training.run.RunSettings`)."""

    name: str = field(default="inspect", metadata={"help": "run name; relaunching the same name resumes it"})
    data: str = field(default="", metadata={"help": "YOLO data.yaml (train and val splits are used)"})
    model: str = field(default="", metadata={"help": "base model spec (vlmlab.models.load_model)"})
    tuning: str = field(default="blocks", metadata={"help": "blocks (last N image blocks trainable) | lora"})
    unfrozen_blocks: int = field(default=4, metadata={"help": "image blocks trained (tuning=blocks; 0: head only)"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank (tuning=lora)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (tuning=lora)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (tuning=lora)"})
    templates: str = field(default="inspection", metadata={"help": "prompt template set for the head's init"})
    crop_margin: float = field(default=0.15, metadata={"help": "context margin around a box, x box size per side"})
    focal_alpha: float = field(default=0.25, metadata={"help": "focal alpha (times the per-class weight)"})
    focal_gamma: float = field(default=2.0, metadata={"help": "focal gamma (0: weighted cross-entropy)"})
    class_weighting: bool = field(default=True, metadata={"help": "per-class alpha inverse to class frequency"})
    rare_oversample: float = field(default=2.5, metadata={"help": "draw factor of rare classes"})
    rare_fraction: float = field(default=0.5, metadata={"help": "rare = fewer examples than this x the largest class"})
    blocked_oversample: float = field(default=3.0, metadata={"help": "draw factor of 'blocked' classes"})
    damaged_oversample: float = field(default=1.0, metadata={"help": "draw factor of 'damaged' classes"})
    lr: float = field(default=0.0, metadata={
        "help": "OneCycleLR peak learning rate (AdamW); 0: scaled to the model (the lab's 2e-5 at ViT-L/14's width "
                "1024, larger for narrower towers: see learning_rate_for)"})
    head_lr_multiplier: float = field(default=1.0, metadata={"help": "head learning rate = lr x this"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    pct_start: float = field(default=0.1, metadata={"help": "OneCycleLR fraction of steps spent warming up"})
    epochs: int = field(default=15, metadata={"help": "epochs (at most: early stopping may end sooner)"})
    steps_per_epoch: int = field(default=0, metadata={"help": "optimizer steps per epoch (0: crops / global batch)"})
    batch_size: int = field(default=16, metadata={"help": "crops per worker per micro-batch"})
    patience: int = field(default=5, metadata={"help": "epochs without a val-accuracy gain before stopping (0: off)"})
    hflip: bool = field(default=True, metadata={"help": "random horizontal flips of training crops"})
    seed: int = field(default=0, metadata={"help": "seed for sampling, flips and init"})


class ConditionClassifier(torch.nn.Module):
    """CLIP image tower + linear head over the L2-normalised image embedding; logits (B, C).

    ``classes`` are the class names in head order; ``crop_margin`` is the margin the crops it was
    trained on used (crop with :func:`training.inspect_data.crop_instance` and this margin).
    """

    def __init__(self, encoder, class_embeddings: np.ndarray, classes: Sequence[str], meta: dict[str, Any]) -> None:
        super().__init__()
        self.encoder = encoder  # vlmlab Encoder: preprocess + image_features; its model is registered below
        self.clip = encoder.model
        self.classes = list(classes)
        self.meta = dict(meta)
        self.crop_margin = float(meta.get("crop_margin", 0.15))
        weight = torch.as_tensor(class_embeddings, dtype=torch.float32) * encoder.logit_scale
        self.head = torch.nn.Linear(weight.shape[1], weight.shape[0]).to(encoder.device)
        with torch.no_grad():
            # logits = logit_scale * cos(image, class text): exactly zero-shot CLIP before training
            self.head.weight.copy_(weight)
            self.head.bias.zero_()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class logits (B, C) float32 for preprocessed pixels (B, 3, H, W); keeps gradients."""
        features = F.normalize(self.encoder.image_features(pixels).float(), dim=-1)
        return self.head(features)

    @torch.inference_mode()
    def predict_pixels(self, pixels: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Class probabilities (N, C) float32 for preprocessed pixels; sets eval mode."""
        self.eval()
        out = [F.softmax(self(pixels[i : i + batch_size]), dim=-1).cpu().numpy()
               for i in range(0, len(pixels), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict_proba(self, crops: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        """Class probabilities (N, C) float32 (rows sum to 1) of PIL crops, columns in :attr:`classes` order."""
        if not len(crops):
            return np.zeros((0, len(self.classes)), np.float32)
        return self.predict_pixels(self.encoder.preprocess_batch(list(crops)), batch_size)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """CPU copies of every trained parameter (the head always): what the model directory stores."""
        names = {n for n, p in self.named_parameters() if p.requires_grad} | {"head.weight", "head.bias"}
        return {n: p.detach().cpu().clone() for n, p in self.named_parameters() if n in names}

    def save(self, out: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the model directory: ``classifier.pt`` (trained weights) + ``classifier.json`` (how to rebuild)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(self.trainable_state(), out / WEIGHTS_FILE)
        meta = {**self.meta, "classes": self.classes, "crop_margin": self.crop_margin, **(extra or {})}
        (out / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
        return out


def _freeze_for_tuning(model: torch.nn.Module, backend: Backend, tuning: str, unfrozen_blocks: int,
                       lora: dict[str, Any]) -> None:
    """Make only the chosen part of the image tower trainable (the text tower always stays frozen).

    Where the tower's blocks, tail and parameters live is the backend's ``vision`` declaration."""
    tower = backend.vision
    for param in model.parameters():
        param.requires_grad_(False)
    if tuning == "lora":
        from vlmlab.adapters import add_lora

        add_lora(model, backend, lora["rank"], lora["alpha"], lora["dropout"])
        # add_lora trains both towers' LoRA layers and heads; the classifier trains the image side only
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name and name.startswith(tower.prefixes))
        return
    if unfrozen_blocks <= 0:
        return
    blocks = model.get_submodule(tower.blocks) if _has_module(model, tower.blocks) else None
    if blocks is None:
        raise ValueError(f"this {backend.name} model has no transformer block list at {tower.blocks}; "
                         "use tuning=lora or unfrozen_blocks=0")
    for block in list(blocks)[-unfrozen_blocks:]:
        block.requires_grad_(True)
    for name, param in model.named_parameters():
        if name.startswith(tower.tail):
            param.requires_grad_(True)


def _has_module(model: torch.nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def build_classifier(spec: str, classes: Sequence[str], templates: str = "inspection", tuning: str = "blocks",
                     unfrozen_blocks: int = 0, lora_rank: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.0,
                     crop_margin: float = 0.15, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None) -> ConditionClassifier:
    """A classifier on ``load_model(spec)`` whose head holds the zero-shot class embeddings.

    Class ``c``'s head row is ``logit_scale x`` the prompt-ensembled (``templates``, see
    :mod:`vlmlab.prompts`) text embedding of ``classes[c]``, so its predictions equal zero-shot CLIP's.
    ``tuning``/``unfrozen_blocks``/``lora_*`` choose which image-tower weights train (none when
    ``tuning=blocks`` and ``unfrozen_blocks=0``: the head alone). Raises ``ValueError`` on a bad mode.
    """
    from vlmlab.models import load_model
    from vlmlab.prompts import ensemble_text_embeddings

    if tuning not in TUNING_MODES:
        raise ValueError(f"unknown tuning {tuning!r}; use one of {', '.join(TUNING_MODES)}")
    encoder = load_model(spec, device=device, dtype=dtype)
    class_embeddings = ensemble_text_embeddings(encoder, list(classes), templates)
    _freeze_for_tuning(encoder.model, encoder.backend, tuning, unfrozen_blocks,
                       {"rank": lora_rank, "alpha": lora_alpha, "dropout": lora_dropout})
    meta = {"base_spec": spec, "backend": encoder.backend.name, "templates": templates, "tuning": tuning,
            "unfrozen_blocks": unfrozen_blocks, "lora_rank": lora_rank, "lora_alpha": lora_alpha,
            "lora_dropout": lora_dropout, "crop_margin": crop_margin, "image_size": encoder.image_size}
    return ConditionClassifier(encoder, class_embeddings, classes, meta)


def model_dir_of(path: str | Path) -> Path:
    """The model directory of a run directory (``RUN/model``) or of a model directory itself."""
    path = Path(path).expanduser().resolve()
    for candidate in (path, path / MODEL_DIR):
        if (candidate / META_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"no classifier at {path}: expected {META_FILE} there or in {path / MODEL_DIR} "
                            "(train one with `vlmlab train inspect`)")


def load_classifier(run_dir_or_model_dir: str | Path, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> ConditionClassifier:
    """Load a trained classifier from ``RUN/`` or ``RUN/model/``, in eval mode.

    Rebuilds the base model (``load_model(base_spec)``) with the same tuning structure and loads the
    trained weights. ``.classes`` are the class names; ``.predict_proba(crops)`` -> (N, C); crop with
    :func:`training.inspect_data.crop_instance` and ``.crop_margin``.
    """
    directory = model_dir_of(run_dir_or_model_dir)
    meta = json.loads((directory / META_FILE).read_text())
    model = build_classifier(meta["base_spec"], meta["classes"], meta["templates"], meta["tuning"],
                             meta["unfrozen_blocks"], meta["lora_rank"], meta["lora_alpha"], meta["lora_dropout"],
                             meta["crop_margin"], device=device, dtype=dtype)
    model.meta = meta
    state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"{directory / WEIGHTS_FILE} holds weights the rebuilt model lacks: {missing[:5]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    return model.eval()


# The lab's recipe: peak lr 2e-5 for ViT-L/14 (width 1024). Adam's best step for a weight matrix falls
# about as 1/width (muP), and the head, which starts at zero-shot text embeddings x logit scale, must
# move as far whatever the tower's width; LR_WIDTH_POWER is measured (bench/inspection_lr.py).
REFERENCE_LR, REFERENCE_WIDTH, LR_WIDTH_POWER = 2e-5, 1024, 2.0


def learning_rate_for(encoder: Any) -> float:
    """The default peak learning rate for ``encoder``'s image tower: ``2e-5 x (1024 / width) ** p``."""
    width = encoder.backend.vision_width(encoder.model)
    return REFERENCE_LR * (REFERENCE_WIDTH / width) ** LR_WIDTH_POWER


def accuracy_and_f1(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy and macro F1 (over the classes present in ``y_true``) of integer labels."""
    from sklearn.metrics import f1_score

    labels = np.unique(y_true)
    return {"accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0,
            "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))}


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker of a classifier run: data, model, optimizer, loop, report (see :func:`train_inspect`)."""
    from training.inspect_data import (
        class_weights,
        crop_all,
        draw_indices,
        oversampling_factors,
        oversampling_weights,
        read_data_yaml,
        read_instances,
    )
    from training.losses import focal_loss

    cfg = InspectConfig(**{f.name: config[f.name] for f in fields(InspectConfig) if f.name in config})
    rank, world = run.rank(), run.world_size()
    torch.manual_seed(cfg.seed)
    device = run.device()

    # data: every crop cropped and preprocessed once per worker (crop sets are small)
    names = read_data_yaml(cfg.data)["names"]
    train, val = read_instances(cfg.data, "train"), read_instances(cfg.data, "val")
    model = build_classifier(cfg.model, names, cfg.templates, cfg.tuning, cfg.unfrozen_blocks, cfg.lora_rank,
                             cfg.lora_alpha, cfg.lora_dropout, cfg.crop_margin, device=device, dtype=torch.float32)
    pixels = model.encoder.preprocess_batch(crop_all(train, cfg.crop_margin))
    val_pixels = model.encoder.preprocess_batch(crop_all(val, cfg.crop_margin))
    targets = torch.tensor([inst.class_id for inst in train])
    val_targets = np.array([inst.class_id for inst in val])
    alpha: torch.Tensor | float = cfg.focal_alpha
    if cfg.class_weighting:
        alpha = torch.from_numpy(class_weights(targets.numpy(), len(names))).to(device) * cfg.focal_alpha
    factors = oversampling_factors(targets.numpy(), names, cfg.rare_oversample, cfg.rare_fraction,
                                   {"blocked": cfg.blocked_oversample, "damaged": cfg.damaged_oversample})
    draw_weights = oversampling_weights(targets.numpy(), factors)

    # optimizer: AdamW (head at lr x multiplier), OneCycleLR over the whole run
    global_batch = cfg.batch_size * world * cfg.grad_accum
    steps_per_epoch = cfg.steps_per_epoch or max(math.ceil(len(train) / global_batch), 1)
    total_steps = steps_per_epoch * cfg.epochs
    head = list(model.head.parameters())
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    lr = cfg.lr or learning_rate_for(model.encoder)
    groups = [{"params": head, "lr": lr * cfg.head_lr_multiplier}]
    groups += [{"params": body, "lr": lr}] if body else []
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)

    def one_cycle(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.OneCycleLR:
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                   total_steps=total_steps, pct_start=cfg.pct_start)

    zero_shot = accuracy_and_f1(val_targets, model.predict_pixels(val_pixels).argmax(1))  # step 0 == zero-shot
    wrapped = run.wrap(model, optimizer, config, one_cycle)

    # resume: trained weights, optimizer moments, scheduler, step, epoch and best-model tracking
    tracker = run.BestTracker(patience=cfg.patience)
    model_dir = Path(config["log_dir"]) / MODEL_DIR
    start_epoch, step, extra = run.resume(wrapped)
    if extra:
        tracker.load(extra["tracker"])
    else:
        # step 0 competes for "best" too: the kept model is never worse on validation than zero-shot
        tracker.update(zero_shot["accuracy"], -1)
        if rank == 0:
            model.save(model_dir, {"data": cfg.data, "epoch": -1, "step": 0, "val": zero_shot,
                                   "val_zero_shot": zero_shot, "config": asdict(cfg)})
    log = run.TrainingLog(config, resume_step=step, total_steps=total_steps)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.use_gpu and torch.cuda.is_available())

    for epoch in range(start_epoch, cfg.epochs):
        # the same draw on every worker, then a disjoint share each: one oversampled epoch in all
        order = draw_indices(draw_weights, steps_per_epoch * global_batch, np.random.default_rng([cfg.seed, epoch]))
        mine = order[rank::world]
        flip_rng = torch.Generator().manual_seed(cfg.seed * 1000 + epoch * 10 + rank)
        model.train()
        for micro in range(steps_per_epoch * cfg.grad_accum):
            idx = torch.from_numpy(mine[micro * cfg.batch_size : (micro + 1) * cfg.batch_size])
            batch = pixels[idx]
            if cfg.hflip:
                flip = torch.rand(len(batch), generator=flip_rng) < 0.5
                batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
            with autocast:
                logits = wrapped.model(batch.to(device))
            loss = focal_loss(logits, targets[idx].to(device), alpha, cfg.focal_gamma)
            if wrapped.backward_step(loss):
                step += 1
                acc = float((logits.argmax(1).cpu() == targets[idx]).float().mean())
                log.step({"step": step, "epoch": epoch, "total_loss": float(loss.item()), "train_accuracy": acc,
                          "lr": float(optimizer.param_groups[-1]["lr"])})

        # validation on every worker (same weights -> same figures -> same early-stopping decision)
        val_scores = accuracy_and_f1(val_targets, model.predict_pixels(val_pixels).argmax(1))
        improved = tracker.update(val_scores["accuracy"], epoch)
        if improved and rank == 0:
            model.save(model_dir, {"data": cfg.data, "epoch": epoch, "step": step, "val": val_scores,
                                   "val_zero_shot": zero_shot, "config": asdict(cfg)})
        metrics = {"epoch": epoch, "step": step, "total_loss": float(loss.item()),
                   "val_accuracy": val_scores["accuracy"], "val_macro_f1": val_scores["macro_f1"],
                   "zero_shot_val_accuracy": zero_shot["accuracy"], "zero_shot_val_macro_f1": zero_shot["macro_f1"],
                   "best_val_accuracy": tracker.best, "best_epoch": tracker.best_epoch, "peak_lr": lr}
        log.flush({f"val/{k}": v for k, v in val_scores.items()}, step)
        run.report_epoch(metrics, wrapped, epoch, step, {"tracker": tracker.state()})
        if tracker.should_stop:
            break


def train_inspect(cfg: InspectConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Fine-tune the condition classifier on Ray Train.

    Returns ``{"metrics", "model_dir", "log_dir", "result", "kept", "best_val_accuracy", "best_epoch"}``:
    ``model_dir`` (``RUN_DIR/NAME/model``) holds the best epoch by validation accuracy, and ``kept`` says
    whether that is a fine-tuned epoch or still the zero-shot head (training did not beat it; said
    loudly, with what to change). Needs Ray initialised. A relaunch of the same run resumes it; another
    run under the same name raises :class:`training.run.RunMismatchError`. Raises
    ``ValueError``/``FileNotFoundError`` on a missing data file, split or model spec.
    """
    from training.inspect_data import read_data_yaml

    if not cfg.data or not cfg.model:
        raise ValueError("train inspect needs --data data.yaml and --model SPEC")
    if cfg.tuning not in TUNING_MODES:
        raise ValueError(f"unknown tuning {cfg.tuning!r}; use one of {', '.join(TUNING_MODES)}")
    cfg = run.absolute_paths(cfg, ("data", "model"))
    spec = read_data_yaml(cfg.data)  # fail here, not inside a worker
    missing = [s for s in ("train", "val") if s not in spec["splits"]]
    if missing:
        raise ValueError(f"{cfg.data} lacks the {missing} split(s) the classifier trains and validates on")
    settings = run.settings_of(cfg)
    log_dir = Path(settings.run_dir).expanduser().resolve() / settings.name
    record = run.prepare_run(settings, run.identity(cfg, data=[cfg.data, spec["root"]]), cfg.epochs)
    result = None
    if record is None:
        result = run.launch(train_loop, asdict(cfg), settings, callbacks)
        record = run.finish_run(settings, result.metrics, {"model": log_dir / MODEL_DIR}, cfg.epochs,
                                **kept_model(log_dir / MODEL_DIR))
    return {"metrics": record["metrics"], "model_dir": log_dir / MODEL_DIR, "log_dir": log_dir, "result": result,
            **{k: record.get(k) for k in ("kept", "best_val_accuracy", "best_epoch", "zero_shot_val_accuracy")}}


def kept_model(model_dir: Path) -> dict[str, Any]:
    """Which model the run kept: ``{"kept": "fine-tuned"|"zero-shot", "best_val_accuracy", "best_epoch",
    "zero_shot_val_accuracy"}`` from the model directory's metadata (epoch -1 is the zero-shot head)."""
    meta = json.loads((model_dir / META_FILE).read_text())
    return {"kept": "zero-shot" if int(meta.get("epoch", -1)) < 0 else "fine-tuned",
            "best_val_accuracy": meta.get("val", {}).get("accuracy"), "best_epoch": int(meta.get("epoch", -1)),
            "zero_shot_val_accuracy": meta.get("val_zero_shot", {}).get("accuracy")}


DID_NOT_LEARN = ("!!! training did not beat zero-shot on validation (best {best:.3f} = zero-shot, kept the zero-shot "
                 "head): RUN/model is NOT fine-tuned. Try a larger lr (now {lr:g}; e.g. lr={bigger:g}), more "
                 "unfrozen_blocks (now {blocks}), a larger head_lr_multiplier (now {head:g}) or more epochs (now "
                 "{epochs}) !!!")


def _report(cfg: InspectConfig, out: dict[str, Any]) -> None:
    print(json.dumps({"metrics": out["metrics"], "model_dir": str(out["model_dir"]), "kept": out["kept"],
                      "best_val_accuracy": out["best_val_accuracy"], "best_epoch": out["best_epoch"]}, default=str))
    if out["kept"] == "zero-shot":
        lr = out["metrics"].get("peak_lr", cfg.lr)
        print(DID_NOT_LEARN.format(best=out["best_val_accuracy"] or 0.0, lr=lr, bigger=lr * 10,
                                   blocks=cfg.unfrozen_blocks, head=cfg.head_lr_multiplier, epochs=cfg.epochs))
    print(f"vlmlab evaluate inspect --run {out['log_dir']} --split test")
    print(f"tensorboard --logdir {out['log_dir'] / 'tensorboard'}")


def main(argv: list[str] | None = None) -> None:
    """``vlmlab train inspect``: train, then print the final metrics, the kept model and what to run next."""
    run.job_main(InspectConfig, train_inspect, argv, prog="vlmlab train inspect",
                 description=__doc__.splitlines()[0], report=_report,
                 config_help="YAML file of InspectConfig fields (training/configs/inspect.yaml)")


if __name__ == "__main__":
    main()
