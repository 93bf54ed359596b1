"""Corpus throughput: images/s of ``corpus build`` and of ``corpus filter`` on this machine.

Side by side in one run: build without and with augmentations (input images/s and output
pairs/s), and the filter at two batch sizes (pairs/s). Prints ratios and appends one JSON line to
bench/results.jsonl.

    python bench/corpus.py --samples DIR --model SPEC [--images 48]

Without ``--samples``/``--model`` the sample data and the tiny CLIP are built into a temp dir.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.jsonl"


def timed(fn, *args):
    """Return (result, seconds) of one call."""
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and return the JSON record it appended."""
    import ray

    from pipelines.corpus import CorpusConfig, build_corpus
    from pipelines.quality import FilterConfig, filter_corpus
    from vlmlab.runtime import start_ray
    from vlmlab.testing.samples import copy_tiles

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", help="a `vlmlab samples` directory")
    parser.add_argument("--model", help="CLIP model spec for the filter")
    parser.add_argument("--images", type=int, default=48, help="tiles to use")
    parser.add_argument("--augmentations", type=int, default=3)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-corpus-"))
    samples = Path(args.samples) if args.samples else work / "samples"
    if not args.samples:
        from vlmlab.testing.samples import build_samples

        build_samples(samples)
    model = args.model
    if not model:
        from vlmlab.testing.tiny import build_tiny_model

        model = str(build_tiny_model(work / "tiny", samples))
    images = work / "images"
    rows = copy_tiles(samples, images, slice(args.images))
    if not ray.is_initialized():
        start_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    build_corpus(CorpusConfig(images=str(images), out=str(work / "warm"), augmentations=0, zoom=False))  # warm-up
    record: dict = {"bench": "corpus", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "images": len(rows), "augmentations": args.augmentations}
    for name, aug, zoom in (("build_plain", 0, False), ("build_augmented", args.augmentations, True)):
        cfg = CorpusConfig(images=str(images), out=str(work / name), captions=str(images / "captions.csv"),
                           augmentations=aug, zoom=zoom, batch_size=8)
        dataset, seconds = timed(build_corpus, cfg)
        record[name] = {"seconds": round(seconds, 2), "images_per_s": round(len(rows) / seconds, 2),
                        "pairs": dataset["total"], "pairs_per_s": round(dataset["total"] / seconds, 2)}
    for batch in (8, 32):
        report, seconds = timed(filter_corpus, FilterConfig(corpus=str(work / "build_augmented"), model=model,
                                                            batch_size=batch))
        record[f"filter_batch{batch}"] = {"seconds": round(seconds, 2), "pairs": report["pairs"],
                                          "pairs_per_s": round(report["pairs"] / seconds, 2)}
    record["ratios"] = {
        "build_pairs_per_s_augmented_over_plain": round(
            record["build_augmented"]["pairs_per_s"] / record["build_plain"]["pairs_per_s"], 2),
        "build_images_per_s_augmented_over_plain": round(
            record["build_augmented"]["images_per_s"] / record["build_plain"]["images_per_s"], 2),
        "filter_batch32_over_batch8": round(
            record["filter_batch32"]["pairs_per_s"] / record["filter_batch8"]["pairs_per_s"], 2),
        "filter_over_build_pairs_per_s": round(
            record["filter_batch32"]["pairs_per_s"] / record["build_augmented"]["pairs_per_s"], 2),
    }
    print(json.dumps(record, indent=1))
    with open(RESULTS, "a") as f:
        f.write(json.dumps(record) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return record


if __name__ == "__main__":
    main()
