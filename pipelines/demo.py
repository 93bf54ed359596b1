"""``vlmlab demo``: the main job end to end on sample data, on an embedded local Ray.

Each step is the same library call its own verb makes, so the demo doubles as a walkthrough:
read it top to bottom to see how the product's pieces connect.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vlmlab.testing.samples import ROCK_CLASSES, SamplesConfig, build_samples
from vlmlab.testing.tiny import build_tiny_model


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

    step("3. extract embeddings with Ray Data (vlmlab extract)")
    stores = extract_step(samples, str(model_dir), out / "stores")
    summary["extract"] = stores["summary"]

    step("4. FAISS index and text searches (vlmlab index / vlmlab search)")
    summary["search"] = search_step(stores["tiles"], samples, out)

    step("5. zero-shot classification with prompt ensembles (vlmlab classify)")
    summary["classify"] = classify_step(stores["tiles"], samples, out)

    step("6. clusters, UMAP and tile maps; real vs synthetic (vlmlab cluster / vlmlab compare)")
    summary["explore"] = explore_step(stores["tiles"], stores["synthetic"], out)

    step("7. training corpus: augment, caption, compose, filter (vlmlab corpus build / corpus filter)")
    summary["corpus"] = corpus_step(out, samples, str(model_dir))

    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ndemo finished in {summary['seconds']} s; outputs under {out}")
    return summary


def corpus_step(out: Path, samples: Path, model: str) -> dict:
    """Build a small corpus from the sample tiles (plus composed inspection scenes) and filter it."""
    from pipelines.corpus import CorpusConfig, build_corpus
    from pipelines.quality import FilterConfig, filter_corpus

    dataset = build_corpus(CorpusConfig(images=str(samples / "tiles"), out=str(out / "corpus"),
                                        captions=str(samples / "tiles.csv"), augmentations=1, zoom=False,
                                        synthetic="compose", n=8, inspection=str(samples / "inspection")))
    report = filter_corpus(FilterConfig(corpus=str(out / "corpus"), model=model))
    print(f"corpus {dataset['stats']} -> kept {report['kept']}/{report['pairs']} (by source {report['by_source']})")
    return {"stats": dataset["stats"], "kept": report["kept"], "pairs": report["pairs"]}


def extract_step(samples: Path, model: str, stores: Path) -> dict:
    """Embed the real tiles and the synthetic renderings into two stores on the embedded local Ray."""
    from dataclasses import asdict

    from pipelines.extract import ExtractConfig, extract

    result: dict = {"summary": {}}
    for name, folder, source in (("tiles", "tiles", "real"), ("synthetic", "synthetic", "synthetic")):
        run = extract(ExtractConfig(images=str(samples / folder), model=model, out=str(stores / name), source=source))
        print(f"{name}: {run.line()}")
        result[name] = stores / name
        result["summary"][name] = {k: v for k, v in asdict(run).items() if k != "pipelines"}
    return result


def _tile_labels(samples: Path) -> dict[str, str]:
    import csv

    with open(samples / "tiles.csv") as f:
        return {row["path"].split("/", 1)[1]: row["label"] for row in csv.DictReader(f)}


def search_step(store_dir: Path, samples: Path, out: Path) -> dict:
    """Index the tile store, search each class description, print the hits and precision@10."""
    from vlmlab.index import build_index
    from vlmlab.search import Query, open_for_query, search, write_montage
    from vlmlab.store import EmbeddingStore

    built = build_index(EmbeddingStore.open(store_dir))
    print(f"index: {built.meta['kind']} over {len(built)} vectors")
    index, encoder = open_for_query(store_dir)
    labels = _tile_labels(samples)
    precision = {}
    for name, phrases in ROCK_CLASSES.items():
        hits = search(index, encoder, Query(text=phrases[0], k=10, templates="rocks"))
        precision[name] = sum(labels.get(h.path) == name for h in hits) / len(hits)
        best = ", ".join(f"{h.path} ({h.score:.2f})" for h in hits[:3])
        print(f"{phrases[0]!r}: P@10 {precision[name]:.0%} | {best}")
    query = Query(text="dark vesicular basalt", negative="vegetation", k=12, templates="rocks",
                  where="tile_x >= 65540")
    montage = write_montage(index, search(index, encoder, query), out / "search_montage.png")
    print(f"montage of 'dark vesicular basalt' minus 'vegetation' where tile_x >= 65540: {montage}")
    return {"precision_at_10": precision, "montage": str(montage)}


def classify_step(store_dir: Path, samples: Path, out: Path) -> dict:
    """Zero-shot classification of the tiles over the six rock classes, scored against tiles.csv."""
    from vlmlab.classify import classify_store, evaluate_predictions
    from vlmlab.models import load_model
    from vlmlab.store import EmbeddingStore

    store = EmbeddingStore.open(store_dir)
    preds = classify_store(store, load_model(store.model), list(ROCK_CLASSES), templates="rocks",
                           hierarchy={"igneous": ["granite", "basalt"], "sedimentary": ["sandstone"]})
    metrics = evaluate_predictions(preds, samples / "tiles.csv", out / "classify")
    print(f"accuracy {metrics['accuracy']:.1%} (chance {1 / len(ROCK_CLASSES):.1%}), "
          f"macro F1 {metrics['macro_f1']:.3f}; confusion matrix in {out / 'classify'}")
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def explore_step(tiles: Path, synthetic: Path, out: Path) -> dict:
    """Cluster the tiles (UMAP map + tile map) and compare real tiles with synthetic renderings."""
    from vlmlab.clusters import cluster_store
    from vlmlab.compare import compare_stores
    from vlmlab.store import EmbeddingStore

    clusters = cluster_store(EmbeddingStore.open(tiles), out / "clusters", k=len(ROCK_CLASSES))
    print(f"clusters: sizes {clusters['sizes']}; maps in {out / 'clusters'}")
    report = compare_stores(EmbeddingStore.open(tiles), EmbeddingStore.open(synthetic), out / "compare",
                            permutations=200)
    print(f"real vs synthetic: mean-embedding cosine {report['mean_cosine']:.3f}, "
          f"MMD p-value {report['mmd_p_value']:.3f}; report in {out / 'compare'}")
    return {"cluster_sizes": clusters["sizes"], "mean_cosine": report["mean_cosine"],
            "mmd_p": report["mmd_p_value"]}


def main(argv: list[str] | None = None) -> None:
    """``vlmlab demo --out DIR``: run the demo."""
    parser = argparse.ArgumentParser(prog="vlmlab demo", description=main.__doc__)
    parser.add_argument("--out", default="demo_out", help="directory for every demo output")
    args = parser.parse_args(argv)
    run_demo(args.out)


if __name__ == "__main__":
    main()
