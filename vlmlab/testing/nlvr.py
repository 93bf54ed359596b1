"""A procedural NLVR-style set in the lil-lab NLVR2 layout: pairs of rendered scenes with true and
false statements about them.

Each *set* (an NLVR2 ``set_id``) is four image pairs and two sentences; every sentence is paired
with all four pairs, true on two of them and false on the other two, so the official consistency
(all pairs of a sentence right) is meaningful. Scenes hold one to three shapes (circle, square,
triangle) in four colours on a 2x2 grid of places; sentences speak of colours, shapes, coloured
shapes, counts, both images and comparisons (the ``phenomenon`` of each row).

Written as NLVR2 is distributed (``nlvr2/data`` JSON lines + images named by identifier):

    nlvr/train.json  nlvr/dev.json  nlvr/test1.json       one JSON object per line
    nlvr/images/<split>/<split>-<set>-<pair>-img0.png       left image (img1: right)

with ``identifier`` = ``split-set_id-pair_id-sentence_id``, ``label`` "True"/"False", and the
lil-lab fields ``left_url``, ``right_url``, ``writer``, ``synset``, ``query``. Set ids are unique
across splits, so train and held-out splits never share an image set.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 80, 220),
    "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three")
SPLITS = ("train", "dev", "test1")
PHENOMENA = ("colour", "shape", "object", "count", "both", "compare")
SIDES = ("left", "right")


@dataclass(frozen=True)
class NlvrConfig:
    """Sizes of the procedural NLVR set."""

    seed: int = field(default=0, metadata={"help": "random seed; the same seed gives the same files"})
    train_sets: int = field(default=160, metadata={"help": "image sets in train (8 examples each)"})
    dev_sets: int = field(default=40, metadata={"help": "image sets in dev"})
    test_sets: int = field(default=40, metadata={"help": "image sets in test1"})
    image_size: int = field(default=96, metadata={"help": "image edge in pixels"})
    pairs_per_set: int = field(default=4, metadata={"help": "image pairs per set (NLVR2: 4)"})


# --------------------------------------------------------------------------- scenes


Scene = list[tuple[str, str, int]]  # (colour, shape, place 0..3) per object


def random_scene(rng: np.random.Generator) -> Scene:
    """One to three objects of random colour and shape at distinct places of a 2x2 grid."""
    n = int(rng.integers(1, 4))
    places = rng.permutation(4)[:n]
    return [(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), int(p)) for p in places]


def render_scene(scene: Scene, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """Draw a scene: shapes of about a third of the edge, jittered inside their grid cell."""
    background = tuple(int(v) for v in rng.integers(200, 240, 3))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    cell = size / 2
    for colour, shape, place in scene:
        r = cell * rng.uniform(0.28, 0.36)
        cx = (place % 2 + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cy = (place // 2 + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        fill = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[colour])
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":
            draw.rectangle([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 3, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def describe_scene(scene: Scene) -> str:
    """A canonical caption of one scene: "two red circles and a blue square"."""
    groups: dict[tuple[str, str], int] = {}
    for colour, shape, _ in scene:
        groups[(colour, shape)] = groups.get((colour, shape), 0) + 1
    order = sorted(groups, key=lambda g: (list(COLOURS).index(g[0]), SHAPES.index(g[1])))
    parts = [f"{'a' if groups[g] == 1 else NUMBERS[groups[g]]} {g[0]} {_plural(g[1], groups[g])}" for g in order]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe_pair(left: Scene, right: Scene) -> str:
    """The caption of an image pair the tiny VLM is pre-trained to write."""
    return f"Left: {describe_scene(left)}. Right: {describe_scene(right)}."


# --------------------------------------------------------------------------- statements


@dataclass(frozen=True)
class Statement:
    """A sentence about an image pair and the program that decides it."""

    sentence: str
    phenomenon: str
    holds: Callable[[Scene, Scene], bool]


def _side(left: Scene, right: Scene, side: str) -> Scene:
    return left if side == "left" else right


def random_statement(rng: np.random.Generator) -> Statement:
    """A random statement of one of :data:`PHENOMENA`."""
    kind = str(rng.choice(PHENOMENA))
    side = str(rng.choice(SIDES))
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    if kind == "colour":
        return Statement(f"The {side} image contains a {colour} shape.", kind,
                         lambda a, b: any(o[0] == colour for o in _side(a, b, side)))
    if kind == "shape":
        return Statement(f"The {side} image contains a {shape}.", kind,
                         lambda a, b: any(o[1] == shape for o in _side(a, b, side)))
    if kind == "object":
        return Statement(f"The {side} image contains a {colour} {shape}.", kind,
                         lambda a, b: any(o[:2] == (colour, shape) for o in _side(a, b, side)))
    if kind == "count":
        n = int(rng.integers(1, 4))
        return Statement(f"The {side} image shows exactly {NUMBERS[n]} {_plural('shape', n)}.", kind,
                         lambda a, b: len(_side(a, b, side)) == n)
    if kind == "both":
        if rng.random() < 0.5:
            return Statement(f"Both images contain a {colour} shape.", kind,
                             lambda a, b: all(any(o[0] == colour for o in s) for s in (a, b)))
        return Statement(f"Both images contain a {shape}.", kind,
                         lambda a, b: all(any(o[1] == shape for o in s) for s in (a, b)))
    if rng.random() < 0.5:
        return Statement("The left image shows more shapes than the right image.", kind,
                         lambda a, b: len(a) > len(b))
    return Statement("The left image shows fewer shapes than the right image.", kind, lambda a, b: len(a) < len(b))


def _pair_with(rng: np.random.Generator, statements: list[Statement], truths: tuple[bool, ...],
               tries: int = 2000) -> tuple[Scene, Scene] | None:
    for _ in range(tries):
        left, right = random_scene(rng), random_scene(rng)
        if all(s.holds(left, right) == t for s, t in zip(statements, truths)):
            return left, right
    return None


def make_set(rng: np.random.Generator, pairs: int = 4) -> tuple[list[Statement], list[tuple[Scene, Scene]],
                                                                 list[tuple[bool, ...]]]:
    """Two statements and ``pairs`` image pairs; each statement holds on exactly half of the pairs."""
    while True:
        statements = [random_statement(rng), random_statement(rng)]
        if statements[0].sentence == statements[1].sentence:
            continue
        columns = [rng.permutation([True] * (pairs // 2) + [False] * (pairs - pairs // 2)) for _ in statements]
        truths = [tuple(bool(c[p]) for c in columns) for p in range(pairs)]
        scenes = [_pair_with(rng, statements, t) for t in truths]
        if all(s is not None for s in scenes):
            return statements, scenes, truths


# --------------------------------------------------------------------------- writer


def write_nlvr(out: str | Path, cfg: NlvrConfig = NlvrConfig()) -> dict[str, int]:
    """Write the set under ``out`` (``out/<split>.json`` + ``out/images/<split>/``); return rows per split."""
    out = Path(out)
    sizes = {}
    set_id = 0
    for split, n_sets in zip(SPLITS, (cfg.train_sets, cfg.dev_sets, cfg.test_sets)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for _ in range(n_sets):
            rng = np.random.default_rng([cfg.seed, 23, set_id])
            statements, scenes, truths = make_set(rng, cfg.pairs_per_set)
            for pair_id, ((left, right), truth) in enumerate(zip(scenes, truths)):
                stem = f"{split}-{set_id}-{pair_id}"
                for k, scene in enumerate((left, right)):
                    render_scene(scene, rng, cfg.image_size).save(out / "images" / split / f"{stem}-img{k}.png")
                for sentence_id, (statement, holds) in enumerate(zip(statements, truth)):
                    rows.append({
                        "identifier": f"{stem}-{sentence_id}",
                        "sentence": statement.sentence,
                        "label": "True" if holds else "False",
                        "left_url": f"images/{split}/{stem}-img0.png",
                        "right_url": f"images/{split}/{stem}-img1.png",
                        "writer": "procedural",
                        "synset": "shape",
                        "query": f"shapes{set_id}",
                        "phenomenon": statement.phenomenon,
                        "left_caption": describe_scene(left),
                        "right_caption": describe_scene(right),
                    })
            set_id += 1
        with open(out / f"{split}.json", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        sizes[split] = len(rows)
    return sizes
