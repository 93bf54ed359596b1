"""Real-photo texture set: crops of scikit-image's bundled texture photographs, intact and with defects.

``vlmlab samples textures --out DIR`` writes crops of the ``brick``, ``grass`` and ``gravel``
photographs (``skimage.data``, real photos shipped with the package, so nothing is downloaded),
half of them with a synthetic defect drawn on (a crack, a rust stain or a spalled patch). Classes
read like the lab's inspection classes, ``<surface> normal`` / ``<surface> damaged``, which the
tiny CLIP (trained on rock tiles) has never seen: zero-shot is near chance, few labelled crops help.

Layout, usable both ways:

- YOLO (for ``vlmlab train inspect``): ``images/{train,valid,test}/*.png``, one box covering the
  whole crop in ``labels/<split>/*.txt``, and ``data.yaml``;
- a labels CSV (for ``vlmlab train probe`` / ``evaluate probe``): ``labels.csv`` with
  ``path,label,split`` (paths relative to DIR, so they end with the store paths of
  ``vlmlab extract DIR/images``);
- image-caption pairs (for ``vlmlab train lora``: adapting CLIP to a new domain): ``pairs.parquet``
  with a caption per crop that names its surface and, when damaged, its defect.

Splits come from disjoint horizontal bands of each photograph (top 60 % train, next 20 % valid,
bottom 20 % test), so no test crop shares pixels with a training crop.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SURFACES = ("brick", "grass", "gravel")
CONDITIONS = ("normal", "damaged")
DEFECTS = ("crack", "stain", "spall")
DEFECT_PHRASES = {"crack": "a dark crack", "stain": "a rust stain", "spall": "a spalled pale patch"}
# (split folder, band of the photo's height it is cropped from, share of each class's crops)
SPLITS = (("train", (0.0, 0.6), 0.6), ("valid", (0.6, 0.8), 0.2), ("test", (0.8, 1.0), 0.2))


@dataclass(frozen=True)
class TextureSetConfig:
    """What ``vlmlab samples textures`` writes."""

    per_class: int = field(default=40, metadata={"help": "crops per class (split 60/20/20 train/valid/test)"})
    size: int = field(default=128, metadata={"help": "crop edge in pixels"})
    seed: int = field(default=0, metadata={"help": "random seed; the same seed gives the same files"})


def texture_classes() -> list[str]:
    """Class names in id order: ``brick normal``, ``brick damaged``, ``grass normal``, ..."""
    return [f"{surface} {condition}" for surface in SURFACES for condition in CONDITIONS]


def _photo(name: str) -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB"))


def _crop(photo: np.ndarray, band: tuple[float, float], size: int, rng: np.random.Generator) -> Image.Image:
    """A random square crop inside the band's rows, resized to ``size``, flipped/rotated and re-lit."""
    height, width = photo.shape[:2]
    top, bottom = int(band[0] * height), int(band[1] * height)
    edge = int(rng.integers(80, min(113, bottom - top + 1)))
    y = int(rng.integers(top, bottom - edge + 1))
    x = int(rng.integers(0, width - edge + 1))
    patch = photo[y:y + edge, x:x + edge].astype(np.float32)
    patch = np.rot90(patch, int(rng.integers(4)))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    patch = (patch - patch.mean()) * rng.uniform(0.85, 1.15) + patch.mean() * rng.uniform(0.85, 1.15)
    image = Image.fromarray(np.clip(patch, 0, 255).astype(np.uint8))
    return image.resize((size, size), Image.BICUBIC)


