"""Embedding extraction with Ray Data: images -> CLIP embeddings -> the embedding store.

``vlmlab extract IMAGES --model SPEC --out STORE`` (or ``python -m pipelines.extract ...``, e.g.
under ``ray job submit --working-dir . --``) connects to the Ray cluster at ``--address`` /
``RAY_ADDRESS`` or starts an embedded local Ray.

How the work flows (nothing is materialised whole; each stage streams into the next):

1. The driver lists image files and compares them with the store: new paths are queued as they
   are; paths already stored are queued with their stored content hash, so a reader that finds
   the same bytes skips them without decoding (resume and incremental runs cost one read each).
2. Reader actors (CPU, on the nodes of their pool's GPU type) pull chunks of paths from a shared
   queue actor, read, hash, decode (``vlmlab.images.decode_image``: bad files become error rows,
   never exceptions) and preprocess with the model's own transform (``vlmlab.models.load_preprocess``,
   no weights needed) into blocks of about one encoder batch; pixels for GPU encoders travel as
   float16 (they compute in half precision), half the bytes of float32. By default every core a
   pool's nodes have beside its encoders runs a reader.
3. Encoder actors (``map_batches`` with a class: the model loads once per actor) embed the
   pixels on GPU when they hold one, else on CPU, and pass error rows through.
4. The driver writes each returned batch as one atomic store part, so a killed run loses at
   most the batches in flight, and records errors in ``errors.parquet``.

Heterogeneous GPUs: one reader+encoder pipeline **per GPU type** present in the cluster
(``titan_rtx``, ``a30``: custom resources declared by the nodes, see ``cluster/``), each pinned
to its type with ``resources={type: share}`` and sized from that type's profile
(``cluster/profiles.yaml``: batch size, dtype, GPU share). A Ray Data map stage has one
resource shape, so per-type batch sizes and dtypes need per-type stages; the pipelines share one
work queue, so a faster type simply pulls more chunks (dynamic balance, no static split that
leaves one card idle at the end). Readers start pulling once every pool's encoders have loaded
and each pool's readers stay a bounded number of images ahead of its encoders (``FlowGate``), so
no pool can drain the queue into its own buffers while another type idles. GPUs on nodes that
declare no type run one pipeline with the generic ``gpu`` profile (and a warning); a machine
without GPUs runs one ``cpu`` pipeline.

Precision follows the profile (``--dtype`` overrides it): fp16 on the Titan RTX (Turing has no
bf16), bf16 on the A30, and int8 dynamic quantisation of the image tower on CPU encoders, which on
a CPU with AVX-512 VNNI runs a ViT-B/32 about 1.7x faster than float32 at a cosine of about
0.9997 to the float32 embeddings. The summary reports throughput over the whole run and from the
moment every encoder has loaded its model (``steady_images_per_s``: what a long run sustains).
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cluster.node_args import GPU_TYPE_LABEL
from vlmlab.config import add_config_arguments, config_from_args
from vlmlab.images import ImageDecodeError, content_hash, decode_image, list_images, stable_id, tile_xyz
from vlmlab.models import PRECISIONS
from vlmlab.store import EmbeddingStore, StoreError

log = logging.getLogger("vlmlab.extract")

# decompression bombs are refused by decode_image; this bounds what a reader pulls into memory
MAX_FILE_BYTES = 512 * 1024**2


@dataclass(frozen=True)
class ExtractConfig:
    """Options of ``vlmlab extract``."""

    images: str = field(default="", metadata={"help": "folder of images (searched recursively)"})
    model: str = field(default="", metadata={"help": "model spec: open_clip:NAME/TAG, hf:ID or a local directory"})
    out: str = field(default="", metadata={"help": "embedding store directory (created or resumed)"})
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter directory applied on load"})
    source: str = field(default="real", metadata={"help": "source tag written on every row (real|synthetic|...)"})
    batch_size: int | None = field(default=None, metadata={"help": "images per encoder batch (default: profile)"})
    workers: int | None = field(
        default=None, metadata={"help": "encoder actors per GPU type (default: its GPUs / GPU share; 1 on CPU)"}
    )
    gpus_per_worker: float | None = field(
        default=None, metadata={"help": "GPU share per encoder actor, fractional allowed (default: profile)"}
    )
    dtype: str | None = field(default=None, metadata={
        "help": "encoder precision: float32|float16|bfloat16|int8 (default: profile: fp16/bf16 on GPUs, "
                "int8 on CPU)"})
    readers: int | None = field(default=None, metadata={
        "help": "decode actors per pipeline (default: the CPUs its nodes have left beside the encoders)"})
    chunk_size: int = field(default=64, metadata={"help": "paths a reader pulls from the work queue at a time"})
    bands: tuple[int, ...] = field(
        default=(0, 1, 2), metadata={"help": "bands mapped to R,G,B for multi-band TIFFs, e.g. 3 0 1 for NIR-R-G"}
    )
    new_store: bool = field(default=False, metadata={"help": "replace a store made with another model"})
    prune: bool = field(default=False, metadata={"help": "drop rows of images that no longer exist"})
    address: str | None = field(default=None, metadata={"help": "Ray address (default: RAY_ADDRESS or local)"})
    progress_every_s: float = field(default=10.0, metadata={"help": "seconds between progress lines"})
    start_wait_s: float = field(default=300.0, metadata={
        "help": "longest wait for every GPU type's encoders to load before reading starts anyway"})


@dataclass
class ExtractSummary:
    """What a run did; printed at the end and saved in the store manifest as ``last_run``."""

    listed: int = 0
    processed: int = 0
    skipped: int = 0
    errors: int = 0
    pruned: int = 0
    vanished: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    # from the moment every encoder had loaded its model: what a long run sustains
    startup_s: float = 0.0
    steady_images_per_s: float = 0.0
    devices: dict[str, int] = field(default_factory=dict)
    pipelines: list[dict[str, Any]] = field(default_factory=list)

    def line(self) -> str:
        """One human-readable summary line."""
        devices = ", ".join(f"{d} x{n}" for d, n in sorted(self.devices.items())) or "none"
        return (f"extracted {self.processed} images, skipped {self.skipped} already stored, {self.errors} errors "
                f"in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s; "
                f"{self.steady_images_per_s:.1f} images/s after {self.startup_s:.1f} s loading models) on {devices}")


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class PipelinePlan:
    """One per GPU type (or ``cpu``): how its encoder pool is shaped."""

    gpu_type: str
    workers: int
    batch_size: int
    num_gpus: float
    dtype: str
    resources: dict[str, float]
    readers: int = 1

    @property
    def pixel_dtype(self) -> str:
        """What readers hand this pool's encoders: float16 for GPU encoders, which compute in half
        precision anyway (half the bytes through the object store and to the card), else float32."""
        return "float16" if self.num_gpus else "float32"

    def chunks_per_block(self, chunk_size: int) -> int:
        """Work-queue chunks a reader decodes into one block: about one encoder batch, so that the
        encoders get whole batches without Ray Data concatenating blocks."""
        return max(1, self.batch_size // chunk_size)

    def block_rows(self, chunk_size: int) -> int:
        """Images in one reader block."""
        return self.chunks_per_block(chunk_size) * chunk_size

    @property
    def encoder_cpus(self) -> float:
        """CPUs one encoder actor reserves: a GPU encoder (or a CPU-backed node declaring a GPU
        type, as in tests) keeps half a core; a CPU encoder a whole one (it uses every core)."""
        return 0.5 if self.num_gpus or self.resources else 1.0


def reader_count(plan: PipelinePlan, nodes: list[dict[str, Any]]) -> int:
    """Decode actors for ``plan``: the CPUs left on the nodes that serve it once its encoders hold
    theirs (``nodes`` as ``ray.nodes()``); at least one.

    Decoding a tile costs a few milliseconds of one core, so a GPU that embeds thousands of images
    a second needs every spare core of its node, while a CPU encoder needs one reader.
    """
    pin = next(iter(plan.resources), None)
    cpus = sum(n["Resources"].get("CPU", 0) for n in nodes
               if n.get("Alive", True) and (pin is None or n["Resources"].get(pin, 0) > 0))
    return max(1, int(cpus - plan.workers * plan.encoder_cpus))


def plan_pipelines(cfg: ExtractConfig, cluster: dict[str, float]) -> list[PipelinePlan]:
    """Encoder pools for the GPU types present in ``cluster`` (``ray.cluster_resources()``).

    GPUs on nodes that declare no type get the generic ``gpu`` profile (never the CPU); a cluster
    without GPUs gets one CPU pool. A CPU-backed node that declares a type runs that type's batch
    size at the CPU profile's precision.
    """
    from cluster.profiles import CPU, GENERIC_GPU, gpu_types, profile_for

    has_gpus = cluster.get("GPU", 0) > 0
    pools = [(t, cluster[t]) for t in gpu_types() if cluster.get(t, 0) > 0]
    if not pools and has_gpus:
        pools = [(GENERIC_GPU, cluster["GPU"])]
    cpu_dtype = cfg.dtype or profile_for(CPU, cfg.model).dtype
    if not pools:
        profile = profile_for(CPU, cfg.model)
        workers = cfg.workers or 1
        return [PipelinePlan(CPU, workers, cfg.batch_size or profile.batch_size, 0.0, cpu_dtype, {})]
    plans = []
    for gpu_type, capacity in pools:
        profile = profile_for(gpu_type, cfg.model)
        share = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else profile.gpus_per_worker
        share = share if has_gpus else 0.0  # CPU-backed nodes that declare a type (tests, laptops)
        workers = cfg.workers or max(1, int(capacity / share) if share else 1)
        # the custom resource pins the actor to a node of this type; its amount equals the GPU share
        # so that `titan_rtx: 2` on a 2-GPU node admits as many actors as the GPUs do. Untyped GPUs
        # have no resource to pin by.
        pin = share if share else min(capacity / workers, 1.0)
        resources = {} if gpu_type == GENERIC_GPU else {gpu_type: pin}
        plans.append(PipelinePlan(gpu_type, workers, cfg.batch_size or profile.batch_size, share,
                                  (cfg.dtype or profile.dtype) if share else cpu_dtype, resources))
    return plans


def plan_work(images: Path, known: dict[str, str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """``(work, vanished)``: every listed image as ``(relpath, stored hash or None)``, and stored
    paths whose file is gone."""
    work = []
    seen = set()
    for path in list_images(images):
        rel = path.relative_to(images).as_posix()
        seen.add(rel)
        work.append((rel, known.get(rel)))
    vanished = [p for p in known if p not in seen]
    return work, vanished


# --------------------------------------------------------------------------- Ray stages


def _error_row(rel: str, reason: str, source: str) -> dict[str, Any]:
    return {"rel": rel, "reason": reason, "source": source}


class FlowGate:
    """Flow control shared by the pipelines (a zero-CPU actor).

    Readers decode far faster than encoders embed, so without a bound one pool's readers would pull
    the shared queue dry into that pool's buffers and the other GPU type would idle. The gate counts,
    per pool, images pulled and images finished; a reader pulls only while its pool is less than
    ``max_ahead`` images ahead, so each type takes work at the rate it embeds. It also holds readers
    until every pool's encoders have loaded, so no type starts with a head start.
    """

    def __init__(self, expected_encoders: int, max_ahead: dict[str, int]):
        self.expected = expected_encoders
        self.arrived = 0
        self.max_ahead = max_ahead
        self.ahead = dict.fromkeys(max_ahead, 0)
        self.started_at: float | None = None

    def arrive(self) -> None:
        """An encoder actor has loaded its model."""
        self.arrived += 1
        if self.ready() and self.started_at is None:
            self.started_at = time.time()

    def work_started(self) -> float | None:
        """Wall-clock time at which reading began (every encoder loaded, or the first pull)."""
        return self.started_at

    def ready(self) -> bool:
        """Whether every encoder actor of every pool has loaded."""
        return self.arrived >= self.expected

    def may_pull(self, pool: str) -> bool:
        """Whether ``pool`` may take another chunk now."""
        return self.ahead[pool] < self.max_ahead[pool]

    def pulled(self, pool: str, n: int) -> None:
        """``pool`` took ``n`` images from the queue."""
        if self.started_at is None:  # readers that stopped waiting for a pool that never loaded
            self.started_at = time.time()
        self.ahead[pool] += n

    def done(self, pool: str, n: int) -> None:
        """``n`` images of ``pool`` are finished (embedded, failed or skipped as unchanged)."""
        self.ahead[pool] -= n


def _wait(gate: Any, method: str, *args: Any, timeout_s: float | None = None) -> bool:
    """Poll ``gate.method(*args)`` until it is true (or ``timeout_s`` passes); returns its last answer."""
    import ray

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not ray.get(getattr(gate, method).remote(*args)):
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class ReadChunks:
    """Reader actor body: pulls chunks of ``(relpath, stored hash)`` from the work queue until it is
    empty, yielding one decoded, preprocessed block per ``chunks_per_block`` chunks."""

    def __init__(self, root: str, spec: str, queue: Any, source: str, bands: Sequence[int], gate: Any,
                 pool: str, start_wait_s: float, chunks_per_block: int = 1, pixel_dtype: str = "float32"):
        from vlmlab.models import load_preprocess

        self.root = Path(root)
        self.queue = queue
        self.gate = gate
        self.pool = pool
        self.start_wait_s = start_wait_s
        self.source = source
        self.bands = tuple(bands)
        self.chunks_per_block = chunks_per_block
        self.pixel_dtype = np.dtype(pixel_dtype)
        self.preprocess = load_preprocess(spec)
        from PIL import Image

        self.pixel_shape = tuple(self.preprocess(Image.new("RGB", (32, 32))).shape)

    def __call__(self, _: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        import queue as std_queue

        if not _wait(self.gate, "ready", timeout_s=self.start_wait_s):
            log.warning("not every encoder pool started within %.0f s; reading anyway", self.start_wait_s)
        while True:
            _wait(self.gate, "may_pull", self.pool)
            chunk: list[tuple[str, str | None]] = []
            try:
                for _ in range(self.chunks_per_block):
                    chunk.extend(self.queue.get(block=False))
            except std_queue.Empty:
                if not chunk:
                    return
            self.gate.pulled.remote(self.pool, len(chunk))
            batch = self._read(chunk)
            rows = 0 if batch is None else len(batch["id"])
            if rows < len(chunk):  # unchanged images never reach the encoders
                self.gate.done.remote(self.pool, len(chunk) - rows)
            if batch is not None:
                yield batch

    def _read(self, chunk: list[tuple[str, str | None]]) -> dict[str, np.ndarray] | None:
        rows: list[dict[str, Any]] = []
        pixels = []
        for rel, stored_hash in chunk:
            path = self.root / rel
            try:
                size = path.stat().st_size
                if size > MAX_FILE_BYTES:
                    raise ImageDecodeError(f"file of {size} bytes exceeds {MAX_FILE_BYTES}")
                data = path.read_bytes()
            except OSError as exc:
                rows.append({"path": rel, "error": f"cannot read file: {exc}"})
                pixels.append(None)
                continue
            digest = content_hash(data)
            if digest == stored_hash:
                continue  # unchanged since it was stored
            try:
                image = decode_image(data, self.bands)
                tensor = self.preprocess(image).numpy()
            except ImageDecodeError as exc:
                rows.append({"path": rel, "error": str(exc)})
                pixels.append(None)
                continue
            except Exception as exc:  # a transform failing on a decodable image is still bad input
                rows.append({"path": rel, "error": f"preprocess failed: {type(exc).__name__}: {exc}"})
                pixels.append(None)
                continue
            rows.append({"path": rel, "error": "", "hash": digest, "width": image.width, "height": image.height})
            pixels.append(tensor)
        if not rows:
            return None
        blank = np.zeros(self.pixel_shape, self.pixel_dtype)
        xyz = [tile_xyz(r["path"]) for r in rows]
        return {
            "id": np.array([stable_id(r["path"]) for r in rows], np.int64),
            "path": np.array([r["path"] for r in rows], object),
            "content_hash": np.array([r.get("hash", "") for r in rows], object),
            "width": np.array([r.get("width", 0) for r in rows], np.int32),
            "height": np.array([r.get("height", 0) for r in rows], np.int32),
            "tile_z": np.array([t[0] if t else -1 for t in xyz], np.int32),
            "tile_x": np.array([t[1] if t else -1 for t in xyz], np.int32),
            "tile_y": np.array([t[2] if t else -1 for t in xyz], np.int32),
            "source": np.array([self.source] * len(rows), object),
            "error": np.array([r["error"] for r in rows], object),
            "pixels": np.stack([p if p is not None else blank for p in pixels]).astype(self.pixel_dtype),
        }


class EncodeBatch:
    """Encoder actor: loads the model once, embeds the pixels of good rows, passes error rows on."""

    def __init__(self, spec: str, adapter: str | None, gpu_type: str, dtype: str, micro_batch: int, gate: Any):
        import socket

        import ray
        import torch

        from vlmlab.models import load_model

        use_cuda = torch.cuda.is_available()
        if not use_cuda:
            # Ray limits an actor's BLAS threads to its CPU reservation (1); a CPU encoder is the
            # bottleneck stage, so it takes every core and the light readers share them
            torch.set_num_threads(os.cpu_count() or 1)
        if dtype == "auto" or (not use_cuda and dtype in ("float16", "bfloat16")):
            # half precision is a GPU format: on a CPU it is slower than float32
            dtype = None if use_cuda else "float32"
        self.encoder = load_model(spec, device="cuda" if use_cuda else "cpu", dtype=dtype, adapter=adapter)
        self.micro_batch = micro_batch
        where = "cuda:" + torch.cuda.get_device_name(0) if use_cuda else "cpu"
        self.device = f"{gpu_type}/{where} {self.encoder.precision}"
        logging.basicConfig(level=logging.INFO)
        log.info("encoder actor on %s (%s, pool %s, batch %d)", socket.gethostname(), self.device, gpu_type,
                 micro_batch)
        if not use_cuda and ray.cluster_resources().get("GPU", 0) > 0:
            log.warning("!!! GPUs exist in this Ray cluster but this encoder runs on CPU: give the actors a GPU "
                        "share (--gpus-per-worker) or check CUDA on node %s !!!", socket.gethostname())
        self.gate = gate
        self.pool = gpu_type
        ray.get(gate.arrive.remote())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ok = np.array([e == "" for e in batch["error"]], bool)
        emb = np.zeros((len(ok), self.encoder.embed_dim), np.float32)
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            emb[ok] = self.encoder.encode_images(pixels, batch_size=self.micro_batch)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["embedding"] = emb
        out["device"] = np.array([self.device] * len(ok), object)
        self.gate.done.remote(self.pool, len(ok))
        return out


# --------------------------------------------------------------------------- the job


def _to_part(batch: dict[str, np.ndarray], ok: np.ndarray) -> pa.Table:
    def nullable(col: str) -> pa.Array:
        values = batch[col][ok]
        return pa.array(values, pa.int32(), mask=values < 0)

    emb = batch["embedding"][ok].astype(np.float32)
    return pa.table({
        "id": pa.array(batch["id"][ok], pa.int64()),
        "path": pa.array(list(batch["path"][ok]), pa.string()),
        "content_hash": pa.array(list(batch["content_hash"][ok]), pa.string()),
        "width": pa.array(batch["width"][ok], pa.int32()),
        "height": pa.array(batch["height"][ok], pa.int32()),
        "tile_z": nullable("tile_z"),
        "tile_x": nullable("tile_x"),
        "tile_y": nullable("tile_y"),
        "source": pa.array(list(batch["source"][ok]), pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]),
    })


class _Writer:
    """Driver-side sink shared by the per-type pipelines: writes parts, records errors, counts."""

    def __init__(self, cfg: ExtractConfig, images: Path, summary: ExtractSummary, progress_every_s: float):
        self.cfg = cfg
        self.images = images
        self.summary = summary
        self.store: EmbeddingStore | None = None
        # paths with a recorded error: only these need clearing when they now embed
        self.errored = set(EmbeddingStore.open(cfg.out).errors()["path"].to_pylist()) \
            if (Path(cfg.out) / "manifest.json").exists() else set()
        self.lock = threading.Lock()
        self.started = time.perf_counter()
        self.last_report = self.started
        self.progress_every_s = progress_every_s

    def write(self, batch: dict[str, np.ndarray]) -> None:
        errors = np.array([e != "" for e in batch["error"]], bool)
        ok = ~errors
        with self.lock:
            if self.store is None:
                self.store = EmbeddingStore.create(self.cfg.out, self.cfg.model, batch["embedding"].shape[1],
                                                   self.images, adapter=self.cfg.adapter,
                                                   new_store=self.cfg.new_store)
            if ok.any():
                self.store.write_part(_to_part(batch, ok))
                fixed = self.errored.intersection(batch["path"][ok])
                if fixed:
                    self.store.clear_errors(sorted(fixed))
                    self.errored -= fixed
                for device in batch["device"][ok]:
                    self.summary.devices[device] = self.summary.devices.get(device, 0) + 1
            if errors.any():
                self.store.record_errors(list(zip(batch["path"][errors], batch["error"][errors], strict=True)))
                self.errored.update(batch["path"][errors])
            self.summary.processed += int(ok.sum())
            self.summary.errors += int(errors.sum())
            now = time.perf_counter()
            if now - self.last_report >= self.progress_every_s:
                self.last_report = now
                done = self.summary.processed + self.summary.errors
                print(f"[extract] {done}/{self.summary.listed} images "
                      f"({self.summary.processed / (now - self.started):.1f} images/s)", flush=True)


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
                                                 plan.chunks_per_block(cfg.chunk_size), plan.pixel_dtype), **near)
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


def _run_pipeline(ds: Any, writer: _Writer, failures: list[BaseException]) -> None:
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            writer.write(batch)
    except BaseException as exc:  # re-raised by the driver thread that waits for all pipelines
        failures.append(exc)


def extract(cfg: ExtractConfig) -> ExtractSummary:
    """Embed every image under ``cfg.images`` not already in the store ``cfg.out``; see the module doc."""
    import ray

    images = Path(cfg.images).expanduser().resolve()
    if not images.is_dir():
        raise FileNotFoundError(f"image folder {cfg.images!r} does not exist")
    if not cfg.model:
        raise ValueError("--model is required (a model spec or local directory)")
    if cfg.dtype is not None and cfg.dtype not in PRECISIONS:
        raise ValueError(f"--dtype {cfg.dtype!r}: expected one of {', '.join(PRECISIONS)}")
    out = Path(cfg.out)
    known: dict[str, str] = {}
    if (out / "manifest.json").exists():
        store = EmbeddingStore.open(out)
        same = store.holds(cfg.model, cfg.adapter)
        if not same and not cfg.new_store:
            raise StoreError(f"store {out} holds embeddings of {store.manifest['model']!r}, not {cfg.model!r}; "
                             "use another --out or pass --new-store to replace it")
        if same:
            if Path(store.manifest["source_root"]) != images:
                raise StoreError(f"store {out} was extracted from {store.manifest['source_root']}, not {images}; "
                                 "use one store per image folder")
            known = store.known_hashes()
    from PIL import Image

    from vlmlab.models import load_preprocess

    # a bad spec fails here, in the driver, with its clear message
    pixel_values = load_preprocess(cfg.model)(Image.new("RGB", (32, 32))).numel()

    summary = ExtractSummary()
    work, vanished = plan_work(images, known)
    summary.listed, summary.vanished = len(work), len(vanished)
    if vanished and cfg.prune and known:
        summary.pruned = EmbeddingStore.open(out).remove_paths(vanished)
    elif vanished:
        log.warning("%d stored images no longer exist under %s (pass --prune to drop them)", len(vanished), images)

    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    started, started_wall, work_started = time.perf_counter(), time.time(), None
    writer = _Writer(cfg, images, summary, cfg.progress_every_s)
    if work:
        from ray.util.queue import Queue

        chunks = [work[i : i + cfg.chunk_size] for i in range(0, len(work), cfg.chunk_size)]
        queue = Queue(maxsize=0, actor_options={"num_cpus": 0})
        queue.put_nowait_batch(chunks)
        nodes = ray.nodes()
        plans = [replace(p, readers=cfg.readers or reader_count(p, nodes))
                 for p in plan_pipelines(cfg, ray.cluster_resources())]
        if any(p.gpu_type == "gpu" for p in plans):
            log.warning("!!! the cluster's GPUs declare no type with a profile: encoding with the generic "
                        "'gpu' profile; declare the type (cluster/nodes.yaml) for its tuned batch size !!!")
        elif ray.cluster_resources().get("GPU", 0) > 0 and not any(p.num_gpus for p in plans):
            log.warning("!!! the cluster has GPUs but the encoders get none (--gpus-per-worker 0?): encoding "
                        "on CPU !!!")
        summary.pipelines = [asdict(p) for p in plans]
        failures: list[BaseException] = []
        # each pool may run one batch per encoder and have one more queued per encoder, or have every
        # reader decoding a block if that is more (a tighter bound idles the readers of a fast GPU)
        ahead = {p.gpu_type: max(2 * p.batch_size * p.workers, p.readers * p.block_rows(cfg.chunk_size))
                 + p.block_rows(cfg.chunk_size) for p in plans}
        gate = ray.remote(num_cpus=0)(FlowGate).remote(sum(p.workers for p in plans), ahead)
        datasets = [_build_dataset(p, cfg, images, queue, gate, pixel_values) for p in plans]
        threads = [threading.Thread(target=_run_pipeline, args=(ds, writer, failures), name=f"extract-{p.gpu_type}")
                   for p, ds in zip(plans, datasets, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        work_started = ray.get(gate.work_started.remote())
        ray.kill(queue.actor)
        ray.kill(gate)
        if failures:
            raise failures[0]
    summary.seconds = round(time.perf_counter() - started, 2)
    summary.skipped = summary.listed - summary.processed - summary.errors
    summary.images_per_s = round(summary.processed / summary.seconds, 2) if summary.seconds else 0.0
    ended_wall = time.time()
    if work_started is not None and ended_wall > work_started:
        summary.startup_s = round(max(0.0, work_started - started_wall), 2)
        summary.steady_images_per_s = round(summary.processed / (ended_wall - work_started), 2)
    if (out / "manifest.json").exists():
        store = EmbeddingStore.open(out)
        store.update_manifest(rows=store.count(), last_run=asdict(summary))
    return summary


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
