"""training.inspection (+ inspect_eval, tune_inspect): the focal-loss condition classifier end to end.

One short DDP fine-tune of the tiny model on the sample inspection crops is shared by the module.
The tiny model only knows rock textures, so zero-shot CLIP is poor on these crops (blocked at 0 %)
and a few epochs of fine-tuning must beat it on held-out crops.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from training.inspect_data import crop_all, read_instances
from training.inspection import InspectConfig, build_classifier, load_classifier, train_inspect
from vlmlab.testing.samples import INSPECTION_CLASSES


@pytest.fixture(scope="module")
def data_yaml(samples_dir):
    return samples_dir / "inspection" / "data.yaml"


@pytest.fixture(scope="module")
def inspect_config(data_yaml, tiny_model, tmp_path_factory) -> InspectConfig:
    # the lab's lr (2e-5) is for ViT-L over 15 epochs; the 3.5M-param tiny model moves in 8 with 1e-3
    return InspectConfig(data=str(data_yaml), model=tiny_model, run_dir=str(tmp_path_factory.mktemp("runs")),
                         name="ddp", strategy="ddp", workers=2, epochs=8, batch_size=16, lr=1e-3,
                         head_lr_multiplier=10, unfrozen_blocks=2, patience=0, seed=0)


@pytest.fixture(scope="module")
def inspect_run(ray_local, inspect_config):
    return train_inspect(inspect_config)


@pytest.fixture(scope="module")
def evaluation(inspect_run):
    from training.inspect_eval import main

    main(["--run", str(inspect_run["log_dir"]), "--split", "test", "--conformal", "0.1"])
    return json.loads((inspect_run["log_dir"] / "evaluation.json").read_text())


def test_step0_classifier_is_zero_shot_clip(tiny_model, data_yaml, inspect_run):
    from vlmlab.models import load_model
    from vlmlab.prompts import ensemble_text_embeddings

    val = read_instances(data_yaml, "val")
    crops = crop_all(val, 0.15)
    classifier = build_classifier(tiny_model, INSPECTION_CLASSES, "inspection", "blocks", unfrozen_blocks=2)
    probs = classifier.predict_proba(crops)
    encoder = load_model(tiny_model)
    text = ensemble_text_embeddings(encoder, INSPECTION_CLASSES, "inspection")
    zero_shot = torch.softmax(torch.from_numpy(encoder.logit_scale * encoder.encode_images(crops) @ text.T), -1)
    assert np.abs(probs - zero_shot.numpy()).max() < 1e-4
    assert (probs.argmax(1) == zero_shot.numpy().argmax(1)).all()
    # the training loop's step-0 validation figure is this zero-shot accuracy
    accuracy = float(np.mean(probs.argmax(1) == [i.class_id for i in val]))
    assert inspect_run["metrics"]["zero_shot_val_accuracy"] == pytest.approx(accuracy)


@pytest.mark.slow
def test_short_finetune_beats_zero_shot_on_held_out_crops(evaluation):
    tuned, zero = evaluation["fine_tuned"], evaluation["zero_shot"]
    for metric in ("macro_f1", "accuracy", "rare_accuracy", "blocked_accuracy"):
        print(f"test {metric}: zero-shot {zero[metric]:.3f} fine-tuned {tuned[metric]:.3f}")
    assert zero["macro_f1"] < 0.25 and zero["blocked_accuracy"] == 0.0
    assert tuned["macro_f1"] > zero["macro_f1"] + 0.3
    assert tuned["accuracy"] > zero["accuracy"] + 0.2
    # every rare class present in the test split is recalled at least once, blocked included
    rare_in_test = [c for c in evaluation["rare_classes"] if c in tuned["per_class"]]
    assert len(rare_in_test) >= 4
    assert all(tuned["per_class"][c]["accuracy"] > 0 for c in rare_in_test), tuned["per_class"]
    assert tuned["blocked_accuracy"] > 0.5


@pytest.mark.slow
def test_evaluation_writes_json_and_confusion_png_with_every_figure(evaluation, inspect_run):
    models = ("zero_shot", "fine_tuned", "spatial_zero_shot", "context_zero_shot")
    for name in models:
        report = evaluation[name]
        assert {"accuracy", "macro_f1", "weighted_f1", "per_class", "per_condition", "per_object_type",
                "per_spatial_bin", "rare_accuracy", "blocked_accuracy"} <= set(report)
        assert set(report["per_condition"]) == {"normal", "blocked", "damaged"}
        assert set(report["per_object_type"]) == {"toe drain", "rock toe", "slope drain", "vegetation"}
        assert 0 <= report["weighted_f1"] <= 1 and report["n"] == evaluation["fine_tuned"]["n"]
    assert set(evaluation["side_by_side"]["macro_f1"]) == set(models)
    matrix = np.array(evaluation["confusion_matrix"]["fine_tuned"])
    assert matrix.shape == (9, 9) and matrix.sum() == evaluation["fine_tuned"]["n"]
    assert np.trace(matrix) / matrix.sum() == pytest.approx(evaluation["fine_tuned"]["accuracy"])
    png = inspect_run["log_dir"] / "confusion_matrix.png"
    with Image.open(png) as image:
        assert image.width > 1000 and image.height > 400  # two matrices side by side


@pytest.mark.slow
def test_evaluation_calibrates_on_val_and_reports_prediction_sets(evaluation, inspect_run):
    from vlmlab.calibration import Calibration

    calibration, conformal = evaluation["calibration"], evaluation["conformal"]
    assert calibration["split"] == "val" and conformal["alpha"] == 0.1 and conformal["method"] == "aps"
    for name in ("zero_shot", "fine_tuned"):
        row = calibration[name]
        assert row["n"] == evaluation["fine_tuned"]["n"] and row["temperature"] > 0
        assert 0 <= row["ece_after"] <= 1 and 0 <= row["ece_before"] <= 1
        sets = conformal[name]
        assert set(sets["per_class"]) == set(evaluation[name]["per_class"])  # coverage and size per class
        assert sets["within_object_type"]["mean_set_size"] <= sets["mean_set_size"]
    tuned, zero = conformal["fine_tuned"], conformal["zero_shot"]
    print(f"\nsets at alpha=0.1: zero-shot size {zero['mean_set_size']:.2f} (coverage {zero['coverage']:.2f}), "
          f"fine-tuned {tuned['mean_set_size']:.2f} ({tuned['coverage']:.2f}); ECE fine-tuned "
          f"{calibration['fine_tuned']['ece_before']:.3f} -> {calibration['fine_tuned']['ece_after']:.3f}")
    assert tuned["mean_set_size"] < zero["mean_set_size"] - 1  # the better classifier needs smaller sets
    with Image.open(calibration["reliability_png"]) as image:
        assert image.width > 1500  # before | after for both models
    record = Calibration.load(inspect_run["model_dir"], inspect_run["model_dir"] / "classifier.pt")
    assert record is not None and record.split["rows"] == calibration["rows"] and record.method == "aps"


@pytest.mark.slow
def test_run_keeps_the_best_model_logs_and_checkpoints(inspect_run, inspect_config):
    from training.run import read_training_log

    metrics = inspect_run["metrics"]
    rows = read_training_log(inspect_config.run_dir, inspect_config.name)
    assert rows[-1]["step"] == metrics["step"] == 8 * 7  # 213 train crops / (16 x 2 workers) = 7 steps an epoch
    assert np.mean([r["total_loss"] for r in rows[-7:]]) < np.mean([r["total_loss"] for r in rows[:7]])
    assert list((inspect_run["log_dir"] / "tensorboard").glob("events.out.tfevents.*"))
    assert len(list(inspect_run["log_dir"].glob("checkpoint_2*"))) == 2
    meta = json.loads((inspect_run["model_dir"] / "classifier.json").read_text())
    assert meta["epoch"] == metrics["best_epoch"] and meta["val"]["accuracy"] == metrics["best_val_accuracy"]
    assert meta["base_spec"] and meta["classes"] == INSPECTION_CLASSES and meta["crop_margin"] == 0.15
    assert metrics["best_val_accuracy"] > metrics["zero_shot_val_accuracy"]


@pytest.mark.slow
def test_load_classifier_gives_the_contract_and_the_best_epochs_accuracy(inspect_run, data_yaml):
    val = read_instances(data_yaml, "val")
    for path in (inspect_run["log_dir"], inspect_run["model_dir"]):
        classifier = load_classifier(path)
        assert classifier.classes == INSPECTION_CLASSES
    probs = classifier.predict_proba(crop_all(val, classifier.crop_margin))
    assert probs.shape == (len(val), 9) and np.allclose(probs.sum(1), 1, atol=1e-5)
    accuracy = float(np.mean(probs.argmax(1) == [i.class_id for i in val]))
    assert accuracy == pytest.approx(inspect_run["metrics"]["best_val_accuracy"])
    assert classifier.predict_proba([]).shape == (0, 9)


@pytest.mark.slow
def test_one_trial_tune_inspect_runs_and_exports_its_model(ray_local, data_yaml, tiny_model, tmp_path):
    from training.tune_inspect import InspectSearchConfig, tune_inspect

    cfg = InspectSearchConfig(run_dir=str(tmp_path), name="search", num_samples=1, grace_period=1,
                              focal_gammas=(2.0,), lr_min=1e-3, lr_max=2e-3, unfrozen_blocks=(1,),
                              trial=InspectConfig(data=str(data_yaml), model=tiny_model, workers=1, epochs=1,
                                                  patience=0, steps_per_epoch=2, batch_size=16))
    out = tune_inspect(cfg)
    assert len(out["table"]) == 1 and out["table"]["training_iteration"].iloc[0] == 1
    assert 0 <= out["table"]["val_accuracy"].iloc[0] <= 1
    assert out["best_config"]["unfrozen_blocks"] == 1 and 1e-3 <= out["best_config"]["lr"] <= 2e-3
    assert load_classifier(out["best_model"]).classes == INSPECTION_CLASSES


def test_bad_inputs_fail_early(inspect_config, tmp_path):
    from dataclasses import replace

    with pytest.raises(FileNotFoundError, match="data.yaml"):
        train_inspect(replace(inspect_config, data=str(tmp_path / "data.yaml")))
    with pytest.raises(ValueError, match="tuning"):
        train_inspect(replace(inspect_config, tuning="full"))
    with pytest.raises(FileNotFoundError, match="train inspect"):
        load_classifier(tmp_path)


def test_recipe_config_files_fill_the_job_dataclasses():
    from pathlib import Path

    from training.tune_inspect import InspectSearchConfig
    from vlmlab.config import build_config, load_yaml

    configs = Path(__file__).resolve().parents[1] / "training" / "configs"
    recipe = build_config(InspectConfig, load_yaml(configs / "inspect.yaml"))
    assert (recipe.focal_alpha, recipe.focal_gamma, recipe.lr, recipe.batch_size, recipe.epochs) == (0.25, 2.0, 2e-5,
                                                                                                     16, 15)
    assert (recipe.rare_oversample, recipe.blocked_oversample, recipe.weight_decay) == (2.5, 3.0, 0.01)
    search = build_config(InspectSearchConfig, load_yaml(configs / "inspect_search.yaml"))
    assert search.name == "inspect_search" and len(search.unfrozen_blocks) > 1
