"""Inspection latency: the two-stage YOLO -> CLIP pipeline per 640x640 image, direct and through Serve,
and the condition classifier's crops/s with and without batching.

    python bench/inspection.py [--detector W] [--classifier RUN | --model SPEC] [--samples DIR] [--images 40]

Without arguments it makes what it needs in a temporary folder: the sample scenes (``vlmlab
samples``), the tiny CLIP (``vlmlab tiny``) as a zero-shot classifier (``build_classifier``, step 0),
and a one-epoch YOLO11n (``vlmlab train detector``). Detector weights do not change its cost, but an
untrained detector finds nothing at the usual threshold, so boxes are kept down to ``--conf`` (0.001)
and capped at ``--max-det`` (5, the lab's ~5 objects per image): each image sends 5 crops on.

Measured side by side in one run, on this machine's CPU:
- direct: ``InspectionPipeline.inspect`` one image at a time (p50/p99 ms, detect vs classify split);
- serve: the ``inspect`` app of serving/config.yaml on a local Ray (one replica each, CPU), one
  client posting the same images over HTTP on 127.0.0.1, then ``--concurrency`` clients (images/s and
  the classifier's mean crop batch);
- classifier: crops/s on ground-truth crops of the test split, all crops in one forward pass vs one crop
  per pass.
Prints the figures and ratios and appends one JSON line to bench/results.jsonl.

(The file is ``inspection.py``, not ``inspect.py``: ``python bench/inspect.py`` puts bench/ first on
``sys.path``, and every ``import inspect`` of the standard library would load it.)
"""

import argparse
import json
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.jsonl"


def summarize(latencies_s: list[float], wall_s: float) -> dict[str, float]:
    """p50/p99 in milliseconds and images per second of one run."""
    ms = np.asarray(latencies_s) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "images_per_s": round(len(ms) / wall_s, 2), "images": len(ms)}


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_models(args: argparse.Namespace, work: Path) -> tuple[Path, Path, Path]:
    """(samples dir, detector weights, classifier dir): the given ones, or built under ``work``."""
    samples = Path(args.samples) if args.samples else None
    if samples is None:
        from vlmlab.testing.samples import build_samples

        samples = work / "samples"
        build_samples(samples)
    classifier = Path(args.classifier) if args.classifier else None
    if classifier is None:
        from training.inspect_data import read_data_yaml
        from training.inspection import build_classifier

        model = args.model
        if not model:
            from vlmlab.testing.tiny import build_tiny_model

            model = str(work / "tiny")
            build_tiny_model(model, samples)
        names = read_data_yaml(samples / "inspection" / "data.yaml")["names"]
        classifier = build_classifier(model, names, device="cpu").save(work / "classifier")
    detector = Path(args.detector) if args.detector else None
    if detector is None:
        from training.detector import DetectorConfig, train_detector

        detector = train_detector(DetectorConfig(data=str(samples / "inspection" / "data.yaml"), epochs=1, imgsz=128,
                                                 batch=8, workers=0, device="cpu", out=str(work / "detector")))
    return samples, detector, classifier


def direct_run(pipeline: Any, images: list, warmup: int = 3) -> dict[str, Any]:
    """Per-image latency of ``pipeline.inspect`` in this process, one image at a time."""
    for image in images[:warmup]:
        pipeline.inspect(image)
    latencies, detect_ms, classify_ms, objects = [], [], [], []
    started = time.perf_counter()
    for image in images:
        t0 = time.perf_counter()
        result = pipeline.inspect(image)
        latencies.append(time.perf_counter() - t0)
        detect_ms.append(result["timing_ms"]["detect"])
        classify_ms.append(result["timing_ms"]["classify"])
        objects.append(len(result["objects"]))
    out = summarize(latencies, time.perf_counter() - started)
    out.update({"detect_p50_ms": round(float(np.median(detect_ms)), 2),
                "classify_p50_ms": round(float(np.median(classify_ms)), 2),
                "objects_per_image": round(float(np.mean(objects)), 2)})
    return out


def classifier_run(classifier: Any, crops: list, repeats: int = 3) -> dict[str, Any]:
    """Crops/s of the classifier: all crops in one forward pass vs one crop per pass (best of ``repeats``)."""
    classifier.predict_proba(crops[:4])  # warm-up
    batched, single = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        classifier.predict_proba(crops, batch_size=len(crops))
        batched.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for crop in crops:
            classifier.predict_proba([crop])
        single.append(time.perf_counter() - t0)
    return {"crops": len(crops), "batched_crops_per_s": round(len(crops) / min(batched), 1),
            "single_crops_per_s": round(len(crops) / min(single), 1)}


