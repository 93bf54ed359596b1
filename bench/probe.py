"""Few-shot probes vs zero-shot vs a full fine-tune, and conformal coverage vs alpha.

    python bench/probe.py [--work DIR] [--model SPEC --samples DIR] [--per-class 100] [--repeats 5] [--epochs 15]

Without ``--model``/``--samples`` it builds what it needs under ``--work`` (a temporary folder by default):
the sample data (``vlmlab samples``), the tiny CLIP (``vlmlab tiny``) and the real-photo texture set
(``vlmlab samples textures``: skimage brick/grass/gravel photos, intact and with synthetic cracks, stains
and spalls). Both image sets are embedded by the real extraction pipeline (float32) on a local Ray.

Measured side by side in one run:
- probe fit time and test accuracy vs shots per class (0, 1, 2, 4, 8, 16, all) for logistic, kNN and
  Tip-Adapter, on the sample tiles (true labels; and relabelled, where the prompts are wrong) and on the
  texture photos (their train/valid/test folders);
- on the texture photos' test split: zero-shot vs the best probe vs a full fine-tune of the image tower
  (``vlmlab train inspect``: last 2 blocks + head, focal loss, Ray Train), with the fine-tune's wall time
  against the probe's fit time;
- coverage and mean set size vs alpha (0.05, 0.1, 0.2) for LAC, APS and RAPS, for zero-shot, the probe
  and the fine-tune: the texture set's valid+test rows are re-split at random into calibration and test
  halves ``--splits`` times (temperature + conformal fitted on one half, scored on the other).

Prints the tables and appends one JSON line to bench/results.jsonl.
"""

import argparse
import datetime as dt
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.jsonl"
SHOTS = (0, 1, 2, 4, 8, 16, None)
ALPHAS = (0.05, 0.1, 0.2)


def prepare(args: argparse.Namespace, work: Path) -> tuple[str, Path, Path]:
    """(model spec, samples dir, texture set dir): given, or built under ``work``."""
    from vlmlab.testing.samples import build_samples
    from vlmlab.testing.textures import TextureSetConfig, build_texture_set
    from vlmlab.testing.tiny import build_tiny_model

    samples = Path(args.samples) if args.samples else work / "samples"
    if not args.samples:
        build_samples(samples)
    model = args.model or str(work / "tiny")
    if not args.model:
        build_tiny_model(model, samples)
    textures = work / "textures"
    build_texture_set(textures, TextureSetConfig(per_class=args.per_class))
    return model, samples, textures


def embed(images: Path, model: str, out: Path) -> Path:
    """A float32 store of ``images`` made by the extraction pipeline."""
    from pipelines.extract import ExtractConfig, extract

    extract(ExtractConfig(images=str(images), model=model, out=str(out), readers=1, dtype="float32"))
    return out


def curve(store: Path, labels: Path, templates: str, repeats: int, seed: int, **split: float) -> dict[str, Any]:
    """Few-shot curves of every method on one store (accuracy, fit time, ECE, set size per K)."""
    from vlmlab.classify import class_embeddings
    from vlmlab.models import load_model
    from vlmlab.probe import labelled_rows, split_rows
    from vlmlab.probe_curve import few_shot_curve
    from vlmlab.store import EmbeddingStore

    st = EmbeddingStore.open(store)
    rows = labelled_rows(st, labels)
    parts = split_rows(rows, seed=seed, **split)
    encoder = load_model(st.model, device="cpu")
    text = class_embeddings(encoder, rows.classes, templates)
    curves = few_shot_curve(rows, parts, text, encoder.logit_scale, shots=SHOTS, repeats=repeats, seed=seed)
    return {"rows": rows, "parts": parts, "text": text, "logit_scale": encoder.logit_scale, "curves": curves,
            "splits": {k: int(len(v)) for k, v in parts.items()}}


