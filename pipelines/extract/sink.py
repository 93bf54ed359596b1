"""The driver-side writer every pipeline's batches go to: store parts, error records, progress."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from pipelines.extract.config import ExtractConfig, ExtractSummary
from vlmlab.progress import Progress
from vlmlab.store import METADATA_COLUMNS, EmbeddingStore, rows_to_part


class StoreWriter:
    """Driver-side sink shared by the per-type pipelines: writes parts, records errors, counts."""

    def __init__(self, cfg: ExtractConfig, images: Path, summary: ExtractSummary, expected: int):
        self.cfg = cfg
        self.images = images
        self.summary = summary
        self.store: EmbeddingStore | None = None
        # paths with a recorded error: only these need clearing when they now embed
        self.errored = set(EmbeddingStore.open(cfg.out).errors()["path"].to_pylist()) \
            if (Path(cfg.out) / "manifest.json").exists() else set()
        self.lock = threading.Lock()
        # images not yet in the store (stored ones are mostly skipped unchanged by the readers)
        self.progress = Progress(expected, "extract", "images", cfg.progress_every_s)

    def write(self, batch: dict[str, np.ndarray]) -> None:
        """Store a batch returned by the encoders: good rows as one part, failed ones as error records."""
        errors = np.array([e != "" for e in batch["error"]], bool)
        ok = ~errors
        with self.lock:
            if self.store is None:
                self.store = EmbeddingStore.create(self.cfg.out, self.cfg.model, batch["embedding"].shape[1],
                                                   self.images, adapter=self.cfg.adapter,
                                                   new_store=self.cfg.new_store)
            if ok.any():
                self.store.write_part(rows_to_part({c: batch[c][ok] for c in METADATA_COLUMNS},
                                                   batch["embedding"][ok]))
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
            self.progress.update(int(len(ok)))
