"""Two-stage inspection: a YOLO detector finds the objects, the CLIP condition classifier judges each one.

``vlmlab inspect IMAGES... --detector W --classifier RUN --out DIR [--conf 0.25]`` (also
``python -m pipelines.inspection``) writes, per image, ``DIR/<name>.json`` (boxes, object, condition
and scores) and ``DIR/<name>.png`` (the image with boxes and "object: condition (score)" labels).
A folder argument stands for the images under it; an image that cannot be read is reported and
skipped (listed in ``DIR/summary.json``), never fatal. A calibrated classifier (``calibration.json``
beside its weights, written by ``vlmlab evaluate inspect``) reports temperature-scaled probabilities;
``--conformal ALPHA`` adds each object's conformal ``prediction_set`` and ``needs_review`` (see
:func:`inspection_objects`), drawn on the PNG as a "REVIEW" band and frame.

:class:`InspectionPipeline` is the library behind it; the Serve ``inspect`` application
(``serving/inspection.py``) runs the same steps split over two deployments, so it reuses
:func:`detect`, :func:`classify_boxes` and :func:`inspection_objects` from here.

Why the classifier sees the detector's object type: the detector's classes are the 9 conditional
classes, but the recipe trusts it for *where* and *what object* and the classifier for the
*condition*; with ``restrict_to_object`` the condition is chosen among the classifier's classes of
the detected object type (the full distribution is still returned as ``probs``).

(The module is ``inspection``, not ``inspect``: an ``inspect.py`` shadows the standard library's
module whenever its folder is on ``sys.path``.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlmlab.calibration import Calibration

# One colour per object type (the annotation legend); other types cycle through the extras.
OBJECT_COLOURS = {"toe drain": (230, 25, 75), "rock toe": (245, 130, 48), "slope drain": (0, 130, 200),
                  "vegetation": (60, 180, 75)}
EXTRA_COLOURS = ((145, 30, 180), (70, 240, 240), (240, 50, 230), (128, 128, 0))
BOX_WIDTH = 3  # pixels; readable on a 640x640 scene
REVIEW_COLOUR = (255, 200, 0)  # label band and outer frame of an object flagged needs_review


@dataclass(frozen=True)
class Detection:
    """One detector box: ``box`` (x0, y0, x1, y1) in pixels of the input image, its class and score."""

    box: tuple[float, float, float, float]
    detector_class: str
    detector_score: float


def load_detector(weights: str | Path) -> Any:
    """An ultralytics ``YOLO`` model from local weights (``RUN/weights/best.pt``); never downloads."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no detector weights at {path}; train them with `vlmlab train detector` "
                                "(RUN/weights/best.pt)")
    # Before ultralytics' first import: a local .pt never needs the network, so skip its online checks.
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    return YOLO(str(path.resolve()))


def detector_device(device: str | None) -> str:
    """Ultralytics device string for a torch-style device (``None``: first GPU if any, else ``cpu``)."""
    if device:
        return "cpu" if device == "cpu" else device.replace("cuda:", "").replace("cuda", "0")
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def trained_imgsz(model: Any) -> int:
    """The input size a YOLO model was trained at (its checkpoint's ``train_args``), 640 when unrecorded."""
    return int(((getattr(model, "ckpt", None) or {}).get("train_args") or {}).get("imgsz") or 640)


def detect(model: Any, image: Image.Image, conf: float = 0.25, iou: float = 0.7, imgsz: int = 0,
           device: str = "cpu", max_det: int = 100) -> list[Detection]:
    """Boxes of ``model`` on one RGB image, best first; ``conf``/``iou`` are the NMS thresholds, ``imgsz``
    the input size (0: the size the detector was trained at: another size finds other objects, or none)."""
    result = model.predict(image.convert("RGB"), conf=conf, iou=iou, imgsz=imgsz or trained_imgsz(model),
                           device=device, max_det=max_det, verbose=False)[0]
    boxes = result.boxes
    xyxy = boxes.xyxy.cpu().numpy().astype(float)
    scores = boxes.conf.cpu().numpy().astype(float)
    classes = boxes.cls.cpu().numpy().astype(int)
    order = np.argsort(-scores, kind="stable")
    return [Detection(tuple(float(v) for v in xyxy[i]), result.names[int(classes[i])], float(scores[i]))
            for i in order]


