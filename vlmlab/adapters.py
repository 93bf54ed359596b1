"""LoRA adapters for CLIP-family models: inject, save, and apply on load.

An adapter directory holds what a LoRA run trained on top of a base model:

- ``adapter_config.json`` + ``adapter_model.safetensors``: the peft LoRA weights,
- ``projection_heads_final.pt``: the trained projection heads and ``logit_scale`` (name -> tensor),
- ``vlmlab_adapter.json``: the base model spec and backend it was trained on.

``load_model(spec, adapter=DIR)`` calls :func:`apply_adapter`, so extraction, search and serving
use an adapter through the same door as a plain model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

META_FILE = "vlmlab_adapter.json"
HEADS_FILE = "projection_heads_final.pt"
# the lab's earlier fine-tuning scripts wrote (and their evaluation notebooks load) these names
SEED_LORA_FILE = "lora_final.pt"

# LoRA targets per backend. open_clip's nn.MultiheadAttention computes attention from its packed
# in_proj/out_proj weights inside F.multi_head_attention_forward, so a LoRA on its out_proj Linear
# alone never runs: peft's MultiheadAttention layer wraps the whole module ("attn") instead.
DEFAULT_TARGETS = {
    "open_clip": ("attn", "c_fc", "c_proj"),
    "hf": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
# Parameters trained in full next to LoRA: the projection heads into the joint space and the temperature.
HEAD_PARAMETERS = {
    "open_clip": ("visual.proj", "text_projection", "logit_scale"),
    "hf": ("visual_projection.weight", "text_projection.weight", "logit_scale"),
}


class AdapterError(ValueError):
    """An adapter directory is missing, incomplete or does not fit the model it is applied to."""


def add_lora(model: torch.nn.Module, backend: str, rank: int = 8, alpha: int = 16, dropout: float = 0.0,
             target_modules: tuple[str, ...] | None = None) -> torch.nn.Module:
    """Inject peft LoRA layers into ``model`` in place and make only LoRA + heads trainable.

    ``target_modules`` are module-name suffixes (defaults per backend in ``DEFAULT_TARGETS``).
    Returns the same model object (its forward and ``encode_*`` methods are unchanged).
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(target_modules or DEFAULT_TARGETS[backend])
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    for param in model.parameters():
        param.requires_grad_(False)
    inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        if "lora_" in name or name in HEAD_PARAMETERS[backend]:
            param.requires_grad_(True)
    model._vlmlab_lora_config = config  # kept for save_adapter
    return model


def head_state(model: torch.nn.Module, backend: str) -> dict[str, torch.Tensor]:
    """CPU copies of the projection heads and ``logit_scale`` of ``model``."""
    params = dict(model.named_parameters())
    return {name: params[name].detach().cpu().clone() for name in HEAD_PARAMETERS[backend] if name in params}


def save_adapter(model: torch.nn.Module, out: str | Path, base_spec: str, backend: str,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write the adapter directory of a model prepared by :func:`add_lora`; returns the directory."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = getattr(model, "_vlmlab_lora_config", None)
    if config is None:
        raise AdapterError("model has no LoRA layers: build it with vlmlab.adapters.add_lora first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lora_state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name="default")
                  .items()}
    save_file(lora_state, out / "adapter_model.safetensors")
    torch.save(lora_state, out / SEED_LORA_FILE)
    config_dict = config.to_dict()
    config_dict["target_modules"] = sorted(config_dict["target_modules"])
    (out / "adapter_config.json").write_text(json.dumps(config_dict, indent=1, default=str))
    torch.save(head_state(model, backend), out / HEADS_FILE)
    meta = {"base_spec": base_spec, "backend": backend, **(extra or {})}
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return out


def read_adapter_meta(adapter: str | Path) -> dict[str, Any]:
    """The ``vlmlab_adapter.json`` of an adapter directory (base_spec, backend, training figures)."""
    path = Path(adapter) / META_FILE
    if not path.is_file():
        raise AdapterError(f"{adapter} is not an adapter directory (no {META_FILE}); "
                           "train one with `vlmlab train lora`")
    return json.loads(path.read_text())


def apply_adapter(model: torch.nn.Module, backend: str, adapter: str | Path) -> torch.nn.Module:
    """Load an adapter directory into ``model`` in place (LoRA layers + heads); returns the model.

    Raises :class:`AdapterError` when the directory is incomplete or was trained for another backend.
    """
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = Path(adapter).expanduser()
    meta = read_adapter_meta(adapter)
    if meta["backend"] != backend:
        raise AdapterError(f"adapter {adapter} was trained on a {meta['backend']} model, not {backend}; "
                           f"load it with its base spec {meta['base_spec']!r}")
    config_dict = json.loads((adapter / "adapter_config.json").read_text())
    config = LoraConfig(r=config_dict["r"], lora_alpha=config_dict["lora_alpha"],
                        lora_dropout=config_dict.get("lora_dropout", 0.0),
                        target_modules=list(config_dict["target_modules"]))
    add_lora(model, backend, config.r, config.lora_alpha, config.lora_dropout, tuple(config.target_modules))
    result = set_peft_model_state_dict(model, load_file(adapter / "adapter_model.safetensors"), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise AdapterError(f"adapter {adapter} holds weights this model lacks: {unexpected[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in torch.load(adapter / HEADS_FILE, map_location="cpu").items():
            if name not in params or params[name].shape != value.shape:
                raise AdapterError(f"adapter {adapter}: head {name} does not fit the model (trained on "
                                   f"{meta['base_spec']!r})")
            params[name].copy_(value.to(params[name]))
    for param in model.parameters():
        param.requires_grad_(False)
    return model
