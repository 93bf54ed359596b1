"""``vlmlab corpus filter``: score every pair of a corpus and keep the best of every class.

score = w_clip * CLIP similarity (normalised per model) + w_sanity * sanity + w_quality * image quality

- CLIP: cosine of image and caption embeddings, rescaled so the model's mismatched-pair mean is
  0 and its 95th percentile of matched pairs is 1 (clipped to 0..1): raw cosines of different
  models live on different scales, this puts them on one.
- sanity: the share of checkable caption claims that hold, taken for each part of the caption
  (the given/VLM words, the M2B sentence, the YOLO object count) and the lowest part kept: colour
  words against the share of pixels in each colour family, "mostly X" against the image's largest
  family, M2B spatial phrases against the cell they name. The families are measured per pixel
  with their own hue bands (pink apart from brown), not with the cell means the M2B caption was
  written from: checking a caption against the analysis that wrote it always passes.
- quality: mean of brightness (not near black or white), contrast and sharpness, each 0..1 and
  all three on the luma (Rec. 601) image, so recolouring a texture at equal luma changes none.

Synthetic pairs under ``--min-clip-synthetic`` are dropped first; then, by default, the top
``--keep`` fraction of every (source, class) group is kept (``--no-keep-per-class``: of all
pairs), and at least ``--min-per-class`` pairs of every group survive. A group that loses more
than half its pairs is warned about in the log and in ``quality_report.json``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.captions import COLOUR_MEANINGS, grid_edges, laplacian_variance, to_array
from pipelines.corpus import parse_job_config, write_pairs_parquet
from vlmlab.images import read_image
from vlmlab.runtime import start_ray

log = logging.getLogger(__name__)

COMPONENTS = ("clip", "sanity", "quality")
QUALITY_PARTS = ("brightness", "contrast", "sharpness")
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # Rec. 601, as pipelines.captions uses
# Families the sanity check measures per pixel: the M2B families plus pink, which the M2B cell
# means file under brown (pink granite read "mostly brown (soil or sandstone)").
FAMILIES = (*COLOUR_MEANINGS, "pink")
# Caption words that claim colour families; a claim holds when its families cover at least
# WORD_MIN_SHARE of the pixels (a named colour may be speckles or crystals, not the whole tile).
# "dark" and "black" name small features (cracks, holes, speckles) and come with a rock name
# that carries the claim, so they are not claims of their own.
CLAIM_WORDS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("green", "vegetation", "grass", "plants", "shrubs"), ("green",)),
    **dict.fromkeys(("blue", "water"), ("blue",)),
    **dict.fromkeys(("grey", "gray", "concrete"), ("grey",)),
    **dict.fromkeys(("pink", "red", "reddish"), ("pink",)),
    **dict.fromkeys(("sandstone", "tan", "orange", "brown", "soil"), ("brown",)),
    **dict.fromkeys(("pale", "beige"), ("bright", "brown")),
    "white": ("bright",),
    "basalt": ("dark", "grey"),
    "granite": ("pink", "grey"),
    "fractured": ("grey", "dark", "brown"),
}
WORD_MIN_SHARE = 0.05
CELL_MIN_SHARE = 0.25  # an M2B phrase "X in the upper left" holds when X covers a quarter of that cell
_PHRASE = re.compile(r"(" + "|".join(map(re.escape, COLOUR_MEANINGS.values())) +
                     r") in the (upper|middle|lower|centre) ?(left|centre|right)?")
_MOSTLY = re.compile(r"mostly (" + "|".join(COLOUR_MEANINGS) + r") \([^)]*\)")
_ROWS, _COLS = ("upper", "middle", "lower"), ("left", "centre", "right")


@dataclass(frozen=True)
class FilterConfig:
    """What ``vlmlab corpus filter`` does."""

    corpus: str = field(default="", metadata={"help": "corpus directory written by vlmlab corpus build"})
    model: str = field(default="", metadata={"help": "CLIP model spec for the similarity component"})
    keep: float = field(default=0.7, metadata={"help": "fraction of pairs to keep (best scores)"})
    keep_per_class: bool = field(default=True, metadata={
        "help": "keep the --keep fraction within every (source, class) group; --no-keep-per-class: of all pairs"})
    min_per_class: int = field(default=1, metadata={
        "help": "pairs of every (source, class) group that survive whatever their rank (not past the synthetic floor)"})
    weights: str = field(default="0.5,0.25,0.25", metadata={"help": "weights of clip,sanity,quality"})
    min_clip_synthetic: float = field(default=0.25, metadata={"help": "normalised CLIP floor for synthetic pairs"})
    batch_size: int = field(default=32, metadata={"help": "pairs per Ray Data batch"})
    concurrency: int = field(default=1, metadata={"help": "scoring actors"})
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs per scoring actor (0 on CPU)"})


def luma(arr: np.ndarray) -> np.ndarray:
    """Rec. 601 luma ``(H, W)`` of an RGB float image ``(H, W, 3)`` in 0..1."""
    return arr @ LUMA


def image_quality(arr: np.ndarray) -> dict[str, float]:
    """Brightness, contrast and sharpness scores (each 0..1) of an RGB float image in 0..1.

    All three read the luma image only, so two images with the same luma score the same whatever
    their hue. Contrast is the luma standard deviation on a log scale: one grey level (1/255)
    is flat (0), ten grey levels is fully textured (1); a linear ramp to 0.08 ranked smooth but
    sound textures (vegetation, weathered rock) as defects.
    """
    y = luma(arr)
    b = float(y.mean())
    lap = laplacian_variance(arr)
    return {
        "brightness": float(np.clip(min(b, 1 - b) / 0.15, 0, 1)),
        "contrast": float(np.clip(math.log10(float(y.std()) * 255 + 1e-12), 0, 1)),
        # Laplacian variance 1e-5 (smooth blur) -> 0, 1e-2 (sharp texture with noise) -> 1.
        "sharpness": float(np.clip((math.log10(lap + 1e-12) + 5) / 3, 0, 1)),
    }


def pixel_families(arr: np.ndarray) -> np.ndarray:
    """Colour family index (into ``FAMILIES``) of every pixel of an RGB float image, ``(H, W)``.

    Thresholds of :func:`pipelines.captions.colour_family` for dark/grey/bright; chromatic pixels
    by hue: pink/red below 18 or from 260 degrees, brown 18-70, green 70-170, blue 170-260.
    """
    y = luma(arr)
    hi, lo = arr.max(-1), arr.min(-1)
    spread = hi - lo
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    d = np.maximum(spread, 1e-6)
    hue = np.where(hi == r, ((g - b) / d) % 6, np.where(hi == g, (b - r) / d + 2, (r - g) / d + 4)) * 60
    f = {name: i for i, name in enumerate(FAMILIES)}
    chromatic = np.select([hue < 18, hue < 70, hue < 170, hue < 260],
                          [f["pink"], f["brown"], f["green"], f["blue"]], f["pink"])
    achromatic = np.where(y > 0.75, f["bright"], f["grey"])
    return np.where(y < 0.18, f["dark"], np.where(spread < 0.08, achromatic, chromatic)).astype(np.int64)


def family_shares(families: np.ndarray) -> dict[str, float]:
    """Share of pixels of each of ``FAMILIES`` in an array of family indices (shares sum to 1)."""
    counts = np.bincount(families.ravel(), minlength=len(FAMILIES))
    return dict(zip(FAMILIES, (counts / max(counts.sum(), 1)).tolist()))


def sanity_score(arr: np.ndarray, caption: str, given: str, yolo_lines: int | None) -> tuple[float, int]:
    """How far a caption's checkable claims hold on the image: a 0..1 score and the claims checked.

    ``caption`` is the full corpus caption (its M2B sentence is checked), ``given`` the text CLIP
    sees (its colour words are checked), ``yolo_lines`` the object count of a composed scene or
    None. Each part scores the share of its claims that hold and the lowest part is the score:
    one wrong part makes the caption wrong, and averaging it with true parts would hide it. No
    claims: (1.0, 0).
    """
    families = pixel_families(arr)
    shares = family_shares(families)
    parts: list[list[bool]] = []
    # The M2B sentence is checked below as structure; its words are not claims of the given text.
    words = set(re.findall(r"[a-z]+", _MOSTLY.sub(" ", _PHRASE.sub(" ", given.lower()))))
    parts.append([sum(shares[f] for f in CLAIM_WORDS[w]) >= WORD_MIN_SHARE for w in sorted(words & set(CLAIM_WORDS))])
    m2b: list[bool] = []
    for family in _MOSTLY.findall(caption):
        m2b.append(shares[family] == max(shares.values()))
    meaning_to_family = {v: k for k, v in COLOUR_MEANINGS.items()}
    ys, xs = grid_edges(families.shape[0]), grid_edges(families.shape[1])
    for meaning, row, col in _PHRASE.findall(caption):
        r, c = (1, 1) if row == "centre" else (_ROWS.index(row), _COLS.index(col or "centre"))
        cell = family_shares(families[ys[r]:ys[r + 1], xs[c]:xs[c + 1]])
        m2b.append(cell[meaning_to_family[meaning]] >= CELL_MIN_SHARE)
    parts.append(m2b)
    if yolo_lines is not None and given.startswith("an inspection scene with "):
        parts.append([len(given.split(", ")) == yolo_lines])
    checked = [p for p in parts if p]
    return (min(float(np.mean(p)) for p in checked) if checked else 1.0), sum(map(len, checked))


class PairScorer:
    """Ray Data stage: CLIP cosine, a within-batch mismatched baseline, sanity and quality per pair.

    Batch in: ``image_path``, ``caption``, ``caption_sources`` (JSON). Adds ``clip_raw``,
    ``clip_mismatch`` (mean cosine of the image with the batch's other captions; NaN alone),
    ``sanity``, ``claims``, ``brightness``, ``contrast``, ``sharpness``, ``quality``.
    """

    def __init__(self, spec: str, corpus: str):
        from vlmlab.models import load_model

        self.encoder = load_model(spec)
        self.corpus = Path(corpus)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = [read_image(self.corpus / p).convert("RGB") for p in batch["image_path"]]
        sources = [json.loads(s) for s in batch["caption_sources"]]
        # CLIP sees the human/VLM caption: the appended M2B text is long and model-agnostic.
        texts = [s.get("given") or s.get("vlm") or c for s, c in zip(sources, batch["caption"])]
        sims = self.encoder.encode_images(images) @ self.encoder.encode_texts(texts).T
        n = len(images)
        off = (sims.sum(1) - np.diag(sims)) / (n - 1) if n > 1 else np.full(n, np.nan)
        out = {k: [] for k in ("sanity", "claims", "brightness", "contrast", "sharpness", "quality")}
        for i, img in enumerate(images):
            arr = to_array(img)
            q = image_quality(arr)
            txt = (self.corpus / batch["image_path"][i]).with_suffix(".txt")
            yolo = len([ln for ln in txt.read_text().split("\n") if ln.strip()]) if txt.exists() else None
            s, k = sanity_score(arr, batch["caption"][i], texts[i], yolo)
            for key, v in (*q.items(), ("quality", float(np.mean(list(q.values())))), ("sanity", s), ("claims", k)):
                out[key].append(v)
        batch["clip_raw"] = np.diag(sims).astype(np.float64)
        batch["clip_mismatch"] = off.astype(np.float64)
        for key, values in out.items():
            batch[key] = np.array(values)
        return batch


def parse_weights(text: str) -> np.ndarray:
    """``"0.5,0.25,0.25"`` -> array of three non-negative weights summing to 1."""
    try:
        w = np.array([float(v) for v in text.split(",")])
    except ValueError:
        raise ValueError(f"--weights {text!r}: expected three numbers like 0.5,0.25,0.25") from None
    if w.shape != (3,) or (w < 0).any() or w.sum() == 0:
        raise ValueError(f"--weights {text!r}: expected three non-negative numbers (clip,sanity,quality)")
    return w / w.sum()


def _summary(values: np.ndarray) -> dict[str, float]:
    q = np.percentile(values, [0, 5, 25, 50, 75, 95, 100]) if len(values) else [float("nan")] * 7
    return dict(zip(("min", "p5", "p25", "median", "p75", "p95", "max"), map(float, q))) | {
        "mean": float(np.mean(values)) if len(values) else float("nan")}


def group_of(pair: dict[str, Any]) -> str:
    """The (source, class) group a pair is kept within: ``"real/granite"``; no label: ``"real/unlabelled"``."""
    return f"{pair['source']}/{pair.get('label') or 'unlabelled'}"


def select_pairs(score: np.ndarray, groups: list[str], floor_drop: np.ndarray, ids: list[str], keep: float,
                 per_class: bool, min_per_class: int) -> np.ndarray:
    """Boolean mask of the pairs kept: the best ``keep`` fraction of each group (``per_class``) or of
    all pairs, then the best ``min_per_class`` of every group topped up; ``floor_drop`` pairs never.

    A group keeps ``floor(keep * size)`` pairs: never more than the asked fraction except through
    the ``min_per_class`` floor. Ties are broken by ``ids`` so the choice is deterministic.
    """
    order = np.lexsort((np.array(ids), -score))
    kept = np.zeros(len(score), bool)
    eligible = [i for i in order if not floor_drop[i]]
    if per_class:
        for g in sorted(set(groups)):
            members = [i for i in eligible if groups[i] == g]
            kept[members[:int(keep * sum(x == g for x in groups) + 1e-9)]] = True
    else:
        kept[eligible[:int(round(keep * len(score)))]] = True
    for g in sorted(set(groups)):
        members = [i for i in eligible if groups[i] == g]
        kept[members[:min_per_class]] = True
    return kept


def group_report(mask: np.ndarray, kept: np.ndarray, floor_drop: np.ndarray, components: dict[str, np.ndarray]
                 ) -> dict[str, Any]:
    """Pairs, kept, dropped, dropped by the synthetic floor and the mean of each component of one group."""
    n = int(mask.sum())
    return {"pairs": n, "kept": int((kept & mask).sum()), "dropped": int((~kept & mask).sum()),
            "dropped_by_floor": int((floor_drop & mask).sum()),
            "kept_fraction": float((kept & mask).sum() / n) if n else float("nan"),
            "cutoff": float(components["score"][kept & mask].min()) if (kept & mask).any() else float("inf"),
            "mean": {k: float(v[mask].mean()) if n else float("nan") for k, v in components.items()}}


def loss_warnings(by_class: dict[str, dict[str, Any]], by_source: dict[str, dict[str, Any]]) -> list[str]:
    """One message per class or source that lost more than half its pairs (also logged as warnings)."""
    messages = []
    for kind, table in (("class", by_class), ("source", by_source)):
        for name, r in table.items():
            if r["dropped"] * 2 > r["pairs"]:
                mean = r["mean"]
                messages.append(f"{kind} {name}: {r['dropped']} of {r['pairs']} pairs dropped "
                                f"({r['dropped_by_floor']} by the synthetic CLIP floor); mean quality "
                                f"{mean['quality']:.2f}, sanity {mean['sanity']:.2f}, clip {mean['clip']:.2f}")
    for m in messages:
        log.warning("vlmlab corpus filter: %s", m)
    return messages


def filter_corpus(cfg: FilterConfig) -> dict[str, Any]:
    """Score, rank and filter a corpus; write ``filtered/`` and return the quality report."""
    import ray

    from vlmlab.config import absolute_paths

    cfg = absolute_paths(cfg, ("corpus", "model"))  # the scorers run in Ray actors elsewhere
    corpus = Path(cfg.corpus)
    dataset_path = corpus / "dataset.json"
    if not dataset_path.exists():
        raise FileNotFoundError(f"{dataset_path} not found: run `vlmlab corpus build` first")
    if not 0 < cfg.keep <= 1:
        raise ValueError(f"--keep {cfg.keep}: must be in (0, 1]")
    if cfg.min_per_class < 0:
        raise ValueError(f"--min-per-class {cfg.min_per_class}: must be 0 or more")
    weights = parse_weights(cfg.weights)
    dataset = json.loads(dataset_path.read_text())
    pairs = dataset["pairs"]
    rows = [{"image_id": p["image_id"], "image_path": p["image_path"], "caption": p["caption"],
             "caption_sources": json.dumps(p["caption_sources"])} for p in pairs]
    from vlmlab.progress import collect_rows

    scored = collect_rows(ray.data.from_items(rows).map_batches(
        PairScorer, fn_constructor_args=(cfg.model, str(corpus)), batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency), num_gpus=cfg.num_gpus), len(rows),
        "corpus filter", "pairs")
    by_id = {r["image_id"]: r for r in scored}
    raw = np.array([by_id[p["image_id"]]["clip_raw"] for p in pairs])
    mismatch = np.array([by_id[p["image_id"]]["clip_mismatch"] for p in pairs])
    low = float(np.nanmean(mismatch)) if np.isfinite(mismatch).any() else float(raw.min())
    high = float(np.percentile(raw, 95))
    clip = np.clip((raw - low) / max(high - low, 1e-6), 0, 1)
    sanity = np.array([by_id[p["image_id"]]["sanity"] for p in pairs])
    quality = np.array([by_id[p["image_id"]]["quality"] for p in pairs])
    score = weights[0] * clip + weights[1] * sanity + weights[2] * quality
    synthetic = np.array([p["source"] == "synthetic" for p in pairs])
    floor_drop = synthetic & (clip < cfg.min_clip_synthetic)
    groups = [group_of(p) for p in pairs]
    ids = [p["image_id"] for p in pairs]
    kept = select_pairs(score, groups, floor_drop, ids, cfg.keep, cfg.keep_per_class, cfg.min_per_class)
    order = np.lexsort((np.array(ids), -score))
    cutoff = float(score[kept].min()) if kept.any() else float("inf")
    for i, p in enumerate(pairs):
        r = by_id[p["image_id"]]
        p["scores"] = {"clip": float(clip[i]), "clip_raw": float(raw[i]), "sanity": float(sanity[i]),
                       "quality": float(quality[i]), "score": float(score[i]),
                       **{k: float(r[k]) for k in QUALITY_PARTS}}
        p["kept"] = bool(kept[i])
        p["drop_reason"] = "" if kept[i] else ("synthetic clip floor" if floor_drop[i] else "below keep cutoff")
    out = corpus / "filtered"
    out.mkdir(parents=True, exist_ok=True)
    kept_pairs = [pairs[i] for i in sorted(np.flatnonzero(kept), key=lambda i: -score[i])]
    sources = sorted({p["source"] for p in pairs})
    components = {"clip": clip, "sanity": sanity, "quality": quality, "score": score,
                  **{k: np.array([by_id[p["image_id"]][k] for p in pairs], float) for k in QUALITY_PARTS}}
    by_class = {g: group_report(np.array([x == g for x in groups]), kept, floor_drop, components)
                for g in sorted(set(groups))}
    by_source = {s: group_report(np.array([p["source"] == s for p in pairs]), kept, floor_drop, components)
                 for s in sources}
    report = {
        "pairs": len(pairs), "kept": int(kept.sum()), "dropped": int((~kept).sum()),
        "weights": dict(zip(COMPONENTS, map(float, weights))),
        "thresholds": {"keep": cfg.keep, "keep_per_class": cfg.keep_per_class, "min_per_class": cfg.min_per_class,
                       "score_cutoff": cutoff, "min_clip_synthetic": cfg.min_clip_synthetic,
                       "clip_normalisation": {"model": cfg.model, "mismatch_mean": low, "matched_p95": high}},
        "components": {"clip": _summary(clip), "clip_raw": _summary(raw), "sanity": _summary(sanity),
                       "quality": _summary(quality), "score": _summary(score)},
        "by_source": by_source,
        "by_class": by_class,
        "warnings": loss_warnings(by_class, by_source),
        "worst": [{k: pairs[i][k] for k in ("image_id", "image_path", "caption", "source", "label", "scores",
                                            "drop_reason")}
                  for i in order[::-1][:10]],
    }
    filtered = {k: v for k, v in dataset.items() if k != "pairs"} | {
        "source_corpus_hash": dataset["corpus_hash"], "pairs": kept_pairs,
        "stats_kept": {s: sum(p["source"] == s for p in kept_pairs) for s in sources}}
    (out / "filtered_dataset.json").write_text(json.dumps(filtered, indent=1) + "\n")
    (out / "quality_report.json").write_text(json.dumps(report, indent=1) + "\n")
    # Image paths gain "../" so they stay relative to the Parquet file's own directory.
    write_pairs_parquet(kept_pairs, out / "pairs.parquet", prefix="../")
    plot_scores(pairs, out / "score_distributions.png", cutoff, by_class)
    return report


def plot_scores(pairs: list[dict[str, Any]], path: Path, cutoff: float,
                by_class: dict[str, dict[str, Any]] | None = None) -> Path:
    """Histograms of each component and of the score, kept vs dropped, with the cutoff line; below
    them, per (source, class) group, the kept fraction (the half line marks a warning) and the
    mean of each component."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_class = by_class or {}
    fig, axes = plt.subplots(2, 4, figsize=(14, 7), gridspec_kw={"height_ratios": [1, 1.4]})
    for ax, key in zip(axes[0], (*COMPONENTS, "score")):
        for kept, colour in ((True, "tab:green"), (False, "tab:red")):
            vals = [p["scores"][key] for p in pairs if p["kept"] == kept]
            ax.hist(vals, bins=20, range=(0, 1), alpha=0.6, color=colour, label="kept" if kept else "dropped")
        ax.set_title(key)
    axes[0, -1].axvline(cutoff, color="k", linestyle="--")
    axes[0, -1].legend()
    names = list(by_class)
    at = np.arange(len(names))
    frac = axes[1, 0]
    frac.barh(at, [by_class[g]["kept_fraction"] for g in names],
              color=["tab:red" if by_class[g]["dropped"] * 2 > by_class[g]["pairs"] else "tab:green" for g in names])
    frac.axvline(0.5, color="k", linestyle="--")
    frac.set(yticks=at, yticklabels=[f"{g} ({by_class[g]['kept']}/{by_class[g]['pairs']})" for g in names],
             xlim=(0, 1), title="kept fraction per class")
    frac.invert_yaxis()
    for ax, key in zip(axes[1, 1:], COMPONENTS):
        ax.barh(at, [by_class[g]["mean"][key] for g in names], color="tab:blue")
        ax.set(yticks=at, yticklabels=[], xlim=(0, 1), title=f"mean {key} per class")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    """``vlmlab corpus filter CORPUS --model SPEC [--keep 0.7] [...]``."""
    cfg = parse_job_config(argv, "vlmlab corpus filter", __doc__.split("\n")[0], FilterConfig, "corpus", "CORPUS")
    if not cfg.model:
        raise SystemExit("vlmlab corpus filter: --model SPEC is required (a CLIP model spec, e.g. a model directory)")
    start_ray()
    report = filter_corpus(cfg)
    print(json.dumps({"pairs": report["pairs"], "kept": report["kept"], "dropped": report["dropped"],
                      "by_source": {s: {k: r[k] for k in ("pairs", "kept", "dropped", "dropped_by_floor")}
                                    for s, r in report["by_source"].items()},
                      "warnings": report["warnings"]}, indent=1))


if __name__ == "__main__":
    main()