def classify_boxes(classifier: Any, image: Image.Image, boxes: Sequence[Sequence[float]]) -> np.ndarray:
    """Class probabilities (N, C) of the ``boxes`` of one image, cropped with the classifier's own margin
    (as in training) and classified in one batch."""
    from training.inspect_data import crop_instance

    crops = [crop_instance(image, box, classifier.crop_margin) for box in boxes]
    return classifier.predict_proba(crops)


def inspection_objects(detections: Sequence[Detection], probs: np.ndarray, classes: Sequence[str],
                       image_size: tuple[int, int], restrict_to_object: bool = True,
                       calibration: Calibration | None = None, alpha: float | None = None,
                       method: str | None = None) -> list[dict[str, Any]]:
    """Join detector boxes and classifier probabilities (rows in the same order) into JSON-ready objects.

    Each object: ``box``, ``object`` (the detector's object type), ``detector_class``,
    ``detector_score``, ``condition``, ``class`` (the classifier's full class name),
    ``condition_score``, ``probs`` (class -> probability) and ``spatial`` (top/middle/bottom of the box
    centre). With ``restrict_to_object`` the class is the most probable one of the detected object type
    (when the classifier knows that type), and ``condition_score`` its probability renormalised over them.

    With a ``calibration`` record (:mod:`vlmlab.calibration`) the probabilities are temperature-scaled;
    with ``alpha`` too, each object gets ``prediction_set`` (its conformal set's classes, most probable
    first, among the same classes the top class is chosen from), ``condition_set`` (their conditions)
    and ``needs_review``: the set does not name exactly one condition (several are plausible at level
    alpha, or none of the detected object type's is).
    """
    from training.inspect_data import condition_vocabulary, spatial_bin, split_class_name
    from vlmlab.calibration import logits_of

    conditions = condition_vocabulary(classes)
    parts = [split_class_name(c, conditions) for c in classes]
    height = image_size[1]
    objects = []
    probs = np.asarray(probs, dtype=float).reshape(-1, len(classes))
    if calibration is not None:
        calibration.check_classes(classes)
        probs = calibration.probs(logits_of(probs))
    if alpha is not None and calibration is None:
        raise ValueError("prediction sets need a calibrated classifier (calibration.json beside its weights)")
    members = calibration.sets(probs, alpha, method) if alpha is not None else None
    for i, (det, row) in enumerate(zip(detections, probs)):
        object_type = split_class_name(det.detector_class, conditions)[0]
        allowed = np.array([p[0] == object_type for p in parts]) if restrict_to_object else np.ones(len(parts), bool)
        if not allowed.any():
            allowed[:] = True  # the classifier does not know this object type: judge over all classes
        masked = np.where(allowed, row, 0.0)
        best = int(np.argmax(masked))
        centre_y = (det.box[1] + det.box[3]) / 2 / height
        objects.append({
            "box": [round(v, 2) for v in det.box],
            "object": object_type,
            "detector_class": det.detector_class,
            "detector_score": round(det.detector_score, 4),
            "condition": parts[best][1],
            "class": classes[best],
            "condition_score": round(float(masked[best] / max(masked.sum(), 1e-12)), 4),
            "probs": {c: round(float(p), 4) for c, p in zip(classes, row)},
            "spatial": spatial_bin(centre_y),
        })
        if members is not None:
            in_set = [j for j in np.argsort(-row, kind="stable") if members[i, j] and allowed[j]]
            objects[-1]["prediction_set"] = [classes[j] for j in in_set]
            objects[-1]["condition_set"] = [parts[j][1] for j in in_set]
            objects[-1]["needs_review"] = len(in_set) != 1
    return objects


def colour_for(object_type: str) -> tuple[int, int, int]:
    """The RGB colour boxes of ``object_type`` are drawn in."""
    if object_type in OBJECT_COLOURS:
        return OBJECT_COLOURS[object_type]
    return EXTRA_COLOURS[sum(map(ord, object_type)) % len(EXTRA_COLOURS)]  # stable across runs


