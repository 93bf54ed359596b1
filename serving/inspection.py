"""Inspection on Ray Serve: YOLO detector -> CLIP condition classifier behind ``POST /inspect``.

Three deployments composed with DeploymentHandles (the ``inspect`` application of config.yaml):

- ``Detector`` holds the ultralytics YOLO weights (a fractional GPU in the shipped config) and
  returns the boxes of an image (:func:`pipelines.inspection.detect`).
- ``ConditionClassifier`` holds the fine-tuned CLIP classifier (``training.inspection.load_classifier``),
  crops each box with the classifier's training margin and classifies the crops through
  ``@serve.batch``: every crop is one batch item, so the crops of many concurrent requests share
  one forward pass (``max_batch_size`` crops at most).
- ``InspectAPI`` is the FastAPI ingress: ``POST /`` (``/inspect`` under the config's route prefix)
  takes a multipart ``image`` and optional ``annotated=true`` and ``conformal=ALPHA`` form fields and
  answers the JSON of :meth:`pipelines.inspection.InspectionPipeline.inspect` (plus ``annotated_png``,
  base64; with ``conformal``, each object's ``prediction_set`` and ``needs_review`` and the guarantee,
  from the classifier's ``calibration.json``; 409 when it has none);
  ``GET /healthz``. Bad input is a 4xx with a reason: an empty, non-image or corrupt upload 400, one
  over ``max_upload_bytes`` 413, a missing field 422. Missing/bad weights answer 503 with the reason.

``serve run serving/config.yaml`` (with the ``inspect`` app's args set) or
``python -m serving.inspection --detector W --classifier RUN`` starts it; ``build_app(args)`` is the
app builder both use. Nothing heavy happens at import time. (No ``from __future__ import annotations``
here: FastAPI must see the real types of the ingress methods' parameters.)
"""

import asyncio
import base64
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.common import (
    Unavailable,
    app_parser,
    call,
    decode_upload,
    install_error_handlers,
    install_request_limits,
    options_of,
    public_message,
    run_app,
)
from vlmlab.config import build_config

log = logging.getLogger("ray.serve")

APP_NAME = "inspect"


@dataclass(frozen=True)
class InspectAppArgs:
    """Arguments of the inspect application (the ``args:`` block of its entry in config.yaml)."""

    detector: str = field(default="", metadata={"help": "YOLO weights (RUN/weights/best.pt)"})
    classifier: str = field(default="", metadata={"help": "run or model directory of `vlmlab train inspect`"})
    device: str = field(default="", metadata={"help": "torch device of both models; empty: CUDA if any"})
    conf: float = field(default=0.25, metadata={"help": "detector confidence threshold"})
    iou: float = field(default=0.7, metadata={"help": "detector NMS IoU threshold"})
    imgsz: int = field(default=0, metadata={"help": "detector input size (pixels); 0: the size it was trained at"})
    max_det: int = field(default=100, metadata={"help": "most boxes per image"})
    restrict_to_object: bool = field(default=True, metadata={"help": "condition chosen among the detected object "
                                                                      "type's classes"})
    max_batch_size: int = field(default=32, metadata={"help": "most crops per classifier forward pass; 1: no batching"})
    batch_wait_timeout_s: float = field(default=0.01, metadata={"help": "longest wait for a crop batch to fill"})
    max_upload_bytes: int = field(default=10 * 1024**2, metadata={"help": "largest image upload accepted (bytes)"})
    conformal: float | None = field(default=None, metadata={"help": "default alpha of prediction sets (a request's "
                                                                     "conformal field overrides); none: on request"})


# --------------------------------------------------------------------------- deployments


# No GPU by default, so `serve run serving.inspection:build_app detector=... classifier=...` also runs
# on a CPU-only machine; serving/config.yaml asks for 0.25 GPU (dropped where there is none).
@serve.deployment(ray_actor_options={"num_cpus": 1})
class Detector:
    """The YOLO detector; a model that fails to load is reported by ``health()``, not a crash loop."""

    def __init__(self, weights: str, device: str = "", conf: float = 0.25, iou: float = 0.7, imgsz: int = 0,
                 max_det: int = 100):
        from pipelines.inspection import detector_device, load_detector

        self.model, self.error = None, ""
        self.device = detector_device(device or None)
        self.options = {"conf": conf, "iou": iou, "imgsz": imgsz, "max_det": max_det}
        try:
            if not weights:
                raise Unavailable("no detector weights: set args.detector of the inspect app")
            self.model = load_detector(weights)
            log.info("detector %s loaded on %s", weights, self.device)
        except Exception as exc:
            self.error = f"could not load detector {weights!r}: {type(exc).__name__}: {exc}"
            log.error(self.error)

    def health(self) -> dict[str, Any]:
        """{"ok", "reason"} of this replica's detector."""
        return {"ok": self.model is not None, "reason": self.error, "device": self.device}

    def detect(self, image: Image.Image) -> list[Any]:
        """Boxes (``pipelines.inspection.Detection``) of one RGB image, best first."""
        from pipelines.inspection import detect

        if self.model is None:
            raise Unavailable(self.error)
        return detect(self.model, image, device=self.device, **self.options)


