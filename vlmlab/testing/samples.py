"""Deterministic procedural sample data standing in for the lab's imagery.

Three sets, all from one seed:
- rock-texture map tiles in the slippy-map layout ``tiles/<z>/<x>/<y>.png`` with a caption and
  a label per tile in ``tiles.csv``; classes form spatial patches so neighbouring tiles tend to
  share a class, as geology does;
- "synthetic" renderings of the same classes (smoother, shifted colours) in ``synthetic/``, so
  real-vs-synthetic tooling and synthetic-ratio samplers have something to chew on;
- infrastructure-inspection scenes (640x640) in YOLO format under ``inspection/`` with the nine
  conditional classes, their spatial layout and a realistic class imbalance;
- a few real photographs from scikit-image in ``photos/`` as out-of-distribution images;
- a procedural NLVR2-style set in ``nlvr/`` (lil-lab layout; see :mod:`vlmlab.testing.nlvr`).

``pairs.parquet`` lists every tile and synthetic image with its caption, source and label: the
corpus format the trainers read.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vlmlab.testing.nlvr import NlvrConfig, write_nlvr

# Rock classes: name -> phrases used in captions. The first phrase is the class description
# used by searches and zero-shot tests.
ROCK_CLASSES: dict[str, list[str]] = {
    "granite": [
        "speckled granite with pink and grey crystals",
        "coarse granite with dark speckles",
        "granite rock with quartz crystals",
    ],
    "sandstone": [
        "layered sandstone with tan bands",
        "banded orange sandstone strata",
        "sandstone with wavy sediment layers",
    ],
    "basalt": [
        "dark vesicular basalt full of holes",
        "black basalt with gas bubbles",
        "porous dark volcanic basalt",
    ],
    "fractured": [
        "fractured rock with dark cracks",
        "grey rock broken by fractures",
        "cracked bedrock with fissures",
    ],
    "weathered": [
        "smooth weathered rock surface",
        "pale eroded smooth rock",
        "weathered beige stone surface",
    ],
    "vegetation": [
        "green vegetation cover",
        "grass and shrubs covering the ground",
        "dense green plants",
    ],
}

CAPTION_TEMPLATES = [
    "a map tile of {}",
    "an aerial image of {}",
    "a close-up texture of {}",
    "{}",
]

# Inspection classes in YOLO id order: object type and condition.
INSPECTION_CLASSES: list[str] = [
    "toe drain normal",
    "toe drain blocked",
    "toe drain damaged",
    "rock toe normal",
    "rock toe damaged",
    "slope drain normal",
    "slope drain blocked",
    "slope drain damaged",
    "vegetation",
]

SKIMAGE_PHOTOS = ("brick", "grass", "gravel")


@dataclass(frozen=True)
class SamplesConfig:
    """What ``vlmlab samples`` writes."""

    seed: int = field(default=0, metadata={"help": "random seed; the same seed gives the same files"})
    grid: int = field(default=16, metadata={"help": "rock tiles per side of the square tile grid"})
    tile_size: int = field(default=128, metadata={"help": "tile edge in pixels"})
    zoom: int = field(default=17, metadata={"help": "slippy-map zoom level of the tiles"})
    patch: int = field(default=4, metadata={"help": "edge in tiles of a same-class geological patch"})
    synthetic: int = field(default=48, metadata={"help": "synthetic rock images to render"})
    scenes: int = field(default=60, metadata={"help": "inspection scenes (split 70/15/15)"})
    scene_size: int = field(default=640, metadata={"help": "inspection scene edge in pixels"})


# --------------------------------------------------------------------------- textures


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1] of shape (size, size) with roughly ``cells`` features per side."""
    coarse = (rng.random((cells, cells)) * 255).astype(np.uint8)
    img = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]


