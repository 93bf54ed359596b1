"""The FAISS index of an embedding store: build, extend, load and search it.

Layout, under ``STORE/index/`` (``EmbeddingStore.index_dir``)::

    faiss.index    the inner-product index; FAISS ids are the store's int64 row ids
    ids.parquet    id -> content_hash of every indexed row (what ``update_index`` diffs against)
    index.json     kind, parameters, ntotal, measured recall@10, build time, model spec, ...

``index.json`` is written last, so a half-written index is never loaded as a whole one.

Kinds: ``flat`` (exact, ``IndexIDMap2(IndexFlatIP)``), ``ivf`` (``IndexIVFFlat`` with its own ids
and a hash-table direct map, so vectors can be read back and removed), ``hnsw``
(``IndexIDMap2(IndexHNSWFlat)``: no removal, a change of existing rows rebuilds it). ``auto``
follows autofaiss's reasoning: below ``flat_threshold`` vectors exact search is cheap enough, so
keep it exact; above, train candidates (IVF at ``nlist`` about 4*sqrt(n) and half that), tune each
one's search knob (``nprobe``) by doubling then bisecting until recall@10 against exact search on
held-out stored vectors reaches the target, time them, and keep the fastest that meets the latency
budget. Exact flat stays a candidate (recall 1), and an approximate index must be ``min_speedup``
times faster than it to be taken: on data without neighbourhood structure (isotropic random
vectors) IVF needs most lists probed to reach 0.95, and then exact search is the better index.
HNSW is offered by ``--kind hnsw`` but not tried by ``auto``: its build on millions of 512-d
vectors takes far longer on a small machine and it cannot remove vectors.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmlab.fileio import atomic_write, atomic_write_json, atomic_write_table, utc_now
from vlmlab.store import METADATA_COLUMNS, EmbeddingStore, Hit, hit_from_row

log = logging.getLogger(__name__)

INDEX_FILE = "faiss.index"
IDS_FILE = "ids.parquet"
META_FILE = "index.json"
KINDS = ("auto", "flat", "ivf", "hnsw")
RECALL_K = 10  # the k of the recorded held-out recall@k (fewer on a store of ten rows or less)


class IndexMissingError(FileNotFoundError):
    """The store has no (complete) index yet."""


@dataclass(frozen=True)
class IndexConfig:
    """How ``vlmlab index`` builds a store's index."""

    kind: str = field(default="auto", metadata={"help": "auto | flat | ivf | hnsw"})
    recall_target: float = field(default=0.95, metadata={"help": "recall@10 vs exact search an approximate index "
                                                                 "is tuned to reach on held-out queries"})
    latency_budget_ms: float = field(default=20.0, metadata={"help": "p99 single-query latency `auto` aims under"})
    flat_threshold: int = field(default=100_000, metadata={"help": "`auto` keeps exact search below this many "
                                                                   "vectors"})
    min_speedup: float = field(default=2.0, metadata={"help": "`auto` takes an approximate index only if its median "
                                                               "latency is this many times below exact search's"})
    nlist: int = field(default=0, metadata={"help": "IVF lists; 0 = about 4*sqrt(n), a power of two"})
    hnsw_m: int = field(default=32, metadata={"help": "HNSW neighbours per node"})
    ef_construction: int = field(default=80, metadata={"help": "HNSW build-time search depth"})
    tuning_queries: int = field(default=300, metadata={"help": "held-out queries for recall/latency tuning"})
    seed: int = field(default=0, metadata={"help": "seed of the held-out sample and k-means"})

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 0 < self.recall_target <= 1:
            raise ValueError(f"recall_target must be in (0, 1], got {self.recall_target}")


def _faiss() -> Any:
    import faiss

    return faiss


# --------------------------------------------------------------------------- building blocks


