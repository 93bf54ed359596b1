"""``vlmlab corpus build``: the Ray Data job that builds the fine-tuning corpus.

Layout written under ``--out``::

    dataset.json          name, seed, corpus_hash, stats, augmentation (asked/made/kept, why
                          any are missing), pairs, errors
    pairs.parquet         image_path (relative to the corpus dir), caption, source, label,
                          image_id, caption_sources (JSON) -- the columns trainers read
    images/real_aug/      originals, augmentations and zoom crops (PNG, named by image_id)
    images/synthetic/     synthetic images (compose: with YOLO ``.txt`` labels beside them)
    metadata/<id>.json    per-image metadata (kind, parent, caption sources, analysis)

Image ids are content hashes of the written PNG, so the same inputs and seed give the same ids,
captions and ``corpus_hash``. Stages write files from the workers: on a multi-node cluster
``--out`` must be on a filesystem every node mounts.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.augment import AUGMENTATIONS, augment
from pipelines.captions import Region, analyse_image, cell_region, enrich_caption, png_bytes
from pipelines.synthetic import SYNTHETIC_STAGES, ComposeStage, DiffusionStage, decode_png
from vlmlab.config import add_config_arguments, config_from_args
from vlmlab.images import ImageDecodeError, content_hash, list_images, read_image

KIND_ORDER = {"original": 0, "augmented": 1, "zoom": 2, "synthetic": 3}
DETERMINISTIC_AUGMENTATIONS = ("flip", "rotate")  # one possible output per image
MAX_AUGMENT_DRAWS = 10  # draws per augmented copy asked before giving up on finding a new one
AUGMENT_SHORT_REASON = ("identical augmentations are dropped: flip and rotate give one image each (a symmetric "
                        "image's flip or rotation is the image itself) and a small image has few distinct crops")


@dataclass(frozen=True)
class CorpusConfig:
    """What ``vlmlab corpus build`` does."""

    images: str = field(default="", metadata={"help": "directory of real images (searched recursively)"})
    out: str = field(default="corpus", metadata={"help": "corpus directory to write"})
    captions: str = field(default="", metadata={
        "help": "CSV (path,caption[,label]) or Parquet (image_path,caption[,label]); paths relative to its dir"})
    augmentations: int = field(default=5, metadata={"help": "augmented copies per real image"})
    zoom: bool = field(default=True, metadata={"help": "add zoom crops: around the strongest M2B region, or around "
                                                       "the detector's boxes when --detector is given"})
    detector: str = field(default="", metadata={"help": "YOLO weights whose boxes the zoom crops follow; empty: M2B"})
    detector_conf: float = field(default=0.25, metadata={"help": "detector confidence for zoom crops"})
    max_zoom: int = field(default=3, metadata={"help": "most detector zoom crops per image"})
    vlm: str = field(default="", metadata={"help": "vision-language captioner (local dir or hub id); empty: none"})
    synthetic: str = field(default="", metadata={"help": "synthetic stage: compose or diffusion; empty: none"})
    n: int = field(default=0, metadata={"help": "synthetic images to make"})
    inspection: str = field(default="", metadata={"help": "YOLO dataset dir whose object crops compose pastes"})
    diffusion_model: str = field(default="", metadata={"help": "diffusers pipeline (local dir or hub id)"})
    diffusion_steps: int = field(default=20, metadata={"help": "denoising steps per diffusion image"})
    diffusion_size: int = field(default=0, metadata={"help": "diffusion image edge in pixels; 0: the model's"})
    seed: int = field(default=0, metadata={"help": "random seed; same inputs and seed give the same corpus"})
    name: str = field(default="corpus", metadata={"help": "corpus name recorded in dataset.json"})
    batch_size: int = field(default=8, metadata={"help": "rows per Ray Data batch"})
    concurrency: int = field(default=1, metadata={"help": "actors per model stage (one per GPU on a GPU cluster)"})
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs per VLM/diffusion actor (0 on CPU)"})


def read_captions(path: str | Path) -> dict[str, tuple[str, str | None]]:
    """Captions by absolute image path: ``{path: (caption, label or None)}`` from a CSV or Parquet file."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        key = "image_path"
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        key = "path" if rows and "path" in rows[0] else "image_path"
    if rows and (key not in rows[0] or "caption" not in rows[0]):
        raise ValueError(f"{path}: needs columns path (or image_path) and caption; found {sorted(rows[0])}")
    return {str((path.parent / r[key]).resolve()): (r["caption"], r.get("label") or None) for r in rows}