def _granite(rng: np.random.Generator, s: int) -> np.ndarray:
    base = _mix(np.array([205, 150, 140.0]), np.array([160, 158, 155.0]), _value_noise(rng, s, 12))
    grain = rng.random((s // 2, s // 2))
    grain = np.asarray(Image.fromarray((grain * 255).astype(np.uint8)).resize((s, s), Image.NEAREST)) / 255.0
    base[grain < 0.12] = [35, 32, 30]
    base[grain > 0.93] = [245, 245, 240]
    return base


def _sandstone(rng: np.random.Generator, s: int) -> np.ndarray:
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    period = rng.uniform(10, 18) * s / 128
    wave = rng.uniform(2, 6) * np.sin(xx / s * 2 * np.pi * rng.uniform(0.5, 1.5) + rng.uniform(0, 6))
    bands = 0.5 + 0.5 * np.sin(2 * np.pi * (yy + wave) / period)
    t = np.clip(bands * 0.8 + _value_noise(rng, s, 24) * 0.2, 0, 1)
    return _mix(np.array([225, 185, 120.0]), np.array([165, 100, 55.0]), t)


def _basalt(rng: np.random.Generator, s: int) -> np.ndarray:
    base = _mix(np.array([70, 70, 75.0]), np.array([45, 45, 50.0]), _value_noise(rng, s, 20))
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(25, 45) * (s / 128) ** 2)):
        x, y = rng.uniform(0, s, 2)
        r = rng.uniform(2, 7) * s / 128
        draw.ellipse([x - r - 1, y - r - 1, x + r + 1, y + r + 1], fill=(105, 105, 110))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(12, 12, 14))
    return np.asarray(img, dtype=np.float32)


def _fractured(rng: np.random.Generator, s: int) -> np.ndarray:
    base = _mix(np.array([150, 145, 138.0]), np.array([120, 118, 112.0]), _value_noise(rng, s, 16))
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 8))):
        pts = [tuple(rng.uniform(0, s, 2))]
        angle = rng.uniform(0, 2 * np.pi)
        for _ in range(8):
            angle += rng.normal(0, 0.5)
            step = s / 8
            pts.append((pts[-1][0] + step * np.cos(angle), pts[-1][1] + step * np.sin(angle)))
        draw.line(pts, fill=(25, 22, 20), width=int(rng.integers(1, 4)))
    return np.asarray(img, dtype=np.float32)


def _weathered(rng: np.random.Generator, s: int) -> np.ndarray:
    t = _value_noise(rng, s, 3)
    return _mix(np.array([215, 205, 185.0]), np.array([180, 172, 160.0]), t)


def _vegetation(rng: np.random.Generator, s: int) -> np.ndarray:
    t = _value_noise(rng, s, 10) * 0.6 + _value_noise(rng, s, 40) * 0.4
    base = _mix(np.array([40, 95, 30.0]), np.array([110, 170, 60.0]), t)
    soil = _value_noise(rng, s, 8) > 0.8
    base[soil] = [120, 90, 60]
    return base


TEXTURES = {
    "granite": _granite,
    "sandstone": _sandstone,
    "basalt": _basalt,
    "fractured": _fractured,
    "weathered": _weathered,
    "vegetation": _vegetation,
}


def render_rock(label: str, rng: np.random.Generator, size: int, synthetic: bool = False) -> Image.Image:
    """One texture image of rock class ``label``; ``synthetic`` renders the smoother, colour-shifted style."""
    arr = TEXTURES[label](rng, size)
    arr = arr * rng.uniform(0.88, 1.12) + rng.normal(0, 4, arr.shape)  # lighting and sensor noise
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if synthetic:
        img = img.filter(ImageFilter.GaussianBlur(1.2))
        shifted = np.asarray(img, dtype=np.float32) * np.array([1.08, 1.0, 0.9])
        img = Image.fromarray(np.clip(shifted, 0, 255).astype(np.uint8))
    return img


def rock_caption(label: str, rng: np.random.Generator) -> str:
    """A caption for a tile of ``label`` drawn from the class phrases and caption templates."""
    phrase = ROCK_CLASSES[label][int(rng.integers(len(ROCK_CLASSES[label])))]
    return CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(phrase)


def tile_class_grid(cfg: SamplesConfig) -> np.ndarray:
    """Class index per tile, (grid, grid), in patches of ``cfg.patch`` tiles with a few strays."""
    rng = np.random.default_rng(cfg.seed)
    n_classes = len(ROCK_CLASSES)
    cells = -(-cfg.grid // cfg.patch)
    coarse = rng.integers(0, n_classes, size=(cells, cells))
    grid = np.kron(coarse, np.ones((cfg.patch, cfg.patch), dtype=int))[: cfg.grid, : cfg.grid]
    stray = rng.random(grid.shape) < 0.12
    grid[stray] = rng.integers(0, n_classes, size=int(stray.sum()))
    return grid


# --------------------------------------------------------------------------- inspection scenes


def _scene_background(rng: np.random.Generator, s: int) -> Image.Image:
    yy = np.linspace(0, 1, s, dtype=np.float32)[:, None, None]
    top, bottom = np.array([95, 135, 70.0]), np.array([140, 115, 80.0])
    arr = top * (1 - yy) + bottom * yy + (_value_noise(rng, s, 30)[..., None] - 0.5) * 40
    return Image.fromarray(np.clip(arr + rng.normal(0, 5, (s, s, 3)), 0, 255).astype(np.uint8))


def _draw_debris(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: tuple[float, ...], n: int) -> None:
    x0, y0, x1, y1 = box
    for _ in range(n):
        cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
        r = rng.uniform(3, 9)
        colour = (int(rng.integers(70, 110)), int(rng.integers(55, 90)), int(rng.integers(25, 45)))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)


