"""Caption enrichment: M2B/B2C algorithmic captions and the VLM captioner stage.

M2B ("map to boxes") splits an image into a 3x3 grid and marks the cells whose colour or edge
density stands out as regions with boxes; B2C ("boxes to captions") turns each region into a
spatial phrase ("green vegetation in the upper left"). Every analysis here is mirror-symmetric:
the caption of a horizontally flipped image is the caption of the original with left and right
swapped, which is what keeps augmented captions true.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROWS = ("upper", "middle", "lower")
COLS = ("left", "centre", "right")
# Colour families and what they usually are in the lab's field imagery.
COLOUR_MEANINGS = {
    "green": "vegetation",
    "blue": "water",
    "grey": "rock or concrete",
    "brown": "soil or sandstone",
    "dark": "shadow or dark rock",
    "bright": "pale bare rock",
}
EDGE_THRESHOLD = 0.15  # Sobel magnitude (image in 0..1) above which a pixel counts as an edge


def to_array(img: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB image as float32 ``(H, W, 3)`` in 0..1."""
    if isinstance(img, np.ndarray):
        arr = img.astype(np.float32)
        return arr / 255.0 if arr.max() > 1.0 else arr
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _grey(arr: np.ndarray) -> np.ndarray:
    return arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _conv3(g: np.ndarray, k: np.ndarray) -> np.ndarray:
    p = np.pad(g, 1, mode="edge")
    h, w = g.shape
    return sum(k[i, j] * p[i:i + h, j:j + w] for i in range(3) for j in range(3))


def sobel_magnitude(arr: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of the grey image, ``(H, W)``; a 0..1 step edge gives about 4."""
    g = _grey(arr)
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float32)
    return np.hypot(_conv3(g, kx), _conv3(g, kx.T))


def laplacian_variance(arr: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image (0..1 scale): low means blurred or flat."""
    k = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float32)
    return float(_conv3(_grey(arr), k).var())


def colour_family(rgb: np.ndarray) -> str:
    """Name the colour family of a mean RGB triple in 0..1 (a key of ``COLOUR_MEANINGS``)."""
    r, g, b = (float(v) for v in rgb)
    lum = 0.299 * r + 0.587 * g + 0.114 * b
    if lum < 0.18:
        return "dark"
    if max(r, g, b) - min(r, g, b) < 0.08:
        return "bright" if lum > 0.75 else "grey"
    if g >= r and g >= b:
        return "green"
    if b >= r and b >= g:
        return "blue"
    return "brown" if r > b + 0.05 else ("bright" if lum > 0.75 else "grey")


@dataclass(frozen=True)
class Region:
    """One M2B region: a grid cell that stands out, its box in pixels and its phrase."""

    row: int
    col: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1
    colour: str
    edge_density: float

    @property
    def where(self) -> str:
        """Spatial phrase of the cell: "in the upper left", "in the centre"."""
        if (self.row, self.col) == (1, 1):
            return "in the centre"
        return f"in the {ROWS[self.row]} {COLS[self.col]}"


def grid_edges(n: int) -> list[int]:
    """Edges of three cells along ``n`` pixels, mirror-symmetric so a flip maps cells onto cells."""
    third = round(n / 3)
    return [0, third, n - third, n]


def cell_region(img: Image.Image | np.ndarray, k: int, cell: dict[str, Any]) -> Region:
    """The :class:`Region` of grid cell ``k`` (row-major) with its analysed colour and edge density."""
    h, w = to_array(img).shape[:2]
    r, c = divmod(k, 3)
    ys, xs = grid_edges(h), grid_edges(w)
    return Region(r, c, (int(xs[c]), int(ys[r]), int(xs[c + 1]), int(ys[r + 1])), cell["colour"], cell["edge_density"])


def analyse_image(img: Image.Image | np.ndarray) -> dict[str, Any]:
    """M2B analysis: edge density, blur, overall and per-cell colour, scene type and stand-out regions.

    Cells are the 3x3 grid with row-major order; a cell is a region when its colour family differs
    from the whole image's or its edge density is 1.5x the image's.
    """
    arr = to_array(img)
    h, w = arr.shape[:2]
    edges = sobel_magnitude(arr) > EDGE_THRESHOLD
    overall = colour_family(arr.reshape(-1, 3).mean(0))
    density = float(edges.mean())
    ys, xs = grid_edges(h), grid_edges(w)
    cells, regions = [], []
    for r in range(3):
        for c in range(3):
            sl = (slice(ys[r], ys[r + 1]), slice(xs[c], xs[c + 1]))
            colour = colour_family(arr[sl].reshape(-1, 3).mean(0))
            cell_density = float(edges[sl].mean())
            cells.append({"colour": colour, "edge_density": cell_density})
            if colour != overall or (cell_density > 1.5 * density and cell_density > 0.05):
                regions.append(Region(r, c, (int(xs[c]), int(ys[r]), int(xs[c + 1]), int(ys[r + 1])),
                                      colour, cell_density))
    fractions = {}
    for cell in cells:
        fractions[cell["colour"]] = fractions.get(cell["colour"], 0.0) + 1 / 9
    return {
        "colour": overall,
        "colour_fractions": fractions,
        "edge_density": density,
        "laplacian_variance": laplacian_variance(arr),
        "brightness": float(_grey(arr).mean()),
        "contrast": float(_grey(arr).std()),
        "cells": cells,
        "regions": regions,
        "scene": scene_type(overall, density),
    }


