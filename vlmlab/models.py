"""The only door to a model: ``load_model(spec)`` returns an :class:`Encoder`.

A model spec is one string used everywhere (CLI ``--model``, configs, store manifests):

- ``open_clip:ViT-B-32/openai``      open_clip architecture name and pretrained tag
- ``open_clip:ViT-B-32``             the architecture with random weights (benchmarks only)
- ``open_clip:hf-hub:org/repo``      an open_clip checkpoint on the Hugging Face hub
- ``open_clip:local-dir:/path``      an open_clip checkpoint directory
- ``hf:openai/clip-vit-base-patch32`` a transformers CLIPModel / SiglipModel (hub id or path)
- ``/path/to/dir``                   a local directory in either format (open_clip preferred
                                     when ``open_clip_config.json`` is present)

Embeddings from :meth:`Encoder.encode_images` and :meth:`Encoder.encode_texts` are L2-normalised
float32 numpy arrays. The model runs on CUDA in half precision when a GPU is visible, else on
CPU in float32. ``dtype="int8"`` (CPU inference only) quantises the image tower's Linear layers
to int8 and runs their matrix products in int8 with per-batch activation scales (PyTorch dynamic
quantisation; see :mod:`vlmlab.quantize`): on a CPU with AVX-512 VNNI a ViT-B/32 then runs about
1.7x faster than in float32, at a cosine of about 0.9997 to the float32 embeddings. A spec that
cannot be loaded raises :class:`ModelSpecError`; nothing ever falls back to another model.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

OPEN_CLIP_CONFIG = "open_clip_config.json"
HF_CONFIG = "config.json"
HF_MODEL_TYPES = ("clip", "siglip", "siglip2")


class ModelSpecError(ValueError):
    """A model spec could not be resolved or loaded; the message says what was tried and what to do."""


@dataclass(frozen=True)
class ResolvedSpec:
    """Which library loads a spec, and the identifier that library is given."""

    backend: str  # "open_clip" or "hf"
    name: str  # open_clip model name (may carry hf-hub:/local-dir:) or transformers id/path
    pretrained: str | None = None  # open_clip pretrained tag or file


def resolve_spec(spec: str) -> ResolvedSpec:
    """Parse a model spec string into the backend and identifier that load it."""
    if not spec or not isinstance(spec, str):
        raise ModelSpecError(f"empty model spec {spec!r}; pass e.g. open_clip:ViT-B-32/openai or a local directory")
    if spec.startswith("open_clip:"):
        rest = spec[len("open_clip:") :]
        if rest.startswith(("hf-hub:", "local-dir:")):
            if rest.startswith("local-dir:"):
                rest = "local-dir:" + str(Path(rest[len("local-dir:") :]).expanduser().resolve())
            return ResolvedSpec("open_clip", rest)
        name, _, pretrained = rest.partition("/")
        return ResolvedSpec("open_clip", name, pretrained or None)
    if spec.startswith("hf:"):
        target = spec[len("hf:") :]
        if Path(target).expanduser().is_dir():
            target = str(Path(target).expanduser().resolve())
        return ResolvedSpec("hf", target)
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path.resolve()
        if (path / OPEN_CLIP_CONFIG).is_file():
            return ResolvedSpec("open_clip", f"local-dir:{path}")
        if (path / HF_CONFIG).is_file():
            return ResolvedSpec("hf", str(path))
        raise ModelSpecError(
            f"model directory {path} holds neither {OPEN_CLIP_CONFIG} (open_clip) nor {HF_CONFIG} "
            "(transformers); build one with `vlmlab tiny --out DIR` or save a model there"
        )
    raise ModelSpecError(
        f"unknown model spec {spec!r}: expected open_clip:NAME/PRETRAINED, open_clip:hf-hub:REPO, "
        f"hf:REPO_ID or an existing local directory (no directory {path} exists)"
    )


LLM2CLIP_UNSUPPORTED = (
    "LLM2CLIP is not supported: its text tower is a Llama-3-8B LLM2Vec encoder "
    "(microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned) run through the `llm2vec` package with "
    "trust_remote_code, and llm2vec (0.2.3, the latest) requires transformers<=4.44.2 and imports attention "
    "classes that transformers 5, which vlmlab runs on, removed. Running it needs its own environment "
    "(transformers 4.44, llm2vec, peft) and local copies of the vision checkpoint with its remote code, the "
    "Llama-3-8B encoder (about 16 GB) and the openai/clip-vit-* image processor; score it there and analyse "
    "the score CSVs with `vlmlab study colours analyze`."
)


def check_supported(spec: str, resolved: ResolvedSpec) -> None:
    """Refuse, with what it would need, a model whose code vlmlab does not run (LLM2CLIP, any checkpoint
    whose config maps AutoModel to its own code), instead of loading it as something it is not."""
    if "llm2clip" in spec.lower():
        raise ModelSpecError(f"{spec!r}: {LLM2CLIP_UNSUPPORTED}")
    config = Path(resolved.name) / HF_CONFIG if resolved.backend == "hf" else None
    if config is None or not config.is_file():
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


def default_device() -> torch.device:
    """CUDA when a GPU is visible to this process, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


