"""vlmlab.probe and vlmlab.probe_curve: few-shot probes on the sample store's stored embeddings.

The tiny model classifies the rock tiles zero-shot, so the hard task is the relabelled one
(``relabelled_labels``: every tile carries the next class's name): zero-shot gets it all wrong, a
handful of labelled embeddings per class must fix it.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from vlmlab.probe import METHODS, fit_probe, labelled_rows, load_probe, sample_shots, split_rows
from vlmlab.testing.samples import ROCK_CLASSES

CLASSES = list(ROCK_CLASSES)


@pytest.fixture(scope="module")
def encoder(tiny_model):
    from vlmlab.models import load_model

    return load_model(tiny_model, device="cpu")


@pytest.fixture(scope="module")
def store(sample_store):
    from vlmlab.store import EmbeddingStore

    return EmbeddingStore.open(sample_store)


@pytest.fixture(scope="module")
def relabelled(store, relabelled_labels):
    return labelled_rows(store, relabelled_labels, CLASSES)


@pytest.fixture(scope="module")
def text(encoder):
    from vlmlab.classify import class_embeddings

    return class_embeddings(encoder, CLASSES, "rocks")


def test_zero_shot_probe_is_zero_shot_clip(store, encoder, text):
    """K = 0 gives zero-shot CLIP's probabilities (to 1e-5) and predictions, for every method, and the
    store-wide predictions table equals `classify`'s."""
    from vlmlab.classify import classify_store, zero_shot_probs
    from vlmlab.probe import predict_store

    _, vectors, _ = store.embeddings()
    zero_shot = zero_shot_probs(vectors, text, encoder.logit_scale)
    for method in METHODS:
        probe = fit_probe(np.zeros((0, text.shape[1])), np.zeros(0, int), text, encoder.logit_scale, CLASSES, method)
        probs = probe.predict_proba(vectors)
        assert np.abs(probs - zero_shot).max() < 1e-5, method
        assert (probs.argmax(1) == zero_shot.argmax(1)).all()
        assert probe.shots == 0 and probe.meta["train_rows"] == 0
    probe.meta["model"] = store.model
    table, _, _ = predict_store(store, probe)
    reference = classify_store(store, encoder, CLASSES, "rocks")
    assert table["label"].to_pylist() == reference["label"].to_pylist()
    for c in CLASSES:
        assert np.abs(table[f"prob_{c}"].to_numpy() - reference[f"prob_{c}"].to_numpy()).max() < 1e-5


def test_shots_are_per_class_seeded_and_nested():
    labels = np.repeat(np.arange(3), [5, 2, 8])
    four = sample_shots(labels, 4, seed=1)
    assert np.bincount(labels[four]).tolist() == [4, 2, 4]  # a class with fewer gives all it has
    assert set(sample_shots(labels, 2, seed=1)) <= set(four)  # nested draws: curves compare like with like
    assert (sample_shots(labels, 4, seed=1) == four).all() and not (sample_shots(labels, 4, seed=2) == four).all()
    assert len(sample_shots(labels, None)) == len(labels)


@pytest.mark.parametrize("method", list(METHODS))
def test_probe_beats_zero_shot_on_classes_the_prompts_misdescribe(relabelled, text, encoder, method):
    parts = split_rows(relabelled, calibration_fraction=0.0, test_fraction=0.5, seed=0)
    train = parts["train"][sample_shots(relabelled.labels[parts["train"]], 4, seed=0)]
    test = parts["test"]
    probe = fit_probe(relabelled.vectors[train], relabelled.labels[train], text, encoder.logit_scale, CLASSES, method)
    zero = fit_probe(np.zeros((0, text.shape[1])), np.zeros(0, int), text, encoder.logit_scale, CLASSES, method)
    accuracy = float((probe.logits(relabelled.vectors[test]).argmax(1) == relabelled.labels[test]).mean())
    zero_accuracy = float((zero.logits(relabelled.vectors[test]).argmax(1) == relabelled.labels[test]).mean())
    print(f"\n{method}, 4 shots/class: accuracy {accuracy:.3f} vs zero-shot {zero_accuracy:.3f} (chance 0.167); "
          f"{probe.meta['params_from']} -> {probe.params}")
    assert zero_accuracy < 0.05
    assert accuracy > 0.9
    assert probe.meta["params_from"] == "cross-validation" and probe.meta["cv"]