def default_nlist(n: int) -> int:
    """IVF list count: about ``4*sqrt(n)`` rounded to a power of two (autofaiss's rule of thumb),
    at least 1 and never more than n/39 (k-means wants >= 39 training points per centroid)."""
    if n < 39:
        return 1
    target = 4 * math.sqrt(n)
    nlist = 2 ** round(math.log2(target))
    return int(max(1, min(nlist, n // 39)))


def new_index(kind: str, dim: int, n_train: int = 0, nlist: int = 0, hnsw_m: int = 32,
              ef_construction: int = 80) -> Any:
    """An empty inner-product FAISS index of ``kind`` (flat|ivf|hnsw) that takes our int64 ids.

    IVF still needs ``train``; ``n_train`` sizes its default ``nlist``.
    """
    faiss = _faiss()
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "ivf":
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist or default_nlist(n_train), faiss.METRIC_INNER_PRODUCT)
        ivf.own_fields = True
        quantizer.this.disown()  # the IVF index frees it
        # A hash-table direct map lets reconstruct(id) and remove_ids work with arbitrary int64 ids.
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        return ivf
    if kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = ef_construction
        return faiss.IndexIDMap2(hnsw)
    raise ValueError(f"unknown index kind {kind!r}")


def search_parameters(kind: str, params: dict[str, Any], selector: Any = None) -> Any:
    """FAISS per-call search parameters (so concurrent searches never mutate shared index state)."""
    faiss = _faiss()
    if kind == "ivf":
        return faiss.SearchParametersIVF(nprobe=int(params.get("nprobe", 1)), sel=selector)
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=int(params.get("ef_search", 64)), sel=selector)
    return faiss.SearchParameters(sel=selector) if selector is not None else None


# Below this many queries FAISS scans without BLAS, one query per OpenMP thread; a parallel region
# for a single query only adds a barrier, which on a busy machine (2 cores shared with other jobs)
# measured 15-40x slower (16 ms vs 0.8 ms for 40k x 64 flat). So small batches run on one thread.
SMALL_BATCH = 20


def faiss_search(index: Any, queries: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` with one OpenMP thread for small batches (see ``SMALL_BATCH``)."""
    if len(queries) >= SMALL_BATCH:
        return index.search(queries, k, params=params)
    faiss = _faiss()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # OpenMP keeps this per calling thread
    try:
        return index.search(queries, k, params=params)
    finally:
        faiss.omp_set_num_threads(threads)


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product ``(scores (Q,k), rows (Q,k))`` of ``queries`` against ``vectors``
    (rows index ``vectors``; -1 / -inf pad when there are fewer than k)."""
    n = len(vectors)
    kk = min(k, n)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    rows = np.full((len(queries), k), -1, np.int64)
    if kk == 0:
        return scores, rows
    for start in range(0, len(queries), 256):  # bounded (256, n) score blocks
        sims = queries[start:start + 256] @ vectors.T
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        part_scores = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        rows[start:start + 256, :kk] = np.take_along_axis(part, order, axis=1)
        scores[start:start + 256, :kk] = np.take_along_axis(part_scores, order, axis=1)
    return scores, rows


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |found[:k] ∩ truth[:k]| / |truth[:k]| (ids; -1 pads truth and never counts).

    A query's true list holds fewer than k ids only when fewer exist, and finding all of them is a
    perfect answer; a query with none is left out (1.0 when none has any).
    """
    scores = []
    for f, t in zip(found, truth, strict=True):
        real = set(t[:k].tolist()) - {-1}
        if real:
            scores.append(len(set(f[:k].tolist()) & real) / len(real))
    return float(np.mean(scores)) if scores else 1.0


@dataclass
class Tuning:
    """What tuning measured for one candidate index."""

    kind: str
    params: dict[str, Any]
    recall_at_10: float
    p50_ms: float
    p99_ms: float
    build_s: float
    gave_up: bool = False


def _latencies_ms(index: Any, kind: str, params: dict[str, Any], queries: np.ndarray, k: int = 10) -> np.ndarray:
    sp = search_parameters(kind, params)
    out = []
    for q in queries:
        t0 = time.perf_counter()
        faiss_search(index, q[None, :], k, sp)
        out.append(1000 * (time.perf_counter() - t0))
    return np.asarray(out)


def _heldout_recall(index: Any, kind: str, params: dict[str, Any], queries: np.ndarray, query_ids: np.ndarray,
                    truth: np.ndarray, k: int = 10) -> float:
    """recall@k with each query's own id dropped from both lists (a held-out query may be a stored row)."""
    _, found = faiss_search(index, queries, k + 1, search_parameters(kind, params))
    found = [[i for i in row if i != qid][:k] for row, qid in zip(found, query_ids, strict=True)]
    return recall_at_k(np.asarray(found, dtype=np.int64), truth, k)


def recall_k(n: int) -> int:
    """The k that held-out recall is measured at on ``n`` stored rows: ``RECALL_K``, or the ``n - 1``
    rows a held-out query has as neighbours besides itself when that is fewer (an exact index then
    finds all of them: recall 1, not 8 of 10 on a 9-row store)."""
    return max(1, min(RECALL_K, n - 1))


def _tune_knob(index: Any, kind: str, base: dict[str, Any], knob: str, lo: int, hi: int, target: float,
               queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray,
               give_up: Any = None) -> tuple[dict[str, Any], float, bool]:
    """Smallest ``knob`` in [lo, hi] whose held-out recall@10 reaches ``target``: double, then bisect
    (recall grows with nprobe / efSearch; the knob's cost grows about linearly).

    ``give_up(params)`` is asked before each larger value is tried (cost only grows from there);
    when it says True the search stops. Returns ``(params, recall, gave_up)``.
    """

    def recall(v: int) -> float:
        return _heldout_recall(index, kind, base | {knob: v}, queries, query_ids, truth, truth.shape[1])

    value, r = lo, recall(lo)
    while r < target and value < hi:
        prev = value
        value = min(hi, value * 2)
        if give_up is not None and give_up(base | {knob: value}):
            return base | {knob: int(prev)}, r, True  # the last value measured, with its recall
        r = recall(value)
        if r >= target:
            a, b = prev, value  # recall(a) < target <= recall(b)
            while b - a > max(1, a // 8):
                mid = (a + b) // 2
                rm = recall(mid)
                if rm >= target:
                    b, r = mid, rm
                else:
                    a = mid
            value = b
            r = recall(value)
    return base | {knob: int(value)}, r, False


def _ground_truth(vectors: np.ndarray, ids: np.ndarray, q_rows: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact top-k ids of the held-out queries, their own row excluded."""
    _, rows = exact_top_k(vectors, vectors[q_rows], k + 1)
    truth = [[ids[r] for r in row if r != qr and r >= 0][:k] for row, qr in zip(rows, q_rows, strict=True)]
    return np.asarray([t + [-1] * (k - len(t)) for t in truth], dtype=np.int64)


def build_faiss_index(vectors: np.ndarray, ids: np.ndarray, config: IndexConfig = IndexConfig()
                      ) -> tuple[Any, dict[str, Any]]:
    """Build the FAISS index of ``vectors`` (N, D) float32, L2-normalised, keyed by int64 ``ids``.

    Returns ``(index, info)`` with info = kind, params, recall_at_10 (held-out, vs exact, at
    :func:`recall_k` of N: 10 but on tiny stores), latency p50/p99 in ms, build_s, and the candidates
    tried when ``config.kind`` is ``auto``.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    n, dim = vectors.shape if vectors.ndim == 2 else (0, 0)
    rng = np.random.default_rng(config.seed)
    n_q = min(config.tuning_queries, n)
    q_rows = np.sort(rng.choice(n, size=n_q, replace=False)) if n_q else np.zeros(0, np.int64)
    queries, query_ids = vectors[q_rows], ids[q_rows]
    k = recall_k(n)
    truth = _ground_truth(vectors, ids, q_rows, k) if n_q else np.zeros((0, k), np.int64)

    def build(kind: str, nlist: int = 0) -> tuple[Any, dict[str, Any], float]:
        t0 = time.perf_counter()
        index = new_index(kind, dim, n_train=n, nlist=nlist, hnsw_m=config.hnsw_m,
                          ef_construction=config.ef_construction)
        params: dict[str, Any] = {}
        if kind == "ivf":
            # Train on rows outside the held-out queries, as a fresh query would be.
            train_rows = np.setdiff1d(np.arange(n), q_rows) if n - n_q >= 39 * index.nlist else np.arange(n)
            max_train = 40 * index.nlist  # FAISS asks >= 39 per centroid; more only slows 1M-row builds
            if len(train_rows) > max_train:
                train_rows = np.sort(rng.choice(train_rows, size=max_train, replace=False))
            index.cp.seed = config.seed
            index.train(vectors[train_rows])
            params = {"nlist": int(index.nlist), "nprobe": 1}
        elif kind == "hnsw":
            params = {"M": config.hnsw_m, "ef_construction": config.ef_construction, "ef_search": 16}
        index.add_with_ids(vectors, ids)
        return index, params, time.perf_counter() - t0

    def measure(index: Any, kind: str, params: dict[str, Any], build_s: float, give_up: Any = None) -> Tuning:
        gave_up = False
        if kind == "ivf":
            params, recall, gave_up = _tune_knob(index, kind, params, "nprobe", 1, params["nlist"],
                                                 config.recall_target, queries, query_ids, truth, give_up)
        elif kind == "hnsw":
            params, recall, gave_up = _tune_knob(index, kind, params, "ef_search", 16, max(16, n),
                                                 config.recall_target, queries, query_ids, truth, give_up)
        else:
            recall = _heldout_recall(index, kind, params, queries, query_ids, truth, k) if n_q else 1.0
        lat = _latencies_ms(index, kind, params, queries[: min(100, n_q)]) if n_q else np.zeros(1)
        tuning = Tuning(kind, params, recall, float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), build_s,
                        gave_up)
        log.info("  %s %s: recall@10 %.3f, p50 %.2f ms, p99 %.2f ms, build %.1f s%s", kind, params, recall,
                 tuning.p50_ms, tuning.p99_ms, build_s,
                 " (abandoned: not clearly faster than exact before reaching the recall target)" if gave_up else "")
        return tuning

    if config.kind != "auto" or n < config.flat_threshold:
        kind = "flat" if config.kind == "auto" else config.kind
        if kind == "ivf" and n < 39:
            raise ValueError(f"an ivf index needs at least 39 vectors to train, the store has {n}; use --kind flat")
        index, params, build_s = build(kind, config.nlist)
        tuning = measure(index, kind, params, build_s)
        return index, {**asdict(tuning), "candidates": [asdict(tuning)]}

    # auto on a large store: exact flat first (recall 1: the bar to beat), then IVF candidates, each
    # tuned to the recall target and abandoned as soon as its median latency is no longer
    # ``min_speedup`` times below flat's (it can only get slower from there). Of those that reach the
    # target, the fastest (p99) within the latency budget wins, else the fastest; flat when none is
    # clearly faster: an approximate index that scans most of the data buys nothing.
    from vlmlab.progress import Progress

    nlists = sorted({config.nlist} if config.nlist else {default_nlist(n) // 2, default_nlist(n)}, reverse=True)
    # a candidate trains, adds n vectors and is tuned: minutes each at 10M rows
    progress = Progress(1 + len(nlists), f"index build ({n} vectors)", "candidates")
    index, params, build_s = build("flat")
    flat = measure(index, "flat", params, build_s)
    progress.update()
    candidates: list[tuple[Any, Tuning]] = [(index, flat)]
    worth_it = flat.p50_ms / config.min_speedup

    def not_worth_it(params: dict[str, Any]) -> bool:
        return float(np.median(_latencies_ms(index_ivf, "ivf", params, queries[:50]))) >= worth_it

    for nlist in nlists:
        index_ivf, params, build_s = build("ivf", nlist)
        candidates.append((index_ivf, measure(index_ivf, "ivf", params, build_s, give_up=not_worth_it)))
        progress.update()
    progress.close()
    good = [c for c in candidates if c[1].recall_at_10 >= config.recall_target and not c[1].gave_up
            and (c[1] is flat or c[1].p50_ms < worth_it)]
    in_budget = [c for c in good if c[1].p99_ms <= config.latency_budget_ms]
    chosen = min(in_budget or good, key=lambda c: c[1].p99_ms)
    for other in candidates:
        if other is not chosen:
            other[0].reset()  # free the losers' memory now
    info = {**asdict(chosen[1]), "within_latency_budget": bool(in_budget),
            "candidates": [asdict(c[1]) for c in candidates]}
    return chosen[0], info


# --------------------------------------------------------------------------- store <-> index files


def _save(store: EmbeddingStore, index: Any, id_hashes: pa.Table, meta: dict[str, Any]) -> None:
    faiss = _faiss()
    d = store.index_dir
    d.mkdir(parents=True, exist_ok=True)
    (d / META_FILE).unlink(missing_ok=True)  # marks the index incomplete until the new metadata lands
    atomic_write(d / INDEX_FILE, lambda p: faiss.write_index(index, str(p)))
    atomic_write_table(id_hashes, d / IDS_FILE)
    atomic_write_json(d / META_FILE, meta)


def build_index(store: EmbeddingStore, kind: str = "auto", config: IndexConfig | None = None) -> SearchIndex:
    """Build ``store``'s index from scratch (every current row) and save it under ``store.index_dir``.

    ``kind`` is auto|flat|ivf|hnsw (``config.kind`` wins when a config is given). The metadata
    records kind, params, ntotal, held-out recall@10 vs exact, latency, build time and model spec.
    """
    config = config or IndexConfig(kind=kind)
    t0 = time.perf_counter()
    ids, vectors, meta_table = store.embeddings()
    if len(ids) == 0:
        raise ValueError(f"store {store.root} has no rows to index; run `vlmlab extract` first")
    index, info = build_faiss_index(vectors, ids, config)
    manifest = store.manifest
    meta = {
        "kind": info["kind"],
        "requested_kind": config.kind,
        "params": info["params"],
        "ntotal": int(index.ntotal),
        "embed_dim": int(vectors.shape[1]),
        "recall_at_10": info["recall_at_10"],
        "recall_k": recall_k(len(ids)),
        "recall_target": config.recall_target,
        "recall_queries": min(config.tuning_queries, len(ids)),
        "latency_ms": {"p50": info["p50_ms"], "p99": info["p99_ms"]},
        "latency_budget_ms": config.latency_budget_ms,
        "within_latency_budget": info.get("within_latency_budget", info["p99_ms"] <= config.latency_budget_ms),
        "candidates": info["candidates"],
        "build_s": round(time.perf_counter() - t0, 3),
        "model": manifest["model"],
        "adapter": manifest.get("adapter"),
        "built_at": utc_now(),
        "updates": [],
        "faiss_version": _faiss().__version__,
    }
    _save(store, index, pa.table({"id": pa.array(ids, pa.int64()),
                                  "content_hash": meta_table["content_hash"]}), meta)
    return SearchIndex(store, index, meta)


@dataclass
class IndexDiff:
    """How the store differs from what its index holds."""

    new: np.ndarray
    removed: np.ndarray
    changed: np.ndarray

    @property
    def empty(self) -> bool:
        """True when the index is up to date."""
        return not (len(self.new) or len(self.removed) or len(self.changed))

    def summary(self) -> dict[str, int]:
        """Counts, JSON-able."""
        return {"new": len(self.new), "removed": len(self.removed), "changed": len(self.changed)}


def index_diff(store: EmbeddingStore, current: pa.Table | None = None) -> IndexDiff:
    """Rows added, removed and re-embedded (content hash changed) since the index was built/updated.

    ``current`` is the store's ``id``/``content_hash`` columns when the caller already holds them."""
    indexed = pq.read_table(store.index_dir / IDS_FILE).to_pandas().set_index("id")["content_hash"]
    current = current if current is not None else store.read(columns=["id", "content_hash"])
    current = current.select(["id", "content_hash"]).to_pandas().set_index("id")["content_hash"]
    both = indexed.index.intersection(current.index)
    changed = both[(indexed.loc[both].to_numpy() != current.loc[both].to_numpy())]
    return IndexDiff(new=current.index.difference(indexed.index).to_numpy(np.int64),
                     removed=indexed.index.difference(current.index).to_numpy(np.int64),
                     changed=np.asarray(changed, np.int64))


def update_index(store: EmbeddingStore, current: SearchIndex | None = None, diff: IndexDiff | None = None
                 ) -> SearchIndex:
    """Bring ``store``'s index up to date without a full rebuild where the index kind allows.

    New rows are added; removed rows and rows whose ``content_hash`` changed are removed
    (flat and ivf support removal) and the changed ones re-added. Only the embeddings of the rows
    to add are read (parts holding none of them are skipped). An hnsw index cannot remove
    vectors, so removals/changes rebuild it (recorded in the metadata's ``updates`` with
    ``rebuilt: true`` and logged). Without an index, builds one. ``current``/``diff``: the loaded
    index and its :meth:`SearchIndex.stale` answer when the caller has them.
    """
    if current is None:
        try:
            current = SearchIndex.load(store)
        except IndexMissingError:
            log.info("no index yet: building it")
            return build_index(store)
    diff = diff if diff is not None else current.stale()
    if diff.empty:
        return current
    meta = dict(current.meta)
    t0 = time.perf_counter()
    drop = np.concatenate([diff.removed, diff.changed])
    if len(drop) and current.kind == "hnsw":
        log.info("hnsw cannot remove vectors: rebuilding for %s", diff.summary())
        config = IndexConfig(kind="hnsw", hnsw_m=meta["params"]["M"],
                             ef_construction=meta["params"]["ef_construction"],
                             recall_target=meta["recall_target"])
        rebuilt = build_index(store, config=config)
        rebuilt.meta["updates"] = meta.get("updates", []) + [{**diff.summary(), "rebuilt": True, "at": utc_now()}]
        atomic_write_json(store.index_dir / META_FILE, rebuilt.meta)
        return rebuilt
    faiss = _faiss()
    index = current.faiss_index
    if len(drop):
        drop = np.ascontiguousarray(drop, dtype=np.int64)  # kept alive while FAISS reads it
        # IDSelectorArray: the only selector an IVF hash-table direct map can remove with.
        removed = index.remove_ids(faiss.IDSelectorArray(drop))
        if removed != len(drop):
            raise RuntimeError(f"index removal removed {removed} of {len(drop)} vectors; rebuild with `vlmlab index "
                               f"{store.root} --rebuild`")
    add = np.concatenate([diff.new, diff.changed])
    if len(add):
        add_ids, vectors, _ = store.embeddings(ids=add)
        index.add_with_ids(np.ascontiguousarray(vectors), add_ids.astype(np.int64))
    meta["ntotal"] = int(index.ntotal)
    meta["updates"] = meta.get("updates", []) + [{**diff.summary(), "rebuilt": False, "at": utc_now(),
                                                  "seconds": round(time.perf_counter() - t0, 3)}]
    meta["updated_at"] = utc_now()
    ids_table = store.read(columns=["id", "content_hash"])
    _save(store, index, ids_table, meta)
    log.info("index updated in place: %s", diff.summary())
    return SearchIndex(store, index, meta)


# --------------------------------------------------------------------------- the loaded index


class SearchIndex:
    """A store's FAISS index with the rows' metadata, ready to search.

    Searching reads only the FAISS index; ``where`` filters read the store's metadata (loaded
    once). Rows the index holds but the store no longer has are never returned.
    """

    # At or below this many allowed rows, a filtered search is exact over the allowed vectors:
    # cheaper than a selector scan of the whole index and guaranteed to return k.
    EXACT_FILTER_ROWS = 20_000

    def __init__(self, store: EmbeddingStore, faiss_index: Any, meta: dict[str, Any]):
        self.store = store
        self.faiss_index = faiss_index
        self.meta = meta
        self.kind = meta["kind"]
        self.params = meta["params"]
        table = store.read(columns=list(METADATA_COLUMNS))
        order = np.argsort(table["id"].to_numpy(), kind="stable")
        self._rows = table.take(pa.array(order))
        self._sorted_ids = self._rows["id"].to_numpy()
        self._source_root = store.source_root
        indexed = pq.read_table(store.index_dir / IDS_FILE, columns=["id"])["id"].to_numpy()
        # Rows in the index that the store still has; a stale index (rows removed since) must not return others.
        self._live = np.intersect1d(indexed, self._sorted_ids)
        self._all_live = len(self._live) == len(indexed)

    # ---------------------------------------------------------------- loading

    @classmethod
    def load(cls, store: EmbeddingStore) -> SearchIndex:
        """Load the index of an open ``store``; :class:`IndexMissingError` when none was built."""
        d = store.index_dir
        if not (d / META_FILE).is_file() or not (d / INDEX_FILE).is_file():
            raise IndexMissingError(f"store {store.root} has no index (no {d / META_FILE}); "
                                    f"build it with `vlmlab index {store.root}`")
        meta = read_meta(d)
        if meta is None:
            raise IndexMissingError(f"the index of {store.root} is unreadable ({d / META_FILE} is not valid JSON); "
                                    f"rebuild it with `vlmlab index {store.root} --rebuild`")
        try:
            return cls(store, _faiss().read_index(str(d / INDEX_FILE)), meta)
        except RuntimeError as exc:  # faiss reports a truncated or foreign file as RuntimeError
            raise IndexMissingError(f"the index of {store.root} is unreadable ({d / INDEX_FILE}: "
                                    f"{str(exc).splitlines()[0]}); rebuild it with `vlmlab index {store.root} "
                                    "--rebuild`") from exc

    # ---------------------------------------------------------------- properties

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    @property
    def model(self) -> str:
        """Model spec the indexed embeddings were made with (queries must use the same)."""
        return self.meta["model"]

    @property
    def embed_dim(self) -> int:
        """Vector size."""
        return int(self.meta["embed_dim"])

    def stale(self) -> IndexDiff:
        """What changed in the store since this index was built or updated (reads the store's ids now)."""
        return index_diff(self.store)

    @property
    def rows(self) -> pa.Table:
        """The store's metadata columns as read when this index was loaded, sorted by id."""
        return self._rows

    # ---------------------------------------------------------------- rows

    def _position(self, image_id: int) -> int:
        pos = int(np.searchsorted(self._sorted_ids, image_id))
        if pos >= len(self._sorted_ids) or self._sorted_ids[pos] != image_id:
            raise KeyError(f"no image with id {image_id} in store {self.store.root}")
        return pos

    def row(self, image_id: int) -> dict[str, Any]:
        """Metadata of store row ``image_id`` (id, path, content_hash, size, tile_z/x/y, source)."""
        return self._rows.slice(self._position(int(image_id)), 1).to_pylist()[0]

    def path_of(self, image_id: int) -> Path:
        """Absolute path of image ``image_id`` (store source root / stored relative path)."""
        return self._source_root / self.row(image_id)["path"]

    def vector(self, image_id: int) -> np.ndarray:
        """The indexed (D,) embedding of ``image_id``; KeyError if it is not in the index and store."""
        image_id = int(image_id)
        self._position(image_id)
        try:
            return self.faiss_index.reconstruct(image_id)
        except RuntimeError as exc:  # faiss: "key not found"
            raise KeyError(f"image id {image_id} is in the store but not in its index; run `vlmlab index "
                           f"{self.store.root}`") from exc

    # ---------------------------------------------------------------- search

    def allowed_ids(self, where: str | None) -> np.ndarray | None:
        """Sorted ids a search may return under ``where`` (None: every indexed row)."""
        if not where:
            return None if self._all_live else self._live
        from vlmlab.filters import parse_where

        ids = self._rows.filter(parse_where(where, self._rows.schema))["id"].to_numpy()
        return np.intersect1d(ids, self._live)

    def search(self, vectors: np.ndarray, k: int, where: str | None = None) -> list[list[Hit]]:
        """Top-``k`` hits per query row of ``vectors`` (Q, D) (or one (D,) vector), best first.

        With ``where`` (a :mod:`vlmlab.filters` expression over the metadata columns) only
        matching rows are returned, and k of them whenever k match: small allowed sets are
        searched exactly; large ones through a FAISS ID selector, falling back to exact search
        over the allowed rows if the approximate index finds fewer than k.
        """
        queries = np.ascontiguousarray(np.atleast_2d(np.asarray(vectors, np.float32)))
        if queries.shape[1] != self.embed_dim:
            raise ValueError(f"query vectors have {queries.shape[1]} dims; the index has {self.embed_dim}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        allowed = self.allowed_ids(where)
        if allowed is None:
            scores, ids = faiss_search(self.faiss_index, queries, k, search_parameters(self.kind, self.params))
        elif len(allowed) == 0:
            return [[] for _ in queries]
        elif len(allowed) <= self.EXACT_FILTER_ROWS or self.kind == "flat":
            scores, ids = self._exact(queries, k, allowed)
        else:
            faiss = _faiss()
            selector = faiss.IDSelectorBatch(allowed.astype(np.int64))
            scores, ids = faiss_search(self.faiss_index, queries, k,
                                       search_parameters(self.kind, self.params, selector))
            short = [q for q in range(len(queries)) if (ids[q] >= 0).sum() < min(k, len(allowed))]
            if short:
                ex_scores, ex_ids = self._exact(queries[short], k, allowed)
                scores[short], ids[short] = ex_scores, ex_ids
        return [self._hits(s, i) for s, i in zip(scores, ids, strict=True)]

    def _exact(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "flat":
            # The flat index scans exactly; the selector only restricts it.
            selector = _faiss().IDSelectorBatch(allowed.astype(np.int64))
            return faiss_search(self.faiss_index, queries, k, search_parameters("flat", {}, selector))
        vectors = np.stack([self.faiss_index.reconstruct(int(i)) for i in allowed])
        scores, rows = exact_top_k(vectors, queries, k)
        ids = np.where(rows >= 0, allowed[np.clip(rows, 0, None)], -1)
        return scores, ids

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
        keep = [(float(s), int(i)) for s, i in zip(scores, ids, strict=True) if i >= 0]
        if not keep:
            return []
        positions = np.searchsorted(self._sorted_ids, [i for _, i in keep])
        rows = self._rows.take(pa.array(np.clip(positions, 0, len(self._sorted_ids) - 1))).to_pylist()
        hits = []
        for (score, image_id), row in zip(keep, rows, strict=True):
            if row["id"] != image_id:  # indexed but gone from the store (stale index): never returned
                continue
            hits.append(hit_from_row(row, score))
        return hits


# --------------------------------------------------------------------------- CLI


def read_meta(index_dir: Path) -> dict[str, Any] | None:
    """``index.json`` of an index directory; None when it is missing or not valid JSON (a garbled file is
    an index to rebuild, not a crash)."""
    try:
        meta = json.loads((index_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and "kind" in meta else None


def ensure_index(store: EmbeddingStore) -> SearchIndex:
    """The store's index, built if missing and updated if the store changed since (logged, so that a
    verb's ``--json`` output on stdout stays clean)."""
    try:
        index = SearchIndex.load(store)
    except IndexMissingError as exc:
        log.info("%s: building it", exc)
        return build_index(store)
    diff = index_diff(store, index.rows)  # the rows it just read: no second read of the store
    if diff.empty:
        return index
    log.info("index is stale (%s): updating it", diff.summary())
    return update_index(store, current=index, diff=diff)


def main(argv: list[str] | None = None) -> None:
    """``vlmlab index STORE [--kind auto|flat|ivf|hnsw] [--rebuild] [...]``: build or update the index."""
    parser = argparse.ArgumentParser(prog="vlmlab index", description=__doc__.split("\n")[0])
    parser.add_argument("store_dir", metavar="STORE", help="embedding store (from `vlmlab extract`)")
    parser.add_argument("--rebuild", action="store_true",
                        help="build from scratch even if an index exists (default: add/remove changed rows)")
    from vlmlab.config import add_config_arguments, config_from_args

    add_config_arguments(parser, IndexConfig)
    parser.add_argument("--config", default=None, help="YAML file of IndexConfig fields")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of IndexConfig")
    args = parser.parse_args(argv)
    config = config_from_args(IndexConfig, args, args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    store = EmbeddingStore.open(args.store_dir)
    meta = read_meta(store.index_dir)
    exists = meta is not None and (store.index_dir / INDEX_FILE).is_file()
    same_kind = exists and config.kind in ("auto", meta["kind"])
    started = time.perf_counter()
    if args.rebuild or not exists or not same_kind:
        print(f"building {config.kind} index of {store.root} ...", flush=True)
        index = build_index(store, config=config)
        for c in index.meta["candidates"]:
            print(f"  {c['kind']} {c['params']}: recall@10 {c['recall_at_10']:.3f}, p50 {c['p50_ms']:.2f} ms, "
                  f"p99 {c['p99_ms']:.2f} ms, build {c['build_s']:.1f} s")
    else:
        current = SearchIndex.load(store)
        updates = len(current.meta.get("updates", []))
        index = update_index(store, current=current)
        if len(index.meta.get("updates", [])) > updates:
            last = index.meta["updates"][-1]
            how = "rebuilt" if last["rebuilt"] else "updated in place"
            print(f"index {how}: {({k: last[k] for k in ('new', 'removed', 'changed')})}")
        else:
            print("index is up to date")
    m = index.meta
    print(f"{m['kind']} index of {len(index)} vectors ({m['embed_dim']} dims) in {store.index_dir}: "
          f"params {m['params']}, recall@10 {m['recall_at_10']:.3f} (held-out, vs exact), "
          f"p99 {m['latency_ms']['p99']:.2f} ms; took {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
