"""The one encoder interface every pipeline, trainer and endpoint uses, whatever the model family.

:func:`vlmlab.models.load_model` returns an :class:`Encoder`; each model family (open_clip,
transformers CLIP/SigLIP) is a :class:`vlmlab.backends.base.Backend` that builds one. Code that
only embeds (search, classification, Serve's batching stand-in) types its argument as
:class:`EncoderLike`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from vlmlab.backends.base import Backend


class ModelSpecError(ValueError):
    """A model spec could not be resolved or loaded; the message says what was tried and what to do."""


@dataclass(frozen=True)
class ResolvedSpec:
    """Which backend loads a spec, and the identifier that backend's library is given."""

    backend: str  # a name in vlmlab.backends.BACKENDS: "open_clip" or "hf"
    name: str  # open_clip model name (may carry hf-hub:/local-dir:) or transformers id/path
    pretrained: str | None = None  # open_clip pretrained tag or file


@runtime_checkable
class EncoderLike(Protocol):
    """What embedding code needs of an encoder: L2-normalised float32 embeddings of texts and images."""

    spec: str
    embed_dim: int

    @property
    def logit_scale(self) -> float:
        """exp of the model's learned temperature."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) L2-normalised float32 text embeddings."""
        ...

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, D) L2-normalised float32 image embeddings."""
        ...


@dataclass
class Encoder:
    """A loaded CLIP-family model behind one interface.

    ``preprocess`` maps a PIL image to a (3, H, W) float tensor; ``tokenize`` maps texts to the
    dict of tensors ``text_features`` takes. ``image_features``/``text_features`` keep gradients
    and are not normalised (trainers use them); ``encode_*`` are the inference entry points.
    ``backend`` is the model family's :class:`~vlmlab.backends.base.Backend`: where its LoRA
    targets, projection heads and image-tower layout are declared.
    """

    spec: str
    backend: Backend
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenize: Callable[[Sequence[str]], dict[str, torch.Tensor]]
    embed_dim: int
    device: torch.device
    dtype: torch.dtype = torch.float32
    adapter: str | None = None
    image_size: int = 224
    precision: str = "float32"

    @property
    def logit_scale(self) -> float:
        """exp of the model's learned temperature: the factor applied to cosine similarities."""
        return float(self.model.logit_scale.detach().float().exp().item())

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings (B, D) for preprocessed pixels (B, 3, H, W); keeps gradients."""
        return self.backend.image_features(self.model, pixels.to(self.device, self.dtype))

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unnormalised text embeddings (B, D) for the output of ``tokenize``; keeps gradients."""
        return self.backend.text_features(self.model, {k: v.to(self.device) for k, v in tokens.items()})

    def preprocess_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Stack ``preprocess`` over PIL images into (B, 3, H, W)."""
        return torch.stack([self.preprocess(img.convert("RGB")) for img in images])

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image] | torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """L2-normalised float32 embeddings (N, D) of PIL images or preprocessed pixels (N, 3, H, W)."""
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = chunk if isinstance(chunk, torch.Tensor) else self.preprocess_batch(chunk)
            feats = self.image_features(pixels).float()
            out.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """L2-normalised float32 embeddings (N, D) of texts."""
        out = []
        for start in range(0, len(texts), batch_size):
            feats = self.text_features(self.tokenize(list(texts[start : start + batch_size]))).float()
            out.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)
