"""Extraction throughput: the lab's single-process loop vs the Ray Data pipeline, side by side.

    python bench/extract.py [--tiles 2025] [--models tiny open_clip:ViT-B-32]

For each model, on the same >= 2,000 procedural sample tiles in one run:
(a) the seed-style loop: PIL-open files one by one, batches of 32, one forward per batch;
(b) ``pipelines.extract`` on an embedded local Ray (decode tasks overlapping the encoder actor).
Prints images/s and the pipeline/loop ratio, and the fraction of this machine's compute limit
reached (model FLOPs per image x images/s / measured fp32 matmul FLOP/s). One JSON line goes to
bench/results.jsonl. ``open_clip:ViT-B-32`` without a pretrained tag has random weights: fine
for speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results.jsonl"


def matmul_flops(n: int = 1024, repeat: int = 20) -> float:
    """Measured fp32 matmul FLOP/s of this process (all cores torch uses)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * n**3 * repeat / (time.perf_counter() - start)


def flops_per_image(encoder) -> float:
    """Forward FLOPs of the image tower for one image (torch's FLOP counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    pixels = torch.zeros(1, 3, encoder.image_size, encoder.image_size)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        encoder.image_features(pixels)
    return float(counter.get_total_flops())


def seed_loop(paths: list[Path], encoder, batch_size: int = 32) -> float:
    """The lab's original script: open images one by one, batch, forward. Returns images/s."""
    import torch
    from PIL import Image

    start = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[i : i + batch_size]]
        pixels = torch.stack([encoder.preprocess(im) for im in images])
        with torch.no_grad():
            feats = encoder.image_features(pixels)
            (feats / feats.norm(dim=-1, keepdim=True)).numpy()
    return len(paths) / (time.perf_counter() - start)


def pipeline(tiles: Path, model: str, out: Path) -> dict:
    """``pipelines.extract`` on the embedded local Ray; returns its summary."""
    from dataclasses import asdict

    from pipelines.extract import ExtractConfig, extract

    shutil.rmtree(out, ignore_errors=True)
    summary = extract(ExtractConfig(images=str(tiles), model=model, out=str(out), progress_every_s=30))
    return asdict(summary)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the JSON record it appends."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=2025, help="sample tiles to embed (a square grid)")
    parser.add_argument("--models", nargs="+", default=["tiny", "open_clip:ViT-B-32"],
                        help="model specs; 'tiny' builds the tiny model")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args(argv)

    import ray

    from vlmlab.models import load_model
    from vlmlab.samples import SamplesConfig, write_rock_tiles

    work = Path(args.work or tempfile.mkdtemp(prefix="vlmlab-bench-extract-"))
    grid = int(round(args.tiles**0.5))
    samples = work / "samples"
    if not (samples / "tiles.csv").exists():
        write_rock_tiles(samples, SamplesConfig(grid=grid))
    paths = sorted((samples / "tiles").rglob("*.png"))
    peak = matmul_flops()
    print(f"{len(paths)} tiles; matmul peak {peak / 1e9:.1f} GFLOP/s; {os.cpu_count()} cores")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = {}
    for spec in args.models:
        model = spec
        if spec == "tiny":
            from vlmlab.samples import build_samples
            from vlmlab.tiny import build_tiny_model

            if not (work / "tiny" / "tiny_report.json").exists():
                build_samples(work / "tiny-samples")
                build_tiny_model(work / "tiny", work / "tiny-samples")
            model = str(work / "tiny")
        encoder = load_model(model, device="cpu")
        flops = flops_per_image(encoder)
        loop = seed_loop(paths, encoder)
        summary = pipeline(samples / "tiles", model, work / "store")
        piped = summary["images_per_s"]
        rows[spec] = {
            "loop_images_per_s": round(loop, 2),
            "pipeline_images_per_s": piped,
            "pipeline_vs_loop": round(piped / loop, 2),
            "gflops_per_image": round(flops / 1e9, 3),
            "loop_fraction_of_peak": round(flops * loop / peak, 3),
            "pipeline_fraction_of_peak": round(flops * piped / peak, 3),
            "processed": summary["processed"],
        }
        print(f"{spec:24s} loop {loop:7.1f} img/s   pipeline {piped:7.1f} img/s   "
              f"x{piped / loop:.2f}   {flops / 1e9:.2f} GFLOP/img   "
              f"peak fraction loop {flops * loop / peak:.2f} / pipeline {flops * piped / peak:.2f}")
    ray.shutdown()
    record = {"bench": "extract", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
              "cores": os.cpu_count(), "tiles": len(paths), "matmul_gflops": round(peak / 1e9, 1), "models": rows}
    with open(RESULTS, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


if __name__ == "__main__":
    main()
