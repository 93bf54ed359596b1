"""Zero-shot (or adapted) NLVR2 evaluation of a VLM: ``vlmlab vlm eval``.

``vlmlab vlm eval --model SPEC --data DATA --split dev --out EVAL [--adapter DIR] [--mode logits|generate]
[--prompt FILE]`` scores every example of a prepared split:

- ``logits`` compares the scores of "True" and "False" at the answer position (``p_true`` is their
  softmax), which small models answer robustly;
- ``generate`` decodes an answer and parses it (:func:`vlmlab.nlvr.parse_answer`); answers that say
  neither are counted as ``unparseable`` (wrong for the metrics) and listed.

It writes ``EVAL/predictions.jsonl`` (identifier, sentence, label, prediction, p_true, raw_answer),
``EVAL/predictions.csv`` (the official ``identifier,prediction`` form), ``EVAL/metrics.json``
(accuracy and consistency exactly as the official script, n, unparseable, the per-phenomenon
breakdown where the data has one, throughput) and ``EVAL/errors.html`` (every wrong example with
both images, sentence, label, prediction and p_true).

Small splits run in this process, batched. Large ones (``--ray on``, or ``auto`` above
``--ray-threshold`` rows) run as a Ray Data job over the dataset's Parquet parts: ``NlvrScorer``
actors (the model loaded once per actor) on a fractional GPU each where the cluster has GPUs
(``--gpus-per-actor``), else on CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmlab.nlvr import (
    DEFAULT_PROMPT,
    check_prompt_template,
    format_prompt,
    nlvr_metrics,
    parse_answer,
    write_predictions_csv,
)

MODES = ("logits", "generate")
UNPARSEABLE = "unparseable"


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation of a model on a prepared split."""

    model: str = field(default="", metadata={"help": "VLM spec: hub id, hf:ID or local directory"})
    data: str = field(default="", metadata={"help": "prepared dataset directory (vlmlab vlm data)"})
    split: str = field(default="dev", metadata={"help": "split to evaluate"})
    out: str = field(default="", metadata={"help": "output directory"})
    adapter: str = field(default="", metadata={"help": "LoRA adapter directory (vlmlab vlm train)"})
    mode: str = field(default="logits", metadata={"help": "logits | generate"})
    prompt: str = field(default="", metadata={"help": "prompt template file ({sentence}); default: the dataset's"})
    batch_size: int = field(default=16, metadata={"help": "examples per forward pass"})
    max_new_tokens: int = field(default=8, metadata={"help": "generate mode: tokens to decode"})
    limit: int = field(default=0, metadata={"help": "evaluate only the first N examples (0: all)"})
    device: str = field(default="", metadata={"help": "torch device; empty: CUDA when visible"})
    ray: str = field(default="auto", metadata={"help": "auto | on | off: run as a Ray Data job over parts"})
    ray_threshold: int = field(default=4000, metadata={"help": "auto: use Ray Data above this many examples"})
    actors: int = field(default=1, metadata={"help": "Ray Data scorer actors"})
    gpus_per_actor: float = field(default=0.25, metadata={"help": "GPU share per actor where the cluster has GPUs"})
    max_errors_shown: int = field(default=500, metadata={"help": "most wrong examples on errors.html"})


