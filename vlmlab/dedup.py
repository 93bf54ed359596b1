"""``vlmlab dedup``: groups of near-duplicate images in a store.

Two images are near duplicates when their embeddings' cosine is at least ``--threshold``; groups
are the connected components of that relation (union-find over the pairs), so a chain A~B~C is
one group even when A and C are a little further apart. Up to ``--exact-limit`` rows every pair
is checked (faiss exact range search, in batches; 20k x 512 takes ~20 s on 2 cores and the cost
grows with the square); above it each row's ``--neighbors`` nearest rows from an IVF index are
checked, which finds the same pairs unless a group is larger than that (chains still join it).

Each group keeps its first member by path as the one to ``keep``; the rest are listed with their
cosine to it. The groups are printed and written as JSON (``--out``, default
``STORE/dedup.json``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmlab.config import add_config_arguments, config_from_args
from vlmlab.index import default_nlist
from vlmlab.store import EmbeddingStore


@dataclass(frozen=True)
class DedupConfig:
    """What ``vlmlab dedup`` does."""

    store: str = field(default="", metadata={"help": "embedding store directory (vlmlab extract)"})
    threshold: float = field(default=0.95, metadata={"help": "cosine at or above which two images are duplicates"})
    out: str | None = field(default=None, metadata={"help": "groups JSON file (default: STORE/dedup.json)"})
    where: str | None = field(default=None, metadata={"help": "metadata filter, e.g. \"source='real'\""})
    exact_limit: int = field(default=50000, metadata={"help": "most rows checked pair by pair; above: IVF k-NN"})
    neighbors: int = field(default=32, metadata={"help": "neighbours checked per row above --exact-limit"})
    quiet: bool = field(default=False, metadata={"help": "print only the summary, not every group"})


def duplicate_pairs(embeddings: np.ndarray, threshold: float = 0.95, exact_limit: int = 50000,
                    neighbors: int = 32, nprobe: int = 16, batch: int = 4096) -> np.ndarray:
    """``(P, 2)`` int64 row pairs ``i < j`` of L2-normalised ``embeddings`` with cosine >= ``threshold``.

    Exact (every pair) up to ``exact_limit`` rows; beyond, each row's ``neighbors`` nearest found by
    an IVF index probing ``nprobe`` cells (a near duplicate almost always shares a cell or a neighbouring one).
    """
    import faiss

    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = emb.shape
    found = []
    if n <= exact_limit:
        index = faiss.IndexFlatIP(dim)
        index.add(emb)
        # range_search keeps scores strictly above the radius; nudge it down so ">=" holds.
        radius = float(np.nextafter(np.float32(threshold), np.float32(-1)))
        for start in range(0, n, batch):  # batches bound the result buffers
            lims, _, rows = index.range_search(emb[start : start + batch], radius)
            queries = start + np.repeat(np.arange(len(lims) - 1), np.diff(lims).astype(np.int64))
            found.append(np.stack([queries, rows.astype(np.int64)], axis=1))
    else:
        # Inverted lists: each row is compared with the rows of its `nprobe` nearest cells only.
        nlist = default_nlist(n)
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        train = emb[np.sort(np.random.default_rng(0).choice(n, min(n, 40 * nlist), replace=False))]
        index.train(train)
        index.add(emb)
        index.nprobe = min(nlist, nprobe)
        for start in range(0, n, batch):
            sims, rows = index.search(emb[start : start + batch], min(neighbors + 1, n))
            queries = np.repeat(np.arange(start, start + len(rows)), rows.shape[1])
            keep = (sims.ravel() >= threshold) & (rows.ravel() >= 0)
            found.append(np.stack([queries[keep], rows.ravel()[keep].astype(np.int64)], axis=1))
    pairs = np.concatenate(found) if found else np.zeros((0, 2), np.int64)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return np.unique(np.sort(pairs, axis=1), axis=0)


def connected_groups(n: int, pairs: np.ndarray) -> list[np.ndarray]:
    """Union-find over ``pairs`` of row indices in ``range(n)``: the groups with 2+ members, each
    sorted, largest group first."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps the trees flat
            i = parent[i]
        return i

    for i, j in pairs:
        ri, rj = root(int(i)), root(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([root(i) for i in range(n)]) if n else np.zeros(0, np.int64)
    labels, counts = np.unique(roots, return_counts=True)
    groups = [np.flatnonzero(roots == r) for r in labels[counts > 1]]
    return sorted(groups, key=lambda g: (-len(g), int(g[0])))


def near_duplicate_groups(embeddings: np.ndarray, threshold: float = 0.95, exact_limit: int = 50000,
                          neighbors: int = 32) -> list[np.ndarray]:
    """Row-index groups of near duplicates (cosine >= ``threshold``) among L2-normalised ``embeddings``."""
    pairs = duplicate_pairs(embeddings, threshold, exact_limit, neighbors)
    return connected_groups(len(embeddings), pairs)


def dedup_store(store: EmbeddingStore, threshold: float = 0.95, where: str | None = None,
                exact_limit: int = 50000, neighbors: int = 32) -> dict[str, Any]:
    """Near-duplicate groups of ``store``'s rows (matching ``where``) as a JSON-ready dict:
    ``{"threshold", "rows", "groups": [{"keep": {id, path}, "duplicates": [{id, path, cosine}]}],
    "duplicates"}`` where ``duplicates`` counts the rows that could be dropped."""
    ids, emb, meta = store.embeddings(where=where)
    paths = meta["path"].to_pylist()
    groups = []
    for rows in near_duplicate_groups(emb, threshold, exact_limit, neighbors):
        rows = sorted(rows.tolist(), key=lambda i: paths[i])
        keep, rest = rows[0], rows[1:]
        groups.append({
            "keep": {"id": int(ids[keep]), "path": paths[keep]},
            "duplicates": [{"id": int(ids[i]), "path": paths[i], "cosine": round(float(emb[i] @ emb[keep]), 6)}
                           for i in rest]})
    return {"store": str(store.root), "where": where, "threshold": threshold, "rows": len(ids),
            "method": "exact" if len(ids) <= exact_limit else f"ivf k={neighbors}",
            "groups": groups, "duplicates": sum(len(g["duplicates"]) for g in groups)}


def main(argv: list[str] | None = None) -> None:
    """``vlmlab dedup STORE [--threshold 0.95] [--out groups.json] [--where ...]``."""
    parser = argparse.ArgumentParser(prog="vlmlab dedup", description=__doc__.split("\n")[0])
    parser.add_argument("store_dir", metavar="STORE", help=DedupConfig.__dataclass_fields__["store"].metadata["help"])
    parser.add_argument("--config", help="YAML file filling DedupConfig")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    add_config_arguments(parser, DedupConfig, skip=("store",))
    args = parser.parse_args(argv)
    cfg = config_from_args(DedupConfig, args, args.config, [*args.overrides, f"store={args.store_dir}"])
    store = EmbeddingStore.open(cfg.store)
    result = dedup_store(store, cfg.threshold, cfg.where, cfg.exact_limit, cfg.neighbors)
    out = Path(cfg.out) if cfg.out else store.root / "dedup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if not cfg.quiet:
        for n, group in enumerate(result["groups"]):
            print(f"group {n}: keep {group['keep']['path']}")
            for dup in group["duplicates"]:
                print(f"    {dup['cosine']:.4f}  {dup['path']}")
    print(f"{len(result['groups'])} groups, {result['duplicates']} duplicates among {result['rows']} rows "
          f"(cosine >= {cfg.threshold}); wrote {out}")


if __name__ == "__main__":
    main()
