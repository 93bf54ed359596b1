"""Geometric and photometric augmentations that keep captions true.

A horizontal flip swaps left and right in the caption's spatial phrases, a 180-degree rotation
also swaps upper and lower; crops are central and keep the whole layout's meaning; colour jitter
is small enough that colour words still hold.
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image, ImageEnhance

AUGMENTATIONS = ("flip", "rotate", "crop", "jitter")
_SWAPS = {
    "lr": {"left": "right", "right": "left"},
    "ud": {"upper": "lower", "lower": "upper", "top": "bottom", "bottom": "top"},
}


def swap_phrases(caption: str, axes: str = "lr") -> str:
    """Swap spatial words of the caption: ``axes`` "lr" (left/right), "ud" (upper/lower) or "lrud"."""
    table = {}
    for key in ("lr", "ud"):
        if key in axes:
            table.update(_SWAPS[key])
    pattern = re.compile(r"\b(" + "|".join(table) + r")\b", re.IGNORECASE)

    def repl(m: re.Match) -> str:
        word = table[m.group(0).lower()]
        return word.capitalize() if m.group(0)[0].isupper() else word

    return pattern.sub(repl, caption)


def augment(img: Image.Image, caption: str, kind: str, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """Apply one augmentation ``kind`` (one of ``AUGMENTATIONS``); return the image and its true caption.

    The output has the input's size; ``rng`` decides the crop fraction and jitter strengths.
    """
    img = img.convert("RGB")
    if kind == "flip":
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), swap_phrases(caption, "lr")
    if kind == "rotate":
        return img.transpose(Image.Transpose.ROTATE_180), swap_phrases(caption, "lrud")
    if kind == "crop":
        w, h = img.size
        f = float(rng.uniform(0.75, 0.9))
        cw, ch = int(w * f), int(h * f)
        x0, y0 = (w - cw) // 2, (h - ch) // 2
        return img.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BICUBIC), caption
    if kind == "jitter":
        img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.9, 1.1)))
        img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.9, 1.1)))
        return ImageEnhance.Color(img).enhance(float(rng.uniform(0.9, 1.1))), caption
    raise ValueError(f"unknown augmentation {kind!r}; choose from {', '.join(AUGMENTATIONS)}")
