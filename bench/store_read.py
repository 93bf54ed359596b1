"""Bytes a query reads from a large store: ``vlmlab search`` against a stale index, and ``count()``.

Builds a store of ``--rows`` synthetic rows (in parts of 10k, the tiny model's embedding size),
indexes it, appends ``--new`` rows (so the index is stale), then runs ``vlmlab search`` in a fresh
process and reports the bytes that process read (``rchar`` of ``/proc/self/io``: every byte returned
by read calls, page cache or not) during the search alone, next to the same search against an
up-to-date index and the store's raw embedding bytes. The code under test is whatever ``vlmlab``
imports, so the same script measures two checkouts side by side (``PYTHONPATH=OTHER_CHECKOUT``).

    python bench/store_read.py --model TINY_MODEL_DIR [--rows 100000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).with_name("results.jsonl")
PART_ROWS = 10_000

MEASURE = """
import sys, io, contextlib
import vlmlab.search, vlmlab.models
def rchar():
    return int(next(l for l in open('/proc/self/io') if l.startswith('rchar')).split()[1])
encoder = vlmlab.models.load_model(sys.argv[2], device='cpu')  # weights are read before the count starts
before = rchar()
with contextlib.redirect_stdout(io.StringIO()):
    vlmlab.search.main([sys.argv[1], '--text', 'granite', '-k', '5'])
print(rchar() - before)
"""


def write_rows(store, start: int, n: int, dim: int, rng: np.random.Generator) -> None:
    """Append ``n`` synthetic rows (ids ``start..``) to ``store`` in parts of ``PART_ROWS``."""
    import pyarrow as pa

    for a in range(start, start + n, PART_ROWS):
        b = min(a + PART_ROWS, start + n)
        emb = rng.standard_normal((b - a, dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        table = pa.table({
            "id": pa.array(np.arange(a, b) * 7 + 11, pa.int64()),
            "path": pa.array([f"17/{i // 1000}/{i % 1000}.png" for i in range(a, b)], pa.string()),
            "content_hash": pa.array([f"{i:032x}" for i in range(a, b)], pa.string()),
            "width": pa.array(np.full(b - a, 256), pa.int32()),
            "height": pa.array(np.full(b - a, 256), pa.int32()),
            "tile_z": pa.array(np.full(b - a, 17), pa.int32()),
            "tile_x": pa.array(np.arange(a, b) // 1000, pa.int32()),
            "tile_y": pa.array(np.arange(a, b) % 1000, pa.int32()),
            "source": pa.array(["real"] * (b - a), pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
        })
        store.write_part(table)


def search_bytes(store_dir: Path, model: str) -> int:
    """Bytes the ``vlmlab search`` call read, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MEASURE, str(store_dir), model], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    """Run the measurement and append its JSON line."""
    import vlmlab
    from vlmlab.index import build_index
    from vlmlab.models import load_model
    from vlmlab.store import EmbeddingStore

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a local model directory (the tiny model)")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--new", type=int, default=1_000, help="rows appended after indexing (stale index)")
    parser.add_argument("--label", default="", help="name of the checkout measured")
    args = parser.parse_args(argv)
    dim = load_model(args.model, device="cpu").embed_dim
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        store = EmbeddingStore.create(root, model=str(Path(args.model).resolve()), embed_dim=dim, source_root=tmp)
        write_rows(store, 0, args.rows, dim, rng)
        try:
            build_index(store, kind="flat")
        except TypeError:  # a checkout whose build_index takes the store directory
            build_index(root, kind="flat")
        fresh = search_bytes(root, args.model)
        write_rows(store, args.rows, args.new, dim, rng)
        stale = search_bytes(root, args.model)
        embedding_bytes = sum(p.stat().st_size for p in (root / "embeddings").glob("*.parquet"))
        index_bytes = (root / "index" / "faiss.index").stat().st_size
        t0 = time.perf_counter()
        count = EmbeddingStore.open(root).count()
        count_s = time.perf_counter() - t0
    record = {"bench": "store_read", "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "label": args.label or str(Path(vlmlab.__file__).parents[1]), "rows": args.rows, "new": args.new,
              "dim": dim, "store_bytes": embedding_bytes, "search_bytes_fresh_index": fresh,
              "search_bytes_stale_index": stale, "faiss_index_bytes": index_bytes,
              "store_bytes_read_stale": stale - index_bytes, "count_s": round(count_s, 4), "count": count,
              "stale_read_over_store_size": round(stale / embedding_bytes, 2)}
    print(json.dumps(record))
    with open(RESULTS, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


if __name__ == "__main__":
    main()