def compact(curves: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The curve entries without per-draw detail, rounded, for the JSON line."""
    keys = ("shots", "accuracy", "accuracy_std", "macro_f1", "fit_seconds", "ece_before", "ece_after", "coverage",
            "mean_set_size")
    return {m: [{k: (round(e[k], 4) if isinstance(e[k], float) else e[k]) for k in keys if k in e} for e in entries]
            for m, entries in curves.items()}


def fine_tune(model: str, textures: Path, work: Path, epochs: int) -> dict[str, Any]:
    """Fine-tune the condition classifier on the texture set's train split; evaluate it on test (calibrated on val)."""
    from training.inspect_eval import InspectEvalConfig, evaluate_inspect
    from training.inspection import InspectConfig, train_inspect

    cfg = InspectConfig(data=str(textures / "data.yaml"), model=model, run_dir=str(work / "runs"), name="textures",
                        workers=1, epochs=epochs, batch_size=16, lr=1e-3, head_lr_multiplier=10, unfrozen_blocks=2,
                        patience=0, seed=0)
    started = time.perf_counter()
    out = train_inspect(cfg)
    seconds = time.perf_counter() - started
    evaluation = evaluate_inspect(InspectEvalConfig(run=str(out["log_dir"]), split="test", conformal=0.1,
                                                    device="cpu"))
    return {"seconds": seconds, "model_dir": out["model_dir"], "evaluation": evaluation,
            "best_val_accuracy": out["metrics"]["best_val_accuracy"], "epochs": epochs}


def coverage_table(logits: np.ndarray, labels: np.ndarray, classes: list[str], splits: int,
                   seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {alpha: {coverage, coverage_std, mean_set_size, calibration_rows}}}`` over random halves."""
    from vlmlab.calibration import METHODS, Calibration, calibration_report

    rng = np.random.default_rng(seed)
    cells: dict[tuple[str, float], list[tuple[float, float]]] = {}
    rows = 0
    for r in range(splits):
        order = rng.permutation(len(labels))
        cal, test = order[: len(order) // 2], order[len(order) // 2:]
        for method in METHODS:
            record = Calibration.fit(logits[cal], labels[cal], classes, method=method, seed=seed + r)
            rows = len(record.scores[method])
            for alpha in ALPHAS:
                sets = calibration_report(logits[test], labels[test], record, alpha)["conformal"]
                cells.setdefault((method, alpha), []).append((sets["coverage"], sets["mean_set_size"]))
    # E[coverage] = k/(n+1) with k = ceil((n+1)(1-alpha)) for continuous scores: the figure to compare with
    expected = {alpha: math.ceil((rows + 1) * (1 - alpha) - 1e-9) / (rows + 1) for alpha in ALPHAS}
    return {method: {str(alpha): {"coverage": round(float(np.mean([c for c, _ in cells[(method, alpha)]])), 4),
                                  "coverage_std": round(float(np.std([c for c, _ in cells[(method, alpha)]])), 4),
                                  "expected_coverage": round(expected[alpha], 4),
                                  "mean_set_size": round(float(np.mean([s for _, s in cells[(method, alpha)]])), 3),
                                  "conformal_rows": rows}
                     for alpha in ALPHAS} for method in METHODS}


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and append its JSON line to bench/results.jsonl."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--model", default=None, help="model spec (default: build the tiny CLIP)")
    parser.add_argument("--samples", default=None, help="a `vlmlab samples` folder (default: build one)")
    parser.add_argument("--per-class", type=int, default=100, help="texture crops per class (60/20/20 split)")
    parser.add_argument("--repeats", type=int, default=5, help="shot draws per K")
    parser.add_argument("--epochs", type=int, default=15, help="fine-tune epochs")
    parser.add_argument("--splits", type=int, default=50, help="random calibration/test halves for coverage")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import ray
    import scipy.optimize  # noqa: F401  (imported before anything is timed: the first fit must not pay for it)
    import sklearn.model_selection  # noqa: F401

    from training.inspect_data import crop_all, read_instances
    from training.inspection import load_classifier
    from vlmlab.calibration import logits_of
    from vlmlab.probe import fit_probe
    from vlmlab.runtime import start_ray

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model, samples, textures = prepare(args, work)
        start_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
        tiles_store = embed(samples / "tiles", model, work / "stores" / "tiles")
        texture_store = embed(textures / "images", model, work / "stores" / "textures")

        import pandas as pd

        from vlmlab.testing.samples import ROCK_CLASSES

        names = list(ROCK_CLASSES)
        tiles = pd.read_csv(samples / "tiles.csv")
        renamed = tiles[["path"]].assign(label=tiles["label"].map({n: names[(i + 1) % 6] for i, n in enumerate(names)}))
        renamed.to_csv(work / "tiles_relabelled.csv", index=False)
        results: dict[str, Any] = {}
        for name, store, labels, templates, split in (
                ("tiles", tiles_store, samples / "tiles.csv", "plain", {"calibration_fraction": 0.2,
                                                                        "test_fraction": 0.3}),
                ("tiles_relabelled", tiles_store, work / "tiles_relabelled.csv", "plain",
                 {"calibration_fraction": 0.2, "test_fraction": 0.3}),
                ("textures", texture_store, textures / "labels.csv", "inspection", {})):
            results[name] = curve(store, labels, templates, args.repeats, args.seed, **split)
            print(f"\n{name} ({results[name]['splits']}): test accuracy / fit ms by shots per class")
            print(f"{'method':<12}" + "".join(f"{'all' if k is None else k:>14}" for k in SHOTS))
            for method, entries in results[name]["curves"].items():
                print(f"{method:<12}" + "".join(f"{e['accuracy']:>7.3f}/{1000 * e['fit_seconds']:<6.0f}"
                                                for e in entries))

        tuned = fine_tune(model, textures, work, args.epochs)
        tex = results["textures"]
        rows, parts = tex["rows"], tex["parts"]
        zero_entry = tex["curves"]["logistic"][0]
        best_method, best = max(((m, e[-1]) for m, e in tex["curves"].items()), key=lambda me: me[1]["accuracy"])
        ev = tuned["evaluation"]
        side = {"zero_shot": {"accuracy": zero_entry["accuracy"], "macro_f1": zero_entry["macro_f1"],
                              "fit_seconds": 0.0},
                f"probe_{best_method}_all": {"accuracy": best["accuracy"], "macro_f1": best["macro_f1"],
                                             "fit_seconds": best["fit_seconds"]},
                "fine_tune": {"accuracy": ev["fine_tuned"]["accuracy"], "macro_f1": ev["fine_tuned"]["macro_f1"],
                              "fit_seconds": tuned["seconds"],
                              "zero_shot_accuracy_same_crops": ev["zero_shot"]["accuracy"]}}
        print(f"\ntextures test ({len(parts['test'])} photos): zero-shot vs probe vs fine-tune")
        for name, row in side.items():
            print(f"  {name:<22} accuracy {row['accuracy']:.3f}  macro F1 {row['macro_f1']:.3f}  "
                  f"fit {row['fit_seconds']:.2f} s")
        fit_ratio = tuned["seconds"] / max(best["fit_seconds"], 1e-6)
        print(f"  fine-tune wall time / probe fit time: {fit_ratio:.0f}x")

        # coverage vs alpha on the valid+test photos, for three classifiers of increasing quality
        held = np.concatenate([parts["calibration"], parts["test"]])
        y = rows.labels[held]
        pool = parts["train"]
        probe = fit_probe(rows.vectors[pool], rows.labels[pool], tex["text"], tex["logit_scale"], rows.classes,
                          best_method, args.seed)
        classifier = load_classifier(tuned["model_dir"], device="cpu")
        instances = read_instances(textures / "data.yaml", "val") + read_instances(textures / "data.yaml", "test")
        crop_y = np.array([i.class_id for i in instances])
        crop_probs = classifier.predict_proba(crop_all(instances, classifier.crop_margin))
        coverage = {
            "zero_shot": coverage_table(tex["logit_scale"] * rows.vectors[held] @ tex["text"].T, y, rows.classes,
                                        args.splits, args.seed),
            f"probe_{best_method}_all": coverage_table(probe.logits(rows.vectors[held]), y, rows.classes, args.splits,
                                                       args.seed),
            "fine_tune": coverage_table(logits_of(crop_probs), crop_y, classifier.classes, args.splits, args.seed),
        }
        expected = next(iter(next(iter(coverage.values())).values()))
        print(f"\ncoverage / mean set size vs alpha ({args.splits} random calibration/test halves of "
              f"{len(held)} photos; guarantee: coverage >= 1 - alpha; expected k/(n+1): "
              + ", ".join(f"{expected[str(a)]['expected_coverage']:.3f}" for a in ALPHAS) + ")")
        print(f"{'classifier':<24}{'method':<7}" + "".join(f"{'alpha=' + str(a):>16}" for a in ALPHAS))
        for clf, table in coverage.items():
            for method, cells in table.items():
                print(f"{clf:<24}{method:<7}" + "".join(
                    f"{cells[str(a)]['coverage']:>9.3f}/{cells[str(a)]['mean_set_size']:<6.2f}" for a in ALPHAS))
        ray.shutdown()

    line = {
        "bench": "probe", "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        # a local directory is named by its folder only: no path of this machine goes into the results
        "model": Path(model).name if Path(model).exists() else model, "per_class": args.per_class,
        "repeats": args.repeats,
        "curves": {name: {"splits": r["splits"], "classes": len(r["rows"].classes), "curves": compact(r["curves"])}
                   for name, r in results.items()},
        "textures_side_by_side": {k: {m: round(v, 4) for m, v in row.items()} for k, row in side.items()},
        "fine_tune_over_probe_fit_time": round(fit_ratio, 1),
        "fine_tune": {"epochs": tuned["epochs"], "seconds": round(tuned["seconds"], 1),
                      "best_val_accuracy": tuned["best_val_accuracy"],
                      "ece_before": ev["calibration"]["fine_tuned"]["ece_before"],
                      "ece_after": ev["calibration"]["fine_tuned"]["ece_after"]},
        "coverage_vs_alpha": coverage, "coverage_splits": args.splits,
    }
    with open(RESULTS, "a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"\nappended to {RESULTS}")


if __name__ == "__main__":
    main()
