"""Options of ``vlmlab extract`` and the summary a run reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    progress_every_s: float = field(default=2.0, metadata={"help": "seconds between progress lines in a log"})
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

    def finish(self, seconds: float, started_wall: float, work_started: float | None, ended_wall: float) -> None:
        """Fill the timing figures: whole-run throughput, and steady throughput from ``work_started``
        (wall clock when every encoder had loaded) to ``ended_wall``."""
        self.seconds = round(seconds, 2)
        self.skipped = self.listed - self.processed - self.errors
        self.images_per_s = round(self.processed / self.seconds, 2) if self.seconds else 0.0
        if work_started is not None and ended_wall > work_started:
            self.startup_s = round(max(0.0, work_started - started_wall), 2)
            self.steady_images_per_s = round(self.processed / (ended_wall - work_started), 2)

    def line(self) -> str:
        """One human-readable summary line."""
        devices = ", ".join(f"{d} x{n}" for d, n in sorted(self.devices.items())) or "none"
        return (f"extracted {self.processed} images, skipped {self.skipped} already stored, {self.errors} errors "
                f"in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s; "
                f"{self.steady_images_per_s:.1f} images/s after {self.startup_s:.1f} s loading models) on {devices}")
