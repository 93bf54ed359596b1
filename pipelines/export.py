"""``vlmlab export STORE --npy OUT``: the store in the old single-script format
(``image_embeddings.npy`` + ``image_paths.json``) for tools that read it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from vlmlab.store import EmbeddingStore


def export_npy(store_dir: str | Path, out: str | Path, where: str | None = None) -> tuple[Path, Path]:
    """Write ``image_embeddings.npy`` (N, D float32) and ``image_paths.json`` (absolute paths, same
    order): the single-script format older tools read."""
    store = EmbeddingStore.open(store_dir)
    _, emb, meta = store.embeddings(where=where)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = store.source_root
    np.save(out / "image_embeddings.npy", emb)
    paths = [str(root / p) for p in meta["path"].to_pylist()]
    (out / "image_paths.json").write_text(json.dumps(paths, indent=1) + "\n")
    return out / "image_embeddings.npy", out / "image_paths.json"


def main(argv: list[str] | None = None) -> None:
    """``vlmlab export STORE --npy OUT [--where ...]``."""
    parser = argparse.ArgumentParser(prog="vlmlab export", description="write the store as .npy + paths .json")
    parser.add_argument("store")
    parser.add_argument("--npy", required=True, help="output folder for image_embeddings.npy + image_paths.json")
    parser.add_argument("--where", help="SQL-like row filter, e.g. \"source='real'\"")
    args = parser.parse_args(argv)
    npy, paths = export_npy(args.store, args.npy, args.where)
    print(f"wrote {npy} and {paths}")


if __name__ == "__main__":
    main()