def annotate(image: Image.Image, result: dict[str, Any]) -> Image.Image:
    """A copy of ``image`` with each object's box and an "object: condition (score)" label drawn on it.

    Boxes are ``BOX_WIDTH`` pixels wide, inside the box, in :func:`colour_for` the object type; labels
    go above a box (inside it at the image top) on a box-coloured band. An object flagged
    ``needs_review`` gets a ``REVIEW_COLOUR`` band reading "REVIEW object: cond1/cond2" (its condition
    set) and a ``REVIEW_COLOUR`` frame just outside its box. Uses PIL's built-in font.
    """
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    objects = result.get("objects", [])
    for obj in objects:  # labels first, boxes last: a label band never hides another box's edge
        x0, y0, _, _ = obj["box"]
        review = bool(obj.get("needs_review"))
        if review:
            text = f"REVIEW {obj['object']}: {'/'.join(obj.get('condition_set') or []) or 'no condition'}"
        else:
            text = f"{obj['object']}: {obj['condition']} ({obj['condition_score']:.2f})"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        w, h = right - left + 4, bottom - top + 4
        ty = y0 - h if y0 - h >= 0 else y0 + BOX_WIDTH
        draw.rectangle([x0, ty, x0 + w, ty + h], fill=REVIEW_COLOUR if review else colour_for(obj["object"]))
        draw.text((x0 + 2 - left, ty + 2 - top), text, fill=(0, 0, 0) if review else (255, 255, 255), font=font)
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        if obj.get("needs_review"):
            draw.rectangle([x0 - BOX_WIDTH, y0 - BOX_WIDTH, x1 + BOX_WIDTH, y1 + BOX_WIDTH], outline=REVIEW_COLOUR,
                           width=BOX_WIDTH)
        draw.rectangle([x0, y0, x1, y1], outline=colour_for(obj["object"]), width=BOX_WIDTH)
    return out


class InspectionPipeline:
    """Detector -> classifier on one image at a time: ``inspect(image) -> dict`` (see :meth:`inspect`).

    ``detector`` is a YOLO weights file (``vlmlab train detector``); ``classifier`` a run or model
    directory of ``vlmlab train inspect``. ``device`` (``cpu``, ``cuda``, ``cuda:1``) runs both;
    ``conf``/``iou``/``imgsz`` are the detector's thresholds and input size.
    """

    def __init__(self, detector: str | Path, classifier: str | Path, device: str | None = None,
                 conf: float = 0.25, iou: float = 0.7, imgsz: int = 0, max_det: int = 100,
                 restrict_to_object: bool = True, conformal: float | None = None,
                 conformal_method: str | None = None):
        from training.inspection import load_classifier
        from vlmlab.calibration import check_alpha

        self.conformal = None if conformal is None else check_alpha(conformal)
        self.conformal_method = conformal_method
        self.detector = load_detector(detector)
        self.classifier = load_classifier(classifier, device=device)
        self.calibration = classifier_calibration(classifier, required=self.conformal is not None)
        self.device = detector_device(device)
        self.conf, self.iou, self.imgsz, self.max_det = conf, iou, imgsz, max_det
        self.restrict_to_object = restrict_to_object

    @property
    def classes(self) -> list[str]:
        """The classifier's class names (the keys of each object's ``probs``)."""
        return list(self.classifier.classes)

    def inspect(self, image: Image.Image) -> dict[str, Any]:
        """``{"objects": [...], "timing_ms": {"detect", "classify", "total"}, "image_size": [w, h]}``.

        Objects are best detector score first (fields in :func:`inspection_objects`); all crops of the
        image go to the classifier in one batch.
        """
        image = image.convert("RGB")
        started = time.perf_counter()
        detections = detect(self.detector, image, self.conf, self.iou, self.imgsz, self.device, self.max_det)
        detected = time.perf_counter()
        probs = classify_boxes(self.classifier, image, [d.box for d in detections])
        classified = time.perf_counter()
        objects = inspection_objects(detections, probs, self.classes, image.size, self.restrict_to_object,
                                     self.calibration, self.conformal, self.conformal_method)
        return {"objects": objects,
                "timing_ms": {"detect": round(1000 * (detected - started), 2),
                              "classify": round(1000 * (classified - detected), 2),
                              "total": round(1000 * (time.perf_counter() - started), 2)},
                "image_size": list(image.size),
                **calibration_fields(self.calibration, self.conformal, self.conformal_method)}


def classifier_calibration(classifier: str | Path, required: bool = False) -> Calibration | None:
    """The calibration record beside a classifier's weights (written by ``vlmlab evaluate inspect``),
    or None; ``required`` turns its absence into a ``CalibrationError`` saying how to make one."""
    from training.inspection import WEIGHTS_FILE, model_dir_of
    from vlmlab.calibration import CalibrationError

    model_dir = model_dir_of(classifier)
    record = Calibration.load(model_dir, model_dir / WEIGHTS_FILE)
    if record is None and required:
        raise CalibrationError(f"the classifier in {model_dir} is not calibrated (no calibration.json): run "
                               f"`vlmlab evaluate inspect --run {model_dir.parent}` (it calibrates on the val split)")
    return record


