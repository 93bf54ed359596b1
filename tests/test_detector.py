"""The YOLO detector wrapper trains one tiny epoch on the sample scenes with the network cut off
(the ``tiny_detector`` fixture in conftest.py trains it and fails on any connection attempt)."""

from __future__ import annotations

import pytest
import yaml

from training.detector import DetectorConfig, _check_model, resolve_data_yaml, train_detector


def test_one_tiny_epoch_offline_writes_loadable_best_weights(samples_dir, tiny_detector):
    from ultralytics import YOLO

    out = tiny_detector.parents[1]
    assert tiny_detector == out / "weights" / "best.pt" and tiny_detector.is_file()
    names = yaml.safe_load((samples_dir / "inspection" / "data.yaml").read_text())["names"]
    model = YOLO(str(tiny_detector))
    assert model.names == names  # the 9 inspection classes, by id
    scene = sorted((samples_dir / "inspection" / "images" / "test").iterdir())[0]
    result = model.predict(str(scene), imgsz=128, conf=0.001, device="cpu", verbose=False)[0]
    assert result.orig_shape == (640, 640) and len(result.boxes) > 0 and result.boxes.xyxy.shape[1] == 4
    # one epoch was logged; the resolved data file points at the dataset's absolute folder
    assert len((out / "results.csv").read_text().strip().splitlines()) == 2
    resolved = yaml.safe_load((out / "data.yaml").read_text())
    assert resolved["path"] == str((samples_dir / "inspection").resolve())


def test_resolved_data_yaml_and_offline_model_check(samples_dir, tmp_path):
    resolved = yaml.safe_load(resolve_data_yaml(samples_dir / "inspection" / "data.yaml", tmp_path).read_text())
    assert resolved["path"] == str((samples_dir / "inspection").resolve()) and resolved["train"] == "images/train"
    assert _check_model("yolo11n.yaml") == "yolo11n.yaml"  # an ultralytics architecture: built from scratch
    with pytest.raises(FileNotFoundError, match="offline"):
        _check_model("yolo11n.pt")  # a weights name ultralytics would download
    with pytest.raises(FileNotFoundError, match="data"):
        resolve_data_yaml(tmp_path / "missing.yaml", tmp_path)
    with pytest.raises(ValueError, match="amp"):
        train_detector(DetectorConfig(data=str(samples_dir / "inspection" / "data.yaml"), amp="fp8"))


def test_detection_defaults_to_the_size_the_detector_was_trained_at(samples_dir, tiny_detector):
    from PIL import Image

    from pipelines.inspection import detect, load_detector, trained_imgsz

    model = load_detector(tiny_detector)
    assert trained_imgsz(model) == 128
    scene = Image.open(sorted((samples_dir / "inspection" / "images" / "test").iterdir())[0])
    by_default = detect(model, scene, conf=0.001, device="cpu", max_det=10)
    assert by_default and by_default == detect(model, scene, conf=0.001, imgsz=128, device="cpu", max_det=10)
