"""vlmlab.calibration: temperature scaling, ECE and split-conformal prediction sets.

Coverage is checked against its exact finite-sample law: with n calibration rows, continuous scores and
k = ceil((n+1)(1-alpha)), the number of m test rows whose set holds the true class is
BetaBinomial(m, k, n+1-k) (the coverage given the calibration rows is the k-th of n uniform order
statistics, Beta(k, n+1-k)). Bounds are that law's quantiles at a stated false-alarm probability,
not hand-picked tolerances.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from vlmlab.calibration import (
    METHODS,
    Calibration,
    CalibrationError,
    calibration_report,
    check_alpha,
    conformal_threshold,
    coverage_report,
    expected_calibration_error,
    fit_temperature,
    min_rows_for,
    plot_reliability,
    prediction_sets,
    softmax,
    true_class_scores,
)

FALSE_ALARM = 1e-3  # probability that a correct implementation fails one of these checks


def synthetic(rng: np.random.Generator, n: int, sharpness: float, classes: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """(logits (n, C), labels): labels drawn uniformly, features z ~ N(sharpness e_y, I); the logits are the
    Bayes posterior's, sharpness x z, so softmax(logits) is exactly calibrated, and sharper as it grows."""
    y = rng.integers(0, classes, n)
    z = rng.normal(0.0, 1.0, (n, classes))
    z[np.arange(n), y] += sharpness
    return sharpness * z, y


def coverage_law(n: int, m: int, alpha: float) -> stats.rv_discrete:
    """The exact law of the covered count among m test rows, for n calibration rows."""
    k = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    return stats.betabinom(m, k, n + 1 - k)


def test_alpha_must_lie_strictly_between_0_and_1():
    assert check_alpha(0.1) == 0.1 and check_alpha("0.05") == 0.05
    for bad in (0, 1, -0.1, 1.5, float("nan"), "often", None):
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            check_alpha(bad)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        conformal_threshold(np.arange(10.0), 1.0)


def test_threshold_is_the_finite_sample_quantile():
    scores = np.arange(1.0, 20.0)[::-1]  # n = 19, unsorted on purpose
    assert conformal_threshold(scores, 0.1) == 18.0  # ceil(20 x 0.9) = 18th smallest
    assert conformal_threshold(scores, 0.5) == 10.0  # ceil(20 x 0.5) = 10th
    assert conformal_threshold(np.arange(8.0), 0.1) == math.inf  # ceil(9 x 0.9) = 9 > 8 rows: every class
    assert min_rows_for(0.1) == 9 and conformal_threshold(np.arange(9.0), 0.1) == 8.0
    assert min_rows_for(0.05) == 19


def test_scores_and_sets_by_hand():
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    np.testing.assert_allclose(true_class_scores(probs, np.array([1, 1]), "lac"), [0.7, 0.4])
    np.testing.assert_allclose(true_class_scores(probs, np.array([1, 2]), "aps"), [0.5, 0.6])  # mass above
    np.testing.assert_allclose(true_class_scores(probs, np.array([2, 2]), "raps", raps_lambda=0.1, raps_k_reg=1),
                               [0.8 + 0.2, 0.6 + 0.1])
    assert prediction_sets(probs, 0.65, "lac").tolist() == [[True, False, False], [False, True, False]]
    # mass above each class: row 0 -> 0, 0.5, 0.8; row 1 -> 0.9, 0, 0.6
    assert prediction_sets(probs, 0.55, "aps").tolist() == [[True, True, False], [False, True, False]]
    assert prediction_sets(probs, 0.0, "aps").sum(1).tolist() == [1, 1]  # the top class is always in
    report = coverage_report(prediction_sets(probs, 0.55, "aps"), np.array([2, 1]), ["a", "b", "c"])
    assert report["coverage"] == 0.5 and report["mean_set_size"] == 1.5 and report["size_histogram"] == [0, 1, 1, 0]
    assert report["per_class"]["c"] == {"coverage": 0.0, "mean_set_size": 2.0, "support": 1}