@serve.deployment(ray_actor_options={"num_cpus": 1})
class ConditionClassifier:
    """The CLIP condition classifier; crops of concurrent requests share forward passes (``@serve.batch``)."""

    def __init__(self, classifier: str, device: str = "", max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.01):
        from pipelines.inspection import classifier_calibration
        from training.inspection import load_classifier

        self.model, self.error, self.calibration_record = None, "", None
        try:
            if not classifier:
                raise Unavailable("no classifier: set args.classifier of the inspect app")
            self.model = load_classifier(classifier, device=device or None)
            record = classifier_calibration(classifier)
            self.calibration_record = record.to_dict() if record is not None else None
            log.info("classifier %s loaded: %d classes, %s", classifier, len(self.model.classes),
                     "calibrated" if record is not None else "not calibrated")
        except Exception as exc:
            self.error = f"could not load classifier {classifier!r}: {type(exc).__name__}: {exc}"
            log.error(self.error)
        self._classify_crops.set_max_batch_size(max_batch_size)
        self._classify_crops.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batches = self.batched_crops = self.max_batch = 0  # counters, not a list: replicas run for weeks

    def _loaded(self) -> Any:
        if self.model is None:
            raise Unavailable(self.error)
        return self.model

    def health(self) -> dict[str, Any]:
        """{"ok", "reason", "classes"} of this replica's classifier."""
        if self.model is None:
            return {"ok": False, "reason": self.error}
        return {"ok": True, "reason": "", "classes": list(self.model.classes)}

    def classes(self) -> list[str]:
        """Class names, in the order of the probability columns."""
        return list(self._loaded().classes)

    def calibration(self) -> dict[str, Any] | None:
        """The classifier's calibration record (``vlmlab.calibration.Calibration.to_dict``), or None."""
        self._loaded()
        return self.calibration_record

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _classify_crops(self, crops: list[Image.Image]) -> list[np.ndarray]:
        model = self._loaded()
        self.batches += 1
        self.batched_crops += len(crops)
        self.max_batch = max(self.max_batch, len(crops))
        # The forward pass runs in a thread so the replica keeps collecting the next batch meanwhile.
        probs = await asyncio.to_thread(model.predict_proba, crops)
        return list(probs)

    async def classify(self, image: Image.Image, boxes: list[tuple[float, float, float, float]]) -> np.ndarray:
        """Class probabilities (N, C) of the ``boxes`` of ``image``, cropped with the training margin."""
        from training.inspect_data import crop_instance

        model = self._loaded()
        if not boxes:
            return np.zeros((0, len(model.classes)), np.float32)
        crops = [crop_instance(image, box, model.crop_margin) for box in boxes]
        return np.stack(await asyncio.gather(*(self._classify_crops(c) for c in crops)))

    def stats(self) -> dict[str, Any]:
        """Crop batches seen by this replica (to check that batching happens)."""
        return {"batches": self.batches, "max_batch": self.max_batch,
                "mean_batch": self.batched_crops / self.batches if self.batches else 0.0}


# --------------------------------------------------------------------------- HTTP


app = FastAPI(title="vlmlab inspect",
              description="Two-stage inspection: YOLO boxes, then the CLIP condition classifier on each crop.")


install_error_handlers(app)  # before @serve.ingress(app): Serve takes the app's handlers then
install_request_limits(app)  # slow senders cut off after app.state.body_timeout_s (15 s unless set)


