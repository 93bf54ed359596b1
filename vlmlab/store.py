"""The embedding store: a directory every pipeline, trainer and endpoint reads the same way.

Layout (see DESIGN.md)::

    STORE/manifest.json               model spec, adapter, embedding size, dtype, row count, ...
    STORE/embeddings/part-*.parquet   one row per image (schema below), written atomically
    STORE/errors.parquet              images that could not be read, with the reason
    STORE/index/                      the FAISS index and id map (vlmlab.index)
    STORE/quarantine/                 unreadable parts moved aside by `vlmlab store verify --quarantine`
    STORE/.writer.lock                held (flock) by the one extraction writing the store

Parts are written to a temporary name and renamed into place, so a reader never sees a
half-written file and a killed writer leaves at most an ignorable ``.tmp`` behind. Part names
sort by write order; when an image was re-embedded (changed content) the newest row wins.

One writer at a time: :meth:`EmbeddingStore.writer_lock` (an advisory ``flock``, released by the
kernel when its holder dies, so a killed writer never leaves a stale lock). A part that cannot be
read (a truncated file, a disk fault) fails every read with a :class:`StoreError` naming it and the
way out: ``vlmlab store verify STORE --quarantine`` moves it aside, and the next ``vlmlab extract``
re-embeds its images (they are no longer known to the store).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from vlmlab.fileio import atomic_write_json, atomic_write_table, utc_now, utc_stamp

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTS_DIR = "embeddings"
ERRORS = "errors.parquet"
INDEX_DIR = "index"
QUARANTINE_DIR = "quarantine"
WRITER_LOCK = ".writer.lock"
EMBEDDING = "embedding"
ERROR_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string()), ("recorded_at", pa.string())])


class StoreError(ValueError):
    """The store is missing, corrupt, or was made with a different model than requested."""


@dataclass(frozen=True)
class Column:
    """One metadata column of a store row. ``nullable`` integer columns carry -1 for null in numpy
    batches (extraction's readers), which :func:`rows_to_part` turns into Arrow nulls."""

    name: str
    type: pa.DataType
    python_type: type
    help: str
    nullable: bool = False


# The one declaration of a store row (besides its embedding): the Arrow schema, the metadata
# columns a search hit carries, :class:`Hit` and extraction's part builder all derive from it.
ROW_COLUMNS: tuple[Column, ...] = (
    Column("id", pa.int64(), int, "stable int64 id of the image (from its relative path)"),
    Column("path", pa.string(), str, "path relative to the store's source root"),
    Column("content_hash", pa.string(), str, "hash of the file's bytes (what resume compares)"),
    Column("width", pa.int32(), int, "image width in pixels"),
    Column("height", pa.int32(), int, "image height in pixels"),
    Column("tile_z", pa.int32(), int, "slippy-map zoom of a z/x/y tile path, else null", nullable=True),
    Column("tile_x", pa.int32(), int, "tile column, else null", nullable=True),
    Column("tile_y", pa.int32(), int, "tile row, else null", nullable=True),
    Column("source", pa.string(), str, "source tag, e.g. real or synthetic"),
)
METADATA_COLUMNS: tuple[str, ...] = tuple(c.name for c in ROW_COLUMNS)


def store_schema(embed_dim: int, dtype: str = "float32") -> pa.Schema:
    """Arrow schema of a store part with embeddings of ``embed_dim`` values of ``dtype``."""
    value_type = {"float32": pa.float32(), "float16": pa.float16()}[dtype]
    return pa.schema([(c.name, c.type) for c in ROW_COLUMNS] + [(EMBEDDING, pa.list_(value_type, embed_dim))])


def _hit_as_dict(self: Any) -> dict[str, Any]:
    """JSON-able dict of the hit's fields (the store row's metadata and ``score``)."""
    return {name: getattr(self, name) for name in self.__dataclass_fields__}


Hit = make_dataclass("Hit", [("id", int), ("score", float)] + [
    (c.name, c.python_type | None, field(default=None)) for c in ROW_COLUMNS if c.name != "id"],
    namespace={"as_dict": _hit_as_dict, "__doc__": "One search result: a store row's metadata (the fields of "
               "``ROW_COLUMNS``) and its cosine similarity ``score`` to the query.",
               "__module__": __name__})


def hit_from_row(row: Mapping[str, Any], score: float) -> Hit:
    """The :class:`Hit` of a store row (a dict with at least the metadata columns) scored ``score``."""
    return Hit(score=float(score), **{name: row[name] for name in METADATA_COLUMNS})


def rows_to_part(columns: Mapping[str, Any], embeddings: np.ndarray) -> pa.Table:
    """A store part from one array per metadata column (numpy or lists; -1 is null in nullable integer
    columns) and the (N, D) embeddings, typed by ``ROW_COLUMNS``."""
    arrays = {}
    for column in ROW_COLUMNS:
        values = columns[column.name]
        if column.nullable:
            values = np.asarray(values)
            arrays[column.name] = pa.array(values, column.type, mask=values < 0)
        elif pa.types.is_string(column.type):
            arrays[column.name] = pa.array(list(values), column.type)
        else:
            arrays[column.name] = pa.array(np.asarray(values), column.type)
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    arrays[EMBEDDING] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
    return pa.table(arrays)


@dataclass
class EmbeddingStore:
    """Handle on a store directory; cheap to create, reads lazily.

    Reads push column selection and filters down into the Parquet parts (``pyarrow.dataset``), so
    counting rows, listing hashes or building an id map never touches the embeddings.
    """

    root: Path
    _part_ids: tuple[tuple[Path, ...], list[np.ndarray]] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    # ---------------------------------------------------------------- creation

    @classmethod
    def create(
        cls,
        root: str | Path,
        model: str,
        embed_dim: int,
        source_root: str | Path,
        adapter: str | None = None,
        dtype: str = "float32",
        new_store: bool = False,
    ) -> EmbeddingStore:
        """Open ``root`` for writing embeddings of ``model``, creating it if needed.

        An existing store made with another model spec or adapter is refused with
        :class:`StoreError` unless ``new_store`` is set, in which case its contents are removed.
        The manifest records local model and adapter paths absolute, so the store works from any
        working directory.
        """
        from vlmlab.models import canonical_spec

        root = Path(root)
        store = cls(root)
        store.refuse_lost_manifest()
        if (root / MANIFEST).exists():
            if store.holds(model, adapter) and store.manifest["embed_dim"] == embed_dim:
                return store
            if not new_store:
                store.check_compatible(model, adapter)
            store.clear()
        (root / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": canonical_spec(model),
            "adapter": str(Path(adapter).expanduser().resolve()) if adapter else None,
            "embed_dim": int(embed_dim),
            "dtype": dtype,
            "normalized": True,
            "source_root": str(Path(source_root).resolve()),
            "rows": 0,
            "created_at": utc_now(),
        }
        store.write_manifest(manifest)
        return store

    def refuse_lost_manifest(self) -> None:
        """:class:`StoreError` when the directory holds parts but no manifest: a store whose manifest was lost,
        which a new store would silently duplicate (every image embedded again beside the old rows)."""
        parts = [] if (self.root / MANIFEST).exists() else self.part_paths()
        if parts:
            raise StoreError(f"{self.root} holds {len(parts)} embedding part(s) but no {MANIFEST}: its "
                             "manifest was lost, and starting over would embed every image again beside them; "
                             "restore the manifest, or move the directory away to start a new store")

    def holds(self, model: str, adapter: str | None = None) -> bool:
        """Whether this store's embeddings were made with ``model`` and ``adapter`` (compared by resolved
        identity: a relative and an absolute path to one model directory are the same model)."""
        from vlmlab.models import same_spec

        manifest = self.manifest
        stored_adapter, adapter = manifest.get("adapter"), adapter or None
        same_adapter = stored_adapter == adapter or (
            stored_adapter is not None and adapter is not None
            and Path(stored_adapter).expanduser().resolve() == Path(adapter).expanduser().resolve())
        return same_spec(manifest["model"], model) and same_adapter

    def check_compatible(self, model: str, adapter: str | None = None, source_root: str | Path | None = None) -> None:
        """Raise :class:`StoreError` (one message naming the fix) unless this store holds embeddings of
        ``model`` + ``adapter`` extracted from ``source_root`` (when given)."""
        manifest = self.manifest
        if not self.holds(model, adapter):
            held = manifest["model"] + (f" + adapter {manifest['adapter']}" if manifest.get("adapter") else "")
            asked = model + (f" + adapter {adapter}" if adapter else "")
            raise StoreError(f"store {self.root} holds embeddings of {held!r}, not {asked!r}; "
                             "use another --out or pass --new-store to replace it")
        if source_root is not None and Path(manifest["source_root"]) != Path(source_root).resolve():
            raise StoreError(f"store {self.root} was extracted from {manifest['source_root']}, not "
                             f"{Path(source_root).resolve()}; use one store per image folder")

    @classmethod
    def open(cls, root: str | Path) -> EmbeddingStore:
        """Open an existing store for reading; raises :class:`StoreError` if it is not one."""
        store = cls(Path(root))
        if not (store.root / MANIFEST).is_file():
            raise StoreError(f"{root} is not an embedding store (no {MANIFEST}); create one with `vlmlab extract`")
        return store

    def clear(self) -> None:
        """Remove every part, the error list, the index and the manifest."""
        import shutil

        for name in (PARTS_DIR, INDEX_DIR):
            shutil.rmtree(self.root / name, ignore_errors=True)
        for name in (ERRORS, MANIFEST):
            (self.root / name).unlink(missing_ok=True)
        self._part_ids = None

    # ---------------------------------------------------------------- manifest

    @property
    def manifest(self) -> dict[str, Any]:
        """The parsed ``manifest.json``."""
        try:
            return json.loads((self.root / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"cannot read {self.root / MANIFEST}: {exc}") from exc

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Replace ``manifest.json`` atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.root / MANIFEST, manifest)

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        """Set manifest fields and refresh the row count from the parts; returns the new manifest."""
        manifest = self.manifest | fields
        manifest["rows"] = self.count()
        manifest["updated_at"] = utc_now()
        self.write_manifest(manifest)
        return manifest

    @property
    def model(self) -> str:
        """The model spec the store's embeddings were made with."""
        return self.manifest["model"]

    @property
    def schema(self) -> pa.Schema:
        """Arrow schema of this store's parts (:func:`store_schema` of its embedding size and dtype)."""
        manifest = self.manifest
        return store_schema(manifest["embed_dim"], manifest["dtype"])

    @property
    def source_root(self) -> Path:
        """Directory the ``path`` column is relative to."""
        return Path(self.manifest["source_root"])

    @property
    def index_dir(self) -> Path:
        """Where ``vlmlab index`` keeps the FAISS index for this store."""
        return self.root / INDEX_DIR

    # ---------------------------------------------------------------- parts

    def part_paths(self) -> list[Path]:
        """Visible parts in write order (temporary files are never listed)."""
        return sorted((self.root / PARTS_DIR).glob("part-*.parquet"))

    def write_part(self, table: pa.Table) -> Path:
        """Write one part atomically; ``table`` must match :func:`store_schema` for this store."""
        schema = self.schema
        table = table.select(schema.names).cast(schema)
        path = self.root / PARTS_DIR / f"part-{utc_stamp()}-{np.random.default_rng().integers(1 << 32):08x}.parquet"
        atomic_write_table(table, path)
        return path

    def _ids_by_part(self, parts: list[Path]) -> list[np.ndarray]:
        """The ``id`` column of each part (cached while the part list is unchanged)."""
        key = tuple(parts)
        if self._part_ids is None or self._part_ids[0] != key:
            ids = []
            for p in parts:
                try:
                    ids.append(pq.read_table(p, columns=["id"])["id"].to_numpy())
                except (OSError, pa.ArrowException) as exc:
                    raise self._unreadable(p, exc) from exc
            self._part_ids = (key, ids)
        return self._part_ids[1]

    def _unreadable(self, part: Path, exc: BaseException) -> StoreError:
        return StoreError(f"store part {part.name} of {self.root} cannot be read ({exc}); the other parts are "
                          f"intact: `vlmlab store verify {self.root} --quarantine` moves it aside, and the next "
                          "`vlmlab extract` embeds its images again")

    def _superseded(self, ids_by_part: list[np.ndarray]) -> dict[int, np.ndarray]:
        """Per part index, the ids that a later part holds again (re-embedded images: the newest row wins)."""
        if not ids_by_part:
            return {}
        all_ids = np.concatenate(ids_by_part)
        if len(np.unique(all_ids)) == len(all_ids):
            return {}
        part_of = np.concatenate([np.full(len(ids), i) for i, ids in enumerate(ids_by_part)])
        # sorted by id, then part: every occurrence but an id's last is superseded (ids are unique within a part)
        order = np.lexsort((part_of, all_ids))
        sorted_ids = all_ids[order]
        stale = np.zeros(len(all_ids), bool)
        stale[order[:-1]] = sorted_ids[1:] == sorted_ids[:-1]
        out: dict[int, np.ndarray] = {}
        offset = 0
        for i, ids in enumerate(ids_by_part):
            mask = stale[offset:offset + len(ids)]
            if mask.any():
                out[i] = ids[mask].astype(np.int64)
            offset += len(ids)
        return out

    def read(self, columns: Sequence[str] | None = None, where: str | None = None,
             ids: np.ndarray | Sequence[int] | None = None) -> pa.Table:
        """Current rows (newest row per id), only ``columns`` (default all) and rows matching ``where`` and
        ``ids``, in write order.

        ``where`` is a SQL-like filter over the metadata columns, e.g. ``"source='real' AND tile_z=17"``
        (see :func:`vlmlab.filters.parse_where`). Column selection and both filters are pushed down into
        the Parquet parts: only the columns asked for are read, and parts holding none of ``ids`` are
        skipped without reading anything but their id column.
        """
        schema = self.schema
        names = list(columns) if columns is not None else schema.names
        unknown = [c for c in names if c not in schema.names]
        if unknown:
            raise StoreError(f"store {self.root} has no column(s) {unknown}; columns: {schema.names}")
        expression = None
        if where:
            from vlmlab.filters import parse_where

            expression = parse_where(where, schema)
        wanted = None if ids is None else np.unique(np.asarray(ids, np.int64))
        if wanted is not None:
            expression = _and(expression, pc.field("id").isin(pa.array(wanted, pa.int64())))
        parts = self.part_paths()
        ids_by_part = self._ids_by_part(parts)
        superseded = self._superseded(ids_by_part)
        tables = []
        if parts:
            fragments = pads.dataset([str(p) for p in parts], schema=schema, format="parquet").get_fragments()
            for i, fragment in enumerate(fragments):
                if wanted is not None and not np.isin(ids_by_part[i], wanted).any():
                    continue
                stale = superseded.get(i)
                drop = None if stale is None else ~pc.field("id").isin(pa.array(stale, pa.int64()))
                try:
                    tables.append(fragment.to_table(schema=schema, columns=names, filter=_and(expression, drop)))
                except (OSError, pa.ArrowException) as exc:
                    raise self._unreadable(parts[i], exc) from exc
        if not tables:
            return pa.schema([schema.field(n) for n in names]).empty_table()
        return pa.concat_tables(tables)

    def count(self) -> int:
        """Number of distinct images in the store (reads the id column only)."""
        ids = self._ids_by_part(self.part_paths())
        return int(len(np.unique(np.concatenate(ids)))) if ids else 0

    def known_hashes(self) -> dict[str, str]:
        """``{path: content_hash}`` of every stored image: what a resumed extraction skips."""
        table = self.read(columns=["path", "content_hash"])
        return dict(zip(table["path"].to_pylist(), table["content_hash"].to_pylist(), strict=True))

    def embeddings(self, where: str | None = None, ids: np.ndarray | Sequence[int] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, pa.Table]:
        """``(ids (N,), embeddings (N, D) float32, metadata table)`` of current rows (matching ``where``/``ids``)."""
        table = self.read(where=where, ids=ids)
        emb = embedding_matrix(table)
        return table["id"].to_numpy(), emb, table.drop_columns([EMBEDDING])

    def remove_paths(self, paths: Sequence[str]) -> int:
        """Drop rows for images that no longer exist; rewrites parts atomically. Returns rows removed."""
        drop = pa.array(list(paths), pa.string())
        removed = 0
        for part in self.part_paths():
            table = pq.read_table(part)
            keep = pc.invert(pc.is_in(table["path"], value_set=drop))
            kept = table.filter(keep)
            if len(kept) != len(table):
                removed += len(table) - len(kept)
                if len(kept):
                    atomic_write_table(kept, part)
                else:
                    part.unlink()
        self._part_ids = None
        return removed

    # ---------------------------------------------------------------- integrity

    def verify(self, quarantine: bool = False) -> dict[str, Any]:
        """Check every part (footer, schema, ids); with ``quarantine``, move unreadable ones to
        ``STORE/quarantine/`` and refresh the manifest's row count. Returns ``{"parts", "rows", "bad":
        [{"part", "error"}], "quarantined": [paths]}``; the images of a quarantined part are re-embedded
        by the next extraction."""
        schema = self.schema
        bad, rows = [], 0
        for part in self.part_paths():
            try:
                parquet = pq.ParquetFile(part)  # the footer, read once: schema, then the id column
                names = parquet.schema_arrow.names
                if names != schema.names:
                    raise StoreError(f"columns {names} are not the store's {schema.names}")
                rows += parquet.read(columns=["id"]).num_rows
            except (OSError, pa.ArrowException, StoreError) as exc:
                bad.append({"part": part.name, "error": f"{type(exc).__name__}: {exc}"})
        moved = []
        if quarantine and bad:
            target = self.root / QUARANTINE_DIR
            target.mkdir(exist_ok=True)
            for entry in bad:
                destination = target / entry["part"]
                os.replace(self.root / PARTS_DIR / entry["part"], destination)
                moved.append(str(destination))
                log.warning("quarantined %s: %s", entry["part"], entry["error"])
            self._part_ids = None
            earlier = self.manifest.get("quarantined", [])
            self.update_manifest(quarantined=sorted(earlier + [entry["part"] for entry in bad]))
        return {"parts": len(self.part_paths()), "rows": rows, "bad": bad, "quarantined": moved}

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Hold the store's writer lock for the ``with`` block; :class:`StoreError` naming the holder when
        another process writes the store (two writers would embed every image twice)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / WRITER_LOCK
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise StoreError(f"{self.root} is being written by {holder}; wait for it to finish (or stop it) "
                                 "before writing the same store") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} since {utc_now()}")
            handle.flush()
            try:
                yield
            finally:
                handle.seek(0)
                handle.truncate()
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ---------------------------------------------------------------- errors

    def errors(self) -> pa.Table:
        """Images that failed to decode: ``path``, ``reason``, ``recorded_at``."""
        path = self.root / ERRORS
        return pq.read_table(path) if path.exists() else ERROR_SCHEMA.empty_table()

    def record_errors(self, rows: Sequence[tuple[str, str]]) -> None:
        """Add ``(path, reason)`` rows to ``errors.parquet`` (one row per path, newest reason wins)."""
        if not rows:
            return
        now = utc_now()
        new = pa.table(
            {"path": [r[0] for r in rows], "reason": [r[1] for r in rows], "recorded_at": [now] * len(rows)},
            schema=ERROR_SCHEMA,
        )
        old = self.errors()
        old = old.filter(pc.invert(pc.is_in(old["path"], value_set=new["path"])))
        atomic_write_table(pa.concat_tables([old, new]), self.root / ERRORS)

    def clear_errors(self, paths: Sequence[str]) -> None:
        """Forget recorded errors of ``paths`` (e.g. files that now decode)."""
        old = self.errors()
        if len(old) and paths:
            kept = old.filter(pc.invert(pc.is_in(old["path"], value_set=pa.array(list(paths), pa.string()))))
            atomic_write_table(kept, self.root / ERRORS)


def _and(a: pc.Expression | None, b: pc.Expression | None) -> pc.Expression | None:
    return b if a is None else a if b is None else a & b


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column as a contiguous float32 array (N, D)."""
    col = table[EMBEDDING].combine_chunks()
    if len(col) == 0:
        return np.zeros((0, col.type.list_size), np.float32)
    values = col.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values.reshape(len(col), col.type.list_size), dtype=np.float32)