def zoom_crop(img: Image.Image, caption: str) -> tuple[Image.Image, str] | None:
    """Crop around the strongest M2B region (its cell grown by half a cell), resized to the input size.

    Without stand-out regions the cell of highest edge density is used; a flat image gives None.
    """
    a = analyse_image(img)
    if a["edge_density"] == 0.0:
        return None
    regions = a["regions"] or [cell_region(img, k, a["cells"][k]) for k in range(9)]
    g = max(regions, key=lambda r: (r.edge_density, -r.row, -r.col))
    x0, y0, x1, y1 = g.box
    dx, dy = (x1 - x0) // 2, (y1 - y0) // 2
    box = (max(0, x0 - dx), max(0, y0 - dy), min(img.width, x1 + dx), min(img.height, y1 + dy))
    crop = img.crop(box).resize(img.size, Image.Resampling.BICUBIC)
    return crop, f"close-up {g.where} of {caption}" if caption else f"close-up {g.where}"


@functools.lru_cache(maxsize=2)
def _detector(weights: str) -> Any:
    from pipelines.inspection import load_detector

    return load_detector(weights)


def detector_zoom_crops(img: Image.Image, caption: str, weights: str, conf: float = 0.25,
                        max_crops: int = 3) -> list[tuple[Image.Image, str]]:
    """Crops around the detector's best boxes (grown by a quarter of their size, as the inspection
    classifier crops), resized to the input size, each captioned with the object and where it is."""
    from pipelines.inspection import detect, detector_device
    from training.inspect_data import crop_instance

    detections = detect(_detector(weights), img, conf=conf, device=detector_device(None))[:max_crops]
    crops = []
    for det in detections:
        x0, y0, x1, y1 = det.box
        cx, cy = (x0 + x1) / 2 / img.width, (y0 + y1) / 2 / img.height
        where = Region(min(int(cy * 3), 2), min(int(cx * 3), 2), (0, 0, 0, 0), "", 0.0).where
        crop = crop_instance(img, det.box, 0.25).resize(img.size, Image.Resampling.BICUBIC)
        text = f"close-up of {det.detector_class} {where}"
        crops.append((crop, f"{text} of {caption}" if caption else text))
    return crops


def expand_real(batch: dict[str, Any], augmentations: int, seed: int, zoom: bool, detector: str = "",
                detector_conf: float = 0.25, max_zoom: int = 3) -> dict[str, Any]:
    """Ray Data stage: each real image -> original + augmented copies + zoom crop(s), as PNG rows.

    Unreadable images come out as one row with ``error`` set (recorded, never fatal).
    """
    out: list[dict[str, Any]] = []
    for path, rel, caption, label in zip(batch["path"], batch["relpath"], batch["caption"], batch["label"]):
        base = {"parent": rel, "label": label, "error": "", "yolo": ""}
        try:
            img = read_image(path).convert("RGB")
        except (ImageDecodeError, OSError) as exc:
            out.append({**base, "image": b"", "caption": "", "kind": "error", "error": str(exc)})
            continue
        original = png_bytes(img)
        out.append({**base, "image": original, "caption": caption, "kind": "original",
                    "augmentations_short": augmentations})
        # Seeded by content, not position, so adding files elsewhere does not change these.
        rng = np.random.default_rng([seed, int(content_hash(img.tobytes())[:12], 16)])
        augmented = distinct_augmentations(img, caption, augmentations, rng, {content_hash(original)})
        out[-1]["augmentations_short"] = augmentations - len(augmented)
        out.extend({**base, "image": data, "caption": aug_caption, "kind": "augmented"}
                   for data, aug_caption in augmented)
        if zoom and detector:
            crops = detector_zoom_crops(img, caption, detector, detector_conf, max_zoom)
        else:
            crops = [c for c in [zoom_crop(img, caption) if zoom else None] if c]
        for crop, crop_caption in crops:
            out.append({**base, "image": png_bytes(crop), "caption": crop_caption, "kind": "zoom"})
    rows = [{"augmentations_short": 0} | r for r in out]  # one schema for every row of the batch
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]} if rows else {}


