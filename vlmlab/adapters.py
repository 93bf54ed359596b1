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

from vlmlab.backends import Backend

log = logging.getLogger(__name__)

META_FILE = "vlmlab_adapter.json"
HEADS_FILE = "projection_heads_final.pt"
# the lab's earlier fine-tuning scripts wrote (and their evaluation notebooks load) these names
SEED_LORA_FILE = "lora_final.pt"



class AdapterError(ValueError):
    """An adapter directory is missing, incomplete or does not fit the model it is applied to."""


def add_lora(model: torch.nn.Module, backend: Backend, rank: int = 8, alpha: int = 16, dropout: float = 0.0,
             target_modules: tuple[str, ...] | None = None) -> torch.nn.Module:
    """Inject peft LoRA layers into ``model`` in place and make only LoRA + heads trainable.

    ``target_modules`` are module-name suffixes (default: the backend's ``lora_targets``); the
    backend's ``head_params`` (projections, temperature) train in full beside them.
    Returns the same model object (its forward and ``encode_*`` methods are unchanged).
    """
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(target_modules or backend.lora_targets))
    return _inject(model, backend, config)


def _inject(model: torch.nn.Module, backend: Backend, config: Any) -> torch.nn.Module:
    from peft import inject_adapter_in_model

    for param in model.parameters():
        param.requires_grad_(False)
    inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        if "lora_" in name or name in backend.head_params:
            param.requires_grad_(True)
    model._vlmlab_lora_config = config  # kept for save_adapter
    return model


def head_state(model: torch.nn.Module, backend: Backend) -> dict[str, torch.Tensor]:
    """CPU copies of the projection heads and ``logit_scale`` of ``model``."""
    params = dict(model.named_parameters())
    return {name: params[name].detach().cpu().clone() for name in backend.head_params if name in params}


def save_adapter(model: torch.nn.Module, out: str | Path, base_spec: str, backend: Backend,
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
    config.save_pretrained(str(out))  # peft's own adapter_config.json
    torch.save(head_state(model, backend), out / HEADS_FILE)
    meta = {"base_spec": base_spec, "backend": backend.name, **(extra or {})}
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return out


def read_adapter_meta(adapter: str | Path) -> dict[str, Any]:
    """The ``vlmlab_adapter.json`` of an adapter directory (base_spec, backend name, training figures)."""
    path = Path(adapter) / META_FILE
    if not path.is_file():
        raise AdapterError(f"{adapter} is not an adapter directory (no {META_FILE}); "
                           "train one with `vlmlab train lora`")
    return json.loads(path.read_text())


def apply_adapter(model: torch.nn.Module, backend: Backend, adapter: str | Path) -> torch.nn.Module:
    """Load an adapter directory into ``model`` in place (LoRA layers + heads); returns the model.

    Raises :class:`AdapterError` when the directory is incomplete or was trained for another backend.
    """
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = Path(adapter).expanduser()
    meta = read_adapter_meta(adapter)
    if meta["backend"] != backend.name:
        raise AdapterError(f"adapter {adapter} was trained on a {meta['backend']} model, not {backend.name}; "
                           f"load it with its base spec {meta['base_spec']!r}")
    try:
        config = LoraConfig.from_pretrained(str(adapter))
    except (OSError, ValueError, TypeError) as exc:
        raise AdapterError(f"adapter {adapter}: unreadable adapter_config.json ({exc})") from exc
    _inject(model, backend, config)
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
