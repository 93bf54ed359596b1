"""The two Ray Data stages of a pipeline: reader actors (read, hash, decode, preprocess on CPU) and
encoder actors (the model loaded once, embedding on GPU or CPU). Both are callable classes, so a
batch can be pushed through them without Ray."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.extract.config import MAX_FILE_BYTES
from vlmlab.images import ImageDecodeError, content_hash, decode_image, stable_id, tile_xyz

log = logging.getLogger(__name__)


class ReadChunks:
    """Reader actor body: pulls chunks of ``(relpath, stored hash)`` from the work queue until it is
    empty, yielding one decoded, preprocessed block per ``chunks_per_block`` chunks."""

    def __init__(self, root: str, spec: str, queue: Any, source: str, bands: Sequence[int], gate: Any,
                 pool: str, start_wait_s: float, chunks_per_block: int = 1, pixel_dtype: str = "float32",
                 chunk_size: int = 64):
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
        self.block_rows = self.chunks_per_block * chunk_size
        import ray

        ray.get(gate.reader_ready.remote(pool))

    def __call__(self, _: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        import queue as std_queue

        import ray

        warned = False
        while True:
            late = ray.get(self.gate.acquire.remote(self.pool, self.block_rows))  # blocks until allowed
            if late and not warned:
                log.warning("not every pool started within %.0f s; reading anyway", self.start_wait_s)
                warned = True
            chunk: list[tuple[str, str | None]] = []
            try:
                for _ in range(self.chunks_per_block):
                    chunk.extend(self.queue.get(block=False))
            except std_queue.Empty:
                self.gate.release.remote(self.pool, self.block_rows - len(chunk), exhausted=True)
                if not chunk:
                    return
            else:
                if len(chunk) < self.block_rows:
                    self.gate.release.remote(self.pool, self.block_rows - len(chunk))
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
        ray.get(gate.encoder_ready.remote())

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