def scene_type(colour: str, edge_density: float) -> str:
    """A coarse scene type from the dominant colour family and edge density."""
    if colour == "green":
        return "vegetated ground"
    if colour == "blue":
        return "water surface"
    if colour == "dark" and edge_density < 0.02:
        return "dark featureless surface"
    return "rough textured rock" if edge_density > 0.25 else "smooth rock surface"


def algorithmic_caption(img: Image.Image | np.ndarray) -> tuple[str, dict[str, str]]:
    """B2C: caption from the M2B analysis; returns the caption and its parts by source.

    Parts: ``scene`` (scene type + dominant colour), ``edges`` (edge density), ``regions``
    (spatial phrases of stand-out cells, at most three, strongest first).
    """
    a = analyse_image(img)
    parts = {"scene": f"{a['scene']}, mostly {a['colour']} ({COLOUR_MEANINGS[a['colour']]})"}
    level = "dense" if a["edge_density"] > 0.3 else "moderate" if a["edge_density"] > 0.1 else "sparse"
    parts["edges"] = f"{level} edges"
    # Ordered by strength then position so mirrored images list mirrored regions in mirrored order.
    regions = sorted(a["regions"], key=lambda g: (-round(g.edge_density, 3), g.row, abs(g.col - 1), g.col))[:3]
    if regions:
        parts["regions"] = "; ".join(f"{COLOUR_MEANINGS[g.colour]} {g.where}" for g in regions)
    return ", ".join(parts.values()), parts


def enrich_caption(caption: str, img: Image.Image | np.ndarray, vlm_caption: str | None = None
                   ) -> tuple[str, dict[str, str]]:
    """Merge a given caption, an optional VLM caption and the algorithmic one; return the text and
    ``caption_sources`` (which source produced which text: ``given``, ``vlm``, ``m2b``)."""
    algo, _ = algorithmic_caption(img)
    sources = {"given": caption} if caption else {}
    if vlm_caption is not None:
        sources["vlm"] = vlm_caption  # kept even when empty: it records that the VLM ran
    sources["m2b"] = algo
    return "; ".join(v for v in sources.values() if v), sources


def png_bytes(img: Image.Image) -> bytes:
    """Deterministic PNG encoding of an image (same pixels, same bytes)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class VLMCaptioner:
    """Ray Data stage: caption images with a transformers vision-language model (Qwen2-VL class).

    Batch in: ``image`` (PNG bytes). Batch out: adds ``vlm_caption`` (str). Loads from a local
    directory or hub id; greedy decoding so captions are deterministic.
    """

    def __init__(self, spec: str, max_new_tokens: int = 16, prompt: str = "Describe this image."):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(spec)
        self.model = AutoModelForImageTextToText.from_pretrained(spec).eval()
        self.max_new_tokens = max_new_tokens
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        self.text = self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        captions = []
        for data in batch["image"]:
            img = Image.open(io.BytesIO(data)).convert("RGB")
            inputs = self.processor(text=[self.text], images=[img], return_tensors="pt")
            with self.torch.no_grad():
                out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1]:]
            captions.append(self.processor.batch_decode(new, skip_special_tokens=True)[0].strip())
        batch["vlm_caption"] = np.array(captions, dtype=object)
        return batch


def build_tiny_vlm(out: str | Path, seed: int = 0) -> Path:
    """Save a tiny randomly-initialised Qwen2-VL model with a locally built tokenizer and processor.

    For offline tests of :class:`VLMCaptioner`: the text it writes is noise, the plumbing is real.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    words = "a an the of with rock grey green water image describe this . , user assistant system".split()
    vocab = {t: i for i, t in enumerate(specials + words + ["[UNK]", "\n", ":"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(r"(<\|[a-z_]+\|>|\s+|[.,:])", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    config = Qwen2VLConfig(
        text_config={"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                     "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"]},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.save_pretrained(out)
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    video_processor = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=template)
    processor.save_pretrained(out)
    return out
