"""Serve latency/throughput of /search: the one-hop ``combined`` layout and the three-deployment ``split``
layout against direct library calls, and dynamic batching on and off.

    python bench/serve.py [--requests 200] [--concurrency 8] [--batch-model open_clip:ViT-B-32]

Two measurements, each side by side in one run on a local Ray (CPU, one replica per deployment):

1. *Path cost* with the tiny model (sample tiles, built in a temp dir): one client, p50/p99 of the
   in-process ``vlmlab.search.search`` call, of Serve ``combined`` and of Serve ``split`` — the Serve
   figures minus the direct one are what the HTTP path costs (goal: combined within +15 ms p50).
2. *Batching* with ``--batch-model`` (ViT-B/32 random weights, one draw frozen into a local directory so
   every process embeds with the same weights) at ``--concurrency`` clients: QPS with ``@serve.batch``
   (max_batch_size 16) over QPS without (max_batch_size 1), in the combined layout (goal: >= 1.2x).

A second process drives each bounded closed loop (every client sends its next text query when the last
answer arrives). Prints the figures and ratios and appends one JSON line to bench/results.jsonl.
"""

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.jsonl"
QUERIES = [
    "speckled granite with pink and grey crystals", "layered sandstone with tan bands",
    "dark vesicular basalt full of holes", "fractured rock face with cracks", "weathered crumbling rock",
    "rock covered in green vegetation", "black basalt with gas bubbles", "banded orange sandstone strata",
]


def summarize(latencies_s: list[float], wall_s: float) -> dict[str, float]:
    """p50/p99 in milliseconds and queries per second of one run."""
    ms = np.asarray(latencies_s) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "qps": round(len(ms) / wall_s, 1), "requests": len(ms)}


