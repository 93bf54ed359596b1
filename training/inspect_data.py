"""Inspection data: YOLO datasets read as labelled object crops for the condition classifier.

A YOLO dataset is ``data.yaml`` (``path``, ``train``/``val``/``test`` image folders, ``names``)
with ``labels/<split>/<stem>.txt`` next to ``images/<split>/<stem>.jpg`` holding one
``class cx cy w h`` line (normalised to [0, 1]) per object. Each object becomes one
:class:`Instance`: its class, object type and condition (``toe drain blocked`` -> ``toe drain``,
``blocked``), its box in pixels, a spatial bin from the box centre (``top``/``middle``/``bottom``)
and a context text naming the other objects in the image. :func:`crop_instance` is the one crop
function used by training, evaluation and inference.

Imbalance is handled twice, as in the lab's recipe: :func:`class_weights` (inverse frequency)
weight the focal loss, and :func:`oversampling_weights` + :func:`draw_indices` oversample rare
classes (e.g. 2.5x) and conditions (e.g. blocked 3x) when batches are drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlmlab.config import load_yaml

NO_CONDITION = "none"  # classes without a condition word (vegetation)
SPLIT_KEYS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# spatial bins of the box centre's y (fraction of the image height from the top); edges are upper bounds
SPATIAL_BINS = (("top", 1 / 3), ("middle", 2 / 3), ("bottom", 1.0))
# how a bin reads in a spatial prompt ("a photo of toe drain normal at bottom of image")
BIN_PHRASES = {"top": "at top of image", "middle": "in middle of image", "bottom": "at bottom of image"}


@dataclass(frozen=True)
class Instance:
    """One labelled object of a YOLO dataset."""

    image_path: str  # absolute path of the scene image
    split: str  # train | val | test
    class_id: int
    label: str  # class name, e.g. "toe drain blocked"
    object_type: str  # "toe drain"
    condition: str  # normal | blocked | damaged | none
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    centre_y: float  # box centre y as a fraction of the image height
    spatial_bin: str  # top | middle | bottom
    context: str  # "rock toe, slope drain" (other object types in the image), "" if alone


def condition_vocabulary(names: Sequence[str], declared: Sequence[str] | None = None) -> tuple[str, ...]:
    """The condition words of a class list: ``declared`` (a ``conditions:`` list in ``data.yaml``) when
    given, else derived from the names themselves.

    A class name is "<object type> <condition>" when its last word is what tells it apart from another
    class of the same object type: ``toe drain normal`` / ``toe drain blocked`` make ``normal`` and
    ``blocked`` conditions, while ``vegetation`` (alone) has none. So any lab's vocabulary (``clear`` /
    ``silted`` / ``cracked``...) works without a hard-coded list. Sorted, unique.
    """
    if declared:
        return tuple(sorted({str(c) for c in declared}))
    prefixes: dict[str, set[str]] = {}
    for name in names:
        words = name.split()
        if len(words) > 1:
            prefixes.setdefault(" ".join(words[:-1]), set()).add(words[-1])
    return tuple(sorted({c for conditions in prefixes.values() if len(conditions) > 1 for c in conditions}))


def split_class_name(name: str, conditions: Sequence[str]) -> tuple[str, str]:
    """``"toe drain blocked"`` -> ``("toe drain", "blocked")`` when ``blocked`` is one of ``conditions``
    (see :func:`condition_vocabulary`); a name with no condition word -> ``(name, "none")``."""
    words = name.split()
    if len(words) > 1 and words[-1] in conditions:
        return " ".join(words[:-1]), words[-1]
    return name, NO_CONDITION


def spatial_bin(centre_y: float) -> str:
    """The spatial bin (``top``/``middle``/``bottom``) of a box centre at ``centre_y`` (fraction of height)."""
    for name, upper in SPATIAL_BINS:
        if centre_y < upper:
            return name
    return SPATIAL_BINS[-1][0]


def context_text(object_types: Sequence[str]) -> str:
    """The other objects of an image as one phrase (``"rock toe, slope drain"``): unique, sorted."""
    return ", ".join(sorted(set(object_types)))


def crop_instance(image: Image.Image, box_xyxy: Sequence[float], margin: float = 0.1) -> Image.Image:
    """Crop an object with context: the box grown by ``margin`` x its width/height on every side.

    ``box_xyxy`` is (x0, y0, x1, y1) in pixels; the crop is clipped to the image and is at least
    one pixel each way. The same function crops for training, evaluation and inference, so a
    classifier sees at serving time exactly what it was trained on. Returns an RGB image.
    """
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    left, top = max(int(np.floor(x0 - dx)), 0), max(int(np.floor(y0 - dy)), 0)
    right, bottom = min(int(np.ceil(x1 + dx)), image.width), min(int(np.ceil(y1 + dy)), image.height)
    right, bottom = max(right, left + 1), max(bottom, top + 1)
    return image.convert("RGB").crop((left, top, right, bottom))


def read_data_yaml(data: str | Path) -> dict:
    """Read a YOLO ``data.yaml``: ``{"root", "names" (by id), "conditions", "splits": {split: image dir}}``.

    ``conditions`` is the dataset's condition vocabulary (:func:`condition_vocabulary`: an optional
    ``conditions:`` list in the file, else derived from the names).

    Relative ``path`` is resolved against the YAML file's folder, split folders against ``path``
    (as ultralytics does). Raises ``FileNotFoundError``/``ValueError`` naming what is missing.
    """
    data = Path(data).expanduser().resolve()
    if not data.is_file():
        raise FileNotFoundError(f"no YOLO data file {data}; pass --data PATH/data.yaml")
    spec = load_yaml(data)
    root = Path(spec.get("path") or ".")
    root = root if root.is_absolute() else (data.parent / root).resolve()
    names = spec.get("names")
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=int)]
    if not names:
        raise ValueError(f"{data} has no 'names': list the class names by id")
    splits = {}
    for key, split in SPLIT_KEYS.items():
        if spec.get(key):
            folder = Path(spec[key])
            splits[split] = folder if folder.is_absolute() else root / folder
    return {"root": root, "names": list(names), "conditions": condition_vocabulary(names, spec.get("conditions")),
            "splits": splits}


def _label_file(image: Path) -> Path:
    # YOLO convention: the last "images" folder of the path becomes "labels", suffix .txt
    parts = list(image.parts)
    idx = len(parts) - 1 - parts[::-1].index("images")
    parts[idx] = "labels"
    return Path(*parts).with_suffix(".txt")


def read_instances(data: str | Path, split: str) -> list[Instance]:
    """Every labelled object of one split (``train``/``val``/``test``) of a YOLO dataset, in file order.

    Images without a label file have no objects. Raises ``ValueError`` on an unknown split or a
    class id outside ``names``.
    """
    spec = read_data_yaml(data)
    split = SPLIT_KEYS.get(split, split)
    if split not in spec["splits"]:
        raise ValueError(f"{data} has no {split!r} split; it has {sorted(spec['splits'])}")
    folder = spec["splits"][split]
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    names, conditions = spec["names"], spec["conditions"]
    out: list[Instance] = []
    for image in images:
        label_file = _label_file(image)
        if not label_file.is_file():
            continue
        rows = [line.split() for line in label_file.read_text().splitlines() if line.strip()]
        with Image.open(image) as im:
            width, height = im.size
        objects = []
        for row in rows:
            cls = int(row[0])
            if not 0 <= cls < len(names):
                raise ValueError(f"{label_file}: class id {cls} outside the {len(names)} names of {data}")
            cx, cy, w, h = (float(v) for v in row[1:5])
            objects.append((cls, cx, cy, w, h))
        types = [split_class_name(names[cls], conditions)[0] for cls, *_ in objects]
        for i, (cls, cx, cy, w, h) in enumerate(objects):
            object_type, condition = split_class_name(names[cls], conditions)
            box = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
            others = [t for j, t in enumerate(types) if j != i and t != object_type]
            out.append(Instance(str(image), split, cls, names[cls], object_type, condition, box, cy,
                                spatial_bin(cy), context_text(others)))
    return out


def crop_all(instances: Sequence[Instance], margin: float) -> list[Image.Image]:
    """:func:`crop_instance` of every instance, opening each scene image once."""
    crops: list[Image.Image] = []
    current, image = None, None
    for inst in instances:
        if inst.image_path != current:
            with Image.open(inst.image_path) as im:
                image = im.convert("RGB")
            current = inst.image_path
        crops.append(crop_instance(image, inst.box, margin))
    return crops


def class_weights(class_ids: Sequence[int], num_classes: int) -> np.ndarray:
    """Loss weights inverse to class frequency, (num_classes,) float32 (scikit-learn's "balanced").

    ``w_c = N / (K * n_c)`` for the K classes with ``n_c`` > 0 examples out of N, so every class
    carries the same total weight and the mean weight over the N examples is 1; absent classes get 0
    (they have no example to weigh).
    """
    counts = np.bincount(np.asarray(class_ids, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.astype(np.float32)


def oversampling_factors(class_ids: Sequence[int], names: Sequence[str], rare_factor: float = 2.5,
                         rare_fraction: float = 0.5, condition_factors: dict[str, float] | None = None,
                         class_factors: dict[str, float] | None = None) -> np.ndarray:
    """Per-class oversampling factors (len(names),): how many times more often each class is drawn.

    A class is rare when it has fewer than ``rare_fraction`` x the examples of the most frequent
    class; rare classes get ``rare_factor``. ``condition_factors`` (e.g. ``{"blocked": 3.0}``) apply
    to every class of that condition, ``class_factors`` (by class name) override both. Where a rare
    and a condition factor both apply the larger wins (they do not multiply: a rare blocked class is
    drawn 3x, not 7.5x). Every other class gets 1.
    """
    counts = np.bincount(np.asarray(class_ids, dtype=np.int64), minlength=len(names))
    conditions = condition_vocabulary(names)
    factors = np.ones(len(names))
    largest = counts.max() if len(counts) else 0
    for c, name in enumerate(names):
        if 0 < counts[c] < rare_fraction * largest:
            factors[c] = max(factors[c], rare_factor)
        condition = split_class_name(name, conditions)[1]
        if condition_factors and condition in condition_factors:
            factors[c] = max(factors[c], condition_factors[condition])
        if class_factors and name in class_factors:
            factors[c] = class_factors[name]
    return factors


def oversampling_weights(class_ids: Sequence[int], factors: np.ndarray) -> np.ndarray:
    """Per-example draw probabilities (N,) summing to 1: proportional to the factor of the example's class.

    Over many draws class c is drawn ``n_c * factor_c / sum_k(n_k * factor_k)`` of the time, i.e. each
    of its examples ``factor_c`` times as often as an example of a class with factor 1.
    """
    weights = np.asarray(factors, dtype=np.float64)[np.asarray(class_ids, dtype=np.int64)]
    return weights / weights.sum()


def draw_indices(weights: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` example indices drawn with replacement with probabilities ``weights`` (the oversampling sampler)."""
    return rng.choice(len(weights), size=count, replace=True, p=weights)
