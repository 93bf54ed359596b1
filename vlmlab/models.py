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

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from vlmlab.backends import BACKENDS, get_backend
from vlmlab.encoder import Encoder, EncoderLike, ModelSpecError, ResolvedSpec

log = logging.getLogger(__name__)

__all__ = ["PRECISIONS", "Encoder", "EncoderLike", "ModelSpecError", "ResolvedSpec", "canonical_spec", "cpu_precision",
           "default_device", "default_dtype", "load_model", "load_preprocess", "resolve_spec", "same_spec"]

PRECISIONS = ("float32", "float16", "bfloat16", "int8")


def resolve_spec(spec: str) -> ResolvedSpec:
    """Parse a model spec string into the backend and identifier that load it (local paths made absolute)."""
    if not spec or not isinstance(spec, str):
        raise ModelSpecError(f"empty model spec {spec!r}; pass e.g. open_clip:ViT-B-32/openai or a local directory")
    for backend in BACKENDS.values():
        if spec.startswith(backend.spec_prefix):
            return backend.resolve(spec[len(backend.spec_prefix):])
    path = Path(spec).expanduser()
    if path.is_dir():
        for backend in BACKENDS.values():
            if (path / backend.config_file).is_file():
                return backend.resolve_directory(path)
        files = " nor ".join(f"{b.config_file} ({b.name})" for b in BACKENDS.values())
        raise ModelSpecError(f"model directory {path.resolve()} holds neither {files}; build one with "
                             "`vlmlab tiny --out DIR` or save a model there")
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
    """Refuse, with what it would need, a model whose code vlmlab does not run (LLM2CLIP; a checkpoint whose
    config maps to its own code, see the backend's ``check_supported``) instead of loading it as something
    it is not."""
    if "llm2clip" in spec.lower():
        raise ModelSpecError(f"{spec!r}: {LLM2CLIP_UNSUPPORTED}")
    get_backend(resolved.backend).check_supported(spec, resolved)


def canonical_spec(spec: str) -> str:
    """``spec`` with any local directory made absolute (same form otherwise), so that a spec recorded in
    a store manifest or an adapter still names the same model from another working directory."""
    prefix, target = "", spec
    for p in ("open_clip:local-dir:", "hf:"):
        if spec.startswith(p):
            prefix, target = p, spec[len(p):]
    path = Path(target).expanduser()
    if (prefix or not spec.startswith("open_clip:")) and path.is_dir():
        return prefix + str(path.resolve())
    return spec


def same_spec(a: str | None, b: str | None) -> bool:
    """Whether two specs name the same model: equal strings, or the same resolved backend and identifier
    (``tiny-clip``, ``./tiny-clip`` and its absolute path are one model)."""
    if a == b:
        return True
    if not a or not b:
        return False
    try:
        return resolve_spec(a) == resolve_spec(b)
    except ModelSpecError:  # a local directory that no longer exists: only the text can be compared
        return canonical_spec(a) == canonical_spec(b)


def default_device() -> torch.device:
    """CUDA when a GPU is visible to this process, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it (A30), fp16 on older ones (Titan RTX), fp32 on CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cpu_precision() -> str:
    """The fastest precision for CLIP inference on this machine's CPU that keeps cosine > 0.999 to float32:
    ``bfloat16`` where the CPU multiplies bf16 matrices in hardware (AMX tiles, AVX-512 BF16: about 3x
    float32 on a ViT-B/32), ``int8`` where it has VNNI but no bf16 units (dynamic quantisation, about
    1.7x), else ``float32``. Measured in ``bench/extract.py``."""
    cpu = getattr(torch, "cpu", None)

    def has(feature: str) -> bool:
        check = getattr(cpu, f"_is_{feature}_supported", None)
        try:
            return bool(check and check())
        except RuntimeError:
            return False

    if has("amx_tile") or has("avx512_bf16"):
        return "bfloat16"
    if has("vnni"):
        return "int8"
    return "float32"


def _offline_hint() -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return (
        "If this machine cannot reach the Hugging Face hub"
        + (" (HF_HUB_OFFLINE=1 is set)" if offline else "")
        + ", download the model once elsewhere and pass its local directory as the spec "
        "(or open_clip:local-dir:DIR), or build a test model with `vlmlab tiny --out DIR`."
    )


def _precision(dtype: torch.dtype | str | None, device: torch.device) -> tuple[torch.dtype, str]:
    """``(torch dtype the weights take, precision name)`` of a dtype or precision name on ``device``."""
    if isinstance(dtype, str):
        if dtype not in PRECISIONS:
            raise ValueError(f"unknown precision {dtype!r}: expected one of {', '.join(PRECISIONS)}")
        if dtype == "int8" and device.type != "cpu":
            raise ValueError("int8 runs on CPU only (PyTorch dynamic quantisation); use float16 or bfloat16 on a GPU")
        return (torch.float32 if dtype == "int8" else getattr(torch, dtype)), dtype
    dtype = dtype or default_dtype(device)
    return dtype, str(dtype).removeprefix("torch.")


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
    backend = get_backend(resolved.backend)
    device = torch.device(device) if device is not None else default_device()
    dtype, precision = _precision(dtype, device)
    try:
        encoder = backend.load(resolved, device)
    except ModelSpecError:
        raise
    except Exception as exc:  # any loader failure becomes one clear error, never a fallback
        raise ModelSpecError(f"could not load model spec {spec!r}: tried {backend.describe(resolved)}: {exc}. "
                             f"{_offline_hint()}") from exc
    if adapter is not None:
        from vlmlab.adapters import apply_adapter

        apply_adapter(encoder.model, backend, adapter)
        adapter = str(Path(adapter).expanduser().resolve())
    encoder.spec, encoder.adapter, encoder.dtype, encoder.precision = spec, adapter, dtype, precision
    encoder.model.to(device=device, dtype=dtype).eval()
    if precision == "int8":
        from vlmlab.quantize import quantize_int8

        quantize_int8(encoder.model, backend.vision.module)
    log.info("loaded %s (%s) on %s as %s", spec, backend.name, device, precision)
    return encoder


def load_preprocess(spec: str) -> Callable[[Image.Image], torch.Tensor]:
    """The image preprocess of ``spec`` without loading its weights (for CPU decode workers).

    It is the same transform :func:`load_model` returns in ``Encoder.preprocess``: open_clip's
    eval transform built from the model's preprocess config, or the transformers image processor.
    """
    resolved = resolve_spec(spec)
    check_supported(spec, resolved)
    try:
        return get_backend(resolved.backend).preprocess(resolved)
    except ModelSpecError:
        raise
    except Exception as exc:
        raise ModelSpecError(f"could not build the preprocess of {spec!r}: {exc}. {_offline_hint()}") from exc
