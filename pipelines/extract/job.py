"""``extract()``: list, plan, run the per-type reader -> encoder pipelines into the store; the CLI."""

from __future__ import annotations

import argparse
import logging
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from cluster.node_args import GPU_TYPE_LABEL
from pipelines.extract.config import ExtractConfig, ExtractSummary
from pipelines.extract.gate import FlowGate
from pipelines.extract.plan import PipelinePlan, plan_pipelines, plan_work, reader_count
from pipelines.extract.sink import StoreWriter
from pipelines.extract.stages import EncodeBatch, ReadChunks
from vlmlab.config import add_config_arguments, config_from_args
from vlmlab.models import PRECISIONS
from vlmlab.runtime import start_ray
from vlmlab.store import EmbeddingStore, StoreError

log = logging.getLogger(__name__)


def _build_dataset(plan: PipelinePlan, cfg: ExtractConfig, images: Path, queue: Any, gate: Any,
                   pixel_values: int) -> Any:
    """The reader -> encoder dataset of one pipeline (not yet executed)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = ctx.target_max_block_size
    # A reader drains the whole queue; Ray Data would merge its yields into blocks of up to
    # 128 MiB and release them only then. A target just under one yield's pixels makes every
    # yield its own block, so decoding streams into the encoders (datasets copy the context).
    block_bytes = plan.block_rows(cfg.chunk_size) * pixel_values * np.dtype(plan.pixel_dtype).itemsize
    ctx.target_max_block_size = max(1, int(0.9 * block_bytes))
    try:
        # one input row per reader; from_items puts the rows in the object store directly (a
        # read task would need a CPU the actors already hold)
        ds = ray.data.from_items([{"reader": i} for i in range(plan.readers)], override_num_blocks=plan.readers)
        # half a CPU each, so that readers fit beside the encoders on a small machine
        readers = ray.data.ActorPoolStrategy(size=plan.readers, max_tasks_in_flight_per_actor=1)
        # a typed pool's readers run on the nodes of that type (the node label cluster/ declares),
        # so pixels go from decode to GPU through the local object store, never over the network
        near = {"label_selector": {GPU_TYPE_LABEL: plan.gpu_type}} if plan.resources else {}
        ds = ds.map_batches(ReadChunks, batch_size=1, compute=readers, num_cpus=0.5,
                            fn_constructor_args=(str(images), cfg.model, queue, cfg.source, cfg.bands, gate,
                                                 plan.gpu_type, cfg.start_wait_s,
                                                 plan.chunks_per_block(cfg.chunk_size), plan.pixel_dtype,
                                                 cfg.chunk_size), **near)
        return ds.map_batches(
            EncodeBatch,
            batch_size=plan.batch_size,
            compute=ray.data.ActorPoolStrategy(size=plan.workers),
            fn_constructor_args=(cfg.model, cfg.adapter, plan.gpu_type, plan.dtype, plan.batch_size, gate),
            num_gpus=plan.num_gpus,
            num_cpus=plan.encoder_cpus,
            resources=plan.resources or None,
        )
    finally:
        ctx.target_max_block_size = saved


def _run_pipeline(ds: Any, writer: StoreWriter, failures: list[BaseException]) -> None:
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            writer.write(batch)
    except BaseException as exc:  # re-raised by the driver thread that waits for all pipelines
        failures.append(exc)


def extract(cfg: ExtractConfig) -> ExtractSummary:
    """Embed every image under ``cfg.images`` not already in the store ``cfg.out``; see the package doc."""
    from vlmlab.models import canonical_spec

    images = _check(cfg)
    # a local model directory as an absolute path: the actors run in other directories
    cfg = replace(cfg, model=canonical_spec(cfg.model))
    # one writer per store: a second extraction into it is refused, not run beside the first
    with EmbeddingStore(Path(cfg.out)).writer_lock():
        return _extract_locked(cfg, images)


def _extract_locked(cfg: ExtractConfig, images: Path) -> ExtractSummary:
    known = _stored_hashes(cfg, images)
    from PIL import Image

    from vlmlab.models import load_preprocess

    # a bad spec fails here, in the driver, with its clear message
    pixel_values = load_preprocess(cfg.model)(Image.new("RGB", (32, 32))).numel()
    summary = ExtractSummary()
    work = _list_work(cfg, images, known, summary)
    start_ray(cfg.address)
    started, started_wall = time.perf_counter(), time.time()
    writer = StoreWriter(cfg, images, summary, expected=sum(stored is None for _, stored in work))
    try:
        work_started = _run_pools(cfg, images, work, writer, summary, pixel_values) if work else None
    finally:
        writer.progress.close()
    summary.finish(time.perf_counter() - started, started_wall, work_started, time.time())
    if (Path(cfg.out) / "manifest.json").exists():
        EmbeddingStore.open(cfg.out).update_manifest(last_run=asdict(summary))
    return summary


def _check(cfg: ExtractConfig) -> Path:
    """The absolute image folder, after checking the options a run cannot start without."""
    images = Path(cfg.images).expanduser().resolve()
    if not images.is_dir():
        raise FileNotFoundError(f"image folder {cfg.images!r} does not exist")
    if not cfg.model:
        raise ValueError("--model is required (a model spec or local directory)")
    if cfg.dtype is not None and cfg.dtype not in PRECISIONS:
        raise ValueError(f"--dtype {cfg.dtype!r}: expected one of {', '.join(PRECISIONS)}")
    return images


def _stored_hashes(cfg: ExtractConfig, images: Path) -> dict[str, str]:
    """``{path: content_hash}`` already in the store (what a resumed run skips); refuses a store made with
    another model (unless ``--new-store``) or from another image folder."""
    out = Path(cfg.out)
    if not (out / "manifest.json").exists():
        EmbeddingStore(out).refuse_lost_manifest()
        return {}
    store = EmbeddingStore.open(out)
    if store.holds(cfg.model, cfg.adapter):
        store.check_compatible(cfg.model, cfg.adapter, images)
        return store.known_hashes()
    if not cfg.new_store:
        store.check_compatible(cfg.model, cfg.adapter)
    return {}


def _list_work(cfg: ExtractConfig, images: Path, known: dict[str, str], summary: ExtractSummary
               ) -> list[tuple[str, str | None]]:
    """Every listed image with its stored hash; stored images that vanished are pruned or reported."""
    work, vanished = plan_work(images, known)
    summary.listed, summary.vanished = len(work), len(vanished)
    if vanished and cfg.prune and known:
        summary.pruned = EmbeddingStore.open(cfg.out).remove_paths(vanished)
    elif vanished:
        log.warning("%d stored images no longer exist under %s (pass --prune to drop them)", len(vanished), images)
    return work


def _run_pools(cfg: ExtractConfig, images: Path, work: list[tuple[str, str | None]], writer: StoreWriter,
               summary: ExtractSummary, pixel_values: int) -> float | None:
    """Run one reader -> encoder pipeline per GPU type over a shared work queue until it is drained;
    returns the wall-clock time reading began (every encoder loaded)."""
    import ray
    from ray.util.queue import Queue

    ray.data.DataContext.get_current().enable_progress_bars = False
    queue = Queue(maxsize=0, actor_options={"num_cpus": 0})
    queue.put_nowait_batch([work[i : i + cfg.chunk_size] for i in range(0, len(work), cfg.chunk_size)])
    nodes = ray.nodes()
    plans = [replace(p, readers=cfg.readers or reader_count(p, nodes))
             for p in plan_pipelines(cfg, ray.cluster_resources())]
    _warn_about_gpus(plans, ray.cluster_resources())
    summary.pipelines = [asdict(p) for p in plans]
    # each pool may run one batch per encoder and have one more queued per encoder, or have every
    # reader decoding a block if that is more (a tighter bound idles the readers of a fast GPU)
    ahead = {p.gpu_type: max(2 * p.batch_size * p.workers, p.readers * p.block_rows(cfg.chunk_size))
             + p.block_rows(cfg.chunk_size) for p in plans}
    gate = ray.remote(num_cpus=0)(FlowGate).remote(sum(p.workers for p in plans),
                                                   {p.gpu_type: p.readers for p in plans}, ahead, cfg.start_wait_s)
    failures: list[BaseException] = []
    threads = [threading.Thread(target=_run_pipeline, name=f"extract-{p.gpu_type}",
                                args=(_build_dataset(p, cfg, images, queue, gate, pixel_values), writer, failures))
               for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    work_started = ray.get(gate.work_started.remote())
    ray.kill(queue.actor)
    ray.kill(gate)
    if failures:
        raise failures[0]
    return work_started


def _warn_about_gpus(plans: list[PipelinePlan], cluster: dict[str, float]) -> None:
    if any(p.gpu_type == "gpu" for p in plans):
        log.warning("!!! the cluster's GPUs declare no type with a profile: encoding with the generic "
                    "'gpu' profile; declare the type (cluster/nodes.yaml) for its tuned batch size !!!")
    elif cluster.get("GPU", 0) > 0 and not any(p.num_gpus for p in plans):
        log.warning("!!! the cluster has GPUs but the encoders get none (--gpus-per-worker 0?): encoding on CPU !!!")


def main(argv: list[str] | None = None) -> None:
    """``vlmlab extract IMAGES --model SPEC --out STORE [options]``."""
    parser = argparse.ArgumentParser(prog="vlmlab extract", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", help="folder of images (searched recursively)")
    parser.add_argument("--config", help="YAML file with any of the options below")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    add_config_arguments(parser, ExtractConfig, skip=("images",))
    args = parser.parse_args(argv)
    cfg = config_from_args(ExtractConfig, args, args.config, args.overrides)
    cfg = ExtractConfig(**{**asdict(cfg), "images": args.images})
    if not cfg.out:
        parser.error("--out STORE is required")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = extract(cfg)
    except (StoreError, FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"vlmlab extract: {exc}") from exc
    print(summary.line())
    if summary.errors:
        print(f"{summary.errors} files could not be read; reasons in {Path(cfg.out) / 'errors.parquet'}")


if __name__ == "__main__":
    main()

