"""Two-stage inspection (pipelines/inspection.py) and its Serve app (serving/inspection.py).

Models: the one-epoch YOLO of the ``tiny_detector`` fixture (it finds little yet, so inference uses
``conf=0.001`` to get boxes) and a condition classifier fine-tuned briefly from the tiny CLIP with
``vlmlab train inspect``'s library function. The Serve app is the shipped config's ``inspect``
application on a local Ray, over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from pipelines.inspection import (
    BOX_WIDTH,
    REVIEW_COLOUR,
    Detection,
    InspectionPipeline,
    annotate,
    classify_boxes,
    colour_for,
    inspection_objects,
    main,
)
from tests.conftest import free_port, png_bytes
from training.inspect_data import condition_vocabulary, spatial_bin, split_class_name
from vlmlab.calibration import Calibration
from vlmlab.testing.samples import INSPECTION_CLASSES

DETECT = {"conf": 0.001, "imgsz": 128, "max_det": 10}  # the detector was trained at 128 px, one epoch
UPLOAD_LIMIT = 2 * 1024**2
FIXED = {"ray_actor_options": {"num_gpus": 0, "num_cpus": 0.1}, "autoscaling_config": None, "num_replicas": 1}


@pytest.fixture(scope="module")
def scenes(samples_dir) -> list[Path]:
    return sorted((samples_dir / "inspection" / "images" / "test").iterdir())


@pytest.fixture(scope="module")
def classifier_run(ray_local, tiny_model, samples_dir, tmp_path_factory) -> Path:
    """A classifier run directory: one short epoch of `vlmlab train inspect` on the sample crops."""
    from training.inspection import InspectConfig, train_inspect

    cfg = InspectConfig(data=str(samples_dir / "inspection" / "data.yaml"), model=tiny_model,
                        run_dir=str(tmp_path_factory.mktemp("inspect_runs")), name="tiny", workers=1, epochs=1,
                        steps_per_epoch=4, batch_size=16, lr=1e-3, unfrozen_blocks=0, patience=0, seed=0)
    return train_inspect(cfg)["log_dir"]


@pytest.fixture(scope="module")
def pipeline(tiny_detector, classifier_run) -> InspectionPipeline:
    return InspectionPipeline(tiny_detector, classifier_run, device="cpu", **DETECT)


@pytest.fixture(scope="module")
def calibrated_run(classifier_run, tmp_path_factory) -> Path:
    """A copy of the classifier run, calibrated by `vlmlab evaluate inspect --conformal 0.1` (on val)."""
    import shutil

    from training.inspect_eval import InspectEvalConfig, evaluate_inspect

    run = tmp_path_factory.mktemp("calibrated") / "run"
    shutil.copytree(classifier_run / "model", run / "model")
    evaluate_inspect(InspectEvalConfig(run=str(run), split="test", conformal=0.1, device="cpu"))
    return run


# --------------------------------------------------------------------------- library


def test_annotate_draws_each_box_in_its_object_colour():
    image = Image.new("RGB", (320, 240), (255, 255, 255))
    result = {"objects": [
        {"box": [40, 60, 140, 200], "object": "toe drain", "condition": "blocked", "condition_score": 0.91},
        {"box": [180, 10, 300, 90], "object": "slope drain", "condition": "normal", "condition_score": 0.5},
    ]}
    out = np.asarray(annotate(image, result))
    assert np.asarray(image).min() == 255  # the input is left untouched
    for obj in result["objects"]:
        x0, y0, x1, y1 = obj["box"]
        colour = colour_for(obj["object"])
        edges = [out[y0:y1 + 1, x0], out[y0:y1 + 1, x1], out[y1, x0:x1 + 1], out[y0, x0:x1 + 1],
                 out[y0 + BOX_WIDTH - 1, x0:x1 + 1]]  # all four sides, BOX_WIDTH pixels thick
        for edge in edges:
            assert (edge == colour).all(), f"{obj['object']} box edge not drawn in {colour}"
        assert (out[(y0 + y1) // 2, (x0 + x1) // 2] == 255).all()  # the inside stays clear
    # the first label band sits above its box, in the box colour; the second (at the top) inside its box
    assert (out[50:58, 41] == colour_for("toe drain")).all()
    assert (out[14:20, 181] == colour_for("slope drain")).all()
    assert colour_for("toe drain") != colour_for("slope drain")


def test_condition_is_chosen_among_the_detected_object_type():
    classes = ["toe drain normal", "toe drain blocked", "slope drain blocked", "vegetation"]
    probs = np.array([[0.1, 0.3, 0.5, 0.1], [0.1, 0.3, 0.5, 0.1]])
    dets = [Detection((0, 400, 100, 500), "toe drain normal", 0.8), Detection((0, 0, 10, 10), "manhole", 0.3)]
    objects = inspection_objects(dets, probs, classes, (640, 640))
    toe, unknown = objects
    assert (toe["object"], toe["class"], toe["condition"]) == ("toe drain", "toe drain blocked", "blocked")
    assert toe["condition_score"] == pytest.approx(0.75) and toe["spatial"] == "bottom"
    assert toe["probs"] == dict(zip(classes, probs[0]))
    assert unknown["class"] == "slope drain blocked" and unknown["spatial"] == "top"  # unknown type: all classes
    free = inspection_objects(dets[:1], probs[:1], classes, (640, 640), restrict_to_object=False)[0]
    assert free["class"] == "slope drain blocked" and free["condition_score"] == pytest.approx(0.5)


def test_pipeline_inspects_a_scene(pipeline, scenes):
    from vlmlab.images import read_image

    image = read_image(scenes[0])
    result = pipeline.inspect(image)
    assert result["image_size"] == [640, 640]
    assert set(result["timing_ms"]) == {"detect", "classify", "total"}
    assert result["timing_ms"]["total"] >= result["timing_ms"]["detect"] + result["timing_ms"]["classify"] - 1
    objects = result["objects"]
    assert 0 < len(objects) <= DETECT["max_det"]
    classes = pipeline.classes
    assert len(classes) == 9
    scores = [o["detector_score"] for o in objects]
    assert scores == sorted(scores, reverse=True)
    cond = condition_vocabulary(classes)
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 640
        assert obj["class"] in classes and split_class_name(obj["class"], cond) == (obj["object"], obj["condition"])
        assert obj["object"] == split_class_name(obj["detector_class"], cond)[0]
        assert sum(obj["probs"].values()) == pytest.approx(1, abs=1e-3) and 0 < obj["condition_score"] <= 1
        assert obj["spatial"] == spatial_bin((y0 + y1) / 2 / 640)
    # the probabilities are the classifier's on the crops at its training margin, all in one batch
    direct = classify_boxes(pipeline.classifier, image, [o["box"] for o in objects])
    joined = np.array([[o["probs"][c] for c in classes] for o in objects])
    assert np.abs(direct - joined).max() < 2e-3


def test_cli_writes_json_and_annotated_png_and_skips_bad_images(pipeline, tiny_detector, classifier_run, scenes,
                                                                tmp_path):
    folder = tmp_path / "scenes"
    folder.mkdir()
    for scene in scenes[:2]:
        (folder / scene.name).write_bytes(scene.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "out"
    main([str(folder), "--detector", str(tiny_detector), "--classifier", str(classifier_run), "--out", str(out),
          "--conf", "0.001", "--imgsz", "128", "--device", "cpu"])
    summary = json.loads((out / "summary.json").read_text())
    assert [e["path"] for e in summary["errors"]] == [str(folder / "broken.png")]
    assert summary["errors"][0]["error"] == "not an image PIL can read (first bytes: b'not a png at all')"
    assert [Path(i["path"]).name for i in summary["images"]] == [s.name for s in scenes[:2]]
    for scene in scenes[:2]:
        result = json.loads((out / f"{scene.stem}.json").read_text())
        assert result["objects"] and result["image_size"] == [640, 640]
        drawn = np.asarray(Image.open(out / f"{scene.stem}.png").convert("RGB"))
        original = np.asarray(Image.open(scene).convert("RGB"))
        assert drawn.shape == original.shape
        x0, y0, x1, y1 = (int(round(v)) for v in result["objects"][-1]["box"])
        colour = colour_for(result["objects"][-1]["object"])
        # the box of the last (lowest-score, drawn last) object shows along its left edge
        assert (drawn[y0 + 1:y1 - 1, x0 + 1] == colour).all()


# --------------------------------------------------------------------------- Serve


@pytest.fixture(scope="module")
def served(ray_local, tiny_detector, calibrated_run):
    """Base URL of the inspect app deployed from serving/config.yaml with its shipped resources and scaling
    (only the GPU share is dropped, there being none): the shipped config fits this 2-CPU machine."""
    from ray import serve

    from serving.common import deploy_config
    from serving.inspection import APP_NAME

    port = free_port()
    serve.shutdown()  # a Serve left by another module would keep its own HTTP port
    deploy_config(app_args={"detector": str(tiny_detector), "classifier": str(calibrated_run),
                           "max_upload_bytes": UPLOAD_LIMIT, "max_batch_size": 16, **DETECT},
                 apps=(APP_NAME,), host="127.0.0.1", port=port, timeout_s=300)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}/inspect", timeout=120) as client:
        yield client
    serve.shutdown()


def test_inspect_endpoint_answers_a_scene(served, scenes):
    assert served.get("/healthz").status_code == 200
    data = scenes[0].read_bytes()
    # the documented path itself answers (no redirect to /inspect/)
    bare = httpx.post(str(served.base_url).rstrip("/"), files={"image": (scenes[0].name, data, "image/png")},
                      timeout=120, follow_redirects=False)
    assert bare.status_code == 200, (bare.status_code, bare.headers.get("location"))
    r = served.post("/", files={"image": (scenes[0].name, data, "image/png")}, data={"annotated": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image_size"] == [640, 640] and 0 < len(body["objects"]) <= DETECT["max_det"]
    obj = body["objects"][0]
    assert {"box", "object", "detector_class", "detector_score", "condition", "class", "condition_score", "probs",
            "spatial"} <= set(obj)
    conditions = condition_vocabulary(list(obj["probs"]))
    assert split_class_name(obj["class"], conditions) == (obj["object"], obj["condition"])
    annotated = Image.open(io.BytesIO(base64.b64decode(body["annotated_png"])))
    assert annotated.format == "PNG" and annotated.size == (640, 640)
    plain = served.post("/", files={"image": ("scene.png", data, "image/png")}).json()
    assert "annotated_png" not in plain
    # every crop of the image is one batch item: they shared forward passes
    assert served.get("/stats").json()["max_batch"] > 1


def test_inspect_endpoint_rejects_bad_input_with_4xx(served, scenes):
    text = served.post("/", files={"image": ("notes.txt", b"a text file, not an image\n", "text/plain")})
    assert text.status_code == 400 and "decoded" in text.json()["error"]
    empty = served.post("/", files={"image": ("empty.png", b"", "image/png")})
    assert empty.status_code == 400
    truncated = served.post("/", files={"image": ("cut.png", scenes[0].read_bytes()[:500], "image/png")})
    assert truncated.status_code == 400
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1100, 1100, 3), dtype=np.uint8))
    too_big = served.post("/", files={"image": ("big.png", png_bytes(big), "image/png")})
    assert too_big.status_code == 413
    assert served.post("/", data={"annotated": "true"}).status_code == 422  # no image field
    bad_flag = served.post("/", files={"image": ("s.png", scenes[0].read_bytes(), "image/png")},
                           data={"annotated": "perhaps"})
    assert bad_flag.status_code == 422


def test_shipped_config_inspect_app():
    from serving.common import CONFIG_PATH
    from serving.inspection import InspectAppArgs
    from vlmlab.config import build_config, load_yaml

    app = next(a for a in load_yaml(CONFIG_PATH)["applications"] if a["name"] == "inspect")
    assert app["route_prefix"] == "/inspect" and app["import_path"] == "serving.inspection:build_app"
    args = build_config(InspectAppArgs, app["args"])  # every arg is a field
    assert args.max_batch_size > 1 and args.max_upload_bytes > 0
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {"Detector", "ConditionClassifier", "InspectAPI"}
    assert deployments["Detector"]["ray_actor_options"]["num_gpus"] == 0.25
    assert all("max_ongoing_requests" in d and "autoscaling_config" in d for d in deployments.values())


# --------------------------------------------------------------------------- calibrated prediction sets


def _lac_record(classes: list[str], threshold: float) -> Calibration:
    """A record with temperature 1 whose LAC threshold at alpha=0.1 is ``threshold`` (9 scores: the 9th)."""
    return Calibration(classes=classes, temperature=1.0, scores={m: [threshold] * 9 for m in ("lac", "aps", "raps")},
                       method="lac", alpha=0.1, split={"name": "hand-made", "rows": 9})


def test_prediction_set_is_chosen_among_the_detected_object_type():
    classes = ["toe drain normal", "toe drain blocked", "slope drain blocked", "vegetation"]
    probs = np.array([[0.45, 0.45, 0.05, 0.05],   # two toe-drain conditions plausible
                      [0.10, 0.80, 0.05, 0.05],   # one
                      [0.10, 0.10, 0.70, 0.10],   # the classifier sees a slope drain where the detector a toe drain
                      [0.05, 0.05, 0.10, 0.80]])  # vegetation has no condition
    dets = [Detection((0, 400, 100, 500), name, 0.9) for name in
            ("toe drain normal", "toe drain blocked", "toe drain blocked", "vegetation")]
    record = _lac_record(classes, 0.6)  # LAC set: probability >= 0.4
    a, b, c, d = inspection_objects(dets, probs, classes, (640, 640), calibration=record, alpha=0.1)
    assert (a["prediction_set"], a["condition_set"], a["needs_review"]) == (
        ["toe drain normal", "toe drain blocked"], ["normal", "blocked"], True)
    assert (b["prediction_set"], b["needs_review"], b["class"]) == (["toe drain blocked"], False, "toe drain blocked")
    assert (c["prediction_set"], c["needs_review"]) == ([], True)  # none of the toe drain's conditions clears it
    assert (d["prediction_set"], d["condition_set"], d["needs_review"]) == (["vegetation"], ["none"], False)
    anywhere = inspection_objects(dets[2:3], probs[2:3], classes, (640, 640), restrict_to_object=False,
                                  calibration=record, alpha=0.1)[0]
    assert anywhere["prediction_set"] == ["slope drain blocked"] and not anywhere["needs_review"]
    assert "prediction_set" not in inspection_objects(dets, probs, classes, (640, 640), calibration=record)[0]
    with pytest.raises(ValueError, match="calibrated"):
        inspection_objects(dets, probs, classes, (640, 640), alpha=0.1)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        inspection_objects(dets, probs, classes, (640, 640), calibration=record, alpha=1.0)


def test_annotate_marks_objects_that_need_review():
    image = Image.new("RGB", (320, 240), (255, 255, 255))
    result = {"objects": [
        {"box": [40, 60, 140, 200], "object": "toe drain", "condition": "blocked", "condition_score": 0.5,
         "condition_set": ["blocked", "normal"], "needs_review": True},
        {"box": [180, 60, 300, 200], "object": "slope drain", "condition": "normal", "condition_score": 0.9,
         "condition_set": ["normal"], "needs_review": False},
    ]}
    out = np.asarray(annotate(image, result))
    assert (out[61:199, 40] == colour_for("toe drain")).all()  # its own box as before
    assert (out[61:199, 40 - BOX_WIDTH] == REVIEW_COLOUR).all()  # and a review frame just outside it
    assert (out[61:199, 180 - BOX_WIDTH] == 255).all()  # a sure object gets no frame
    assert (out[50:58, 41] == REVIEW_COLOUR).all() and (out[50:58, 181] == colour_for("slope drain")).all()


def test_uncalibrated_classifier_is_refused_prediction_sets(classifier_run, tiny_detector):
    from pipelines.inspection import classifier_calibration
    from vlmlab.calibration import CalibrationError

    assert classifier_calibration(classifier_run) is None
    with pytest.raises(CalibrationError, match="evaluate inspect"):
        InspectionPipeline(tiny_detector, classifier_run, device="cpu", conformal=0.1, **DETECT)


def test_cli_conformal_writes_sets_and_flags_review_in_json_and_png(tiny_detector, calibrated_run, scenes, tmp_path,
                                                                    capsys):
    evaluation = json.loads((calibrated_run / "evaluation.json").read_text())
    assert evaluation["conformal"]["alpha"] == 0.1 and (calibrated_run / "model" / "calibration.json").is_file()
    args = [str(scenes[0]), str(scenes[1]), "--detector", str(tiny_detector), "--classifier", str(calibrated_run),
            "--conf", "0.001", "--imgsz", "128", "--device", "cpu"]
    main(args + ["--out", str(tmp_path / "a"), "--conformal", "0.1"])
    assert "flagged needs_review" in capsys.readouterr().out
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    for scene, entry in zip(scenes[:2], summary["images"]):
        result = json.loads((tmp_path / "a" / f"{scene.stem}.json").read_text())
        assert result["conformal"]["alpha"] == 0.1 and result["conformal"]["coverage_at_least"] == 0.9
        assert result["calibration"]["temperature"] > 0
        assert entry["needs_review"] == sum(o["needs_review"] for o in result["objects"])
        for obj in result["objects"]:
            assert obj["needs_review"] == (len(obj["prediction_set"]) != 1)
            if obj["prediction_set"]:
                assert obj["prediction_set"][0] == obj["class"]  # the top class leads a non-empty set

    # alpha = 0.02 needs 49 calibration rows; with fewer, every class is in every set, which says "review"
    # for every object whose type has several conditions, on the JSON and on the PNG
    main(args + ["--out", str(tmp_path / "b"), "--conformal", "0.02"])
    conditions = condition_vocabulary(INSPECTION_CLASSES)
    for scene in scenes[:2]:
        result = json.loads((tmp_path / "b" / f"{scene.stem}.json").read_text())
        assert "too few" in result["conformal"]["note"]
        for obj in result["objects"]:
            several = sum(split_class_name(c, conditions)[0] == obj["object"] for c in INSPECTION_CLASSES) > 1
            assert obj["needs_review"] == several
        last = result["objects"][-1]  # drawn last: nothing covers its frame
        drawn = np.asarray(Image.open(tmp_path / "b" / f"{scene.stem}.png").convert("RGB"))
        x0, y0, x1, y1 = (int(round(v)) for v in last["box"])
        if last["needs_review"] and x0 >= BOX_WIDTH:
            assert (drawn[y0 + 2:y1 - 2, x0 - 2] == REVIEW_COLOUR).all()
    for bad in ("0", "1", "1.5"):
        with pytest.raises(SystemExit):
            main(args + ["--out", str(tmp_path / "c"), "--conformal", bad])


def test_inspect_endpoint_returns_prediction_set_and_needs_review(served, scenes):
    data = scenes[0].read_bytes()
    r = served.post("/", files={"image": (scenes[0].name, data, "image/png")},
                    data={"conformal": "0.1", "annotated": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["conformal"]["alpha"] == 0.1 and body["conformal"]["coverage_at_least"] == 0.9
    assert body["conformal"]["calibration_rows"] > 0 and "statement" in body["conformal"]
    conditions = condition_vocabulary(list(body["objects"][0]["probs"]))
    for obj in body["objects"]:
        of_type = [c for c in obj["probs"] if split_class_name(c, conditions)[0] == obj["object"]]
        assert set(obj["prediction_set"]) <= set(of_type or obj["probs"])
        assert obj["condition_set"] == [split_class_name(c, conditions)[1] for c in obj["prediction_set"]]
        assert obj["needs_review"] == (len(obj["prediction_set"]) != 1)
    assert Image.open(io.BytesIO(base64.b64decode(body["annotated_png"]))).size == (640, 640)
    plain = served.post("/", files={"image": ("s.png", data, "image/png")}).json()
    assert "prediction_set" not in plain["objects"][0] and plain["calibration"]["temperature"] > 0
    for bad in ("0", "1", "-0.5", "1.5"):
        r = served.post("/", files={"image": ("s.png", data, "image/png")}, data={"conformal": bad})
        assert r.status_code == 400 and "(0, 1)" in r.json()["error"], r.text
    assert served.post("/", files={"image": ("s.png", data, "image/png")},
                       data={"conformal": "often"}).status_code == 422


def test_a_non_image_is_skipped_with_our_reason_and_nothing_is_installed(tmp_path, monkeypatch):
    import ultralytics.utils.checks
    import ultralytics.utils.patches  # noqa: F401  (as load_detector does: it replaces PIL.Image.open)

    from pipelines.inspection import inspect_images

    class NeverCalled:  # the detector never sees an input that did not decode
        def inspect(self, image):
            raise AssertionError("a non-image reached the detector")

    asked: list[object] = []
    monkeypatch.setattr(ultralytics.utils.checks, "check_requirements", lambda *a, **k: asked.append(a))
    (tmp_path / "notes.png").write_bytes(b"hello, not a picture")
    summary = inspect_images(NeverCalled(), [tmp_path / "notes.png"], tmp_path / "out")
    assert summary["images"] == [] and asked == []
    assert summary["errors"] == [{"path": str(tmp_path / "notes.png"),
                                  "error": "not an image PIL can read (first bytes: b'hello, not a pic')"}]
