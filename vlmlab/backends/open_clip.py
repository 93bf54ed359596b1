"""open_clip models: architecture names with pretrained tags, ``hf-hub:`` checkpoints and local
checkpoint directories (``open_clip_config.json`` + weights)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmlab.backends.base import Backend, TokenTaps, VisionTower
from vlmlab.encoder import Encoder, ModelSpecError, ResolvedSpec

log = logging.getLogger(__name__)

CONFIG_FILE = "open_clip_config.json"


class OpenClipBackend(Backend):
    """open_clip CLIP-family models (``open_clip:NAME/TAG``, ``open_clip:hf-hub:REPO``, local dirs)."""

    name = "open_clip"
    spec_prefix = "open_clip:"
    config_file = CONFIG_FILE
    # open_clip's nn.MultiheadAttention computes attention from its packed in_proj/out_proj weights
    # inside F.multi_head_attention_forward, so a LoRA on its out_proj Linear alone never runs:
    # peft's MultiheadAttention layer wraps the whole module ("attn") instead.
    lora_targets = ("attn", "c_fc", "c_proj")
    head_params = ("visual.proj", "text_projection", "logit_scale")
    vision = VisionTower(module="visual", blocks="visual.transformer.resblocks",
                         tail=("visual.ln_post", "visual.proj"), prefixes=("visual.",))

    def resolve(self, target: str) -> ResolvedSpec:
        """``ViT-B-32/openai`` -> name + tag; ``hf-hub:REPO`` as is; ``local-dir:DIR`` made absolute."""
        if target.startswith("local-dir:"):
            return ResolvedSpec(self.name, "local-dir:" + str(Path(target[len("local-dir:"):]).expanduser().resolve()))
        if target.startswith("hf-hub:"):
            return ResolvedSpec(self.name, target)
        name, _, pretrained = target.partition("/")
        return ResolvedSpec(self.name, name, pretrained or None)

    def resolve_directory(self, path: Path) -> ResolvedSpec:
        """A local open_clip checkpoint directory."""
        return ResolvedSpec(self.name, f"local-dir:{path.resolve()}")

    def describe(self, resolved: ResolvedSpec) -> str:
        """The open_clip call that loads ``resolved``."""
        return f"open_clip.create_model_and_transforms({resolved.name!r}, pretrained={resolved.pretrained!r})"

    def load(self, resolved: ResolvedSpec, device: torch.device) -> Encoder:
        """Build the model and its eval transform and tokenizer through open_clip's factory."""
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(
            resolved.name, pretrained=resolved.pretrained, device=device
        )
        tokenizer = open_clip.get_tokenizer(resolved.name)
        if resolved.pretrained is None and not resolved.name.startswith(("hf-hub:", "local-dir:")):
            log.warning("open_clip:%s has no pretrained tag: its weights are random", resolved.name)
        image_size = model.visual.image_size
        return Encoder(
            spec="", backend=self, model=model, preprocess=preprocess, device=device,
            tokenize=lambda texts: {"input_ids": tokenizer(list(texts))},
            embed_dim=int(model.visual.output_dim),
            image_size=int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size),
        )

    def preprocess(self, resolved: ResolvedSpec) -> Callable[[Image.Image], torch.Tensor]:
        """open_clip's eval transform from the model's preprocess config (the file's, or the registry's)."""
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        if resolved.name.startswith(("local-dir:", "hf-hub:")):
            file_config = _file_config(resolved.name)
            model_cfg, pp = file_config["model_cfg"], dict(file_config.get("preprocess_cfg", {}))
        else:
            model_cfg = open_clip.get_model_config(resolved.name)
            if model_cfg is None:
                raise ModelSpecError(f"open_clip has no model config named {resolved.name!r}")
            pretrained = open_clip.get_pretrained_cfg(resolved.name, resolved.pretrained or "")
            pp = {k: pretrained[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pretrained}
        pp.setdefault("size", model_cfg["vision_cfg"]["image_size"])
        fields = PreprocessCfg.__dataclass_fields__
        cfg = PreprocessCfg(**{k: tuple(v) if isinstance(v, list) else v for k, v in pp.items() if k in fields})
        return image_transform_v2(cfg, is_train=False)

    def image_features(self, model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """``model.encode_image``."""
        return model.encode_image(pixels)

    def text_features(self, model: torch.nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """``model.encode_text`` of the token ids."""
        return model.encode_text(tokens["input_ids"])

    def vision_width(self, model: torch.nn.Module) -> int:
        """``visual.transformer.width`` (a ViT's residual width)."""
        return int(model.visual.transformer.width)

    def token_taps(self, model: torch.nn.Module) -> TokenTaps:
        """The towers' final layer norms (patch and word tokens) and the two projections."""
        return TokenTaps(model.visual.ln_post, model.ln_final, model.visual.proj, model.text_projection)


def _file_config(name: str) -> dict[str, Any]:
    """The ``open_clip_config.json`` of a ``local-dir:`` or ``hf-hub:`` open_clip model."""
    if name.startswith("local-dir:"):
        path = Path(name[len("local-dir:") :]) / CONFIG_FILE
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(name[len("hf-hub:") :], CONFIG_FILE))
    return json.loads(path.read_text())
