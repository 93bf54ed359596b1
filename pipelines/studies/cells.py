"""The study runner: every (model, key) cell is one task on an actor that holds the model.

A model is loaded once per actor (through :func:`vlmlab.models.load_model`, so every spec the
project loads works) and serves all of that model's cells: ``task.prepare`` runs once after
loading (e.g. embedding the colour patches, reading a store), ``task.compute`` once per cell on
the actor, and ``task.save`` in the driver, which alone writes the cell's files (atomically; the
file at ``Cell.done`` marks the cell finished, so a re-run skips it). With ``actors_per_model``
above 1, a model's cells are shared round-robin by that many actors, each loading the model.

Actors ask for a fractional GPU (``gpus_per_actor``, default 0.25: four small encoders share a
card) when the cluster has GPUs, and run on CPU otherwise. A cell that fails (a model that does not
load, a bad template) is recorded with its reason and the other cells go on; the caller decides
how to report it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("vlmlab.study")
FOLDER_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class StudyError(RuntimeError):
    """A study cannot start or finished with failed cells; the message says which and why."""


@dataclass(frozen=True)
class Cell:
    """One cell of a study grid: ``model`` (a spec) x ``key`` (a style or template set)."""

    model: str
    folder: str  # the model's folder name in the outputs
    key: str
    done: str  # path of the file whose presence marks the cell finished


class CellTask(Protocol):
    """What a study does per model (``prepare``, on the actor), per cell (``compute``, on the actor)
    and with each result (``save``, in the driver)."""

    def prepare(self, encoder: Any, cell: Cell) -> Any: ...

    def compute(self, encoder: Any, state: Any, cell: Cell) -> Any: ...

    def save(self, cell: Cell, result: Any) -> None: ...


@dataclass(frozen=True)
class ActorOptions:
    """How model actors are shaped."""

    actors_per_model: int = 1
    gpus_per_actor: float = 0.25
    cpus_per_actor: float = 1.0


@dataclass
class RunSummary:
    """What a run did."""

    computed: list[Cell] = field(default_factory=list)
    skipped: list[Cell] = field(default_factory=list)
    failed: list[tuple[Cell, str]] = field(default_factory=list)
    actors: int = 0
    seconds: float = 0.0
    devices: dict[str, str] = field(default_factory=dict)

    @property
    def cells_per_s(self) -> float:
        """Computed cells per second of wall time (model loading included)."""
        return len(self.computed) / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        """One human-readable summary line."""
        return (f"computed {len(self.computed)} cells, skipped {len(self.skipped)} already finished, "
                f"{len(self.failed)} failed, in {self.seconds:.1f} s ({self.cells_per_s:.2f} cells/s) "
                f"on {self.actors} model actor(s)")


def model_folder(spec: str) -> str:
    """The folder name of a model in study outputs: a local directory's name, else the spec with
    characters other than letters, digits, ``.``, ``_``, ``-`` replaced (``open_clip_ViT-B-32_openai``)."""
    path = Path(spec).expanduser()
    if ":" not in spec and path.is_dir():
        return FOLDER_NAME.sub("_", path.resolve().name)
    prefix, _, rest = spec.partition(":")
    rest = rest.removeprefix("local-dir:")
    if rest and Path(rest).expanduser().is_dir():  # hf:DIR, open_clip:local-dir:DIR
        return FOLDER_NAME.sub("_", f"{prefix}_{Path(rest).expanduser().resolve().name}")
    return FOLDER_NAME.sub("_", spec).strip("_") or "model"


def model_folders(specs: Sequence[str], names: Sequence[str] = ()) -> dict[str, str]:
    """``{spec: folder}``, from ``names`` when given (one per spec) else :func:`model_folder`;
    two models may not share a folder."""
    if names and len(names) != len(specs):
        raise StudyError(f"--names gives {len(names)} names for {len(specs)} models")
    folders = {spec: FOLDER_NAME.sub("_", n) if names else model_folder(spec)
               for spec, n in zip(specs, names or specs, strict=True)}
    seen: dict[str, str] = {}
    for spec, folder in folders.items():
        if folder in seen:
            raise StudyError(f"models {seen[folder]!r} and {spec!r} would share the output folder {folder!r}; "
                             "name them with --names")
        seen[folder] = spec
    return folders


class ModelActor:
    """Holds one model; loads it on the first cell, runs ``task.prepare`` once, then every cell."""

    def __init__(self, spec: str, task: CellTask, device: str, threads: int):
        self.spec, self.task, self.device, self.threads = spec, task, device, threads
        self.encoder: Any = None
        self.state: Any = None
        self.error: BaseException | None = None

    def compute(self, cell: Cell) -> tuple[Any, str]:
        """The cell's result and a description of where it ran."""
        if self.error is not None:
            raise self.error  # the model did not load: every cell of this actor fails the same way
        if self.encoder is None:
            import torch

            from vlmlab.models import load_model

            if self.device == "cpu":
                torch.set_num_threads(self.threads)
            try:
                self.encoder = load_model(self.spec, device=self.device)
                self.state = self.task.prepare(self.encoder, cell)
            except BaseException as exc:
                self.error = exc
                raise
        where = self.device if self.device == "cpu" else f"cuda:{_gpu_name()}"
        return self.task.compute(self.encoder, self.state, cell), f"{where} {self.encoder.precision}"


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def _reason(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def run_cells(cells: Sequence[Cell], task: CellTask, options: ActorOptions = ActorOptions(),
              progress: bool = True) -> RunSummary:
    """Compute every cell whose ``done`` file is missing on model actors (Ray must be initialised)."""
    import ray

    from vlmlab.models import canonical_spec  # actors run in another directory

    summary = RunSummary()
    started = time.perf_counter()
    pending = []
    for cell in cells:
        (summary.skipped if Path(cell.done).exists() else pending).append(cell)
    if not pending:
        return summary
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 and options.gpus_per_actor > 0
    actor_class = ray.remote(ModelActor)
    by_model: dict[str, list[Cell]] = {}
    for cell in pending:
        by_model.setdefault(cell.model, []).append(cell)
    inflight: dict[Any, tuple[Cell, Any]] = {}
    remaining: dict[Any, int] = {}
    for spec, model_cells in by_model.items():
        n = max(1, min(options.actors_per_model, len(model_cells)))
        gpus = options.gpus_per_actor if use_gpu else 0
        actors = [actor_class.options(num_cpus=options.cpus_per_actor, num_gpus=gpus, max_restarts=0).remote(
                      canonical_spec(spec), task, "cuda" if use_gpu else "cpu", max(1, int(options.cpus_per_actor)))
                  for _ in range(n)]
        summary.actors += n
        for k, cell in enumerate(model_cells):
            actor = actors[k % n]
            inflight[actor.compute.remote(cell)] = (cell, actor)
            remaining[actor] = remaining.get(actor, 0) + 1
    total = len(pending)
    while inflight:
        ready, _ = ray.wait(list(inflight), num_returns=1)
        cell, actor = inflight.pop(ready[0])
        try:
            result, where = ray.get(ready[0])
            task.save(cell, result)
            summary.computed.append(cell)
            summary.devices[cell.folder] = where
        except Exception as exc:  # one bad cell is recorded; the others go on
            summary.failed.append((cell, _reason(exc)))
            log.error("cell %s / %s failed: %s", cell.folder, cell.key, _reason(exc))
        remaining[actor] -= 1
        if remaining[actor] == 0:
            ray.kill(actor)  # frees its CPU/GPU share for the models still waiting
        if progress:
            done = len(summary.computed) + len(summary.failed)
            elapsed = time.perf_counter() - started
            print(f"[study] {done}/{total} cells ({cell.folder} / {cell.key}) {elapsed:.1f} s", flush=True)
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


def check_specs(specs: Sequence[str]) -> None:
    """Fail in the driver, before any actor starts, on a spec that cannot name a model."""
    from vlmlab.models import check_supported, resolve_spec

    for spec in specs:
        check_supported(spec, resolve_spec(spec))


def has_random_weights(spec: str) -> bool:
    """Whether ``spec`` is an open_clip architecture without pretrained weights (a new random draw in
    every process that loads it)."""
    from vlmlab.models import resolve_spec

    resolved = resolve_spec(spec)
    return (resolved.backend == "open_clip" and resolved.pretrained is None
            and not resolved.name.startswith(("hf-hub:", "local-dir:")))


def _same_entry(key: str, a: Any, b: Any) -> bool:
    if key != "models":
        return a == b
    from vlmlab.models import resolve_spec

    spec_a, spec_b = (x["spec"] if isinstance(x, dict) else x for x in (a, b))
    return resolve_spec(spec_a) == resolve_spec(spec_b)


MANIFEST_LABELS = {"palette_lab": "palette", "concepts": "concept list", "classes": "class list",
                   "labels": "labels file", "where": "row filter (--where)"}


def merge_manifest(path: Path, record: dict[str, Any], fixed: Sequence[str], named: Sequence[str]) -> dict[str, Any]:
    """The study manifest after this run, refusing a run that would mix cells that do not compare.

    ``fixed`` keys (palette, concepts, classes, ...) must equal the earlier run's; ``named`` keys map
    names (styles, template sets, model folders) to definitions: a name may be added, but one used
    before must keep its definition (a model folder its spec).
    """
    if not path.is_file():
        return record
    import json

    old = json.loads(path.read_text())
    for key in fixed:
        if key in old and old[key] != record.get(key):
            what = MANIFEST_LABELS.get(key, key.replace("_", " "))
            raise StudyError(f"{path.parent} was run with another {what}; its cells would not "
                             "compare with this run's: use another --out")
    merged = {**old, **record}
    for key in named:
        for name, value in record.get(key, {}).items():
            before = old.get(key, {}).get(name)
            if before is not None and not _same_entry(key, before, value):
                raise StudyError(f"{key[:-1] if key.endswith('s') else key} {name!r} in {path.parent} was run as "
                                 f"{before!r}, now {value!r}: rename it (--names for models) or use another --out")
        merged[key] = {**old.get(key, {}), **record.get(key, {})}
    return merged


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest only when it changed (a resumed run leaves the folder untouched)."""
    import json

    text = json.dumps(manifest, indent=1) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

