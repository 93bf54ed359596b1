"""``vlmlab demo``: the whole product end to end on sample data, on an embedded local Ray.

The demo *is* the README's walkthrough: it runs the :data:`WALKTHROUGH` commands exactly as a user
types them, one after the other, in the output directory (each through the same ``vlmlab`` entry point,
in this process), then starts the Serve apps on 127.0.0.1, sends a search and an inspect request and
stops them, and writes ``index.html``: one page with every figure and picture the run made and the
numbers that matter. A command that fails, or prints a path it did not write, stops the demo.

Re-running it (or any walkthrough command) in the same directory redoes nothing that is done: stores
resume, finished runs are reported, the tiny model is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

# The walkthrough, in order: every line is a command as written in README.md ("Walkthrough"), run in
# the demo's output directory. Comments are the README's.
WALKTHROUGH: tuple[tuple[str, str], ...] = (
    ("sample data: rock tiles, synthetic renderings, inspection scenes, photos", "vlmlab samples --out samples"),
    ("real photographs with and without defects (skimage)", "vlmlab samples textures --out textures"),
    ("the tiny CLIP, trained on the sample tiles", "vlmlab tiny --out tiny-clip --samples samples"),
    ("embed the tiles and the synthetic renderings (Ray Data)",
     "vlmlab extract samples/tiles --model tiny-clip --out stores/tiles"),
    ("", "vlmlab extract samples/synthetic --model tiny-clip --out stores/synthetic --source synthetic"),
    ("FAISS index, text search with a negative term, image similarity",
     "vlmlab index stores/tiles"),
    ("", 'vlmlab search stores/tiles --text "dark vesicular basalt" --negative vegetation --templates rocks '
         "-k 12 --montage search_montage.png"),
    ("", "vlmlab similar stores/tiles --image samples/photos/gravel.png -k 12 --montage similar_montage.png"),
    ("zero-shot classification with prompt ensembles, scored against the tiles' labels",
     "vlmlab classify stores/tiles --classes granite sandstone basalt fractured weathered vegetation "
     "--templates rocks --hierarchy igneous:granite,basalt sedimentary:sandstone --labels samples/tiles.csv "
     "--out classify/predictions.parquet"),
    ("clusters and 2-D maps; real vs synthetic", "vlmlab cluster stores/tiles -k 6 --out clusters"),
    ("", "vlmlab compare stores/tiles stores/synthetic --out compare"),
    ("a training corpus: augmentations, captions, composed scenes, filtered by CLIP score and quality",
     "vlmlab corpus build samples/tiles --captions samples/tiles.csv --out corpus --augmentations 1 "
     "--synthetic compose --inspection samples/inspection --n 8"),
    ("", "vlmlab corpus filter corpus --model tiny-clip"),
    ("adapt the tiny CLIP to real photos with LoRA (Ray Train), then compare recall base vs adapted",
     "vlmlab train lora --pairs textures/pairs.parquet --model tiny-clip --run-dir runs --name lora "
     "--workers 1 epochs=4 steps_per_epoch=12 batch_size=32 lr=3e-3 fine_grained_weight=0 synthetic_ratio=0"),
    ("", "vlmlab evaluate retrieval --model tiny-clip --adapter runs/lora/adapter --pairs textures/pairs.parquet"),
    ("few labelled photos: a calibrated probe, its few-shot curve and prediction sets",
     "vlmlab extract textures/images --model tiny-clip --out stores/textures"),
    ("", "vlmlab train probe --store stores/textures --labels textures/labels.csv --out probes/textures --shots 8"),
    ("", "vlmlab evaluate probe --store stores/textures --labels textures/labels.csv --out probes/curve"),
    ("", "vlmlab classify stores/textures --probe probes/textures --conformal 0.1 --labels textures/labels.csv "
         "--out probes/predictions.parquet"),
    ("inspection: a YOLO detector, the CLIP condition classifier, and both stages on test scenes",
     "vlmlab train detector --data samples/inspection/data.yaml --epochs 2 --imgsz 160 --out runs/detector"),
    ("", "vlmlab train inspect --data samples/inspection/data.yaml --model tiny-clip --run-dir runs --name inspect "
         "epochs=8"),
    ("", "vlmlab evaluate inspect --run runs/inspect --split test --conformal 0.1"),
    ("", "vlmlab inspect samples/inspection/images/test --detector runs/detector/weights/best.pt "
         "--classifier runs/inspect --out inspected --conf 0.001 --conformal 0.1"),
    ("a colour-concept study over prompt styles (synthetic ratings: not human data)",
     "vlmlab samples ratings --out ratings.csv"),
    ("", "vlmlab study colours run --models tiny-clip --styles all --ratings ratings.csv --out colour-study"),
    ("", "vlmlab study colours analyze --scores colour-study --ratings ratings.csv --out colour-study/analysis"),
)

# An absolute or relative path a command printed: something/with/slashes or a name with a file extension.
_PRINTED_PATH = re.compile(r"(?<![\w:/.-])((?:\.{0,2}/)?[\w.-]+(?:/[\w.-]+)+/?|[\w.-]+\.(?:png|html|json|jsonl|"
                           r"parquet|csv|pt|safetensors|npy|yaml))(?![\w/])")
_NOT_PATHS = ("tensorboard", "http", "ms", "images/s")
_SUGGESTED_COMMAND = re.compile(r"\bvlmlab [^\n]*")


def printed_paths(output: str) -> list[str]:
    """Paths a command printed (``STORE/index``, ``search_montage.png``, ``/tmp/.../adapter``), for
    checking that each one exists; model specs, URLs, ratios and the paths of a suggested next command
    (``next: vlmlab ... --out DIR``: where it *will* write) are left out."""
    found = []
    output = _SUGGESTED_COMMAND.sub("", output)
    for match in _PRINTED_PATH.finditer(output):
        token = match.group(1).rstrip("/.")
        if "://" in output[max(0, match.start() - 8):match.start()] or token.startswith(("open_clip:", "hf:")):
            continue
        if re.fullmatch(r"[\d./]+", token) or any(token.endswith(n) for n in _NOT_PATHS):
            continue
        found.append(token)
    return found


def missing_printed_paths(output: str, cwd: Path) -> list[str]:
    """The printed paths (see :func:`printed_paths`) that do not exist, relative to ``cwd`` or absolute;
    only paths that point into ``cwd`` or an existing parent are judged (a bare ``a/b`` in prose whose
    first part exists nowhere is no claim of a file)."""
    missing = []
    for token in printed_paths(output):
        path = Path(token) if token.startswith("/") else cwd / token
        anchor = next((p for p in path.parents if p.exists()), None)
        claims = token.startswith("/") or (anchor is not None and anchor != cwd.parent and
                                           (cwd / Path(token).parts[0]).exists())
        if claims and not path.exists():
            missing.append(token)
    return missing


def run_command(command: str, cwd: Path) -> str:
    """Run one ``vlmlab ...`` line as written, in ``cwd``, through the CLI entry point; returns what it
    printed (echoed as it goes). Raises ``RuntimeError`` if it fails or prints a path it did not write."""
    from vlmlab.cli import main as vlmlab_main

    argv = shlex.split(command)
    if argv[0] != "vlmlab":
        raise ValueError(f"not a vlmlab command: {command}")
    captured = io.StringIO()
    previous = Path.cwd()

    class Tee(io.TextIOBase):
        def write(self, text: str) -> int:
            captured.write(text)
            return sys.__stdout__.write(text)

        def flush(self) -> None:
            sys.__stdout__.flush()

    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(Tee()):
            vlmlab_main(argv[1:])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"`{command}` exited with {exc.code}") from exc
    finally:
        os.chdir(previous)
    output = captured.getvalue()
    missing = missing_printed_paths(output, cwd)
    if missing:
        raise RuntimeError(f"`{command}` printed paths it did not write: {missing}")
    return output


def serve_step(out: Path) -> dict[str, Any]:
    """Start the search and inspect apps on 127.0.0.1, send one search and one inspect request, stop them."""
    import base64

    import httpx
    from ray import serve

    from serving.common import deploy_config
    from vlmlab.images import list_images

    with contextlib.closing(__import__("socket").socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    small = {"ray_actor_options": {"num_gpus": 0, "num_cpus": 0.25}, "autoscaling_config": None, "num_replicas": 1}
    deploy_config(apps=("search", "inspect"), host="127.0.0.1", port=port, timeout_s=600,
                  args_by_app={"search": {"store": str(out / "stores" / "tiles"), "layout": "combined"},
                               "inspect": {"detector": str(out / "runs" / "detector" / "weights" / "best.pt"),
                                           "classifier": str(out / "runs" / "inspect"), "conf": 0.001}},
                  deployment_options={name: small for name in ("QueryEncoder", "IndexReader", "SearchAPI", "Detector",
                                                               "ConditionClassifier", "InspectAPI")})
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            hits = client.post("/search", json={"text": "layered sandstone with tan bands", "k": 5,
                                                "templates": "rocks"}).raise_for_status().json()["hits"]
            scene = sorted(list_images(out / "samples" / "inspection" / "images" / "test"))[0]
            inspected = client.post("/inspect", files={"image": (scene.name, scene.read_bytes(), "image/jpeg")},
                                    data={"annotated": "true", "conformal": "0.1"}).raise_for_status().json()
        (out / "served_inspect.png").write_bytes(base64.b64decode(inspected.pop("annotated_png")))
    finally:
        serve.shutdown()
    print(f"POST /search 'layered sandstone with tan bands' -> {[h['path'] for h in hits]}")
    print(f"POST /inspect {scene.name} -> {len(inspected['objects'])} objects; annotated: served_inspect.png")
    return {"url": url, "search_hits": [h["path"] for h in hits], "inspect_objects": len(inspected["objects"])}


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _retrieval(output: str) -> dict[str, Any]:
    lines = [line for line in output.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])["recall"] if lines else {}


def write_page(out: Path, numbers: dict[str, Any], outputs: dict[str, str]) -> Path:
    """``index.html``: every figure the run made, by step, with the numbers that matter."""
    import pandas as pd

    from vlmlab.report import Report

    page = Report("vlmlab demo: the whole product on sample data", out)
    page.note(f"Made by `make demo` in {numbers['seconds']:.0f} s. Every section is the output of the README "
              "walkthrough's commands, run as written in this folder.")
    sections = [
        ("Search and similarity", ["search_montage.png", "similar_montage.png"],
         "Text search for 'dark vesicular basalt' minus 'vegetation'; store images most like a gravel photograph."),
        ("Zero-shot classification", ["classify/confusion_matrix.png", "classify/reliability.png"],
         "Six rock classes through prompt ensembles, scored against the tiles' labels."),
        ("Clusters and maps", ["clusters/umap.png", "clusters/tile_map.png", "clusters/montage.png"],
         "k-means over the tile embeddings, its UMAP map, the clusters laid out by tile position."),
        ("Real vs synthetic", ["compare/joint_umap.png", "compare/nn_cosine.png"],
         "Where the synthetic renderings sit next to the real tiles."),
        ("Training corpus", ["corpus/filtered/score_distributions.png"],
         "CLIP-score, sanity and quality scores of the corpus pairs; the kept share per class."),
        ("Probes, calibration and prediction sets", ["probes/curve/few_shot.png", "probes/reliability.png"],
         "A few-shot probe on the texture photos: accuracy, ECE and set size against the number of shots."),
        ("Inspection", ["runs/inspect/confusion_matrix.png", "runs/inspect/reliability.png", "served_inspect.png"],
         "The condition classifier against zero-shot on the test crops; an inspected scene from the Serve app."),
    ]
    for title, files, caption in sections:
        present = [f for f in files if (out / f).is_file()]
        if not present:
            continue
        page.heading(title)
        page.note(caption)
        for f in present:
            page.figure(out / f, f)
    scenes = sorted((out / "inspected").glob("*.png"))[:4]
    if scenes:
        page.heading("Two-stage inspection of test scenes")
        page.note(numbers.get("detector_note", ""))
        for png in scenes:
            page.figure(png, png.name)
    study = out / "colour-study" / "analysis"
    figures = sorted(study.glob("*.png"))[:4]
    if figures:
        page.heading("Colour-concept study")
        page.note("The tiny model knows nothing about colour concepts, so its fit is near zero; the full "
                  "report is colour-study/analysis/report.html.")
        for png in figures:
            page.figure(png, png.name)
    page.heading("Numbers")
    rows = [{"measure": k, "value": json.dumps(v) if not isinstance(v, (int, float, str)) else v}
            for k, v in numbers.items()]
    page.table(pd.DataFrame(rows), digits=3)
    return page.write("index.html")


def run_demo(out: str | Path) -> dict[str, Any]:
    """Run the walkthrough, the Serve step and the page under ``out``; returns the numbers (summary.json)."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    outputs: dict[str, str] = {}
    for i, (note, command) in enumerate(WALKTHROUGH, 1):
        if note:
            print(f"\n=== {note}", flush=True)
        print(f"$ {command}", flush=True)
        step_started = time.time()
        outputs[command] = run_command(command, out)
        print(f"  ({time.time() - step_started:.1f} s, step {i}/{len(WALKTHROUGH)})", flush=True)
    print("\n=== the search and inspect apps on Ray Serve (127.0.0.1)", flush=True)
    served = serve_step(out)
    tiny = _json(out / "tiny-clip" / "tiny_report.json")
    classify = _json(out / "classify" / "metrics.json")
    evaluation = _json(out / "runs" / "inspect" / "evaluation.json")
    recall = _retrieval(next(v for k, v in outputs.items() if k.startswith("vlmlab evaluate retrieval")))
    detector = _json(out / "runs" / "detector" / "results.json")
    numbers: dict[str, Any] = {
        "tiny_heldout_top1": tiny.get("heldout_top1"),
        "zero_shot_accuracy_rocks": classify.get("accuracy"),
        "lora_i2t@1_base": recall.get("base", {}).get("i2t@1"),
        "lora_i2t@1_adapted": recall.get("adapted", {}).get("i2t@1"),
        "lora_t2i@1_base": recall.get("base", {}).get("t2i@1"),
        "lora_t2i@1_adapted": recall.get("adapted", {}).get("t2i@1"),
        "inspect_test_accuracy_zero_shot": evaluation.get("zero_shot", {}).get("accuracy"),
        "inspect_test_accuracy_fine_tuned": evaluation.get("fine_tuned", {}).get("accuracy"),
        "inspect_kept": evaluation.get("kept"),
        "served_search_hits": served["search_hits"],
        "served_inspect_objects": served["inspect_objects"],
        "detector_note": ("The YOLO detector is trained from scratch for 2 epochs on 42 procedural scenes: its "
                          "boxes are placeholders (read with a very low confidence threshold), here to show the "
                          "two stages working together; a lab's detector weights go in the same place."
                          + (f" mAP50 {detector['mAP50']:.3f}." if "mAP50" in detector else "")),
    }
    numbers["seconds"] = round(time.time() - started, 1)
    (out / "summary.json").write_text(json.dumps(numbers, indent=2) + "\n")
    page = write_page(out, numbers, outputs)
    print(f"\ndemo finished in {numbers['seconds']} s; open {page} in a browser")
    return numbers


def main(argv: list[str] | None = None) -> None:
    """``vlmlab demo --out DIR``: run the demo."""
    parser = argparse.ArgumentParser(prog="vlmlab demo", description=main.__doc__)
    parser.add_argument("--out", default="demo_out", help="directory for every demo output")
    args = parser.parse_args(argv)
    run_demo(args.out)


if __name__ == "__main__":
    main()