def _draw_cracks(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: tuple[float, ...], n: int) -> None:
    x0, y0, x1, y1 = box
    for _ in range(n):
        pts = [(rng.uniform(x0, x1), rng.uniform(y0, y1))]
        for _ in range(4):
            pts.append(
                (
                    float(np.clip(pts[-1][0] + rng.normal(0, (x1 - x0) / 4), x0, x1)),
                    float(np.clip(pts[-1][1] + rng.normal(0, (y1 - y0) / 4), y0, y1)),
                )
            )
        draw.line(pts, fill=(15, 15, 15), width=3)
    # a missing chunk
    cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
    r = min(x1 - x0, y1 - y0) * 0.25
    draw.polygon([(cx - r, cy), (cx, cy - r), (cx + r * 0.8, cy + r * 0.3), (cx - r * 0.2, cy + r)], fill=(110, 85, 60))


def _draw_drain(draw, rng, box, condition: str) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, fill=(175, 175, 170), outline=(90, 90, 90), width=3)
    horizontal = (x1 - x0) > (y1 - y0)
    if horizontal:
        mid = (y0 + y1) / 2
        draw.rectangle([x0 + 4, mid - 4, x1 - 4, mid + 4], fill=(70, 95, 120))
    else:
        mid = (x0 + x1) / 2
        draw.rectangle([mid - 4, y0 + 4, mid + 4, y1 - 4], fill=(70, 95, 120))
    if condition == "blocked":
        area = (x1 - x0) * (y1 - y0)
        _draw_debris(draw, rng, (x0 + 3, y0 + 3, x1 - 3, y1 - 3), int(area / 90))
    elif condition == "damaged":
        _draw_cracks(draw, rng, box, 4)


def _draw_rock_toe(draw, rng, box, condition: str) -> None:
    x0, y0, x1, y1 = box
    r = (y1 - y0) / 3
    x = x0 + r
    while x < x1 - r:
        for row in range(2):
            cy = y0 + r + row * r * 1.2 + rng.normal(0, 1.5)
            if condition == "damaged" and rng.random() < 0.45:
                draw.ellipse([x - r, cy - r * 0.6, x + r, cy + r * 0.6], fill=(115, 85, 55))
                continue
            g = int(rng.integers(105, 150))
            draw.ellipse([x - r, cy - r, x + r, cy + r], fill=(g, g, g - 5), outline=(60, 60, 60))
        x += r * 1.6
    if condition == "damaged":
        _draw_cracks(draw, rng, box, 2)


def _draw_vegetation(draw, rng, box) -> None:
    x0, y0, x1, y1 = box
    for _ in range(30):
        cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
        r = rng.uniform(5, 14)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(int(rng.integers(20, 60)), int(rng.integers(90, 150)), 25))


def _conditions(rng: np.random.Generator, obj: str) -> str:
    if obj == "toe drain":
        return str(rng.choice(["normal", "blocked", "damaged"], p=[0.6, 0.2, 0.2]))
    if obj == "slope drain":
        return str(rng.choice(["normal", "blocked", "damaged"], p=[0.6, 0.15, 0.25]))
    return str(rng.choice(["normal", "damaged"], p=[0.75, 0.25]))