PRECISIONS = ("float32", "float16", "bfloat16", "int8")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it (A30), fp16 on older ones (Titan RTX), fp32 on CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass
class Encoder:
    """One interface over open_clip and transformers CLIP-family models.

    ``preprocess`` maps a PIL image to a (3, H, W) float tensor; ``tokenize`` maps texts to the
    dict of tensors ``text_features`` takes. ``image_features``/``text_features`` keep gradients
    and are not normalised (trainers use them); ``encode_*`` are the inference entry points.
    """

    spec: str
    backend: str
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenize: Callable[[Sequence[str]], dict[str, torch.Tensor]]
    embed_dim: int
    device: torch.device
    dtype: torch.dtype
    adapter: str | None = None
    image_size: int = 224
    precision: str = "float32"
    _image_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = field(default=None, repr=False)
    _text_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] = field(default=None, repr=False)

    @property
    def logit_scale(self) -> float:
        """exp of the model's learned temperature: the factor applied to cosine similarities."""
        return float(self.model.logit_scale.detach().float().exp().item())

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings (B, D) for preprocessed pixels (B, 3, H, W); keeps gradients."""
        return self._image_fn(self.model, pixels.to(self.device, self.dtype))

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unnormalised text embeddings (B, D) for the output of ``tokenize``; keeps gradients."""
        return self._text_fn(self.model, {k: v.to(self.device) for k, v in tokens.items()})

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


# --------------------------------------------------------------------------- backends


def _load_open_clip(resolved: ResolvedSpec, device: torch.device) -> dict[str, Any]:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(
        resolved.name, pretrained=resolved.pretrained, device=device
    )
    tokenizer = open_clip.get_tokenizer(resolved.name)
    if resolved.pretrained is None and not resolved.name.startswith(("hf-hub:", "local-dir:")):
        log.warning("open_clip:%s has no pretrained tag: its weights are random", resolved.name)
    image_size = model.visual.image_size
    return {
        "model": model,
        "preprocess": preprocess,
        "tokenize": lambda texts: {"input_ids": tokenizer(list(texts))},
        "embed_dim": int(model.visual.output_dim),
        "image_size": int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size),
        "_image_fn": lambda m, pixels: m.encode_image(pixels),
        "_text_fn": lambda m, tokens: m.encode_text(tokens["input_ids"]),
    }


