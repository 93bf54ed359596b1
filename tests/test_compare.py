"""``vlmlab compare`` (vlmlab/compare.py): distances between two image sets."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from vlmlab.compare import (
    compare_stores,
    cross_duplicates,
    frechet_distance,
    mmd_permutation_test,
    precision_recall,
)
from vlmlab.store import EmbeddingStore

REPORT_KEYS = {"n_a", "n_b", "mean_cosine", "frechet_distance", "frechet", "mmd2", "mmd_p_value", "mmd",
               "precision", "recall", "nn_cosine_b_to_a", "cross_duplicates", "files"}


@pytest.fixture(scope="module")
def class_paths(samples_dir) -> dict[str, list[str]]:
    """Rock class -> store paths of its tiles (sorted)."""
    out: dict[str, list[str]] = {}
    with open(samples_dir / "tiles.csv") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["label"], []).append(row["path"].removeprefix("tiles/"))
    return {k: sorted(v) for k, v in out.items()}


def path_filter(paths: list[str]) -> str:
    """A ``--where`` selecting exactly ``paths``."""
    return "path IN (" + ", ".join(f"'{p}'" for p in paths) + ")"


def test_two_classes_differ(sample_store, class_paths, tmp_path):
    """Granite rows vs basalt rows of one store (same store twice, two filters): a large distance."""
    store = EmbeddingStore.open(sample_store)
    report = compare_stores(store, store, tmp_path, where_a=path_filter(class_paths["granite"]),
                            where_b=path_filter(class_paths["basalt"]), permutations=200, seed=0)
    print(f"\ngranite vs basalt: mean cosine {report['mean_cosine']:.3f}, Frechet {report['frechet_distance']:.3f} "
          f"({report['frechet']['covariance']}), MMD2 {report['mmd2']:.4f} p={report['mmd_p_value']:.4f}, "
          f"precision {report['precision']:.2f} recall {report['recall']:.2f}")
    assert report["n_a"] == len(class_paths["granite"]) and report["n_b"] == len(class_paths["basalt"])
    assert report["mmd_p_value"] < 0.05
    # fewer rows than the 64 dims: the covariances were shrunk, and the report says so
    assert report["frechet"]["covariance"] == "ledoit_wolf" and report["frechet"]["shrinkage_because_rows_le_dims"]
    assert report["precision"] <= 0.2 and report["recall"] <= 0.2
    assert REPORT_KEYS <= set(json.loads((tmp_path / "report.json").read_text()))
    for name in ("joint_umap.png", "nn_cosine.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert report["frechet_distance"] > 1.0 and report["mean_cosine"] < 0.5  # measured 2.31 and -0.16


def test_halves_of_one_class_do_not_differ(sample_store, class_paths, tmp_path):
    """Two random halves of the granite tiles: no significant difference, a small distance."""
    store = EmbeddingStore.open(sample_store)
    granite = class_paths["granite"]
    order = np.random.default_rng(0).permutation(len(granite))
    half_a = [granite[i] for i in order[: len(granite) // 2]]
    half_b = [granite[i] for i in order[len(granite) // 2 :]]
    report = compare_stores(store, store, tmp_path, where_a=path_filter(half_a), where_b=path_filter(half_b),
                            permutations=200, seed=0)
    print(f"\ngranite halves: mean cosine {report['mean_cosine']:.3f}, Frechet {report['frechet_distance']:.3f}, "
          f"MMD2 {report['mmd2']:.4f} p={report['mmd_p_value']:.3f}, precision {report['precision']:.2f} "
          f"recall {report['recall']:.2f}")
    assert report["mmd_p_value"] > 0.05
    assert report["mean_cosine"] > 0.98
    assert report["precision"] >= 0.6 and report["recall"] >= 0.6
    assert report["frechet_distance"] < 0.1  # measured 0.002, against 2.31 between two classes


def test_a_row_is_no_duplicate_of_itself(sample_store, class_paths, tmp_path):
    """The same rows on both sides: every other row pairs up, no row with itself."""
    store = EmbeddingStore.open(sample_store)
    granite = path_filter(class_paths["granite"])
    report = compare_stores(store, store, tmp_path, where_a=granite, where_b=granite, permutations=50,
                            duplicate_threshold=0.5, max_pairs=10)
    n = len(class_paths["granite"])
    dups = report["cross_duplicates"]
    assert dups["count"] == n * (n - 1) and dups["listed"] == len(dups["pairs"]) == 10
    assert all(p["id_a"] != p["id_b"] and p["cosine"] >= 0.5 for p in dups["pairs"])
    assert report["mmd_p_value"] > 0.5


def test_cli_real_vs_synthetic(sample_store, synthetic_store, tmp_path, capsys):
    from vlmlab.cli import main

    main(["compare", str(sample_store), str(synthetic_store), "--out", str(tmp_path), "--permutations", "100"])
    report = json.loads((tmp_path / "report.json").read_text())
    with capsys.disabled():
        print(f"\nreal vs synthetic: mean cosine {report['mean_cosine']:.3f}, "
              f"Frechet {report['frechet_distance']:.3f}, MMD2 {report['mmd2']:.4f} p={report['mmd_p_value']:.4f}, "
              f"precision {report['precision']:.2f} recall {report['recall']:.2f}, "
              f"nearest-real cosine {report['nn_cosine_b_to_a']['mean']:.3f}")
    assert "mmd_p_value" in capsys.readouterr().out
    assert REPORT_KEYS <= set(report)
    assert report["n_a"] == 256 and report["n_b"] == 48 and report["mmd"]["permutations"] == 100
    assert report["mmd_p_value"] < 0.05  # the synthetic renderings are smoother and colour-shifted


def test_frechet_distance_on_arrays():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    b = rng.normal(size=(500, 8)) + np.r_[2.0, np.zeros(7)]
    same, estimator = frechet_distance(a, rng.normal(size=(500, 8)))
    shifted, _ = frechet_distance(a, b)
    assert estimator == "sample" and same < 0.2 and abs(shifted - 4.0) < 0.5  # |mean shift|^2 = 4
    assert frechet_distance(a[:5], b[:5])[1] == "ledoit_wolf"
    with pytest.raises(ValueError, match="covariance"):
        frechet_distance(a, b, covariance="diagonal")


def test_mmd_and_precision_recall_on_arrays():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(100, 4)), rng.normal(size=(100, 4))
    same = mmd_permutation_test(a, b, permutations=200, seed=0)
    moved = mmd_permutation_test(a, b + 1.0, permutations=200, seed=0)
    assert same["p_value"] > 0.05 and moved["p_value"] < 0.01 and moved["mmd2"] > same["mmd2"]
    # B collapsed onto the centre of A: realistic (high precision) but covering little of A (low recall)
    a2 = rng.normal(size=(400, 2))
    pr = precision_recall(a2, 0.2 * rng.normal(size=(100, 2)), k=3)
    assert pr["precision"] > 0.9 and pr["recall"] < 0.3
    swapped = precision_recall(0.2 * rng.normal(size=(100, 2)), a2, k=3)
    assert swapped["precision"] < 0.3 and swapped["recall"] > 0.9


def test_cross_duplicates_lists_planted_copies():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(50, 16)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = np.concatenate([rng.normal(size=(20, 16)), a[[3, 7, 11]]]).astype(np.float32)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    pairs = cross_duplicates(a, b, threshold=0.999)
    assert sorted((i, j) for i, j, _ in pairs) == [(3, 20), (7, 21), (11, 22)]
    assert all(s >= 0.999 for *_, s in pairs)


def test_every_figure_has_both_axes_labelled(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from tests.test_index import make_store, random_unit

    saved: dict[str, list[tuple[str, str]]] = {}
    savefig = Figure.savefig

    def record(fig, path, *args, **kwargs):  # every PNG compare writes, with its axes' labels
        saved[str(path).rsplit("/", 1)[-1]] = [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]
        return savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    a = make_store(tmp_path / "a", random_unit(30, 16, seed=5))
    b = make_store(tmp_path / "b", random_unit(30, 16, seed=6))
    report = compare_stores(a, b, tmp_path / "out", permutations=20)
    pngs = {name for name in report["files"].values() if name.endswith(".png")}
    assert pngs == {"joint_umap.png", "nn_cosine.png"} and pngs <= set(saved)
    for name in pngs:
        assert (tmp_path / "out" / name).is_file() and saved[name]
        assert all(x and y for x, y in saved[name]), f"{name} has an unlabelled axis: {saved[name]}"
    assert saved["nn_cosine.png"][0][1].startswith("density")