@app.middleware("http")
async def _bare_prefix(request: Request, call_next: Any) -> Any:
    # POST /inspect reaches the app as an empty path under its route prefix; serve it as "/" instead of
    # FastAPI's 307 redirect to /inspect/ (clients that do not follow redirects would never get an answer)
    if request.scope["path"] == request.scope.get("root_path", "") and request.scope.get("root_path"):
        request.scope["path"] += "/"
    return await call_next(request)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class InspectAPI:
    """HTTP front: validates uploads, calls the detector then the classifier, joins their answers."""

    def __init__(self, detector: DeploymentHandle, classifier: DeploymentHandle,
                 max_upload_bytes: int = 10 * 1024**2, restrict_to_object: bool = True,
                 conformal: float | None = None):
        self.detector = detector
        self.classifier = classifier
        self.max_upload_bytes = max_upload_bytes
        self.restrict_to_object = restrict_to_object
        self.conformal = conformal
        self._classes: list[str] | None = None
        self._calibration: Any = None  # vlmlab.calibration.Calibration once fetched (False: the model has none)

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 when both models are loaded; 503 with the reasons otherwise."""
        detector, classifier = await asyncio.gather(self.detector.health.remote(), self.classifier.health.remote())
        ok = detector["ok"] and classifier["ok"]
        for part in (detector, classifier):
            if part.get("reason"):
                part["reason"] = public_message(part["reason"])
        body = {"ok": ok, "detector": detector, "classifier": classifier}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.post("/")
    async def inspect(self, image: UploadFile = File(..., description="the scene to inspect (PNG/JPEG/TIFF)"),
                      annotated: bool = Form(default=False, description="also return the annotated PNG (base64)"),
                      conformal: float | None = Form(default=None, description="alpha in (0, 1): each object's "
                                                     "prediction_set holds its true condition with prob >= 1-alpha"),
                      conformal_method: str | None = Form(default=None, description="lac | aps | raps"),
                      ) -> dict[str, Any]:
        """Objects (box, object, condition, scores, spatial bin; with ``conformal``, ``prediction_set`` and
        ``needs_review``) in an uploaded image, best detection first."""
        from pipelines.inspection import annotate, calibration_fields, inspection_objects
        from vlmlab.calibration import Calibration, check_alpha, check_method

        try:
            alpha = check_alpha(conformal) if conformal is not None else self.conformal
            method = None if conformal_method is None else check_method(conformal_method)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from exc
        if self._calibration is None:
            record = await call(self.classifier.calibration.remote())
            self._calibration = Calibration.from_dict(record) if record else False
        calibration = self._calibration or None
        if alpha is not None and calibration is None:
            raise HTTPException(409, "the classifier is not calibrated, so it has no prediction sets: run "
                                     "`vlmlab evaluate inspect --run RUN` (it writes RUN/model/calibration.json)")
        data = await image.read(self.max_upload_bytes + 1)
        picture = decode_upload(data, self.max_upload_bytes)
        started = time.perf_counter()
        detections = await call(self.detector.detect.remote(picture))
        detected = time.perf_counter()
        probs = await call(self.classifier.classify.remote(picture, [d.box for d in detections]))
        classified = time.perf_counter()
        if self._classes is None:
            self._classes = await call(self.classifier.classes.remote())
        objects = inspection_objects(detections, probs, self._classes, picture.size, self.restrict_to_object,
                                     calibration, alpha, method)
        result: dict[str, Any] = {
            "objects": objects,
            "timing_ms": {"detect": round(1000 * (detected - started), 2),
                          "classify": round(1000 * (classified - detected), 2),
                          "total": round(1000 * (time.perf_counter() - started), 2)},
            "image_size": list(picture.size), **calibration_fields(calibration, alpha, method)}
        if annotated:
            buf = io.BytesIO()
            annotate(picture, result).save(buf, format="PNG")
            result["annotated_png"] = base64.b64encode(buf.getvalue()).decode("ascii")
        return result

    @app.get("/stats", include_in_schema=False)
    async def stats(self) -> dict[str, Any]:
        """Batching figures of one classifier replica."""
        return await self.classifier.stats.remote()


def build_app(args: dict[str, Any], deployments: dict[str, dict[str, Any]] | None = None) -> serve.Application:
    """The inspect application for ``serve run`` / config files; ``args`` fill :class:`InspectAppArgs`,
    ``deployments`` (a config's per-deployment options by name) are applied when given.

    Missing or bad weights still build an app whose ``/healthz`` answers 503 with the reason (so a
    deploy never hangs on them); local paths are made absolute (replicas run in another directory).
    """
    from vlmlab.calibration import check_alpha

    cfg = build_config(InspectAppArgs, args)
    if cfg.conformal is not None:
        check_alpha(cfg.conformal)  # a bad default alpha fails the deploy, not every request
    detector_path = str(Path(cfg.detector).expanduser().resolve()) if cfg.detector else ""
    classifier_path = str(Path(cfg.classifier).expanduser().resolve()) if cfg.classifier else ""
    detector = Detector.options(**options_of(deployments, "Detector")).bind(
        detector_path, cfg.device, cfg.conf, cfg.iou, cfg.imgsz, cfg.max_det)
    classifier = ConditionClassifier.options(**options_of(deployments, "ConditionClassifier")).bind(
        classifier_path, cfg.device, cfg.max_batch_size, cfg.batch_wait_timeout_s)
    return InspectAPI.options(**options_of(deployments, "InspectAPI")).bind(
        detector, classifier, cfg.max_upload_bytes, cfg.restrict_to_object, cfg.conformal)


def main(argv: list[str] | None = None) -> None:
    """``python -m serving.inspection --detector W --classifier RUN [--port 8000] [key=value ...]``."""
    args = app_parser("python -m serving.inspection", __doc__.split("\n")[0], InspectAppArgs).parse_args(argv)
    run_app(args, APP_NAME, InspectAppArgs, "/inspect")


if __name__ == "__main__":
    main()