def _pooled(output: Any) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _load_hf(resolved: ResolvedSpec, device: torch.device) -> dict[str, Any]:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(resolved.name)
    if config.model_type not in HF_MODEL_TYPES:
        raise ModelSpecError(
            f"hf:{resolved.name} is a {config.model_type!r} model; vlmlab loads {', '.join(HF_MODEL_TYPES)}"
        )
    model = AutoModel.from_pretrained(resolved.name).to(device)
    processor = AutoImageProcessor.from_pretrained(resolved.name)
    tokenizer = AutoTokenizer.from_pretrained(resolved.name)
    max_length = int(config.text_config.max_position_embeddings)
    # SigLIP was trained on max_length padding; CLIP ignores padding through its attention mask
    padding = "max_length" if config.model_type.startswith("siglip") else "longest"

    def tokenize(texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(list(texts), padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def preprocess(img: Image.Image) -> torch.Tensor:
        return processor(images=img, return_tensors="pt")["pixel_values"][0]

    return {
        "model": model,
        "preprocess": preprocess,
        "tokenize": tokenize,
        "embed_dim": int(getattr(config, "projection_dim", None) or config.vision_config.hidden_size),
        "image_size": int(config.vision_config.image_size),
        "_image_fn": lambda m, pixels: _pooled(m.get_image_features(pixel_values=pixels)),
        "_text_fn": lambda m, tokens: _pooled(m.get_text_features(**tokens)),
    }


BACKENDS: dict[str, Callable[[ResolvedSpec, torch.device], dict[str, Any]]] = {
    "open_clip": _load_open_clip,
    "hf": _load_hf,
}


def _offline_hint() -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return (
        "If this machine cannot reach the Hugging Face hub"
        + (" (HF_HUB_OFFLINE=1 is set)" if offline else "")
        + ", download the model once elsewhere and pass its local directory as the spec "
        "(or open_clip:local-dir:DIR), or build a test model with `vlmlab tiny --out DIR`."
    )


def load_model(
    spec: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    adapter: str | Path | None = None,
) -> Encoder:
    """Load the model a spec names and return its :class:`Encoder` in eval mode.

    ``device`` defaults to CUDA when available, ``dtype`` to bf16/fp16 on GPU and fp32 on CPU.
    ``dtype`` may also be a name from :data:`PRECISIONS`; ``"int8"`` is dynamic int8 quantisation
    of the image tower's Linear layers for CPU inference (:func:`vlmlab.quantize.quantize_int8`;
    the model can then not be trained).
    ``adapter`` is a LoRA adapter directory (``vlmlab train lora``) applied on top of the spec's
    weights (see :mod:`vlmlab.adapters`); a bad adapter raises ``AdapterError``.
    Raises :class:`ModelSpecError` naming the spec, what was tried, and how to fix it.
    """
    resolved = resolve_spec(spec)
    check_supported(spec, resolved)
    device = torch.device(device) if device is not None else default_device()
    precision = dtype if isinstance(dtype, str) else None
    if precision is not None:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        if precision == "int8" and device.type != "cpu":
            raise ValueError("int8 runs on CPU only (PyTorch dynamic quantisation); "
                             "use float16 or bfloat16 on a GPU")
        dtype = torch.float32 if precision == "int8" else getattr(torch, precision)
    dtype = dtype or default_dtype(device)
    try:
        parts = BACKENDS[resolved.backend](resolved, device)
    except ModelSpecError:
        raise
    except Exception as exc:  # any loader failure becomes one clear error, never a fallback
        tried = (
            f"open_clip.create_model_and_transforms({resolved.name!r}, pretrained={resolved.pretrained!r})"
            if resolved.backend == "open_clip"
            else f"transformers AutoModel.from_pretrained({resolved.name!r})"
        )
        raise ModelSpecError(f"could not load model spec {spec!r}: tried {tried}: {exc}. {_offline_hint()}") from exc
    if adapter is not None:
        from vlmlab.adapters import apply_adapter

        apply_adapter(parts["model"], resolved.backend, adapter)
        adapter = str(Path(adapter).expanduser().resolve())
    precision = precision or str(dtype).removeprefix("torch.")
    encoder = Encoder(spec=spec, backend=resolved.backend, device=device, dtype=dtype, adapter=adapter,
                      precision=precision, **parts)
    encoder.model.to(device=device, dtype=dtype).eval()
    if precision == "int8":
        from vlmlab.quantize import quantize_int8

        quantize_int8(encoder.model)
    log.info("loaded %s (%s) on %s as %s", spec, resolved.backend, device, precision)
    return encoder


# --------------------------------------------------------------------------- weight-free parts


def _open_clip_file_config(name: str) -> dict[str, Any]:
    """The ``open_clip_config.json`` of a ``local-dir:`` or ``hf-hub:`` open_clip model."""
    if name.startswith("local-dir:"):
        path = Path(name[len("local-dir:") :]) / OPEN_CLIP_CONFIG
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(name[len("hf-hub:") :], OPEN_CLIP_CONFIG))
    return json.loads(path.read_text())


def load_preprocess(spec: str) -> Callable[[Image.Image], torch.Tensor]:
    """The image preprocess of ``spec`` without loading its weights (for CPU decode workers).

    It is the same transform :func:`load_model` returns in ``Encoder.preprocess``: open_clip's
    eval transform built from the model's preprocess config, or the transformers image processor.
    """
    resolved = resolve_spec(spec)
    check_supported(spec, resolved)
    try:
        if resolved.backend == "hf":
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(resolved.name)
            return lambda img: processor(images=img, return_tensors="pt")["pixel_values"][0]
        import open_clip

        if resolved.name.startswith(("local-dir:", "hf-hub:")):
            file_config = _open_clip_file_config(resolved.name)
            model_cfg, pp = file_config["model_cfg"], dict(file_config.get("preprocess_cfg", {}))
        else:
            model_cfg = open_clip.get_model_config(resolved.name)
            if model_cfg is None:
                raise ModelSpecError(f"open_clip has no model config named {resolved.name!r}")
            pretrained = open_clip.get_pretrained_cfg(resolved.name, resolved.pretrained or "")
            pp = {k: pretrained[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pretrained}
        pp.setdefault("size", model_cfg["vision_cfg"]["image_size"])
        from open_clip.transform import PreprocessCfg, image_transform_v2

        fields = PreprocessCfg.__dataclass_fields__
        cfg = PreprocessCfg(**{k: tuple(v) if isinstance(v, list) else v for k, v in pp.items() if k in fields})
        return image_transform_v2(cfg, is_train=False)
    except ModelSpecError:
        raise
    except Exception as exc:
        raise ModelSpecError(f"could not build the preprocess of {spec!r}: {exc}. {_offline_hint()}") from exc