class NlvrScorer:
    """Ray Data stage (and plain callable): score a batch of NLVR rows with a VLM.

    Batch in: ``identifier``, ``sentence``, ``image0``, ``image1`` (encoded bytes). Batch out:
    ``identifier``, ``prediction`` ("True"/"False", or "unparseable" in generate mode), ``p_true``,
    ``raw_answer``. The model is loaded once, in ``__init__``.
    """

    def __init__(self, model: str, adapter: str = "", mode: str = "logits", prompt: str = DEFAULT_PROMPT,
                 batch_size: int = 16, max_new_tokens: int = 8, device: str = "") -> None:
        from vlmlab.backends.qwen2_vl import load_vlm

        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        self.vlm = load_vlm(model, adapter=adapter or None, device=device or None)
        self.mode, self.prompt, self.batch_size, self.max_new_tokens = mode, prompt, batch_size, max_new_tokens

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from vlmlab.images import decode_image

        prompts = [format_prompt(self.prompt, s) for s in batch["sentence"]]
        images = [[decode_image(a), decode_image(b)] for a, b in zip(batch["image0"], batch["image1"])]
        p_true = self.vlm.p_true(prompts, images, self.batch_size)
        if self.mode == "logits":
            raw = [f"p_true={p:.4f}" for p in p_true]
            predictions = ["True" if p >= 0.5 else "False" for p in p_true]
        else:
            raw = self.vlm.generate(prompts, images, self.max_new_tokens, batch_size=self.batch_size)
            predictions = [parse_answer(a) or UNPARSEABLE for a in raw]
        return {"identifier": np.asarray(batch["identifier"], dtype=object),
                "prediction": np.asarray(predictions, dtype=object),
                "p_true": np.asarray(p_true, dtype=np.float32), "raw_answer": np.asarray(raw, dtype=object)}


def _use_ray(cfg: EvalConfig, n: int) -> bool:
    if cfg.ray not in ("auto", "on", "off"):
        raise ValueError(f"--ray must be auto, on or off, got {cfg.ray!r}")
    return cfg.ray == "on" or (cfg.ray == "auto" and n > cfg.ray_threshold)


