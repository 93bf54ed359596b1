"""Retrieval evaluation: recall@k image->text and text->image, base model vs adapted side by side.

``vlmlab evaluate retrieval --model SPEC [--adapter DIR] --pairs FILE`` prints a table and JSON.
Captions repeat across images (many tiles share one caption), so the text gallery is the set of
unique captions: an image->text hit is its own caption within the top k; a text->image hit is
any image paired with that caption within the top k.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

KS = (1, 5, 10)


@dataclass(frozen=True)
class EvaluateConfig:
    """What to evaluate."""

    model: str = field(default="", metadata={"help": "base model spec"})
    adapter: str = field(default="", metadata={"help": "adapter directory to compare against the base"})
    pairs: str = field(default="", metadata={"help": "pairs file (Parquet or JSONL)"})
    holdout_fraction: float = field(default=0.2, metadata={
        "help": "evaluate on the pairs a training run with this holdout_fraction and seed held out (train lora's "
                "default 0.2); 1.0 scores every pair, training pairs included"})
    seed: int = field(default=0, metadata={"help": "split seed (use the training run's to get its held-out pairs)"})
    batch_size: int = field(default=64, metadata={"help": "images per encoder batch"})


def recall_at_k(image_embeddings: np.ndarray, text_embeddings: np.ndarray, captions: Sequence[str],
                ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@k both ways for N images and the embeddings of their N captions (L2-normalised, (N, D)).

    Returns ``{"i2t@1": ..., "t2i@1": ..., ...}`` in [0, 1], gallery of unique captions as in the module doc.
    """
    captions = list(captions)
    unique, first, inverse = np.unique(captions, return_index=True, return_inverse=True)
    gallery = text_embeddings[first]
    sims = image_embeddings @ gallery.T  # (N images, U captions)
    result = {}
    i2t_rank = (-sims).argsort(axis=1)
    t2i_rank = (-sims.T).argsort(axis=1)
    for k in ks:
        result[f"i2t@{k}"] = float(np.mean([inverse[i] in i2t_rank[i, :k] for i in range(len(captions))]))
        result[f"t2i@{k}"] = float(np.mean([np.any(inverse[t2i_rank[u, :k]] == u) for u in range(len(unique))]))
    return result


def evaluate_encoder(encoder, frame, batch_size: int = 64) -> dict[str, float]:
    """Recall@1/5/10 of an :class:`~vlmlab.models.Encoder` on a pairs frame (``read_pairs`` output)."""
    import numpy as np

    from vlmlab.images import read_image
    from vlmlab.progress import Progress

    paths = list(frame["image_path"])
    chunks = []
    with Progress(len(paths), "evaluate retrieval", "images") as progress:
        for start in range(0, len(paths), 4 * batch_size):
            images = [read_image(p) for p in paths[start:start + 4 * batch_size]]
            chunks.append(encoder.encode_images(images, batch_size=batch_size))
            progress.update(len(images))
    image_embeddings = np.concatenate(chunks) if chunks else np.zeros((0, encoder.embed_dim), np.float32)
    text_embeddings = encoder.encode_texts(list(frame["caption"]))
    return recall_at_k(image_embeddings, text_embeddings, frame["caption"])


def evaluate_retrieval(cfg: EvaluateConfig) -> dict[str, dict[str, float]]:
    """Recall of the base model and, with ``cfg.adapter``, the adapted one: ``{"base": {...}, "adapted": {...}}``."""
    from training.pairs import read_pairs, split_pairs
    from vlmlab.models import load_model

    if not cfg.model or not cfg.pairs:
        raise ValueError("evaluate retrieval needs --model SPEC and --pairs FILE")
    frame = read_pairs(cfg.pairs)
    if cfg.holdout_fraction < 1.0:
        frame = split_pairs(frame, cfg.holdout_fraction, cfg.seed)[1]
    results = {"base": evaluate_encoder(load_model(cfg.model), frame, cfg.batch_size)}
    if cfg.adapter:
        results["adapted"] = evaluate_encoder(load_model(cfg.model, adapter=cfg.adapter), frame, cfg.batch_size)
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per metric, one column per model."""
    names = list(results)
    metrics = list(next(iter(results.values())))
    lines = [f"{'metric':<8}" + "".join(f"{n:>10}" for n in names)]
    lines += [f"{m:<8}" + "".join(f"{results[n][m]:>10.3f}" for n in names) for m in metrics]
    return "\n".join(lines)


def _report(cfg: EvaluateConfig, results: dict[str, dict[str, float]]) -> None:
    print(format_table(results))
    print(json.dumps({"config": asdict(cfg), "recall": results}))


def main(argv: list[str] | None = None) -> None:
    """``vlmlab evaluate retrieval``: print the recall table and its JSON."""
    from training.run import job_main

    job_main(EvaluateConfig, evaluate_retrieval, argv, prog="vlmlab evaluate retrieval",
             description=__doc__.splitlines()[0], report=_report, needs_ray=False)


if __name__ == "__main__":
    main()
