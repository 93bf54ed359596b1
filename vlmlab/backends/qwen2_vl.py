"""The generative VLM door: ``load_vlm(spec)`` returns a :class:`VLM` (Qwen2-VL / Qwen2.5-VL).

A VLM spec follows the rules of :func:`vlmlab.models.load_model` specs:

- ``Qwen/Qwen2-VL-2B-Instruct``  a Hugging Face hub id (downloaded, or read from the hub cache)
- ``hf:Qwen/Qwen2-VL-2B-Instruct`` the same, spelled as encoder specs spell it
- ``/path/to/dir``               a local directory saved by ``save_pretrained`` (``vlmlab vlm tiny``
                                 writes one), loaded the same way

Loading goes through ``AutoModelForImageTextToText`` + ``AutoProcessor``, the path every
transformers 5 image-text-to-text checkpoint takes. ``adapter=DIR`` applies a peft LoRA adapter
(``vlmlab vlm train`` writes one); ``quantization="nf4"`` loads the base weights in 4 bits through
bitsandbytes (Q-LoRA), which needs a CUDA GPU: elsewhere it is refused with the reason. A spec that
cannot be loaded raises :class:`VLMSpecError` naming what was tried and the local alternatives;
nothing ever falls back to another model.

The :class:`VLM` holds the model and processor and the three things every caller does with them:
score a statement (``p_true``: the probability of "True" against "False" at the answer position),
generate an answer, and build supervised batches whose loss covers the answer only (``sft_batch``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

VLM_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
QUANTIZATIONS = ("nf4",)
ADAPTER_META = "vlmlab_adapter.json"
ANSWERS = ("True", "False")


class VLMSpecError(ValueError):
    """A VLM spec, adapter or quantization could not be loaded; the message says what was tried and what to do."""


def resolve_vlm_spec(spec: str) -> str:
    """The hub id or absolute local directory a VLM spec names (``hf:`` prefix dropped).

    An existing directory must hold a ``config.json`` of a supported model type; anything else that
    looks like ``org/name`` is a hub id. Raises :class:`VLMSpecError` otherwise.
    """
    if not spec or not isinstance(spec, str):
        raise VLMSpecError(f"empty VLM spec {spec!r}; pass e.g. Qwen/Qwen2-VL-2B-Instruct or a local directory")
    target = spec[len("hf:"):] if spec.startswith("hf:") else spec
    path = Path(target).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise VLMSpecError(f"VLM directory {path.resolve()} holds no config.json; save a model there with "
                               "save_pretrained or build the tiny one with `vlmlab vlm tiny --out DIR`")
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type not in VLM_MODEL_TYPES:
            raise VLMSpecError(f"{path.resolve()} holds a {model_type!r} model; the VLM door loads "
                               f"{', '.join(VLM_MODEL_TYPES)} (for CLIP-family encoders use load_model)")
        return str(path.resolve())
    if target.count("/") == 1 and not target.startswith(("/", ".", "~")) and all(target.split("/")):
        return target
    raise VLMSpecError(f"unknown VLM spec {spec!r}: expected a hub id such as Qwen/Qwen2-VL-2B-Instruct, "
                       f"hf:ORG/NAME, or an existing local directory (no directory {path} exists)")


def offline_hint(target: str) -> str:
    """What to do when a hub id cannot be reached: the local alternatives."""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return ("If this machine cannot reach the Hugging Face hub" + (" (HF_HUB_OFFLINE=1 is set)" if offline else "")
            + f", download the model once elsewhere (`hf download {target} --local-dir DIR`) and pass DIR as the "
            "spec, or build the offline tiny Qwen2-VL with `vlmlab vlm tiny --out DIR`.")


def default_vlm_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp16 on older ones, fp32 on CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def quantization_config(quantization: str | None, device: torch.device, dtype: torch.dtype) -> Any:
    """The ``BitsAndBytesConfig`` of a quantization name (None: none), or :class:`VLMSpecError` where it cannot run.

    ``"nf4"`` is Q-LoRA's recipe: 4-bit NormalFloat weights, double quantization of the scales,
    compute in ``dtype``. bitsandbytes' 4-bit kernels need a CUDA device; a CPU is refused.
    """
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise VLMSpecError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)} or none")
    if device.type != "cuda":
        raise VLMSpecError(f"4-bit {quantization} loading (Q-LoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels do "
                           f"not run on {device.type}. Use --method lora here, or run on a GPU worker (--use-gpu).")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise VLMSpecError("4-bit loading (Q-LoRA) needs bitsandbytes on the GPU workers: "
                           "pip install 'vlmlab[qlora]' (or bitsandbytes)") from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


@dataclass
class VLM:
    """A loaded image-text-to-text model and its processor, with scoring, generation and SFT batches.

    ``model`` is the transformers model (a peft ``PeftModel`` when an adapter is applied). Prompts
    are user texts; the images follow the text in the one user turn (:meth:`chat_text`). The
    tokenizer pads on the left, so the last position of every row is the answer position.
    """

    spec: str
    model: torch.nn.Module
    processor: Any
    device: torch.device
    dtype: torch.dtype
    adapter: str | None = None
    quantization: str | None = None
    answer_ids: tuple[int, int] = field(default=(0, 0))

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer (left padding)."""
        return self.processor.tokenizer

    def chat_text(self, prompt: str, n_images: int) -> str:
        """The chat-templated text of one user turn, ending at the answer position.

        The prompt comes first and its images right after it, next to the answer: every position of
        an image token then lies at the same distance from the answer whatever the prompt's length,
        and each image token sees the whole prompt. (Qwen2-VL's template takes either order.)
        """
        content = [{"type": "text", "text": prompt}] + [{"type": "image"}] * n_images
        return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    def encode(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]],
               answers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Model inputs for a batch: one prompt and its images per row (optionally followed by an answer)."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
        texts = [self.chat_text(p, len(ims)) for p, ims in zip(prompts, images)]
        if answers is not None:
            eos = self.tokenizer.eos_token or ""
            texts = [t + a + eos for t, a in zip(texts, answers)]
        flat = [im.convert("RGB") for ims in images for im in ims]
        enc = self.processor(text=texts, images=flat or None, return_tensors="pt", padding=True)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in enc.items()}

    def sft_batch(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]],
                  answers: Sequence[str]) -> dict[str, torch.Tensor]:
        """A supervised batch whose ``labels`` cover only each row's answer and end-of-turn token.

        Prompt and padding positions are -100 (ignored by the loss), so the model learns the
        completion, not the prompt.
        """
        enc = self.encode(prompts, images, answers)
        labels = torch.full_like(enc["input_ids"], -100)
        eos = self.tokenizer.eos_token or ""
        for row, answer in enumerate(answers):
            n = len(self.tokenizer(answer + eos, add_special_tokens=False)["input_ids"])
            labels[row, -n:] = enc["input_ids"][row, -n:]
        enc["labels"] = labels
        return enc

    def answer_logits(self, enc: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> torch.Tensor:
        """(B, 2) logits of "True" and "False" at the answer position of encoded prompts."""
        # logits_to_keep=1: only the answer position's logits (a 152k vocabulary at every position is large)
        logits = (model or self.model)(**enc, logits_to_keep=1).logits[:, -1, :]
        return logits[:, list(self.answer_ids)].float()

    @torch.inference_mode()
    def p_true(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]],
               batch_size: int = 16) -> np.ndarray:
        """P("True") against "False" at the answer position, float32 (N,), in batches of ``batch_size``."""
        out = []
        for start in range(0, len(prompts), batch_size):
            enc = self.encode(prompts[start:start + batch_size], images[start:start + batch_size])
            out.append(torch.softmax(self.answer_logits(enc), -1)[:, 0].cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]], max_new_tokens: int = 16,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 50, num_beams: int = 1,
                 batch_size: int = 16) -> list[str]:
        """Decoded answers (special tokens dropped, stripped). ``temperature`` 0 decodes greedily (or beam)."""
        knobs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "num_beams": int(num_beams),
                                 "pad_token_id": self.tokenizer.pad_token_id}
        if temperature > 0:
            knobs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=int(top_k))
        else:
            knobs["do_sample"] = False
        answers: list[str] = []
        for start in range(0, len(prompts), batch_size):
            enc = self.encode(prompts[start:start + batch_size], images[start:start + batch_size])
            tokens = self.model.generate(**enc, **knobs)
            new = tokens[:, enc["input_ids"].shape[1]:]
            answers += [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return answers


def answer_token_ids(tokenizer: Any) -> tuple[int, int]:
    """Ids of the first tokens of "True" and "False" (they must differ for logits scoring)."""
    ids = tuple(tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in ANSWERS)
    if ids[0] == ids[1]:
        raise VLMSpecError("the tokenizer starts 'True' and 'False' with the same token; use --mode generate")
    return ids  # type: ignore[return-value]


def read_adapter_meta(adapter: str | Path) -> dict[str, Any]:
    """The ``vlmlab_adapter.json`` of an adapter directory ({} for a plain peft adapter)."""
    path = Path(adapter).expanduser() / ADAPTER_META
    return json.loads(path.read_text()) if path.is_file() else {}


def load_vlm(spec: str, adapter: str | Path | None = None, device: str | torch.device | None = None,
             dtype: torch.dtype | str | None = None, quantization: str | None = None,
             trainable: bool = False) -> VLM:
    """Load the VLM a spec names (plus an optional LoRA adapter) and return a :class:`VLM` in eval mode.

    ``device`` defaults to CUDA when visible, ``dtype`` to bf16/fp16 on GPU and fp32 on CPU (a name
    such as ``"bfloat16"`` works too). ``quantization="nf4"`` loads 4-bit weights for Q-LoRA (CUDA
    only). ``trainable`` keeps an adapter's LoRA weights trainable (resuming training from it).
    Raises :class:`VLMSpecError` naming the spec, what was tried and the local alternatives.
    """
    target = resolve_vlm_spec(spec)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                          else "cpu")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise VLMSpecError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16")
        dtype = getattr(torch, dtype)
    dtype = dtype or default_vlm_dtype(device)
    bnb = quantization_config(quantization, device, dtype)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        kwargs: dict[str, Any] = {"dtype": dtype}
        if bnb is not None:
            kwargs.update(quantization_config=bnb, device_map={"": device.index or 0})
        model = AutoModelForImageTextToText.from_pretrained(target, **kwargs)
        processor = AutoProcessor.from_pretrained(target)
    except Exception as exc:  # any loader failure becomes one clear error, never a fallback
        hint = "" if Path(target).is_dir() else " " + offline_hint(target)
        raise VLMSpecError(f"could not load VLM spec {spec!r}: tried AutoModelForImageTextToText.from_pretrained"
                           f"({target!r}) and AutoProcessor.from_pretrained: {type(exc).__name__}: {exc}.{hint}"
                           ) from exc
    if getattr(model.config, "model_type", None) not in VLM_MODEL_TYPES:
        raise VLMSpecError(f"{spec!r} is a {model.config.model_type!r} model; the VLM door loads "
                           f"{', '.join(VLM_MODEL_TYPES)}")
    processor.tokenizer.padding_side = "left"
    if bnb is None:
        model.to(device)
    if adapter is not None:
        adapter = str(Path(adapter).expanduser().resolve())
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise VLMSpecError(f"adapter directory {adapter} holds no adapter_config.json; pass the adapter/ "
                               "directory a `vlmlab vlm train` run wrote")
        from peft import PeftModel

        base = read_adapter_meta(adapter).get("base_spec")
        if base and base != spec:
            log.warning("adapter %s was trained on %s; applying it to %s", adapter, base, spec)
        try:
            model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
        except Exception as exc:
            raise VLMSpecError(f"adapter {adapter} does not fit {spec!r}: {type(exc).__name__}: {exc}") from exc
    model.eval()
    log.info("loaded VLM %s%s on %s as %s", spec, f" + {adapter}" if adapter else "", device, dtype)
    return VLM(spec=spec, model=model, processor=processor, device=device, dtype=dtype,
               adapter=str(adapter) if adapter else None, quantization=quantization,
               answer_ids=answer_token_ids(processor.tokenizer))