def render_scene(rng: np.random.Generator, s: int) -> tuple[Image.Image, list[tuple[int, float, float, float, float]]]:
    """One inspection scene and its YOLO labels (class, cx, cy, w, h in [0, 1]).

    Layout follows the lab's data: toe drain low (centre y 0.66-0.79), rock toe just above it,
    slope drains mid-image (centre y 0.44-0.52), vegetation in the upper slope.
    """
    img = _scene_background(rng, s)
    draw = ImageDraw.Draw(img)
    boxes: list[tuple[int, tuple[float, float, float, float]]] = []

    def add(name: str, box: tuple[float, float, float, float]) -> None:
        boxes.append((INSPECTION_CLASSES.index(name), box))

    # toe drain: a wide horizontal channel low in the image
    cy = rng.uniform(0.68, 0.77) * s
    w, h = rng.uniform(0.35, 0.55) * s, rng.uniform(0.05, 0.07) * s
    cx = rng.uniform(0.3, 0.7) * s
    toe = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    condition = _conditions(rng, "toe drain")
    _draw_drain(draw, rng, toe, condition)
    add(f"toe drain {condition}", toe)
    # rock toe: a band of stones just above the toe drain
    rh = rng.uniform(0.06, 0.08) * s
    rock = (toe[0] - 0.05 * s, toe[1] - rh - 0.02 * s, toe[2] + 0.05 * s, toe[1] - 0.02 * s)
    condition = _conditions(rng, "rock toe")
    _draw_rock_toe(draw, rng, rock, condition)
    add(f"rock toe {condition}", rock)
    # slope drains: vertical channels mid-image
    n_slope = int(rng.integers(1, 3))
    slots = rng.permutation([0.2, 0.45, 0.7, 0.85])[:n_slope]
    for sx in slots:
        cx, cy = (sx + rng.uniform(-0.04, 0.04)) * s, rng.uniform(0.45, 0.51) * s
        w, h = rng.uniform(0.06, 0.08) * s, rng.uniform(0.18, 0.24) * s
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        condition = _conditions(rng, "slope drain")
        _draw_drain(draw, rng, box, condition)
        add(f"slope drain {condition}", box)
    # vegetation: bushes in the upper slope
    for _ in range(int(rng.integers(1, 3))):
        cx, cy = rng.uniform(0.15, 0.85) * s, rng.uniform(0.1, 0.28) * s
        w, h = rng.uniform(0.12, 0.2) * s, rng.uniform(0.08, 0.14) * s
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        _draw_vegetation(draw, rng, box)
        add("vegetation", box)

    labels = []
    for cls, (x0, y0, x1, y1) in boxes:
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, s), min(y1, s)
        labels.append((cls, (x0 + x1) / 2 / s, (y0 + y1) / 2 / s, (x1 - x0) / s, (y1 - y0) / s))
    return img, labels


# --------------------------------------------------------------------------- writers


def write_rock_tiles(out: Path, cfg: SamplesConfig) -> list[dict]:
    """Write ``tiles/<z>/<x>/<y>.png`` and ``tiles.csv``; return the CSV rows."""
    grid = tile_class_grid(cfg)
    names = list(ROCK_CLASSES)
    x0, y0 = 2**cfg.zoom // 2, 2**cfg.zoom // 3
    rows = []
    for i in range(cfg.grid):
        for j in range(cfg.grid):
            x, y = x0 + i, y0 + j
            rng = np.random.default_rng([cfg.seed, x, y])
            label = names[int(grid[j, i])]
            path = out / "tiles" / str(cfg.zoom) / str(x) / f"{y}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            render_rock(label, rng, cfg.tile_size).save(path)
            rows.append(
                {
                    "path": str(path.relative_to(out)),
                    "z": cfg.zoom,
                    "x": x,
                    "y": y,
                    "label": label,
                    "caption": rock_caption(label, rng),
                }
            )
    with open(out / "tiles.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def write_synthetic(out: Path, cfg: SamplesConfig) -> list[dict]:
    """Write ``synthetic/<label>_<i>.png`` in the synthetic rendering style; return their rows."""
    names = list(ROCK_CLASSES)
    rows = []
    (out / "synthetic").mkdir(parents=True, exist_ok=True)
    for i in range(cfg.synthetic):
        rng = np.random.default_rng([cfg.seed, 7, i])
        label = names[i % len(names)]
        path = out / "synthetic" / f"{label}_{i:04d}.png"
        render_rock(label, rng, cfg.tile_size, synthetic=True).save(path)
        rows.append({"path": str(path.relative_to(out)), "label": label, "caption": rock_caption(label, rng)})
    return rows


def write_inspection(out: Path, cfg: SamplesConfig) -> dict[str, int]:
    """Write the YOLO-format inspection set under ``inspection/``; return instance counts per class."""
    root = out / "inspection"
    root.mkdir(parents=True, exist_ok=True)  # data.yaml is written even for scenes=0
    n_train = int(round(cfg.scenes * 0.7))
    n_valid = int(round(cfg.scenes * 0.15))
    counts = dict.fromkeys(INSPECTION_CLASSES, 0)
    for k in range(cfg.scenes):
        split = "train" if k < n_train else "valid" if k < n_train + n_valid else "test"
        rng = np.random.default_rng([cfg.seed, 11, k])
        img, labels = render_scene(rng, cfg.scene_size)
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        img.save(root / "images" / split / f"scene_{k:04d}.jpg", quality=92)
        lines = [f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}" for c, cx, cy, w, h in labels]
        (root / "labels" / split / f"scene_{k:04d}.txt").write_text("\n".join(lines) + "\n")
        for c, *_ in labels:
            counts[INSPECTION_CLASSES[c]] += 1
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(INSPECTION_CLASSES))
    (root / "data.yaml").write_text(
        "# Used by: vlmlab train detector --data <this file>; vlmlab train inspect --data <this file>\n"
        "path: .\ntrain: images/train\nval: images/valid\ntest: images/test\n"
        f"nc: {len(INSPECTION_CLASSES)}\nnames:\n{names}\n"
    )
    return counts


