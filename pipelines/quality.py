"""``vlmlab corpus filter``: score every pair of a corpus and keep the best.

score = w_clip * CLIP similarity (normalised per model) + w_sanity * sanity + w_quality * image quality

- CLIP: cosine of image and caption embeddings, rescaled so the model's mismatched-pair mean is
  0 and its 95th percentile of matched pairs is 1 (clipped to 0..1): raw cosines of different
  models live on different scales, this puts them on one.
- sanity: the share of checkable caption claims that hold: colour words against the image's
  colour families, M2B spatial phrases against the cell they name, and for composed scenes the
  number of objects named against the YOLO label lines.
- quality: mean of brightness (not near black or white), contrast (grey std) and sharpness
  (log Laplacian variance); each 0..1.

Synthetic pairs under ``--min-clip-synthetic`` are dropped first; then the top ``--keep``
fraction of all pairs (by score) is kept.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.captions import COLOUR_MEANINGS, analyse_image, laplacian_variance, to_array
from pipelines.corpus import parse_job_config, write_pairs_parquet
from vlmlab.images import read_image
from vlmlab.runtime import start_ray

COMPONENTS = ("clip", "sanity", "quality")
# Caption words that claim colour families (see pipelines.captions.COLOUR_MEANINGS); a claim holds
# when any of its families covers a grid cell. Rock names allow the families their tiles show.
CLAIM_WORDS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("green", "vegetation", "grass", "plants", "shrubs"), ("green",)),
    **dict.fromkeys(("blue", "water"), ("blue",)),
    "basalt": ("dark", "grey"),
    **dict.fromkeys(("granite", "grey", "gray", "concrete"), ("grey", "brown", "bright")),
    "fractured": ("grey", "dark", "brown"),
    **dict.fromkeys(("sandstone", "tan", "orange", "brown", "soil"), ("brown",)),
    **dict.fromkeys(("pale", "white", "beige"), ("bright", "grey", "brown")),
}
_PHRASE = re.compile(r"(" + "|".join(map(re.escape, COLOUR_MEANINGS.values())) +
                     r") in the (upper|middle|lower|centre) ?(left|centre|right)?")
_ROWS, _COLS = ("upper", "middle", "lower"), ("left", "centre", "right")


@dataclass(frozen=True)
class FilterConfig:
    """What ``vlmlab corpus filter`` does."""

    corpus: str = field(default="", metadata={"help": "corpus directory written by vlmlab corpus build"})
    model: str = field(default="", metadata={"help": "CLIP model spec for the similarity component"})
    keep: float = field(default=0.7, metadata={"help": "fraction of all pairs to keep (best scores)"})
    weights: str = field(default="0.5,0.25,0.25", metadata={"help": "weights of clip,sanity,quality"})
    min_clip_synthetic: float = field(default=0.25, metadata={"help": "normalised CLIP floor for synthetic pairs"})
    batch_size: int = field(default=32, metadata={"help": "pairs per Ray Data batch"})
    concurrency: int = field(default=1, metadata={"help": "scoring actors"})
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs per scoring actor (0 on CPU)"})


def image_quality(arr: np.ndarray) -> dict[str, float]:
    """Brightness, contrast and sharpness scores (each 0..1) of an RGB float image in 0..1."""
    grey = arr.mean(-1)
    b = float(grey.mean())
    lap = laplacian_variance(arr)
    return {
        "brightness": float(np.clip(min(b, 1 - b) / 0.15, 0, 1)),
        "contrast": float(np.clip(grey.std() / 0.08, 0, 1)),
        # Laplacian variance 1e-5 (smooth blur) -> 0, 1e-2 (sharp texture with noise) -> 1.
        "sharpness": float(np.clip((math.log10(lap + 1e-12) + 5) / 3, 0, 1)),
    }


def sanity_score(arr: np.ndarray, caption: str, given: str, yolo_lines: int | None) -> tuple[float, int]:
    """Share of checkable claims that hold, and how many were checked (no claims: 1.0, 0)."""
    a = analyse_image(arr)
    present = {c for c, f in a["colour_fractions"].items() if f > 0}
    checks: list[bool] = []
    words = set(re.findall(r"[a-z]+", given.lower()))
    for word in sorted(words & set(CLAIM_WORDS)):
        checks.append(bool(present & set(CLAIM_WORDS[word])))
    meaning_to_family = {v: k for k, v in COLOUR_MEANINGS.items()}
    for meaning, row, col in _PHRASE.findall(caption):
        r, c = (1, 1) if row == "centre" else (_ROWS.index(row), _COLS.index(col or "centre"))
        checks.append(a["cells"][3 * r + c]["colour"] == meaning_to_family[meaning])
    if yolo_lines is not None and given.startswith("an inspection scene with "):
        checks.append(len(given.split(", ")) == yolo_lines)
    return (float(np.mean(checks)) if checks else 1.0), len(checks)


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
    weights = parse_weights(cfg.weights)
    dataset = json.loads(dataset_path.read_text())
    pairs = dataset["pairs"]
    rows = [{"image_id": p["image_id"], "image_path": p["image_path"], "caption": p["caption"],
             "caption_sources": json.dumps(p["caption_sources"])} for p in pairs]
    scored = ray.data.from_items(rows).map_batches(
        PairScorer, fn_constructor_args=(cfg.model, str(corpus)), batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency), num_gpus=cfg.num_gpus).take_all()
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
    n_keep = min(int(round(cfg.keep * len(pairs))), int((~floor_drop).sum()))
    order = np.lexsort((np.array([p["image_id"] for p in pairs]), -score))  # ties broken by id
    candidates = [i for i in order if not floor_drop[i]]
    kept = np.zeros(len(pairs), bool)
    kept[candidates[:n_keep]] = True
    cutoff = float(score[candidates[n_keep - 1]]) if n_keep else float("inf")
    for i, p in enumerate(pairs):
        r = by_id[p["image_id"]]
        p["scores"] = {"clip": float(clip[i]), "clip_raw": float(raw[i]), "sanity": float(sanity[i]),
                       "quality": float(quality[i]), "score": float(score[i]),
                       **{k: float(r[k]) for k in ("brightness", "contrast", "sharpness")}}
        p["kept"] = bool(kept[i])
        p["drop_reason"] = "" if kept[i] else ("synthetic clip floor" if floor_drop[i] else "below keep cutoff")
    out = corpus / "filtered"
    out.mkdir(parents=True, exist_ok=True)
    kept_pairs = [pairs[i] for i in sorted(np.flatnonzero(kept), key=lambda i: -score[i])]
    sources = sorted({p["source"] for p in pairs})
    report = {
        "pairs": len(pairs), "kept": int(kept.sum()), "dropped": int((~kept).sum()),
        "weights": dict(zip(COMPONENTS, map(float, weights))),
        "thresholds": {"keep": cfg.keep, "score_cutoff": cutoff, "min_clip_synthetic": cfg.min_clip_synthetic,
                       "clip_normalisation": {"model": cfg.model, "mismatch_mean": low, "matched_p95": high}},
        "components": {"clip": _summary(clip), "clip_raw": _summary(raw), "sanity": _summary(sanity),
                       "quality": _summary(quality), "score": _summary(score)},
        "by_source": {s: {"kept": int((kept & (np.array([p["source"] == s for p in pairs]))).sum()),
                          "dropped": int((~kept & (np.array([p["source"] == s for p in pairs]))).sum()),
                          "dropped_by_floor": int((floor_drop & (np.array([p["source"] == s for p in pairs]))).sum())}
                      for s in sources},
        "worst": [{k: pairs[i][k] for k in ("image_id", "image_path", "caption", "source", "scores", "drop_reason")}
                  for i in order[::-1][:10]],
    }
    filtered = {k: v for k, v in dataset.items() if k != "pairs"} | {
        "source_corpus_hash": dataset["corpus_hash"], "pairs": kept_pairs,
        "stats_kept": {s: sum(p["source"] == s for p in kept_pairs) for s in sources}}
    (out / "filtered_dataset.json").write_text(json.dumps(filtered, indent=1) + "\n")
    (out / "quality_report.json").write_text(json.dumps(report, indent=1) + "\n")
    # Image paths gain "../" so they stay relative to the Parquet file's own directory.
    write_pairs_parquet(kept_pairs, out / "pairs.parquet", prefix="../")
    plot_scores(pairs, out / "score_distributions.png", cutoff)
    return report


def plot_scores(pairs: list[dict[str, Any]], path: Path, cutoff: float) -> Path:
    """Histograms of each component and of the score, kept vs dropped, with the cutoff line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(14, 3))
    for ax, key in zip(axes, (*COMPONENTS, "score")):
        for kept, colour in ((True, "tab:green"), (False, "tab:red")):
            vals = [p["scores"][key] for p in pairs if p["kept"] == kept]
            ax.hist(vals, bins=20, range=(0, 1), alpha=0.6, color=colour, label="kept" if kept else "dropped")
        ax.set_title(key)
    axes[-1].axvline(cutoff, color="k", linestyle="--")
    axes[-1].legend()
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
    print(json.dumps({k: report[k] for k in ("pairs", "kept", "dropped", "by_source")}, indent=1))


if __name__ == "__main__":
    main()