def test_ece_by_hand_and_reliability_png(tmp_path):
    # top confidence 0.95 on 4 rows (3 right) and 0.55 on 2 rows (1 right):
    # ECE = 4/6 |0.75 - 0.95| + 2/6 |0.5 - 0.55| = 0.15
    probs = np.array([[0.95, 0.05]] * 4 + [[0.55, 0.45]] * 2)
    labels = np.array([0, 0, 0, 1, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.15)
    png = plot_reliability({"before": (probs, labels), "after": (softmax(np.log(probs), 2.0), labels)},
                           tmp_path / "reliability.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_temperature_recovers_a_known_overconfidence_and_lowers_held_out_ece():
    rng = np.random.default_rng(0)
    logits, y = synthetic(rng, 6000, 2.0)
    overconfident = 3.0 * logits  # a classifier whose logits are 3x what its accuracy supports
    temperature = fit_temperature(overconfident[:3000], y[:3000])
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(softmax(overconfident[3000:]), y[3000:])
    after = expected_calibration_error(softmax(overconfident[3000:], temperature), y[3000:])
    print(f"\nT {temperature:.3f}; held-out ECE {before:.3f} -> {after:.3f}")
    assert after < before / 3
    assert (softmax(overconfident, temperature).argmax(1) == overconfident.argmax(1)).all()  # never moves the top


def test_temperature_scaling_lowers_ece_of_the_tiny_model_on_held_out_tiles(sample_store, relabelled_labels,
                                                                           tiny_model):
    """Zero-shot CLIP is confidently wrong on classes its prompts misdescribe: a temperature fitted on half
    the tiles brings its confidence down to its accuracy on the other half."""
    from vlmlab.classify import class_embeddings
    from vlmlab.models import load_model
    from vlmlab.probe import labelled_rows
    from vlmlab.store import EmbeddingStore

    rows = labelled_rows(EmbeddingStore.open(sample_store), relabelled_labels)
    encoder = load_model(tiny_model, device="cpu")
    logits = encoder.logit_scale * rows.vectors @ class_embeddings(encoder, rows.classes, "rocks").T
    order = np.random.default_rng(0).permutation(len(rows.labels))
    cal, test = order[:128], order[128:]
    record = Calibration.fit(logits[cal], rows.labels[cal], rows.classes, seed=0)
    report = calibration_report(logits[test], rows.labels[test], record, alpha=0.1)
    print(f"\nrelabelled zero-shot: accuracy {report['accuracy']:.3f}, T {record.temperature:.1f}, "
          f"ECE {report['ece_before']:.3f} -> {report['ece_after']:.3f}")
    assert report["accuracy"] < 0.1 and report["ece_before"] > 0.8
    assert report["ece_after"] < report["ece_before"] - 0.5
    assert report["nll_after"] < report["nll_before"]


def fresh_split_sets(rng: np.random.Generator, n: int, m: int, sharpness: float, alpha: float, method: str,
                     randomized: bool) -> tuple[np.ndarray, np.ndarray]:
    """(sets (m, C), test labels) of one split on fresh draws: calibrated on n rows, applied to m more."""
    cal_logits, cal_y = synthetic(rng, n, sharpness)
    test_logits, test_y = synthetic(rng, m, sharpness)
    scores = true_class_scores(softmax(cal_logits), cal_y, method, randomized, rng)
    return prediction_sets(softmax(test_logits), conformal_threshold(scores, alpha), method, randomized, rng), test_y


@pytest.mark.parametrize("method,randomized", [("lac", False), ("aps", True), ("raps", True)])
def test_split_conformal_coverage_is_within_sampling_error_over_random_splits(method, randomized):
    """40 independent splits (n=200 calibration, m=400 test rows each, fresh draws): the mean coverage is
    k/(n+1) up to the normal quantile of the mean of 40 BetaBinomial/m variables."""
    rng = np.random.default_rng(1)
    alpha, n, m, splits = 0.1, 200, 400, 40
    covered = []
    for _ in range(splits):
        sets, y = fresh_split_sets(rng, n, m, 2.0, alpha, method, randomized)
        covered.append(sets[np.arange(m), y].sum())
    law = coverage_law(n, m, alpha)
    mean, bound = np.mean(covered) / m, stats.norm.isf(FALSE_ALARM / 2) * law.std() / m / math.sqrt(splits)
    print(f"\n{method}: mean coverage {mean:.4f}, expected {law.mean() / m:.4f} +- {bound:.4f}")
    assert abs(mean - law.mean() / m) <= bound
    assert law.mean() / m >= 1 - alpha  # the guarantee itself


def test_deterministic_aps_covers_at_least_one_minus_alpha():
    """The served (deterministic) APS sets: never empty, coverage at least the law's (one-sided)."""
    rng = np.random.default_rng(2)
    alpha, n, m, splits = 0.1, 200, 400, 30
    covered = []
    for _ in range(splits):
        sets, y = fresh_split_sets(rng, n, m, 1.0, alpha, "aps", False)
        assert sets.sum(1).min() >= 1
        covered.append(sets[np.arange(m), y].mean())
    law = coverage_law(n, m, alpha)
    assert np.mean(covered) >= law.mean() / m - stats.norm.isf(FALSE_ALARM) * law.std() / m / math.sqrt(splits)


def test_coverage_on_the_tiny_models_probabilities_over_random_splits(sample_store, samples_dir, tiny_model):
    """The sample tiles' zero-shot probabilities, reshuffled into 30 calibration/test halves: every split's
    covered count lies inside its exact BetaBinomial law's central interval (Bonferroni over the splits,
    so the check holds however correlated the splits are). Randomised scores: no ties, exact law."""
    from vlmlab.classify import class_embeddings, zero_shot_probs
    from vlmlab.models import load_model
    from vlmlab.probe import labelled_rows
    from vlmlab.store import EmbeddingStore
    from vlmlab.testing.samples import ROCK_CLASSES

    rows = labelled_rows(EmbeddingStore.open(sample_store), samples_dir / "tiles.csv", list(ROCK_CLASSES))
    encoder = load_model(tiny_model, device="cpu")
    probs = zero_shot_probs(rows.vectors, class_embeddings(encoder, rows.classes, "plain"), encoder.logit_scale)
    probs = np.asarray(probs, np.float64)
    alpha, splits = 0.2, 30
    n = len(rows.labels) // 2
    m = len(rows.labels) - n
    law = coverage_law(n, m, alpha)
    lo, hi = law.ppf(FALSE_ALARM / splits / 2), law.isf(FALSE_ALARM / splits / 2)
    rng = np.random.default_rng(3)
    for method in METHODS:
        counts = []
        for _ in range(splits):
            order = rng.permutation(len(rows.labels))
            cal, test = order[:n], order[n:]
            scores = true_class_scores(probs[cal], rows.labels[cal], method, True, rng)
            sets = prediction_sets(probs[test], conformal_threshold(scores, alpha), method, True, rng)
            counts.append(int(sets[np.arange(m), rows.labels[test]].sum()))
        print(f"\n{method}: covered {min(counts)}..{max(counts)} of {m} (law {lo:.0f}..{hi:.0f}), "
              f"mean {np.mean(counts) / m:.3f} vs {law.mean() / m:.3f}")
        assert all(lo <= c <= hi for c in counts), counts


def test_sets_shrink_as_the_classifier_improves():
    rng = np.random.default_rng(4)
    for method in METHODS:
        sizes = []
        for sharpness in (0.5, 1.0, 1.5, 2.5):  # accuracy ~0.3 to ~0.85: below 1 - alpha, sets must grow to cover
            cal_logits, cal_y = synthetic(rng, 500, sharpness)
            test_logits, test_y = synthetic(rng, 2000, sharpness)
            record = Calibration.fit(cal_logits, cal_y, list("abcdef"), method=method, seed=0)
            report = calibration_report(test_logits, test_y, record, alpha=0.1)["conformal"]
            sizes.append(report["mean_set_size"])
        print(f"\n{method}: mean set size {[round(s, 2) for s in sizes]} as the classifier sharpens")
        assert all(a > b for a, b in zip(sizes, sizes[1:])), sizes
        assert sizes[0] > 3 and sizes[-1] < 2


def test_record_round_trips_states_its_guarantee_and_is_tied_to_its_weights(tmp_path):
    rng = np.random.default_rng(5)
    logits, y = synthetic(rng, 300, 2.0)
    weights = tmp_path / "classifier.pt"
    weights.write_bytes(b"weights v1")
    record = Calibration.fit(logits, y, list("abcdef"), method="raps", alpha=0.1, seed=7, split="val",
                             ids=np.arange(300) + 1000, weights_file=weights)
    assert record.split["temperature_rows"] + record.split["conformal_rows"] == 300
    assert not set(record.split["temperature_ids"]) & set(record.split["conformal_ids"])
    path = record.save(tmp_path)
    on_disk = json.loads(path.read_text())
    for key in ("method", "alpha", "temperature", "split", "created_at", "scores", "raps_k_reg", "weights_sha256"):
        assert key in on_disk
    assert on_disk["split"]["seed"] == 7 and on_disk["split"]["name"] == "val"
    loaded = Calibration.load(tmp_path, weights)
    assert loaded.threshold(0.2) == record.threshold(0.2) and loaded.temperature == record.temperature
    guarantee = loaded.guarantee()
    assert guarantee["coverage_at_least"] == 0.9 and guarantee["calibration_rows"] == 150
    assert guarantee["method"] == "raps" and guarantee["threshold"] == pytest.approx(record.threshold())
    assert "note" in loaded.guarantee(0.001)  # 150 rows are too few for alpha = 0.001: every class
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        loaded.sets(softmax(logits), alpha=1.0)
    weights.write_bytes(b"weights v2, retrained")
    with pytest.raises(CalibrationError, match="other weights"):
        Calibration.load(tmp_path, weights)
    assert Calibration.load(tmp_path / "nowhere") is None