def write_photos(out: Path) -> list[str]:
    """Copy scikit-image's bundled texture photographs to ``photos/``; return their relative paths."""
    from skimage import data

    (out / "photos").mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SKIMAGE_PHOTOS:
        arr = getattr(data, name)()
        img = Image.fromarray(arr).convert("RGB")
        path = out / "photos" / f"{name}.png"
        img.save(path)
        paths.append(str(path.relative_to(out)))
    return paths


def write_pairs(out: Path, tiles: list[dict], synthetic: list[dict]) -> Path:
    """Write ``pairs.parquet``: image_path (relative to ``out``), caption, source, label."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [(r["path"], r["caption"], "real", r["label"]) for r in tiles]
    rows += [(r["path"], r["caption"], "synthetic", r["label"]) for r in synthetic]
    table = pa.table(
        {
            "image_path": [r[0] for r in rows],
            "caption": [r[1] for r in rows],
            "source": [r[2] for r in rows],
            "label": [r[3] for r in rows],
        }
    )
    path = out / "pairs.parquet"
    pq.write_table(table, path)
    return path


def copy_tiles(samples_dir: str | Path, out: str | Path, rows: slice = slice(None)) -> list[dict]:
    """Copy the ``rows`` slice of a samples directory's ``tiles.csv`` (e.g. ``slice(None, None, 5)``: every
    fifth tile) into ``out`` with their z/x/y paths, plus ``out/captions.csv`` of those rows (ready for
    ``vlmlab corpus build --captions``); returns the rows copied."""
    import shutil

    samples_dir, out = Path(samples_dir), Path(out)
    with open(samples_dir / "tiles.csv", newline="") as f:
        chosen = list(csv.DictReader(f))[rows]
    for r in chosen:
        (out / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(samples_dir / r["path"], out / r["path"])
    with open(out / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(chosen[0]))
        writer.writeheader()
        writer.writerows(chosen)
    return chosen


def build_samples(out: str | Path, cfg: SamplesConfig = SamplesConfig()) -> dict:
    """Write every sample set under ``out`` and return a summary (also saved as ``samples.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tiles = write_rock_tiles(out, cfg)
    synthetic = write_synthetic(out, cfg)
    counts = write_inspection(out, cfg)
    photos = write_photos(out)
    write_pairs(out, tiles, synthetic)
    summary = {
        "tiles": len(tiles),
        "tile_classes": {c: sum(r["label"] == c for r in tiles) for c in ROCK_CLASSES},
        "synthetic": len(synthetic),
        "inspection_instances": counts,
        "photos": photos,
        "seed": cfg.seed,
        "nlvr": write_nlvr(out / "nlvr", NlvrConfig(seed=cfg.seed)),
    }
    (out / "samples.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    """``vlmlab samples --out DIR``: write the procedural sample data."""
    from vlmlab.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="vlmlab samples", description=main.__doc__)
    parser.add_argument("--out", required=True, help="directory to write into")
    add_config_arguments(parser, SamplesConfig)
    args = parser.parse_args(argv)
    summary = build_samples(args.out, config_from_args(SamplesConfig, args))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