def distinct_augmentations(img: Image.Image, caption: str, n: int, rng: np.random.Generator,
                           seen: set[str]) -> list[tuple[bytes, str]]:
    """Up to ``n`` augmented copies of ``img`` as ``(png bytes, caption)``, none identical to another
    or to an image whose content hash is in ``seen`` (updated).

    A flip and a 180-degree rotation give one image each, so each is drawn at most once; a flip of a
    symmetric image is the image itself, and a small image has few distinct crops. When those run
    out (``MAX_AUGMENT_DRAWS`` draws per copy asked) fewer than ``n`` come back.
    """
    kinds = list(AUGMENTATIONS)
    made: list[tuple[bytes, str]] = []
    for _ in range(MAX_AUGMENT_DRAWS * n):
        if len(made) == n or not kinds:
            break
        kind = kinds[int(rng.integers(len(kinds)))]
        aug, aug_caption = augment(img, caption, kind, rng)
        if kind in DETERMINISTIC_AUGMENTATIONS:
            kinds.remove(kind)  # the same image every time: drawing it again only makes a duplicate
        data = png_bytes(aug)
        digest = content_hash(data)
        if digest not in seen:
            seen.add(digest)
            made.append((data, aug_caption))
    return made


def write_pairs_batch(batch: dict[str, Any], out: str, subdir: str, source: str) -> dict[str, Any]:
    """Ray Data stage: enrich captions, write image + metadata files, return pair rows without pixels."""
    rows = []
    n = len(batch["image"])
    for i in range(n):
        short = int(batch["augmentations_short"][i]) if "augmentations_short" in batch else 0
        if batch.get("error") is not None and batch["error"][i]:
            rows.append({"image_id": "", "image_path": "", "caption": "", "source": source, "label": None,
                         "caption_sources": "{}", "kind": "error", "parent": batch["parent"][i],
                         "error": batch["error"][i], "augmentations_short": 0})
            continue
        data = batch["image"][i]
        img = decode_png(data)
        vlm = batch["vlm_caption"][i] if "vlm_caption" in batch else None
        caption, sources = enrich_caption(batch["caption"][i], img, vlm)
        image_id = content_hash(data)
        rel = f"images/{subdir}/{image_id}.png"
        path = Path(out) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if batch["yolo"][i]:
            path.with_suffix(".txt").write_text(batch["yolo"][i])
        kind = batch["kind"][i] if "kind" in batch else "synthetic"
        parent = batch["parent"][i] if "parent" in batch else ""
        label = batch["label"][i] if isinstance(batch["label"][i], str) else None  # Arrow gives NaN for null
        meta = {"image_id": image_id, "kind": kind, "parent": parent, "source": source, "caption": caption,
                "caption_sources": sources, "label": label, "width": img.width, "height": img.height}
        (Path(out) / "metadata").mkdir(parents=True, exist_ok=True)
        (Path(out) / "metadata" / f"{image_id}.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        rows.append({"image_id": image_id, "image_path": rel, "caption": caption, "source": source,
                     "label": label, "caption_sources": json.dumps(sources, sort_keys=True), "kind": kind,
                     "parent": parent, "error": "", "augmentations_short": short})
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]} if rows else {}


def _with_vlm(ds, cfg: CorpusConfig):
    import ray

    from pipelines.captions import VLMCaptioner

    if not cfg.vlm:
        return ds
    return ds.map_batches(VLMCaptioner, fn_constructor_args=(cfg.vlm,), batch_size=cfg.batch_size,
                          compute=ray.data.ActorPoolStrategy(size=cfg.concurrency), num_gpus=cfg.num_gpus)


def _synthetic_dataset(cfg: CorpusConfig, prompts: list[str]):
    import ray

    ds = ray.data.from_items([{"index": i} for i in range(cfg.n)])
    if cfg.synthetic == "compose":
        return ds.map_batches(ComposeStage, fn_constructor_args=(cfg.inspection, cfg.images, cfg.seed),
                              compute=ray.data.ActorPoolStrategy(size=cfg.concurrency), batch_size=cfg.batch_size)
    return ds.map_batches(DiffusionStage, fn_constructor_args=(cfg.diffusion_model, prompts, cfg.seed,
                                                               cfg.diffusion_steps, cfg.diffusion_size or None),
                          compute=ray.data.ActorPoolStrategy(size=cfg.concurrency), batch_size=cfg.batch_size,
                          num_gpus=cfg.num_gpus)


