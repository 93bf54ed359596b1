"""Vector search: exact numpy brute force vs FAISS flat vs ``vlmlab.index``'s ``auto`` index.

Side by side in one run, per size (100k and 1M unit vectors of 512 dims): build time, index
memory, single-query p50/p99 latency, batched throughput (QPS) and recall@10 against exact
search on fresh queries; ratios against numpy. Prints a table and appends one JSON line to
bench/results.jsonl.

    python bench/search.py            # 100k and 1M, isotropic random vectors (the issue's setting)
    python bench/search.py --quick    # 100k only
    python bench/search.py --data clustered   # vectors from a Gaussian mixture, closer to real embeddings

Isotropic random unit vectors in 512 dims have no neighbourhood structure (every vector is
almost equally far from every other), which is the worst case for any approximate index:
recall@10 >= 0.95 then needs a large part of the data scanned. ``--data clustered`` shows the
same code on data with structure, as CLIP embeddings of real images have.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import resource
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.jsonl"


def unit_vectors(n: int, dim: int, data: str, seed: int, centers: np.ndarray | None = None) -> np.ndarray:
    """``n`` unit vectors: isotropic Gaussian (``random``) or around ``centers`` (``clustered``)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):  # chunks keep the float64 temporaries small
        m = min(100_000, n - s)
        block = rng.standard_normal((m, dim), dtype=np.float32)
        if data == "clustered":
            block = centers[rng.integers(len(centers), size=m)] + 0.35 * block / np.sqrt(dim) * 4
        out[s:s + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    """p50/p99 in milliseconds."""
    a = 1000 * np.asarray(seconds)
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def numpy_search(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k rows (Q, k) by brute-force inner product, in bounded blocks of queries."""
    from vlmlab.index import exact_top_k

    return exact_top_k(x, q, k)[1]


def recall(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean |found[:k] ∩ truth[:k]| / k."""
    from vlmlab.index import recall_at_k

    return round(recall_at_k(found, truth, k), 4)


def index_bytes(index) -> int:
    """Bytes the index holds for vectors, ids and coarse centroids (FAISS's own containers)."""
    import faiss

    if isinstance(index, faiss.IndexIVF):
        inv = index.invlists
        stored = sum(inv.list_size(i) for i in range(index.nlist))
        return stored * (index.code_size + 8) + index.nlist * index.d * 4
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return int(inner.ntotal) * inner.d * 4 + (int(index.ntotal) * 8 if inner is not index else 0)


def measure_faiss(index, kind: str, params: dict, queries: np.ndarray, truth: np.ndarray, singles: int) -> dict:
    """Latency (one query per call), QPS (all queries in one call) and recall of a FAISS index."""
    from vlmlab.index import faiss_search, search_parameters

    sp = search_parameters(kind, params)
    faiss_search(index, queries[:8], 10, sp)  # warm-up
    lat = []
    for q in queries[:singles]:
        t0 = time.perf_counter()
        faiss_search(index, q[None, :], 10, sp)
        lat.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    _, found = faiss_search(index, queries, 10, sp)
    batch_s = time.perf_counter() - t0
    return {**percentiles_ms(lat), "qps": round(len(queries) / batch_s, 1), "recall_at_10": recall(found, truth)}


def run_size(n: int, dim: int, data: str, n_queries: int, seed: int) -> dict:
    """Every method on one data set of ``n`` vectors."""
    import faiss

    from vlmlab.index import IndexConfig, build_faiss_index

    centers = None
    if data == "clustered":
        centers = np.random.default_rng(seed + 99).standard_normal((max(16, n // 1000), dim)).astype(np.float32)
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    t0 = time.perf_counter()
    x = unit_vectors(n, dim, data, seed, centers)
    queries = unit_vectors(n_queries, dim, data, seed + 1, centers)
    print(f"[{n}] {data} vectors made in {time.perf_counter() - t0:.1f} s", flush=True)
    ids = np.arange(n, dtype=np.int64)
    singles = 200 if n <= 200_000 else 100
    out: dict = {"n": n, "dim": dim}

    # numpy brute force: the exact truth and the baseline.
    lat = []
    for q in queries[:singles]:
        t1 = time.perf_counter()
        s = x @ q
        np.argpartition(-s, 10)[:10]
        lat.append(time.perf_counter() - t1)
    t1 = time.perf_counter()
    truth = numpy_search(x, queries, 10)
    batch_s = time.perf_counter() - t1
    out["numpy"] = {**percentiles_ms(lat), "qps": round(n_queries / batch_s, 1), "recall_at_10": 1.0,
                    "build_s": 0.0, "index_bytes": x.nbytes}
    print(f"[{n}] numpy: {out['numpy']}", flush=True)

    # FAISS exact flat.
    t1 = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(x)
    build_s = time.perf_counter() - t1
    out["faiss_flat"] = {**measure_faiss(flat, "flat", {}, queries, truth, singles), "build_s": round(build_s, 2),
                         "index_bytes": index_bytes(flat)}
    print(f"[{n}] faiss flat: {out['faiss_flat']}", flush=True)
    del flat

    # vlmlab's auto index (tuned on held-out stored vectors; measured here on fresh queries).
    t1 = time.perf_counter()
    index, info = build_faiss_index(x, ids, IndexConfig(kind="auto"))
    build_s = time.perf_counter() - t1
    out["auto"] = {**measure_faiss(index, info["kind"], info["params"], queries, truth, singles),
                   "build_s": round(build_s, 2), "index_bytes": index_bytes(index), "kind": info["kind"],
                   "params": info["params"], "tuned_recall_at_10": round(info["recall_at_10"], 4),
                   "within_latency_budget": info.get("within_latency_budget"),
                   "candidates": [{k: c[k] for k in ("kind", "params", "recall_at_10", "p99_ms", "build_s")}
                                  for c in info["candidates"]]}
    print(f"[{n}] auto: {out['auto']}", flush=True)
    del index
    base = out["numpy"]
    for name in ("faiss_flat", "auto"):
        m = out[name]
        m["p99_speedup_vs_numpy"] = round(base["p99_ms"] / m["p99_ms"], 2)
        m["qps_ratio_vs_numpy"] = round(m["qps"] / base["qps"], 2)
    return out


def print_table(runs: list[dict]) -> None:
    """One row per size and method."""
    head = (f"{'n':>9} {'method':<11} {'kind/params':<28} {'build s':>8} {'MB':>7} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'QPS':>8} {'recall@10':>9} {'p99 x':>6}")
    print(head)
    print("-" * len(head))
    for run in runs:
        for name in ("numpy", "faiss_flat", "auto"):
            m = run[name]
            desc = f"{m.get('kind', '')} {m.get('params', '')}".strip()[:28]
            print(f"{run['n']:>9} {name:<11} {desc:<28} {m['build_s']:>8.1f} {m['index_bytes'] / 2**20:>7.0f} "
                  f"{m['p50_ms']:>8.2f} {m['p99_ms']:>8.2f} {m['qps']:>8.0f} {m['recall_at_10']:>9.3f} "
                  f"{m.get('p99_speedup_vs_numpy', 1.0):>6.2f}")


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and return the JSON record it appended."""
    import faiss

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the index tuning's candidate lines
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k vectors only")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="override the sizes (default 100k 1M)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--data", choices=("random", "clustered"), default="random")
    parser.add_argument("--queries", type=int, default=1000, help="fresh queries for QPS and recall")
    parser.add_argument("--threads", type=int, default=2, help="FAISS OpenMP threads (this machine has 2 cores)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    sizes = args.sizes or ([100_000] if args.quick else [100_000, 1_000_000])
    runs = [run_size(n, args.dim, args.data, args.queries, args.seed) for n in sizes]
    print()
    print_table(runs)
    largest = runs[-1]["auto"]
    goal = {"n": runs[-1]["n"], "p99_ms": largest["p99_ms"], "recall_at_10": largest["recall_at_10"],
            "met": bool(largest["p99_ms"] < 20 and largest["recall_at_10"] >= 0.95)}
    print(f"\ngoal (auto at the largest size: p99 < 20 ms, recall@10 >= 0.95): {goal}")
    record = {"bench": "search", "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "data": args.data, "dim": args.dim, "queries": args.queries, "threads": args.threads,
              "machine": platform.processor() or platform.machine(), "faiss": faiss.__version__,
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "runs": runs, "goal": goal}
    with open(RESULTS, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


if __name__ == "__main__":
    main()
