"""The embedding store: a directory every pipeline, trainer and endpoint reads the same way.

Layout (see DESIGN.md)::

    STORE/manifest.json               model spec, adapter, embedding size, dtype, row count, ...
    STORE/embeddings/part-*.parquet   one row per image (schema below), written atomically
    STORE/errors.parquet              images that could not be read, with the reason
    STORE/index/                      the FAISS index and id map (vlmlab.index)

Parts are written to a temporary name and renamed into place, so a reader never sees a
half-written file and a killed writer leaves at most an ignorable ``.tmp`` behind. Part names
sort by write order; when an image was re-embedded (changed content) the newest row wins.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTS_DIR = "embeddings"
ERRORS = "errors.parquet"
INDEX_DIR = "index"
ERROR_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string()), ("recorded_at", pa.string())])


class StoreError(ValueError):
    """The store is missing, corrupt, or was made with a different model than requested."""


def store_schema(embed_dim: int, dtype: str = "float32") -> pa.Schema:
    """Arrow schema of a store part with embeddings of ``embed_dim`` values of ``dtype``."""
    value_type = {"float32": pa.float32(), "float16": pa.float16()}[dtype]
    return pa.schema(
        [
            ("id", pa.int64()),
            ("path", pa.string()),
            ("content_hash", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("tile_z", pa.int32()),
            ("tile_x", pa.int32()),
            ("tile_y", pa.int32()),
            ("source", pa.string()),
            ("embedding", pa.list_(value_type, embed_dim)),
        ]
    )


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_write_table(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


@dataclass
class EmbeddingStore:
    """Handle on a store directory; cheap to create, reads lazily."""

    root: Path

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
        """
        root = Path(root)
        store = cls(root)
        if (root / MANIFEST).exists():
            manifest = store.manifest
            if store.holds(model, adapter) and manifest["embed_dim"] == embed_dim:
                return store
            if not new_store:
                raise StoreError(
                    f"store {root} holds embeddings of {manifest['model']!r}"
                    f"{' + adapter ' + str(manifest.get('adapter')) if manifest.get('adapter') else ''}, "
                    f"not {model!r}{' + adapter ' + adapter if adapter else ''}; "
                    "use another --out or pass --new-store to replace it"
                )
            store.clear()
        (root / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": model,
            "adapter": adapter,
            "embed_dim": int(embed_dim),
            "dtype": dtype,
            "normalized": True,
            "source_root": str(Path(source_root).resolve()),
            "rows": 0,
            "created_at": _now(),
        }
        store.write_manifest(manifest)
        return store

    def holds(self, model: str, adapter: str | None = None) -> bool:
        """Whether this store's embeddings were made with ``model`` and ``adapter``."""
        manifest = self.manifest
        return manifest["model"] == model and manifest.get("adapter") == adapter

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
        _atomic_write_bytes(self.root / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        """Set manifest fields and refresh the row count from the parts; returns the new manifest."""
        manifest = self.manifest | fields
        manifest["rows"] = self.count()
        manifest["updated_at"] = _now()
        self.write_manifest(manifest)
        return manifest

    @property
    def model(self) -> str:
        """The model spec the store's embeddings were made with."""
        return self.manifest["model"]

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
        manifest = self.manifest
        schema = store_schema(manifest["embed_dim"], manifest["dtype"])
        table = table.select(schema.names).cast(schema)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
        path = self.root / PARTS_DIR / f"part-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
        _atomic_write_table(table, path)
        return path

    def read(self, columns: Sequence[str] | None = None, where: str | None = None) -> pa.Table:
        """All current rows (newest row per id), optionally only ``columns`` and rows matching ``where``.

        ``where`` is a SQL-like filter over the metadata columns, e.g.
        ``"source='real' AND tile_z=17"`` (see :func:`vlmlab.filters.parse_where`).
        """
        manifest = self.manifest
        schema = store_schema(manifest["embed_dim"], manifest["dtype"])
        parts = self.part_paths()
        if not parts:
            table = schema.empty_table()
        else:
            table = pa.concat_tables([pq.read_table(p, schema=schema) for p in parts])
            table = _latest_per_id(table)
        if where:
            from vlmlab.filters import parse_where

            table = table.filter(parse_where(where, table.schema))
        if columns is not None:
            table = table.select(list(columns))
        return table

    def count(self) -> int:
        """Number of distinct images in the store."""
        return len(self.read(columns=["id"]))

    def known_hashes(self) -> dict[str, str]:
        """``{path: content_hash}`` of every stored image: what a resumed extraction skips."""
        table = self.read(columns=["path", "content_hash"])
        return dict(zip(table["path"].to_pylist(), table["content_hash"].to_pylist(), strict=True))

    def embeddings(self, where: str | None = None) -> tuple[np.ndarray, np.ndarray, pa.Table]:
        """``(ids (N,), embeddings (N, D) float32, metadata table)`` of current rows."""
        table = self.read(where=where)
        emb = embedding_matrix(table)
        return table["id"].to_numpy(), emb, table.drop_columns(["embedding"])

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
                    _atomic_write_table(kept, part)
                else:
                    part.unlink()
        return removed

    # ---------------------------------------------------------------- errors

    def errors(self) -> pa.Table:
        """Images that failed to decode: ``path``, ``reason``, ``recorded_at``."""
        path = self.root / ERRORS
        return pq.read_table(path) if path.exists() else ERROR_SCHEMA.empty_table()

    def record_errors(self, rows: Sequence[tuple[str, str]]) -> None:
        """Add ``(path, reason)`` rows to ``errors.parquet`` (one row per path, newest reason wins)."""
        if not rows:
            return
        now = _now()
        new = pa.table(
            {"path": [r[0] for r in rows], "reason": [r[1] for r in rows], "recorded_at": [now] * len(rows)},
            schema=ERROR_SCHEMA,
        )
        old = self.errors()
        old = old.filter(pc.invert(pc.is_in(old["path"], value_set=new["path"])))
        _atomic_write_table(pa.concat_tables([old, new]), self.root / ERRORS)

    def clear_errors(self, paths: Sequence[str]) -> None:
        """Forget recorded errors of ``paths`` (e.g. files that now decode)."""
        old = self.errors()
        if len(old) and paths:
            kept = old.filter(pc.invert(pc.is_in(old["path"], value_set=pa.array(list(paths), pa.string()))))
            _atomic_write_table(kept, self.root / ERRORS)


def _latest_per_id(table: pa.Table) -> pa.Table:
    """Keep the last occurrence of each id (parts are concatenated in write order)."""
    ids = table["id"].to_numpy()
    if len(np.unique(ids)) == len(ids):
        return table
    _, first_in_reversed = np.unique(ids[::-1], return_index=True)
    keep = np.sort(len(ids) - 1 - first_in_reversed)
    return table.take(pa.array(keep))


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column as a contiguous float32 array (N, D)."""
    col = table["embedding"].combine_chunks()
    if len(col) == 0:
        return np.zeros((0, col.type.list_size), np.float32)
    values = col.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values.reshape(len(col), col.type.list_size), dtype=np.float32)