def calibration_fields(calibration: Calibration | None, alpha: float | None = None,
                       method: str | None = None) -> dict[str, Any]:
    """The result fields that say how probabilities were calibrated and what the sets guarantee."""
    if calibration is None:
        return {}
    out: dict[str, Any] = {"calibration": {"temperature": calibration.temperature,
                                           "split": calibration.split.get("name"),
                                           "calibrated_at": calibration.created_at}}
    if alpha is not None:
        out["conformal"] = calibration.guarantee(alpha, method)
    return out


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders replaced by the images under them (sorted, recursive)."""
    from vlmlab.images import list_images

    paths: list[Path] = []
    for item in map(Path, inputs):
        paths.extend(list_images(item) if item.is_dir() else [item])
    return paths


def inspect_images(pipeline: InspectionPipeline, inputs: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Run ``pipeline`` over image files/folders, writing ``<name>.json`` + annotated ``<name>.png`` each.

    Unreadable images are skipped and listed. Returns (and writes as ``summary.json``)
    ``{"images": [{"path", "json", "png", "objects"}], "errors": [{"path", "error"}]}``.
    """
    from vlmlab.images import ImageDecodeError, read_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"images": [], "errors": []}
    used: set[str] = set()
    for path in expand_inputs(inputs):
        try:
            image = read_image(path)
        except ImageDecodeError as exc:
            print(f"skipping {path}: {exc}", file=sys.stderr)
            summary["errors"].append({"path": str(path), "error": str(exc)})
            continue
        name, n = path.stem, 1
        while name in used:  # same file name in two folders
            n += 1
            name = f"{path.stem}_{n}"
        used.add(name)
        result = {"path": str(path), **pipeline.inspect(image)}
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        annotate(image, result).save(out / f"{name}.png")
        summary["images"].append({"path": str(path), "json": f"{name}.json", "png": f"{name}.png",
                                  "objects": len(result["objects"]),
                                  "needs_review": sum(bool(o.get("needs_review")) for o in result["objects"])})
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> None:
    """``vlmlab inspect IMAGES... --detector W --classifier RUN --out DIR [--conf 0.25]``."""
    parser = argparse.ArgumentParser(prog="vlmlab inspect", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--detector", required=True, help="YOLO weights (RUN/weights/best.pt of train detector)")
    parser.add_argument("--classifier", required=True, help="run or model directory of `vlmlab train inspect`")
    parser.add_argument("--out", required=True, help="output folder: <name>.json + <name>.png per image")
    parser.add_argument("--conf", type=float, default=0.25, help="detector confidence threshold (default 0.25)")
    parser.add_argument("--iou", type=float, default=0.7, help="detector NMS IoU threshold (default 0.7)")
    parser.add_argument("--imgsz", type=int, default=0,
                        help="detector input size in pixels (default: the size the detector was trained at)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: CUDA if available)")
    parser.add_argument("--any-class", action="store_true",
                        help="let the classifier pick any class, not only those of the detected object type")
    parser.add_argument("--conformal", type=float, default=None, metavar="ALPHA",
                        help="add each object's prediction set (true condition inside with probability >= 1-ALPHA, "
                             "ALPHA in (0, 1)) and flag needs_review; needs a calibrated classifier")
    parser.add_argument("--conformal-method", default=None, choices=["lac", "aps", "raps"],
                        help="conformal score (default: the calibration record's)")
    args = parser.parse_args(argv)
    if args.conformal is not None:
        from vlmlab.calibration import check_alpha

        try:
            check_alpha(args.conformal)
        except ValueError as exc:
            parser.error(str(exc))
    pipeline = InspectionPipeline(args.detector, args.classifier, device=args.device, conf=args.conf, iou=args.iou,
                                  imgsz=args.imgsz, restrict_to_object=not args.any_class, conformal=args.conformal,
                                  conformal_method=args.conformal_method)
    summary = inspect_images(pipeline, args.images, args.out)
    objects = sum(i["objects"] for i in summary["images"])
    review = f", {sum(i['needs_review'] for i in summary['images'])} flagged needs_review" if args.conformal else ""
    print(f"{len(summary['images'])} images inspected ({objects} objects{review}), {len(summary['errors'])} skipped; "
          f"results in {args.out}")


if __name__ == "__main__":
    main()
