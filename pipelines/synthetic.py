"""Synthetic image stages, each a Ray Data callable class sharded over actors.

The lab's synthetic chain has five stages; each is a stage name in ``CHAIN`` so a job composes
the ones it has:

===================  =============================================================  ===========
stage                what it does                                                   status
===================  =============================================================  ===========
super_resolution     upscale low-resolution sources before captioning               not built
vlm_caption          caption each image (``pipelines.captions.VLMCaptioner``)       implemented
grounding            boxes for the caption's nouns (open-vocabulary detector)       not built;
                                                                                    YOLO labels
                                                                                    stand in
segmentation         masks inside the boxes                                         not built;
                                                                                    box crops
                                                                                    stand in
diffusion            text-to-image from captions (:class:`DiffusionStage`)          implemented
===================  =============================================================  ===========

``compose`` (:class:`ComposeStage`) is the CPU route that uses the labelled boxes directly:
object crops from the YOLO inspection set pasted onto backgrounds, with new YOLO labels.
Every stage takes a batch with an ``index`` column and returns rows with ``image`` (PNG bytes),
``caption``, ``label`` and ``yolo`` (label-file text, empty when not a detection sample).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.captions import png_bytes
from vlmlab.images import list_images, read_image

CHAIN = {
    "super_resolution": None,
    "vlm_caption": "pipelines.captions:VLMCaptioner",
    "grounding": None,
    "segmentation": None,
    "diffusion": "pipelines.synthetic:DiffusionStage",
}
SYNTHETIC_STAGES = ("compose", "diffusion")
_WHERE = (("upper", "middle", "lower"), ("left", "centre", "right"))


def read_yolo_objects(inspection_dir: str | Path, split: str = "train") -> list[tuple[Path, int, tuple[float, ...]]]:
    """Every labelled object of a YOLO set: ``(image path, class id, (cx, cy, w, h) normalised)``."""
    root = Path(inspection_dir)
    objects = []
    for img_path in list_images(root / "images" / split):
        label_path = root / "labels" / split / (img_path.stem + ".txt")
        if not label_path.exists():
            continue
        for line in label_path.read_text().split("\n"):
            if line.strip():
                c, *box = line.split()
                objects.append((img_path, int(c), tuple(float(v) for v in box)))
    if not objects:
        raise FileNotFoundError(f"no YOLO labels under {root}/labels/{split}; pass a YOLO dataset dir (data.yaml)")
    return objects


def where_phrase(cx: float, cy: float) -> str:
    """Spatial phrase for a normalised centre: "in the upper left", "in the centre"."""
    r, c = min(int(cy * 3), 2), min(int(cx * 3), 2)
    return "in the centre" if (r, c) == (1, 1) else f"in the {_WHERE[0][r]} {_WHERE[1][c]}"


class ComposeStage:
    """Copy-paste labelled object crops onto background images, up-sampling rare classes.

    Classes are drawn with probability proportional to 1/count so rare inspection classes gain
    the most. Row ``index`` seeds its own generator: the same seed and index give the same image.
    """

    def __init__(self, inspection_dir: str, backgrounds: str, seed: int = 0, size: int = 256, max_objects: int = 3):
        from training.inspect_data import read_data_yaml

        # class names come from the dataset itself, so any lab's YOLO set composes with its own names
        self.names = read_data_yaml(Path(inspection_dir) / "data.yaml")["names"]
        self.objects = read_yolo_objects(inspection_dir)
        self.backgrounds = sorted(list_images(backgrounds))
        if not self.backgrounds:
            raise FileNotFoundError(f"no background images under {backgrounds}")
        counts = np.bincount([o[1] for o in self.objects], minlength=len(self.names)).astype(float)
        present = counts > 0
        self.class_p = np.where(present, 1.0 / np.maximum(counts, 1), 0.0)
        self.class_p /= self.class_p.sum()
        self.seed, self.size, self.max_objects = seed, size, max_objects

    def compose(self, index: int) -> dict[str, Any]:
        """One composed sample: image, YOLO label text, caption and the classes placed."""
        rng = np.random.default_rng([self.seed, 23, index])
        bg = read_image(self.backgrounds[int(rng.integers(len(self.backgrounds)))]).convert("RGB")
        canvas = bg.resize((self.size, self.size), Image.Resampling.BILINEAR)
        lines, phrases, classes = [], [], []
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            c = int(rng.choice(len(self.class_p), p=self.class_p))
            candidates = [o for o in self.objects if o[1] == c]
            path, _, (cx, cy, bw, bh) = candidates[int(rng.integers(len(candidates)))]
            src = read_image(path).convert("RGB")
            sw, sh = src.size
            crop = src.crop((int((cx - bw / 2) * sw), int((cy - bh / 2) * sh),
                             int((cx + bw / 2) * sw), int((cy + bh / 2) * sh)))
            scale = float(rng.uniform(0.2, 0.45)) * self.size / max(crop.size)
            w, h = max(4, int(crop.width * scale)), max(4, int(crop.height * scale))
            crop = crop.resize((w, h), Image.Resampling.BILINEAR)
            x0, y0 = int(rng.integers(0, self.size - w + 1)), int(rng.integers(0, self.size - h + 1))
            canvas.paste(crop, (x0, y0))
            ncx, ncy = (x0 + w / 2) / self.size, (y0 + h / 2) / self.size
            lines.append(f"{c} {ncx:.6f} {ncy:.6f} {w / self.size:.6f} {h / self.size:.6f}")
            phrases.append(f"{self.names[c]} {where_phrase(ncx, ncy)}")
            classes.append(c)
        caption = "an inspection scene with " + ", ".join(phrases)
        return {"image": png_bytes(canvas), "caption": caption, "yolo": "\n".join(lines) + "\n",
                "label": self.names[max(classes, key=lambda k: self.class_p[k])]}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = [self.compose(int(i)) for i in batch["index"]]
        return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


class DiffusionStage:
    """Text-to-image with a diffusers pipeline (local directory or hub id); one actor per device.

    Prompts cycle through ``prompts``; row ``index`` seeds the generator so output is reproducible
    on the same device. Needs the ``diffusion`` extra (``pip install vlmlab[diffusion]``).
    """

    def __init__(self, spec: str, prompts: list[str], seed: int = 0, steps: int = 20, size: int | None = None):
        import torch
        from diffusers import DiffusionPipeline

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = DiffusionPipeline.from_pretrained(spec).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.prompts, self.seed, self.steps, self.size = list(prompts), seed, steps, size

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        indices = [int(i) for i in batch["index"]]
        prompts = [self.prompts[i % len(self.prompts)] for i in indices]
        generators = [self.torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + i) for i in indices]
        kwargs = {"height": self.size, "width": self.size} if self.size else {}
        images = self.pipe(prompts, num_inference_steps=self.steps, generator=generators, **kwargs).images
        return {
            "image": np.array([png_bytes(im.convert("RGB")) for im in images], dtype=object),
            "caption": np.array(prompts, dtype=object),
            "yolo": np.array([""] * len(images), dtype=object),
            "label": np.array([None] * len(images), dtype=object),
        }


def build_tiny_diffusion(out: str | Path, tokenizer_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny randomly-initialised Stable Diffusion pipeline (32 px) for offline tests.

    ``tokenizer_dir`` holds a saved ``CLIPTokenizer`` (the tiny CLIP model's directory does).
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77))
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), cross_attention_dim=32, norm_num_groups=32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=32)
    scheduler = DDIMScheduler(clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)
    return Path(out)


def decode_png(data: bytes) -> Image.Image:
    """PNG bytes from a stage back to an RGB image."""
    return Image.open(io.BytesIO(data)).convert("RGB")