def test_train_probe_verb_then_classify_with_prediction_sets(sample_store, relabelled_labels, tmp_path, capsys):
    from vlmlab.classify import main as classify
    from vlmlab.probe import main as train

    out = tmp_path / "probe"
    train(["--store", str(sample_store), "--labels", str(relabelled_labels), "--out", str(out), "--shots", "4",
           "--method", "knn", "--templates", "rocks", "--calibration-fraction", "0.5"])
    assert "knn probe on 24 labelled embeddings" in capsys.readouterr().out
    probe = load_probe(out)
    record = json.loads((out / "calibration.json").read_text())
    assert record["alpha"] == 0.1 and record["method"] == "aps" and record["split"]["rows"] == 128
    assert {"temperature", "scores", "created_at", "weights_sha256"} <= set(record)
    assert len(probe.meta["train_ids"]) == 24 and len(probe.meta["calibration_ids"]) == 128

    preds = tmp_path / "preds.parquet"
    classify([str(sample_store), "--probe", str(out), "--out", str(preds), "--conformal", "0.1",
              "--labels", str(relabelled_labels)])
    text = capsys.readouterr().out
    assert "prediction sets at alpha=0.1" in text and "coverage" in text
    table = pq.read_table(preds).to_pandas()
    assert len(table) == 256 and set(table["label"]) <= set(CLASSES)
    assert all(label in row for label, row in zip(table["label"], table["prediction_set"]) if len(row))
    assert (table["set_size"] == table["prediction_set"].map(len)).all()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["matched"] == 256 - 24 - 128  # scored on rows the probe neither fitted nor calibrated on
    assert metrics["accuracy"] > 0.9
    conformal = metrics["calibration"]["conformal"]
    assert conformal["coverage"] >= 0.9 and conformal["mean_set_size"] < 1.5 and conformal["alpha"] == 0.1
    assert set(conformal["per_class"]) <= set(CLASSES) and len(conformal["per_class"]) >= 5
    assert (tmp_path / "reliability.png").stat().st_size > 10_000


def test_zero_shot_classify_calibrates_on_held_out_labels(sample_store, relabelled_labels, tmp_path, capsys):
    from vlmlab.classify import main as classify

    preds = tmp_path / "zs.parquet"
    classify([str(sample_store), "--classes", *CLASSES, "--templates", "rocks", "--out", str(preds),
              "--conformal", "0.1", "--labels", str(relabelled_labels)])
    assert "zero-shot calibrated on" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    calibration = metrics["calibration"]
    # zero-shot is confidently wrong here: its sets must grow to cover, and its temperature to flatten it
    assert metrics["accuracy"] < 0.05 and calibration["ece_after"] < calibration["ece_before"] - 0.5
    assert calibration["conformal"]["coverage"] >= 0.85 and calibration["conformal"]["mean_set_size"] > 3
    assert load_probe(tmp_path / "zero_shot_probe").shots == 0


@pytest.mark.parametrize("argv,message", [
    (["--conformal", "0"], "(0, 1)"), (["--conformal", "1"], "(0, 1)"), (["--conformal", "-0.2"], "(0, 1)"),
    (["--conformal", "0.1"], "--labels"),  # zero-shot sets need labelled images to calibrate on
])
def test_classify_refuses_bad_conformal_use(sample_store, tmp_path, capsys, argv, message):
    from vlmlab.classify import main as classify

    with pytest.raises(SystemExit) as exit_:
        classify([str(sample_store), "--classes", "granite", "basalt", "--out", str(tmp_path / "p.parquet"), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_probe_verbs_refuse_bad_alpha_and_shots(sample_store, relabelled_labels, tmp_path, capsys):
    from vlmlab.probe import main as train
    from vlmlab.probe_curve import main as curve

    base = ["--store", str(sample_store), "--labels", str(relabelled_labels), "--out", str(tmp_path / "x")]
    for argv in (["--conformal", "1.0"], ["--shots", "few"]):
        with pytest.raises(SystemExit) as exit_:
            train(base + argv)
        assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        curve(base + ["--conformal", "0"])
    assert exit_.value.code == 2 and "(0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_few_shot_curve_starts_at_zero_shot_and_its_sets_shrink(sample_store, relabelled_labels, tmp_path, capsys):
    from vlmlab.probe_curve import main as curve

    curve(["--store", str(sample_store), "--labels", str(relabelled_labels), "--out", str(tmp_path),
           "--templates", "rocks", "--methods", "logistic", "knn", "--shots", "0", "1", "4", "all",
           "--repeats", "2"])
    printed = capsys.readouterr().out
    assert "logistic" in printed and "few_shot.png" in printed
    result = json.loads((tmp_path / "few_shot.json").read_text())
    assert sum(result["splits"].values()) == 256 and result["splits"]["test"] == 76  # 30 % of each class
    for method in ("logistic", "knn"):
        entries = {str(e["shots"]): e for e in result["curves"][method]}
        assert entries["0"]["accuracy"] == result["zero_shot"]["accuracy"] < 0.05
        assert entries["all"]["accuracy"] > 0.95 and entries["4"]["accuracy"] > 0.9
        assert entries["4"]["draws"] == 2 and entries["0"]["draws"] == 1
        # a better classifier needs smaller sets for the same guarantee
        assert entries["0"]["mean_set_size"] > 3 > 1.5 > entries["all"]["mean_set_size"]
        assert entries["all"]["coverage"] >= 0.85
    assert (tmp_path / "few_shot.png").stat().st_size > 20_000