def draw_defect(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A copy of ``image`` with one defect drawn on: a dark ``crack``, a rust ``stain`` or a pale ``spall``."""
    out = image.convert("RGB").copy()
    s = out.width
    if kind == "crack":
        draw = ImageDraw.Draw(out)
        # from near the middle outwards both ways, so most of the crack stays inside the crop
        start = (rng.uniform(0.35, 0.65) * s, rng.uniform(0.35, 0.65) * s)
        heading = rng.uniform(0, 2 * np.pi)
        for direction in (0.0, np.pi):
            pts, angle = [start], heading + direction
            for _ in range(int(rng.integers(3, 6))):
                angle += rng.normal(0, 0.5)
                step = rng.uniform(0.06, 0.11) * s
                pts.append((pts[-1][0] + step * np.cos(angle), pts[-1][1] + step * np.sin(angle)))
            draw.line(pts, fill=(20, 18, 16), width=max(2, s // 36))
        return out
    mask = Image.new("L", out.size, 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = rng.uniform(0.3, 0.7, 2) * s
    radius = rng.uniform(0.14, 0.24) * s
    angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
    draw.polygon([(cx + radius * rng.uniform(0.6, 1.2) * np.cos(a), cy + radius * rng.uniform(0.6, 1.2) * np.sin(a))
                  for a in angles], fill=255)
    if kind == "stain":
        mask = mask.filter(ImageFilter.GaussianBlur(s / 40))
        colour = Image.new("RGB", out.size, (int(rng.integers(110, 150)), int(rng.integers(55, 80)), 25))
        return Image.composite(Image.blend(out, colour, 0.65), out, mask)
    if kind == "spall":
        pale = Image.new("RGB", out.size, tuple([int(rng.integers(185, 215))] * 3))
        return Image.composite(pale, out, mask)
    raise ValueError(f"unknown defect {kind!r}; use one of {DEFECTS}")


def build_texture_set(out: str | Path, cfg: TextureSetConfig = TextureSetConfig()) -> dict:
    """Write the texture set under ``out`` (layout in the module docstring); returns a summary
    (also saved as ``textures.json``): classes, crops per split and class, defects drawn."""
    out = Path(out)
    classes = texture_classes()
    rows: list[dict[str, str]] = []
    counts: dict[str, dict[str, int]] = {split: dict.fromkeys(classes, 0) for split, _, _ in SPLITS}
    defects = dict.fromkeys(DEFECTS, 0)
    for surface in SURFACES:
        photo = _photo(surface)
        for condition in CONDITIONS:
            label = f"{surface} {condition}"
            class_id = classes.index(label)
            n_train = round(cfg.per_class * SPLITS[0][2])
            n_valid = round(cfg.per_class * SPLITS[1][2])
            sizes = (n_train, n_valid, cfg.per_class - n_train - n_valid)
            for (split, band, _), n in zip(SPLITS, sizes):
                (out / "images" / split).mkdir(parents=True, exist_ok=True)
                (out / "labels" / split).mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    rng = np.random.default_rng([cfg.seed, class_id, SPLITS.index((split, band, _)), i])
                    image = _crop(photo, band, cfg.size, rng)
                    caption = f"a photo of intact {surface}"
                    if condition == "damaged":
                        kind = DEFECTS[int(rng.integers(len(DEFECTS)))]
                        image = draw_defect(image, kind, rng)
                        defects[kind] += 1
                        caption = f"a photo of {surface} with {DEFECT_PHRASES[kind]}"
                    stem = f"{surface}_{condition}_{i:04d}"
                    image.save(out / "images" / split / f"{stem}.png")
                    (out / "labels" / split / f"{stem}.txt").write_text(f"{class_id} 0.5 0.5 1.0 1.0\n")
                    rows.append({"path": f"images/{split}/{stem}.png", "label": label,
                                 "split": "val" if split == "valid" else split, "caption": caption})
                    counts[split][label] += 1
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    _write_pairs(out / "pairs.parquet", rows)
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(classes))
    (out / "data.yaml").write_text(
        "# Used by: vlmlab train inspect --data <this file> (written by vlmlab samples textures)\n"
        f"path: .\ntrain: images/train\nval: images/valid\ntest: images/test\nnc: {len(classes)}\nnames:\n{names}\n")
    summary = {"classes": classes, "counts": counts, "defects": defects, "images": len(rows), "seed": cfg.seed,
               "photos": [f"skimage.data.{s}" for s in SURFACES]}
    (out / "textures.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _write_pairs(path: Path, rows: list[dict[str, str]]) -> None:
    """``pairs.parquet`` in the trainers' format: image_path (relative to the file), caption, source, label."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image_path": [r["path"] for r in rows], "caption": [r["caption"] for r in rows],
                             "source": ["real"] * len(rows), "label": [r["label"] for r in rows]}), path)


def main(argv: list[str] | None = None) -> None:
    """``vlmlab samples textures --out DIR [--per-class 40] [--size 128] [--seed 0]``."""
    from vlmlab.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="vlmlab samples textures", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write into")
    add_config_arguments(parser, TextureSetConfig)
    args = parser.parse_args(argv)
    summary = build_texture_set(args.out, config_from_args(TextureSetConfig, args))
    print(f"{summary['images']} texture crops of {len(summary['classes'])} classes -> {args.out} "
          f"(labels.csv, data.yaml); defects drawn: {summary['defects']}")


if __name__ == "__main__":
    main()