def check_synthetic_config(cfg: CorpusConfig) -> None:
    """Fail before any work when the synthetic flags do not fit together."""
    if not cfg.synthetic:
        return
    if cfg.synthetic not in SYNTHETIC_STAGES:
        raise ValueError(f"--synthetic {cfg.synthetic!r}: choose from {', '.join(SYNTHETIC_STAGES)}")
    if cfg.synthetic == "compose" and not (Path(cfg.inspection) / "labels").is_dir():
        raise ValueError(f"--synthetic compose needs --inspection DIR with labels/ (a YOLO dataset); "
                         f"got {cfg.inspection!r}")
    if cfg.synthetic == "diffusion" and not cfg.diffusion_model:
        raise ValueError("--synthetic diffusion needs --diffusion-model (a diffusers dir or hub id)")


def corpus_hash(pairs: list[dict[str, Any]]) -> str:
    """SHA-1 over the sorted (image_id, caption, source) of every pair: equal corpora, equal hashes."""
    h = hashlib.sha1()
    for p in sorted(pairs, key=lambda p: p["image_id"]):
        h.update(f"{p['image_id']}\t{p['caption']}\t{p['source']}\n".encode())
    return h.hexdigest()


def write_pairs_parquet(pairs: list[dict[str, Any]], path: str | Path, prefix: str = "") -> Path:
    """Write the trainers' pairs table; ``prefix`` is prepended to image paths (e.g. ``../``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "image_path": pa.array([prefix + p["image_path"] for p in pairs], pa.string()),
        "caption": pa.array([p["caption"] for p in pairs], pa.string()),
        "source": pa.array([p["source"] for p in pairs], pa.string()),
        "label": pa.array([p["label"] for p in pairs], pa.string()),
        "image_id": pa.array([p["image_id"] for p in pairs], pa.string()),
        "caption_sources": pa.array([json.dumps(p["caption_sources"], sort_keys=True) for p in pairs], pa.string()),
    })
    pq.write_table(table, path)
    return Path(path)


def build_corpus(cfg: CorpusConfig) -> dict[str, Any]:
    """Run the corpus job; return the ``dataset.json`` content (also written under ``cfg.out``)."""
    import ray

    from vlmlab.config import absolute_paths
    from vlmlab.progress import collect_rows

    # the stages run in Ray actors elsewhere: every path as the user meant it, from here
    cfg = absolute_paths(cfg, ("images", "out", "captions", "detector", "inspection", "vlm", "diffusion_model"),
                         specs=("vlm", "diffusion_model"))
    images = Path(cfg.images)
    if not images.is_dir():
        raise FileNotFoundError(f"images directory {images} does not exist")
    check_synthetic_config(cfg)
    captions = read_captions(cfg.captions) if cfg.captions else {}
    rows = []
    for p in list_images(images):
        caption, label = captions.get(str(p.resolve()), ("", None))
        rows.append({"path": str(p), "relpath": str(p.relative_to(images)), "caption": caption, "label": label})
    if not rows:
        raise FileNotFoundError(f"no images under {images}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    real = ray.data.from_items(rows).map_batches(
        expand_real, fn_kwargs={"augmentations": cfg.augmentations, "seed": cfg.seed, "zoom": cfg.zoom,
                               "detector": cfg.detector, "detector_conf": cfg.detector_conf,
                               "max_zoom": cfg.max_zoom},
        batch_size=cfg.batch_size)
    real = _with_vlm(real, cfg).map_batches(
        write_pairs_batch, fn_kwargs={"out": str(out), "subdir": "real_aug", "source": "real"},
        batch_size=cfg.batch_size)
    results = collect_rows(real, len(rows), "corpus build", "images", key="parent")
    if cfg.synthetic and cfg.n > 0:
        prompts = sorted({r["caption"] for r in rows if r["caption"]}) or ["a rock surface"]
        syn = _with_vlm(_synthetic_dataset(cfg, prompts), cfg).map_batches(
            write_pairs_batch, fn_kwargs={"out": str(out), "subdir": "synthetic", "source": "synthetic"},
            batch_size=cfg.batch_size)
        results += collect_rows(syn, None, "corpus build (synthetic)", "images")
    errors = sorted(({"path": r["parent"], "reason": r["error"]} for r in results if r["kind"] == "error"),
                    key=lambda e: e["path"])
    pairs: dict[str, dict[str, Any]] = {}
    # Identical images (e.g. a flip of a symmetric image) collapse to one pair: the earliest kind wins.
    for r in sorted((r for r in results if r["kind"] != "error"), key=lambda r: (KIND_ORDER[r["kind"]], r["image_id"])):
        pairs.setdefault(r["image_id"], {
            "image_id": r["image_id"], "image_path": r["image_path"], "caption": r["caption"],
            "source": r["source"], "label": r["label"], "kind": r["kind"], "parent": r["parent"],
            "caption_sources": json.loads(r["caption_sources"])})
    ordered = sorted(pairs.values(), key=lambda p: (KIND_ORDER[p["kind"]], p["image_id"]))
    stats = {
        "real_original": sum(p["kind"] == "original" for p in ordered),
        "real_augmented": sum(p["kind"] == "augmented" for p in ordered),
        "zoom_crops": sum(p["kind"] == "zoom" for p in ordered),
        "synthetic": sum(p["kind"] == "synthetic" for p in ordered),
    }
    dataset = {"name": cfg.name, "seed": cfg.seed, "corpus_hash": corpus_hash(ordered), "stats": stats,
               "augmentation": augmentation_report(results, cfg.augmentations, stats["real_augmented"]),
               "total": len(ordered), "config": asdict(cfg) | {"images": os.path.basename(str(images))},
               "pairs": ordered, "errors": errors}
    (out / "dataset.json").write_text(json.dumps(dataset, indent=1) + "\n")
    write_pairs_parquet(ordered, out / "pairs.parquet")
    return dataset


def augmentation_report(results: list[dict[str, Any]], per_image: int, kept: int) -> dict[str, Any]:
    """How many augmented copies were asked, made and kept, and why any are missing.

    ``results`` are the rows of :func:`write_pairs_batch`; ``kept`` the augmented pairs left after
    identical images collapse (the ``real_augmented`` stat). ``short`` lists each image that had
    fewer distinct augmentations than asked, with how many were missing.
    """
    originals = [r for r in results if r["kind"] == "original"]
    asked = per_image * len(originals)
    made = sum(r["kind"] == "augmented" for r in results)
    report: dict[str, Any] = {"per_image": per_image, "asked": asked, "made": made, "kept": kept,
                              "missing": asked - kept, "reasons": {}}
    if asked > made:
        report["reasons"]["no_new_distinct_augmentation"] = {"count": asked - made, "why": AUGMENT_SHORT_REASON}
        report["short"] = sorted(({"path": r["parent"], "missing": int(r["augmentations_short"])}
                                  for r in originals if r["augmentations_short"]), key=lambda e: e["path"])
    if made > kept:
        report["reasons"]["identical_to_another_image"] = {
            "count": made - kept, "why": "the same pixels as another image of the corpus (e.g. two identical inputs)"}
    return report


def parse_job_config(argv: list[str] | None, prog: str, description: str, cls: type, positional: str,
                     metavar: str) -> Any:
    """Parse ``PROG POSITIONAL [--config YAML] [--flags] [key=value ...]`` into the frozen config ``cls``.

    ``positional`` is the config field the positional argument fills.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("positional_value", metavar=metavar, help=cls.__dataclass_fields__[positional].metadata["help"])
    parser.add_argument("--config", help=f"YAML file filling {cls.__name__}")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    add_config_arguments(parser, cls, skip=(positional,))
    args = parser.parse_args(argv)
    return config_from_args(cls, args, args.config, [*args.overrides, f"{positional}={args.positional_value}"])


def main(argv: list[str] | None = None) -> None:
    """``vlmlab corpus build IMAGES --out CORPUS [...]``."""
    cfg = parse_job_config(argv, "vlmlab corpus build", __doc__.split("\n")[0], CorpusConfig, "images", "IMAGES")
    from vlmlab.runtime import start_ray

    start_ray()
    dataset = build_corpus(cfg)
    augmentation = {k: v for k, v in dataset["augmentation"].items() if k != "short"}
    print(json.dumps({"out": cfg.out, "stats": dataset["stats"], "augmentation": augmentation,
                      "errors": len(dataset["errors"]),
                      "corpus_hash": dataset["corpus_hash"]}, indent=1))


if __name__ == "__main__":
    main()