def closed_loop(url: str, requests: int, concurrency: int) -> dict[str, float]:
    """Run ``requests`` POST /search calls from ``concurrency`` closed-loop clients; any non-200 aborts."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                started = time.perf_counter()
                r = c.post("/search", json={"text": QUERIES[i % len(QUERIES)], "k": 10})
                elapsed = time.perf_counter() - started
                with lock:
                    (latencies.append(elapsed) if r.status_code == 200 else failures.append(r.text[:200]))

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} failed requests, e.g. {failures[0]}")
    return summarize(latencies, wall)


def load_from_second_process(url: str, requests: int, concurrency: int) -> dict[str, float]:
    """The closed loop in a separate Python process, so the client does not share our interpreter."""
    out = subprocess.run([sys.executable, __file__, "--load", url, "--requests", str(requests),
                          "--concurrency", str(concurrency)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def direct_calls(store: str, requests: int) -> dict[str, float]:
    """The same text queries as in-process library calls (model + index in this process, one at a time)."""
    from vlmlab.index import SearchIndex
    from vlmlab.search import Query, search
    from vlmlab.store import EmbeddingStore

    index = SearchIndex.load(EmbeddingStore.open(store))
    from vlmlab.models import load_model

    encoder = load_model(index.model, device="cpu")
    for q in QUERIES:  # warm-up
        search(index, encoder, Query(text=q, k=10))
    latencies = []
    started = time.perf_counter()
    for i in range(requests):
        t0 = time.perf_counter()
        search(index, encoder, Query(text=QUERIES[i % len(QUERIES)], k=10))
        latencies.append(time.perf_counter() - t0)
    return summarize(latencies, time.perf_counter() - started)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_run(store: str, port: int, layout: str, max_batch_size: int, requests: int,
              concurrency: int) -> dict[str, float]:
    """Deploy the search app (``layout``, ``max_batch_size``) and measure it under closed-loop load."""
    import httpx

    from serving.common import deploy_config

    fixed = {"ray_actor_options": {"num_gpus": 0, "num_cpus": 0.1}, "autoscaling_config": None, "num_replicas": 1}
    deploy_config(app_args={"store": store, "layout": layout, "max_batch_size": max_batch_size,
                            "batch_wait_timeout_s": 0.005},
                  host="127.0.0.1", port=port,
                  deployment_options={name: fixed for name in ("QueryEncoder", "IndexReader", "SearchAPI")})
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=60) as c:  # warm-up
        for q in QUERIES:
            c.post("/search", json={"text": q, "k": 10}).raise_for_status()
    result = load_from_second_process(url, requests, concurrency)
    with httpx.Client(base_url=url, timeout=60) as c:
        result["encoder_batches"] = c.get("/stats").json()
    return result


def sample_store(work: Path, model: str | None = None) -> str:
    """The sample tiles embedded with ``model`` (default: the tiny model, built here) and indexed."""
    import ray

    from pipelines.extract import ExtractConfig, extract
    from vlmlab.index import build_index
    from vlmlab.store import EmbeddingStore
    from vlmlab.testing.samples import build_samples
    from vlmlab.testing.tiny import build_tiny_model

    if not (work / "samples" / "tiles.csv").exists():
        build_samples(work / "samples")
    if model is None:
        build_tiny_model(work / "tiny", work / "samples")
        model = str(work / "tiny")
    out = work / f"store-{Path(model).name}"
    extract(ExtractConfig(images=str(work / "samples" / "tiles"), model=model, out=str(out), dtype="float32"))
    ray.shutdown()
    build_index(EmbeddingStore.open(out))
    return str(out)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (or, with --load URL, only the closed-loop client)."""
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch-model", default="open_clip:ViT-B-32",
                        help="model of the batching measurement (open_clip:NAME draws random weights once)")
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:
        print(json.dumps(closed_loop(args.load, args.requests, args.concurrency)))
        return
    import ray
    from ray import serve

    from vlmlab.runtime import start_ray

    sys.path.insert(0, str(REPO / "bench"))
    from extract import frozen_random_weights

    work = Path(tempfile.mkdtemp(prefix="vlmlab-bench-serve-"))
    tiny_store = sample_store(work)
    batch_store = sample_store(work, frozen_random_weights(args.batch_model, work))
    start_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    try:
        path = {layout: serve_run(tiny_store, port, layout, 16, args.requests, 1) for layout in ("combined", "split")}
        batching = {name: serve_run(batch_store, port, "combined", size, args.requests, args.concurrency)
                    for name, size in (("batched", 16), ("unbatched", 1))}
    finally:
        serve.shutdown()
        ray.shutdown()
    direct = direct_calls(tiny_store, args.requests)
    ratios = {
        "combined_p50_over_direct_ms": round(path["combined"]["p50_ms"] - direct["p50_ms"], 2),
        "split_p50_over_direct_ms": round(path["split"]["p50_ms"] - direct["p50_ms"], 2),
        "p50_split_over_combined": round(path["split"]["p50_ms"] / path["combined"]["p50_ms"], 2),
        "qps_batched_over_unbatched": round(batching["batched"]["qps"] / batching["unbatched"]["qps"], 2),
        "p99_batched_over_unbatched": round(batching["batched"]["p99_ms"] / batching["unbatched"]["p99_ms"], 2),
    }
    record = {"bench": "serve", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "requests": args.requests, "concurrency": args.concurrency, "batch_model": args.batch_model,
              "direct": direct, "path": path, "batching": batching, "ratios": ratios}
    print(f"{'direct':>18}: p50 {direct['p50_ms']:8.2f} ms  p99 {direct['p99_ms']:8.2f} ms")
    for layout, r in path.items():
        print(f"{'serve ' + layout:>18}: p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms  (1 client, tiny model)")
    for name, r in batching.items():
        print(f"{name:>18}: {r['qps']:7.1f} QPS  p50 {r['p50_ms']:8.2f} ms  ({args.concurrency} clients, "
              f"{args.batch_model})")
    print(json.dumps(ratios))
    with open(RESULTS, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