def score_with_ray(cfg: EvalConfig, parts: list[Path], prompt: str, limit: int) -> list[dict[str, Any]]:
    """Score the parts as a Ray Data job: reading in parallel, ``NlvrScorer`` actors (fractional GPUs if any)."""
    import ray

    from vlmlab.runtime import start_ray

    start_ray()
    gpus = cfg.gpus_per_actor if ray.cluster_resources().get("GPU", 0) > 0 else 0
    ds = ray.data.read_parquet([str(p) for p in parts], columns=["identifier", "sentence", "image0", "image1"])
    if limit:
        ds = ds.limit(limit)
    scored = ds.map_batches(NlvrScorer, fn_constructor_kwargs={
        "model": cfg.model, "adapter": cfg.adapter, "mode": cfg.mode, "prompt": prompt,
        "batch_size": cfg.batch_size, "max_new_tokens": cfg.max_new_tokens, "device": cfg.device},
        batch_size=cfg.batch_size * 4, concurrency=cfg.actors, num_gpus=gpus, num_cpus=0 if gpus else 1)
    return scored.take_all()


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate and write predictions, the official CSV, metrics.json and errors.html; returns the metrics.

    Raises ``VLMSpecError`` for a model that cannot load, ``DatasetError`` for a bad data dir/split.
    """
    from vlmlab.nlvr_data import NlvrDataset

    if not cfg.model or not cfg.data or not cfg.out:
        raise ValueError("vlm eval needs --model SPEC, --data DATA and --out DIR")
    if cfg.mode not in MODES:
        raise ValueError(f"unknown mode {cfg.mode!r}; use one of {', '.join(MODES)}")
    dataset = NlvrDataset.open(cfg.data)
    prompt = check_prompt_template(Path(cfg.prompt).read_text()) if cfg.prompt else dataset.prompt
    examples = dataset.examples(cfg.split)
    if cfg.limit:
        examples = examples[:cfg.limit]
    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if _use_ray(cfg, len(examples)):
        scored = score_with_ray(cfg, dataset.parts(cfg.split), prompt, cfg.limit)
        engine = "ray-data"
    else:
        scorer = NlvrScorer(cfg.model, cfg.adapter, cfg.mode, prompt, cfg.batch_size, cfg.max_new_tokens, cfg.device)
        from vlmlab.progress import Progress

        scored, seen = [], 0
        with Progress(len(examples), f"vlm eval {cfg.split}", "examples") as progress:
            for rows in dataset.iter_batches(cfg.split, cfg.batch_size):
                rows = rows[:len(examples) - seen]
                batch = {k: [r[k] for r in rows] for k in ("identifier", "sentence", "image0", "image1")}
                result = scorer(batch)
                scored += [{k: result[k][i] for k in result} for i in range(len(rows))]
                seen += len(rows)
                progress.update(len(rows))
                if seen >= len(examples):
                    break
        engine = "local"
    seconds = time.perf_counter() - started
    by_id = {s["identifier"]: s for s in scored}
    predictions = {e["identifier"]: str(by_id[e["identifier"]]["prediction"]) for e in examples}
    metrics = nlvr_metrics(predictions, examples, by="phenomenon")
    unparseable = [i for i, p in predictions.items() if p == UNPARSEABLE]
    metrics.update(unparseable=len(unparseable), unparseable_ids=unparseable, split=cfg.split, mode=cfg.mode,
                   model=cfg.model, adapter=cfg.adapter or None, data=str(dataset.root), prompt=prompt,
                   engine=engine, seconds=round(seconds, 2), examples_per_s=round(len(examples) / seconds, 2))
    with open(out / "predictions.jsonl", "w") as f:
        for e in examples:
            s = by_id[e["identifier"]]
            f.write(json.dumps({"identifier": e["identifier"], "sentence": e["sentence"], "label": e["label"],
                                "prediction": str(s["prediction"]), "p_true": round(float(s["p_true"]), 6),
                                "raw_answer": str(s["raw_answer"]),
                                **({"phenomenon": e["phenomenon"]} if e.get("phenomenon") else {})}) + "\n")
    write_predictions_csv(out / "predictions.csv", predictions.items())
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    write_errors_page(dataset, examples, by_id, out, cfg, metrics)
    return metrics


def write_errors_page(dataset: Any, examples: list[dict[str, Any]], scored: dict[str, dict[str, Any]], out: Path,
                      cfg: EvalConfig, metrics: dict[str, Any]) -> Path:
    """``out/errors.html``: every wrong example (up to ``max_errors_shown``) with both images."""
    from vlmlab.nlvr_pages import write_pair_page

    wrong = [e for e in examples if str(scored[e["identifier"]]["prediction"]).lower() != e["label"].lower()]
    shown = wrong[:cfg.max_errors_shown]
    rows = dataset.find([e["identifier"] for e in shown], splits=[cfg.split]) if shown else []
    for row in rows:
        s = scored[row["identifier"]]
        row.update(prediction=str(s["prediction"]), p_true=float(s["p_true"]), raw_answer=str(s["raw_answer"]))
    summary = (f"{len(wrong)} wrong of {metrics['n']} ({cfg.split}, {cfg.mode} mode): accuracy "
               f"{metrics['accuracy']:.3f}, consistency {metrics['consistency']:.3f}; model {cfg.model}"
               + (f" + adapter {cfg.adapter}" if cfg.adapter else "")
               + (f"; showing the first {len(shown)}" if len(shown) < len(wrong) else ""))
    return write_pair_page(rows, out, "errors.html", "NLVR error analysis",
                           ("label", "prediction", "p_true", "raw_answer", "phenomenon"), summary, wrong=True)


def main(argv: list[str] | None = None) -> None:
    """``vlmlab vlm eval --model SPEC --data DATA --split dev --out EVAL [--adapter DIR] [--mode ...] [key=value]``."""
    from vlmlab.backends.qwen2_vl import VLMSpecError
    from vlmlab.config import add_config_arguments, config_from_args
    from vlmlab.nlvr_data import DatasetError

    parser = argparse.ArgumentParser(prog="vlmlab vlm eval", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file of EvalConfig fields")
    add_config_arguments(parser, EvalConfig)
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    cfg = config_from_args(EvalConfig, args, args.config, args.overrides)
    try:
        metrics = evaluate(cfg)
    except (VLMSpecError, DatasetError, ValueError) as exc:
        print(f"vlmlab vlm eval: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    out = Path(cfg.out).expanduser().resolve()
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("unparseable_ids", "prompt")}))
    print(f"wrote {out / 'predictions.jsonl'}, {out / 'predictions.csv'}, {out / 'metrics.json'}, "
          f"{out / 'errors.html'}")


if __name__ == "__main__":
    main()
