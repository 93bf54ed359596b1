"""Hugging Face transformers CLIP / SigLIP models (``hf:ID``, hub ids or local directories)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmlab.backends.base import Backend, VisionTower
from vlmlab.encoder import Encoder, ModelSpecError, ResolvedSpec

CONFIG_FILE = "config.json"
MODEL_TYPES = ("clip", "siglip", "siglip2")


class HFBackend(Backend):
    """transformers ``CLIPModel`` / ``SiglipModel`` through ``AutoModel``."""

    name = "hf"
    spec_prefix = "hf:"
    config_file = CONFIG_FILE
    lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    head_params = ("visual_projection.weight", "text_projection.weight", "logit_scale")
    vision = VisionTower(module="vision_model", blocks="vision_model.encoder.layers",
                         tail=("vision_model.post_layernorm", "visual_projection"),
                         prefixes=("vision_model.", "visual_projection."))

    def resolve(self, target: str) -> ResolvedSpec:
        """A hub id as is; an existing local directory made absolute."""
        if Path(target).expanduser().is_dir():
            target = str(Path(target).expanduser().resolve())
        return ResolvedSpec(self.name, target)

    def resolve_directory(self, path: Path) -> ResolvedSpec:
        """A local transformers model directory."""
        return ResolvedSpec(self.name, str(path.resolve()))

    def check_supported(self, spec: str, resolved: ResolvedSpec) -> None:
        """Refuse a local checkpoint whose ``config.json`` maps the Auto classes to its own code (LLM2CLIP among
        them): vlmlab runs no remote code, and loading it as a plain CLIP would silently drop that code."""
        from vlmlab.models import LLM2CLIP_UNSUPPORTED

        config = Path(resolved.name) / CONFIG_FILE
        if not config.is_file():
            return
        try:
            data = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError):
            return  # transformers reports an unreadable config when it loads it
        names = " ".join(data.get("architectures") or []) + " " + json.dumps(data.get("auto_map") or {})
        if "llm2clip" in names.lower():
            raise ModelSpecError(f"{spec!r}: {LLM2CLIP_UNSUPPORTED}")
        if data.get("auto_map"):
            raise ModelSpecError(f"{spec!r}: its config.json maps to the checkpoint's own code (auto_map "
                                 f"{data['auto_map']}); vlmlab does not run remote code, and loading it as a plain "
                                 f"{data.get('model_type', 'model')} would silently drop that code")

    def describe(self, resolved: ResolvedSpec) -> str:
        """The transformers call that loads ``resolved``."""
        return f"transformers AutoModel.from_pretrained({resolved.name!r})"

    def load(self, resolved: ResolvedSpec, device: torch.device) -> Encoder:
        """Model, image processor and tokenizer through the Auto classes; refuses non-CLIP families."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        config = AutoConfig.from_pretrained(resolved.name)
        if config.model_type not in MODEL_TYPES:
            raise ModelSpecError(
                f"hf:{resolved.name} is a {config.model_type!r} model; vlmlab loads {', '.join(MODEL_TYPES)}"
            )
        model = AutoModel.from_pretrained(resolved.name).to(device)
        tokenizer = AutoTokenizer.from_pretrained(resolved.name)
        max_length = int(config.text_config.max_position_embeddings)
        # SigLIP was trained on max_length padding; CLIP ignores padding through its attention mask
        padding = "max_length" if config.model_type.startswith("siglip") else "longest"

        def tokenize(texts: Sequence[str]) -> dict[str, torch.Tensor]:
            enc = tokenizer(list(texts), padding=padding, truncation=True, max_length=max_length,
                            return_tensors="pt")
            return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}

        return Encoder(
            spec="", backend=self, model=model, preprocess=self.preprocess(resolved), tokenize=tokenize,
            device=device, embed_dim=int(getattr(config, "projection_dim", None) or config.vision_config.hidden_size),
            image_size=int(config.vision_config.image_size),
        )

    def preprocess(self, resolved: ResolvedSpec) -> Callable[[Image.Image], torch.Tensor]:
        """The model's ``AutoImageProcessor`` as a PIL -> (3, H, W) transform."""
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(resolved.name)
        return lambda img: processor(images=img, return_tensors="pt")["pixel_values"][0]

    def image_features(self, model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """``get_image_features`` (the projected pooled embedding)."""
        return _pooled(model.get_image_features(pixel_values=pixels))

    def text_features(self, model: torch.nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """``get_text_features`` (the projected pooled embedding)."""
        return _pooled(model.get_text_features(**tokens))

    def vision_width(self, model: torch.nn.Module) -> int:
        """``config.vision_config.hidden_size``."""
        return int(model.config.vision_config.hidden_size)


def _pooled(output: Any) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding
    return output if isinstance(output, torch.Tensor) else output.pooler_output