def serve_run(detector: Path, classifier: Path, payloads: list[bytes], conf: float, max_det: int,
              concurrency: int) -> dict[str, Any]:
    """Deploy the inspect app and time POST /inspect: one client, then ``concurrency`` clients."""
    import httpx

    from serving.common import deploy_config

    port = free_port()
    fixed = {"ray_actor_options": {"num_gpus": 0, "num_cpus": 0.1}, "autoscaling_config": None, "num_replicas": 1}
    deploy_config(app_args={"detector": str(detector), "classifier": str(classifier), "conf": conf,
                           "max_det": max_det, "device": "cpu"},
                 apps=("inspect",), host="127.0.0.1", port=port,
                 deployment_options={n: fixed for n in ("Detector", "ConditionClassifier", "InspectAPI")})
    url = f"http://127.0.0.1:{port}/inspect"

    def post(client: httpx.Client, data: bytes) -> None:
        r = client.post("/", files={"image": ("scene.jpg", data, "image/jpeg")})
        if r.status_code != 200:
            raise RuntimeError(f"POST /inspect answered {r.status_code}: {r.text[:200]}")

    with httpx.Client(base_url=url, timeout=120) as client:
        for data in payloads[:3]:
            post(client, data)  # warm-up
        latencies = []
        started = time.perf_counter()
        for data in payloads:
            t0 = time.perf_counter()
            post(client, data)
            latencies.append(time.perf_counter() - t0)
        sequential = summarize(latencies, time.perf_counter() - started)

    counter, lock, concurrent_latencies = iter(range(len(payloads))), threading.Lock(), []

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                post(c, payloads[i])
                with lock:
                    concurrent_latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    concurrent = summarize(concurrent_latencies, time.perf_counter() - started)
    with httpx.Client(base_url=url, timeout=60) as client:
        batches = client.get("/stats").json()  # counted over every request the replica served
    return {"sequential": sequential, "concurrent": {**concurrent, "clients": concurrency},
            "classifier_batches": batches}


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and append its JSON line to bench/results.jsonl."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--detector", help="YOLO weights (default: train one tiny epoch)")
    parser.add_argument("--classifier", help="classifier run/model dir (default: zero-shot on --model)")
    parser.add_argument("--model", help="base CLIP spec of the default classifier (default: build the tiny CLIP)")
    parser.add_argument("--samples", help="a `vlmlab samples` folder (default: write one)")
    parser.add_argument("--images", type=int, default=40, help="timed images per run (scenes repeat if fewer)")
    parser.add_argument("--conf", type=float, default=0.001, help="detector threshold (low: an untrained detector)")
    parser.add_argument("--max-det", type=int, default=5, help="boxes per image (the lab's ~5 objects per image)")
    parser.add_argument("--concurrency", type=int, default=4, help="clients of the concurrent Serve run")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from pipelines.inspection import InspectionPipeline
    from training.inspect_data import crop_all, read_instances
    from vlmlab.images import read_image
    from vlmlab.runtime import start_ray

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        samples, detector, classifier = prepare_models(args, Path(tmp))
        print(f"models ready in {time.perf_counter() - t0:.0f} s: detector {detector}, classifier {classifier}")
        data_yaml = samples / "inspection" / "data.yaml"
        scene_paths = sorted((samples / "inspection" / "images").rglob("*.jpg"))
        scene_paths = (scene_paths * (args.images // max(len(scene_paths), 1) + 1))[: args.images]
        images = [read_image(p) for p in scene_paths]
        assert all(im.size == (640, 640) for im in images), "the bench times 640x640 scenes"

        pipeline = InspectionPipeline(detector, classifier, device="cpu", conf=args.conf, max_det=args.max_det)
        direct = direct_run(pipeline, images)
        crops = crop_all(read_instances(data_yaml, "test"), pipeline.classifier.crop_margin)[:64]
        crops_result = classifier_run(pipeline.classifier, crops)
        del pipeline

        start_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            served = serve_run(detector, classifier, [p.read_bytes() for p in scene_paths], args.conf, args.max_det,
                               args.concurrency)
        finally:
            serve.shutdown()
            ray.shutdown()

    ratios = {
        "serve_p50_over_direct_p50": round(served["sequential"]["p50_ms"] / direct["p50_ms"], 2),
        "serve_p99_over_direct_p99": round(served["sequential"]["p99_ms"] / direct["p99_ms"], 2),
        "serve_concurrent_over_sequential_images_per_s": round(
            served["concurrent"]["images_per_s"] / served["sequential"]["images_per_s"], 2),
        "classifier_batched_over_single_crops_per_s": round(
            crops_result["batched_crops_per_s"] / crops_result["single_crops_per_s"], 2),
    }
    record = {"bench": "inspection", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "device": "cpu", "image_size": [640, 640], "conf": args.conf, "max_det": args.max_det,
              "classifier": str(classifier) if args.classifier else "zero-shot tiny CLIP (3.5M params)",
              "detector": str(detector) if args.detector else "YOLO11n, 1 epoch",
              "direct": direct, "serve": served, "classifier_crops": crops_result, "ratios": ratios,
              "target_2s_per_image_met": served["sequential"]["p99_ms"] < 2000 and direct["p99_ms"] < 2000}
    print(f"    direct: p50 {direct['p50_ms']:8.2f} ms  p99 {direct['p99_ms']:8.2f} ms  "
          f"(detect {direct['detect_p50_ms']:.1f} ms + classify {direct['classify_p50_ms']:.1f} ms, "
          f"{direct['objects_per_image']:.1f} objects/image)")
    for name in ("sequential", "concurrent"):
        r = served[name]
        print(f"serve {name:>10}: p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms  "
              f"{r['images_per_s']:6.2f} images/s")
    print(f"classifier: {crops_result['batched_crops_per_s']} crops/s batched ({crops_result['crops']} per pass), "
          f"{crops_result['single_crops_per_s']} crops/s one at a time")
    print(json.dumps(ratios))
    with open(RESULTS, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
