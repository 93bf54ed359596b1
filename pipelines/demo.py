"""``vlmlab demo``: the main job end to end on sample data, on an embedded local Ray.

Each step is the same library call its own verb makes, so the demo doubles as a walkthrough:
read it top to bottom to see how the product's pieces connect.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vlmlab.samples import ROCK_CLASSES, SamplesConfig, build_samples
from vlmlab.tiny import build_tiny_model


def step(title: str) -> None:
    """Print a step banner."""
    print(f"\n=== {title}", flush=True)


def run_demo(out: str | Path) -> dict:
    """Run every demo step under ``out`` and return a summary dict (also written as summary.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    t0 = time.time()

    step("1. sample data (vlmlab samples)")
    samples = out / "samples"
    s = build_samples(samples, SamplesConfig())
    print(f"{s['tiles']} rock tiles, {s['synthetic']} synthetic, inspection: {sum(s['inspection_instances'].values())}"
          f" instances, photos: {len(s['photos'])}")

    step("2. tiny CLIP model (vlmlab tiny)")
    model_dir = out / "tiny-clip"
    report = build_tiny_model(model_dir, samples)
    print(f"held-out text->image top-1 on rock tiles: {report['heldout_top1']:.1%} "
          f"(chance {report['chance']:.1%}), trained in {report['train_seconds']} s")
    summary["tiny_heldout_top1"] = report["heldout_top1"]

    step("3. text -> image similarity on the sample tiles")
    summary["similarity"] = similarity_printout(str(model_dir), samples)

    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ndemo finished in {summary['seconds']} s; outputs under {out}")
    return summary


def similarity_printout(model: str, samples: Path, per_class: int = 3) -> dict[str, float]:
    """For each rock class description, print the best-matching tiles; return precision@k per class."""
    import csv

    from vlmlab.images import read_image
    from vlmlab.models import load_model
    from vlmlab.prompts import ensemble_text_embeddings

    encoder = load_model(model)
    with open(samples / "tiles.csv") as f:
        rows = list(csv.DictReader(f))
    image_emb = encoder.encode_images([read_image(samples / r["path"]) for r in rows])
    names = list(ROCK_CLASSES)
    text_emb = ensemble_text_embeddings(encoder, [ROCK_CLASSES[n][0] for n in names], "rocks")
    sims = text_emb @ image_emb.T
    precision = {}
    for name, row in zip(names, sims, strict=True):
        top = row.argsort()[::-1][:10]
        precision[name] = float(sum(rows[i]["label"] == name for i in top) / len(top))
        best = ", ".join(f"{rows[i]['path']} ({row[i]:.2f})" for i in top[:per_class])
        print(f"{ROCK_CLASSES[name][0]!r}: P@10 {precision[name]:.0%} | {best}")
    return precision


def main(argv: list[str] | None = None) -> None:
    """``vlmlab demo --out DIR``: run the demo."""
    parser = argparse.ArgumentParser(prog="vlmlab demo", description=main.__doc__)
    parser.add_argument("--out", default="demo_out", help="directory for every demo output")
    args = parser.parse_args(argv)
    run_demo(args.out)


if __name__ == "__main__":
    main()
