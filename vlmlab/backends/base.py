"""What a model family declares: how to load it, preprocess for it, and where its parts live.

Everything that depends on a family's layout (LoRA targets, trainable projection heads, the image
tower's blocks, token taps for the fine-grained loss, the weight-free preprocess) is read from its
:class:`Backend`, so a trainer, the quantiser or the adapter loader never switch on a family name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vlmlab.encoder import Encoder, ResolvedSpec


@dataclass(frozen=True)
class VisionTower:
    """Where a family keeps its image tower, by module and parameter names."""

    module: str  # attribute of the model holding the whole tower ("visual", "vision_model")
    blocks: str  # module path of the transformer block list
    tail: tuple[str, ...]  # parameter-name prefixes after the blocks (trained with the last blocks)
    prefixes: tuple[str, ...]  # parameter-name prefixes of the whole image side (LoRA on the image tower)


@dataclass(frozen=True)
class TokenTaps:
    """Per-token outputs of both towers for the fine-grained (FILIP) loss: the modules whose outputs
    are the final-normed tokens, and the projections into the joint space."""

    image_norm: torch.nn.Module
    text_norm: torch.nn.Module
    image_projection: torch.Tensor
    text_projection: torch.Tensor


class Backend:
    """One model family. Subclasses set the class attributes and implement the methods."""

    name: str = ""
    spec_prefix: str = ""  # "open_clip:", "hf:"
    config_file: str = ""  # the file that marks a local directory of this family
    lora_targets: tuple[str, ...] = ()  # peft target-module suffixes (both towers)
    head_params: tuple[str, ...] = ()  # trained in full next to LoRA: projections and temperature
    vision: VisionTower

    def resolve(self, target: str) -> ResolvedSpec:
        """The :class:`ResolvedSpec` of a spec with this family's prefix removed."""
        raise NotImplementedError

    def resolve_directory(self, path: Path) -> ResolvedSpec:
        """The :class:`ResolvedSpec` of a local directory holding :attr:`config_file`."""
        raise NotImplementedError

    def check_supported(self, spec: str, resolved: ResolvedSpec) -> None:
        """Raise ``ModelSpecError`` for a checkpoint of this family that vlmlab cannot run as it is meant."""

    def describe(self, resolved: ResolvedSpec) -> str:
        """The library call that loads ``resolved`` (for error messages)."""
        raise NotImplementedError

    def load(self, resolved: ResolvedSpec, device: torch.device) -> Encoder:
        """The model on ``device`` in float32 behind an :class:`Encoder` (``load_model`` sets precision)."""
        raise NotImplementedError

    def preprocess(self, resolved: ResolvedSpec) -> Callable[[Image.Image], torch.Tensor]:
        """The model's eval image transform, built without loading its weights."""
        raise NotImplementedError

    def image_features(self, model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised (B, D) image embeddings; keeps gradients."""
        raise NotImplementedError

    def text_features(self, model: torch.nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unnormalised (B, D) text embeddings of ``tokenize`` output; keeps gradients."""
        raise NotImplementedError

    def vision_width(self, model: torch.nn.Module) -> int:
        """The image tower's transformer width (what learning rates are scaled by)."""
        raise NotImplementedError

    def token_taps(self, model: torch.nn.Module) -> TokenTaps | None:
        """Token-level outputs for the fine-grained loss, or None where the family has none."""
        return None
