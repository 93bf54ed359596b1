"""vlmlab.classify: zero-shot accuracy of the tiny model on the sample tiles, hierarchy sums,
metrics checked by hand on a crafted prediction table, and the ``classify`` verb."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from vlmlab.classify import (
    class_embeddings,
    classify_store,
    evaluate_predictions,
    match_labels,
    parse_hierarchy,
    zero_shot_probs,
)
from vlmlab.testing.samples import ROCK_CLASSES

CLASSES = list(ROCK_CLASSES)


@pytest.fixture(scope="module")
def encoder(tiny_model):
    from vlmlab.models import load_model

    return load_model(tiny_model, device="cpu")


def test_zero_shot_probs_is_a_scaled_softmax():
    images = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
    classes = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    probs = zero_shot_probs(images, classes, logit_scale=100.0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    expected = np.exp(100 * 0.6) / (np.exp(100 * 0.6) + np.exp(100 * 0.8))
    assert probs.shape == (2, 2) and abs(probs[1, 0] - expected) < 1e-6
    assert zero_shot_probs(images[0], classes, 1.0).shape == (1, 2)  # a single (D,) vector


def test_classify_store_beats_chance_with_hierarchy(sample_store, encoder, samples_dir, tmp_path):
    from vlmlab.store import EmbeddingStore

    store = EmbeddingStore.open(sample_store)
    hierarchy = {"rock": ["granite", "sandstone", "basalt"], "altered": ["fractured", "weathered"]}
    preds = classify_store(store, encoder, CLASSES, templates="rocks", hierarchy=hierarchy)
    frame = preds.to_pandas()
    assert len(frame) == store.count()
    probs = frame[[f"prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (frame["label"] == np.asarray(CLASSES)[probs.argmax(axis=1)]).all()
    np.testing.assert_allclose(frame["parent_prob_rock"], probs[:, :3].sum(axis=1), atol=1e-6)
    # vegetation is in no parent: it is its own parent.
    np.testing.assert_allclose(frame["parent_prob_vegetation"], frame["prob_vegetation"], atol=1e-6)
    assert set(frame["parent_label"]) <= {"rock", "altered", "vegetation"}

    metrics = evaluate_predictions(preds, samples_dir / "tiles.csv", tmp_path / "eval")
    print(f"\nzero-shot accuracy {metrics['accuracy']:.3f} (chance 1/6 = 0.167), macro F1 {metrics['macro_f1']:.3f}, "
          f"per-class recall {({c: round(m['recall'], 2) for c, m in metrics['per_class'].items()})}")
    assert metrics["matched"] == len(frame) and metrics["unmatched"] == 0
    assert metrics["accuracy"] >= 1 / 6 + 0.5  # beats chance by 50 points (measured 1.0 with the rocks templates)
    assert (tmp_path / "eval" / "metrics.json").is_file() and (tmp_path / "eval" / "confusion_matrix.png").is_file()

    # Restricted to a filter.
    some = classify_store(store, encoder, ["granite", "sandstone"], where="tile_x < 65540")
    assert 0 < len(some) < len(frame) and some.column_names[:5] == ["id", "path", "source", "prob_granite",
                                                                      "prob_sandstone"]


def test_class_embeddings_are_unit_and_distinct(encoder):
    emb = class_embeddings(encoder, CLASSES, "rocks")
    assert emb.shape == (len(CLASSES), encoder.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert (emb @ emb.T)[~np.eye(len(CLASSES), dtype=bool)].max() < 0.999


def test_metrics_on_a_hand_made_label_set(tmp_path):
    # 8 predictions: 6 correct. Hand-computed:
    #   a: TP=3 (p1,p2,p3), FP=1 (p7 true b), FN=0 -> P=0.75 R=1 F1=6/7
    #   b: TP=2 (p4,p5), FP=0, FN=2 (p7->a, p8->c) -> P=1 R=0.5 F1=2/3
    #   c: TP=1 (p6), FP=1 (p8), FN=0 -> P=0.5 R=1 F1=2/3
    preds = pd.DataFrame({
        "path": ["17/1/1.png", "17/1/2.png", "17/1/3.png", "17/1/4.png", "17/1/5.png", "17/1/6.png",
                 "17/1/7.png", "17/1/8.png", "17/1/9.png"],
        "label": ["a", "a", "a", "b", "b", "c", "a", "c", "a"],
    })
    labels = pd.DataFrame({
        # relative to a parent folder (tiles/...), one absolute, one exact; 17/1/9.png has no label
        "path": ["tiles/17/1/1.png", "tiles/17/1/2.png", "/data/tiles/17/1/3.png", "17/1/4.png", "tiles/17/1/5.png",
                 "tiles/17/1/6.png", "tiles/17/1/7.png", "tiles/17/1/8.png", "tiles/17/2/1.png"],
        "label": ["a", "a", "a", "b", "b", "c", "b", "b", "b"],
    })
    labels.to_csv(tmp_path / "labels.csv", index=False)
    m = evaluate_predictions(preds, tmp_path / "labels.csv", tmp_path / "out")
    assert m["matched"] == 8 and m["unmatched"] == 1
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["per_class"]["a"] == pytest.approx({"precision": 0.75, "recall": 1.0, "f1": 6 / 7, "support": 3})
    assert m["per_class"]["b"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 4})
    assert m["per_class"]["c"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert m["macro_f1"] == pytest.approx((6 / 7 + 2 / 3 + 2 / 3) / 3)
    assert m["weighted_f1"] == pytest.approx((3 * 6 / 7 + 4 * 2 / 3 + 1 * 2 / 3) / 8)
    assert m["confusion_matrix"] == [[3, 0, 0], [1, 2, 1], [0, 0, 1]]
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk["accuracy"] == m["accuracy"] and on_disk["classes"] == ["a", "b", "c"]
    png = (tmp_path / "out" / "confusion_matrix.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_path_matching_and_hierarchy_parsing():
    assert match_labels(["17/1/2.png", "x/17/1/3.png", "9.png"], ["tiles/17/1/2.png", "17/1/3.png", "a/9.png",
                                                                   "b/9.png"], ["p", "q", "r", "s"]) == ["p", "q", None]
    assert parse_hierarchy(["igneous:granite,basalt", "sedimentary:sandstone"]) == {
        "igneous": ["granite", "basalt"], "sedimentary": ["sandstone"]}
    with pytest.raises(ValueError, match="PARENT:child"):
        parse_hierarchy(["igneous"])


def test_classify_cli(sample_store, samples_dir, tmp_path, capsys):
    from vlmlab.classify import main

    out = tmp_path / "preds.parquet"
    main([str(sample_store), "--classes", *CLASSES, "--templates", "rocks", "--hierarchy",
          "rock:granite,sandstone,basalt", "--out", str(out), "--labels", str(samples_dir / "tiles.csv")])
    text = capsys.readouterr().out
    assert "images classified" in text and "accuracy" in text
    table = pq.read_table(out)
    assert {"id", "path", "label", "prob", "parent_label", "parent_prob"} <= set(table.column_names)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.5 and (tmp_path / "confusion_matrix.png").is_file()
    # uncalibrated ECE with its reliability diagram (calibrated figures: --calibrate / --conformal, tests/test_probe.py)
    assert 0 <= metrics["calibration"]["ece"] < 0.05 and (tmp_path / "reliability.png").is_file()


def test_labels_outside_the_classes_are_left_out_with_a_warning(tmp_path, caplog):
    # 6 predicted rows; truth: 3 known classes, 1 parent (scored on parent_label), 2 unknown labels.
    preds = pd.DataFrame({
        "path": [f"17/1/{i}.png" for i in range(6)],
        "label": ["granite", "basalt", "granite", "basalt", "granite", "granite"],
        "parent_label": ["igneous", "igneous", "igneous", "igneous", "igneous", "igneous"],
    })
    pd.DataFrame({"path": [f"17/1/{i}.png" for i in range(6)],
                  "label": ["granite", "basalt", "basalt", "igneous", "shale", "shale"]}
                 ).to_csv(tmp_path / "labels.csv", index=False)
    hierarchy = {"igneous": ["granite", "basalt"]}
    with caplog.at_level("WARNING", logger="vlmlab.classify"):
        m = evaluate_predictions(preds, tmp_path / "labels.csv", tmp_path / "out", classes=["granite", "basalt"],
                                 hierarchy=hierarchy)
    assert m["unknown_labels"] == {"shale": 2} and m["matched"] == 4 and m["unmatched"] == 0
    assert m["accuracy"] == pytest.approx(3 / 4)  # row 2 wrong; the igneous row right through its parent
    assert "shale" not in m["classes"] and "'shale' (2)" in caplog.text and "2 labelled rows" in caplog.text
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["unknown_labels"] == {"shale": 2}
    # without the hierarchy "igneous" is unknown too
    m = evaluate_predictions(preds, tmp_path / "labels.csv", tmp_path / "out2", classes=["granite", "basalt"])
    assert m["unknown_labels"] == {"igneous": 1, "shale": 2} and m["matched"] == 3
    with pytest.raises(ValueError, match="none of the 6 labelled rows.*shale"):
        evaluate_predictions(preds, tmp_path / "labels.csv", tmp_path / "out3", classes=["sandstone", "marble"])
