"""Does the condition classifier's default recipe learn on the model it is given? Learning rates side by side.

    python bench/inspection_lr.py [--model TINY_DIR] [--lrs 2e-5 auto 1e-3] [--epochs 15]

Trains ``vlmlab train inspect`` with each learning rate (``auto`` = the default, scaled to the model's
width: ``training.inspection.learning_rate_for``; ``2e-5`` = the lab's ViT-L/14 recipe) and otherwise
default settings on two condition sets — the procedural inspection scenes and the real-photo texture
set (skimage photographs with and without drawn defects) — and reports zero-shot, best validation and
held-out test accuracy of the kept model, and whether training beat zero-shot at all. Appends one JSON
line to bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.jsonl"


def run_one(data: Path, model: str, lr: str, epochs: int, run_dir: Path) -> dict:
    """One default-recipe run at ``lr``; its kept model scored on the test split."""
    from training.inspect_eval import InspectEvalConfig, evaluate_inspect
    from training.inspection import InspectConfig, learning_rate_for, train_inspect
    from vlmlab.models import load_model

    cfg = InspectConfig(data=str(data), model=model, run_dir=str(run_dir), name=f"{data.parent.name}-{lr}",
                        epochs=epochs, workers=2, cpus_per_worker=1)
    if lr != "auto":
        cfg = replace(cfg, lr=float(lr))
    started = time.perf_counter()
    out = train_inspect(cfg)
    seconds = time.perf_counter() - started
    evaluation = evaluate_inspect(InspectEvalConfig(run=str(out["log_dir"]), split="test"))
    return {"lr": lr, "peak_lr": out["metrics"].get("peak_lr", cfg.lr or learning_rate_for(load_model(model))),
            "kept": out["kept"], "zero_shot_val": out["zero_shot_val_accuracy"], "best_val": out["best_val_accuracy"],
            "best_epoch": out["best_epoch"], "test_zero_shot": evaluation["zero_shot"]["accuracy"],
            "test_kept": evaluation["fine_tuned"]["accuracy"], "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> dict:
    """Run every (condition set, learning rate) pair and print the table."""
    import ray

    from vlmlab.runtime import start_ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model spec (default: build the tiny model)")
    parser.add_argument("--lrs", nargs="+", default=["2e-5", "auto"])
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args(argv)
    from vlmlab.testing.samples import build_samples
    from vlmlab.testing.textures import build_texture_set
    from vlmlab.testing.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="vlmlab-bench-lr-"))
    build_samples(work / "samples")
    build_texture_set(work / "textures")
    model = args.model or str(work / "tiny")
    if args.model is None:
        build_tiny_model(model, work / "samples")
    start_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    for data in (work / "samples" / "inspection" / "data.yaml", work / "textures" / "data.yaml"):
        for lr in args.lrs:
            row = {"data": data.parent.name, **run_one(data, model, lr, args.epochs, work / "runs")}
            print(json.dumps(row), flush=True)
            rows.append(row)
    ray.shutdown()
    record = {"bench": "inspection_lr", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "model": "tiny" if args.model is None else args.model, "epochs": args.epochs, "runs": rows}
    with open(RESULTS, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"{'data':<12}{'lr':>8}{'peak lr':>10}{'kept':>12}{'zs val':>8}{'best val':>9}{'zs test':>8}{'test':>7}")
    for r in rows:
        print(f"{r['data']:<12}{r['lr']:>8}{r['peak_lr']:>10.2g}{r['kept']:>12}{r['zero_shot_val']:>8.3f}"
              f"{r['best_val']:>9.3f}{r['test_zero_shot']:>8.3f}{r['test_kept']:>7.3f}")
    return record


if __name__ == "__main__":
    main()
