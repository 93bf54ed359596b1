"""Planning an extraction: one encoder pool per GPU type (sized from ``cluster/profiles.yaml``), the
readers each pool gets, and the list of images to embed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.extract.config import ExtractConfig
from vlmlab.images import list_images


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

