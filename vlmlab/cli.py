"""The ``vlmlab`` command line: a table of verbs, each dispatched lazily to a module's ``main``.

Every verb is also ``python -m <module>`` (so ``ray job submit -- python -m pipelines.extract``
runs the same code), and every ``main`` is a thin shell over a library function. Nothing heavy
is imported until a verb is chosen, so ``vlmlab --help`` is instant.
"""

from __future__ import annotations

import importlib
import sys

# verb -> (module whose main(argv) runs it, one-line description). Longer verbs ("study colours run",
# "train lora") are matched before shorter ones.
VERBS: dict[str, tuple[str, str]] = {
    "samples": ("vlmlab.testing.samples", "write deterministic procedural sample data (tiles, scenes, photos)"),
    "tiny": ("vlmlab.testing.tiny", "build, briefly train and save the offline tiny CLIP model"),
    "demo": ("pipelines.demo", "run the main job end to end on sample data"),
    "extract": ("pipelines.extract", "embed a folder of images into an embedding store (Ray Data, resumable)"),
    "export": ("pipelines.export", "write a store as image_embeddings.npy + image_paths.json"),
    "serve": ("serving.search", "serve search/classify endpoints and the search page on Ray Serve"),
    "corpus build": ("pipelines.corpus", "build the augmented, captioned, synthetic training corpus (Ray Data)"),
    "corpus filter": ("pipelines.quality", "score corpus pairs (CLIP, sanity, image quality) and keep the best"),
    "train lora": ("training.lora", "LoRA contrastive fine-tuning under Ray Train (DDP or DeepSpeed)"),
    "tune lora": ("training.tune", "Ray Tune ASHA search over LoRA settings; exports the best adapter"),
    "evaluate retrieval": ("training.evaluate", "recall@1/5/10 both ways, base model vs adapted"),
    "train inspect": ("training.inspection", "focal-loss CLIP condition classifier on YOLO crops (Ray Train)"),
    "tune inspect": ("training.tune_inspect", "Ray Tune ASHA search over the condition classifier's recipe"),
    "evaluate inspect": ("training.inspect_eval", "condition classifier: accuracy, F1, confusion matrix vs zero-shot"),
    "train detector": ("training.detector", "YOLO detector training on a YOLO dataset (ultralytics, offline)"),
    "inspect": ("pipelines.inspection", "two-stage YOLO -> CLIP inspection of images: JSON + annotated PNG"),
    "cluster": ("vlmlab.clusters", "cluster a store's embeddings; UMAP map, montage, tile map"),
    "compare": ("vlmlab.compare", "compare two image sets: Frechet, MMD test, precision/recall, duplicates"),
    "dedup": ("vlmlab.dedup", "near-duplicate groups in a store"),
    "index": ("vlmlab.index", "build or update a store's FAISS index (auto: exact or tuned approximate)"),
    "store verify": ("vlmlab.store_verify", "check a store's parts; --quarantine moves unreadable ones aside"),
    "search": ("vlmlab.search", "text/image search of a store, with negative terms, filters, montage"),
    "similar": ("vlmlab.similar", "store images most like an image file or a store id"),
    "classify": ("vlmlab.classify", "zero-shot classification of a store; metrics against labels"),
    "study colours run": ("pipelines.studies.colours", "colour-patch x concept scores, models x prompt styles (Ray)"),
    "study colours analyze": ("vlmlab.studies.analyze", "colour-concept fit vs human ratings: metrics, ΔS, report"),
    "study grid": ("pipelines.studies.grid", "zero-shot classification over models x template sets (Ray)"),
    "samples ratings": ("vlmlab.testing.ratings", "write synthetic colour-concept ratings (not human data)"),
    "train probe": ("vlmlab.probe", "few-shot probe (logistic, kNN, Tip-Adapter) on stored embeddings, calibrated"),
    "evaluate probe": ("vlmlab.probe_curve", "few-shot curve: accuracy, ECE and prediction-set size vs shots"),
    "samples textures": ("vlmlab.testing.textures", "real-photo texture crops (skimage), intact and with defects"),
    "vlm tiny": ("vlmlab.testing.tiny_vlm", "build, briefly train and save the offline tiny Qwen2-VL"),
    "vlm data": ("pipelines.nlvr2", "prepare NLVR2 (hub id, lil-lab directory or Parquet/JSONL) with a manifest"),
    "vlm eval": ("pipelines.vlm_eval", "NLVR2 evaluation of a VLM: predictions, official metrics, errors.html"),
    "vlm score": ("vlmlab.nlvr", "score an identifier,prediction CSV exactly as the official NLVR2 script"),
    "vlm train": ("training.vlm", "LoRA / Q-LoRA fine-tuning of a VLM on NLVR2 under Ray Train"),
    "tune vlm": ("training.tune_vlm", "Ray Tune ASHA search over the NLVR2 LoRA learning rate and rank"),
    "vlm gallery": ("vlmlab.nlvr_pages", "HTML contact sheet of NLVR pairs (UIDs, random, bookmarks)"),
    "vlm sample": ("vlmlab.nlvr_data", "metadata (and images) of one NLVR example"),
    "vlm bookmark": ("vlmlab.bookmarks", "bookmark NLVR examples: add | list | remove UID"),
    "vlm playground": ("vlmlab.playground", "ask a VLM about one or two images; answers logged with every knob"),
    "vlm serve": ("serving.vlm", "serve POST /vlm/ask (statement or prompt about images) on Ray Serve"),
}


def usage() -> str:
    """The help text listing every verb."""
    width = max(len(v) for v in VERBS)
    lines = ["usage: vlmlab VERB [args...]   (vlmlab VERB --help for a verb's options)", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {desc}" for verb, (_, desc) in VERBS.items()]
    return "\n".join(lines)


# What a user can cause or meet (a bad path, store, spec, config, filter, a run that cannot start):
# reported as one line; --debug shows the traceback instead.
USER_ERRORS = (ValueError, OSError, RuntimeError, KeyError, ImportError)


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``vlmlab VERB ...`` to the verb's module; ``--debug`` anywhere keeps tracebacks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    for n in range(max(len(v.split()) for v in VERBS), 0, -1):
        verb = " ".join(argv[:n])
        if len(argv) >= n and verb in VERBS:
            module = importlib.import_module(VERBS[verb][0])
            try:
                module.main(argv[n:])
            except USER_ERRORS as exc:
                if debug:
                    raise
                reason = str(exc) if not isinstance(exc, KeyError) else str(exc.args[0] if exc.args else exc)
                print(f"vlmlab {verb}: {reason or type(exc).__name__} ({type(exc).__name__}; --debug shows where)",
                      file=sys.stderr)
                raise SystemExit(2) from None
            return
    print(f"vlmlab: unknown verb {argv[0]!r}\n\n{usage()}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
