"""``vlmlab cluster`` (vlmlab/clusters.py) on the sample store made with the tiny model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from vlmlab.clusters import cluster_embeddings, cluster_store, noise_warning, tile_cluster_grid, umap_2d
from vlmlab.store import EmbeddingStore
from vlmlab.testing.samples import ROCK_CLASSES

ARI_FLOOR = 0.9  # measured 1.000 on the sample tiles with the tiny model (see the printed figure)


def tile_labels(samples_dir) -> dict[str, str]:
    """Store path ("17/x/y.png", relative to samples/tiles) -> rock class, from tiles.csv."""
    with open(samples_dir / "tiles.csv") as f:
        return {row["path"].removeprefix("tiles/"): row["label"] for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def clustered(sample_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("clusters")
    summary = cluster_store(EmbeddingStore.open(sample_store), out, k=len(ROCK_CLASSES), seed=0, per_cluster=6)
    return out, summary


def test_kmeans_recovers_the_rock_classes(clustered, samples_dir):
    from sklearn.metrics import adjusted_rand_score

    out, summary = clustered
    table = pq.read_table(out / "clusters.parquet").to_pandas()
    labels = tile_labels(samples_dir)
    truth = [labels[p] for p in table["path"]]
    ari = adjusted_rand_score(truth, table["cluster"])
    print(f"\nk-means k=6 on {len(table)} sample tiles: adjusted Rand index {ari:.3f}; sizes {summary['sizes']}")
    assert len(table) == 256 and summary["n_clusters"] == 6 and summary["noise"] == 0
    assert ari >= ARI_FLOOR
    # Each cluster's representatives are mostly of one class (the montage shows a clean row).
    paths = dict(zip(table["id"], table["path"], strict=True))
    for c, ids in summary["representatives"].items():
        classes = [labels[paths[i]] for i in ids]
        assert max(classes.count(x) for x in classes) >= 4, (c, classes)


def test_cluster_files(clustered):
    out, summary = clustered
    for name in ("clusters.parquet", "clusters.json", "umap.png", "umap.html", "montage.png", "tile_map.png"):
        assert (out / name).stat().st_size > 1000, name
    table = pq.read_table(out / "clusters.parquet")
    assert table.column_names == ["id", "path", "cluster", "umap_x", "umap_y"]
    assert np.isfinite(table["umap_x"].to_numpy()).all()
    written = json.loads((out / "clusters.json").read_text())
    assert sum(written["sizes"].values()) == 256 and written["tile_map"]["zoom"] == 17
    page = (out / "umap.html").read_text()
    first = table["path"][0].as_py()
    assert page.count("<circle") == 256 and first in page and "cluster" in page
    assert "src=" not in page  # self-contained: nothing loaded from elsewhere


def test_tile_map_shows_spatial_patches(clustered, sample_store):
    """The sample classes form spatial patches, so 4-neighbour tiles share a cluster far more
    often than the same labels shuffled over the map."""
    _, summary = clustered
    meta = EmbeddingStore.open(sample_store).read(columns=["tile_z", "tile_x", "tile_y"])
    cols = [meta[c].to_numpy().astype(float) for c in ("tile_z", "tile_x", "tile_y")]
    labels = summary["labels"]

    def agreement(lab: np.ndarray) -> float:
        grid = tile_cluster_grid(*cols, lab)["grid"]
        pairs = [(grid[:, 1:], grid[:, :-1]), (grid[1:, :], grid[:-1, :])]
        same = sum(((a == b) & (a >= -1) & (b >= -1)).sum() for a, b in pairs)
        total = sum(((a >= -1) & (b >= -1)).sum() for a, b in pairs)
        return same / total

    observed = agreement(labels)
    shuffled = np.mean([agreement(np.random.default_rng(s).permutation(labels)) for s in range(5)])
    print(f"\nneighbouring tiles in the same cluster: {observed:.2f} (shuffled {shuffled:.2f})")
    assert observed > shuffled + 0.2


def test_umap_fitted_on_a_sample_projects_the_rest(sample_store, samples_dir):
    """The large-store path: fit on half the rows, transform the other half; projected rows land
    among fitted rows of their own class (1-NN class accuracy in 2-D)."""
    ids, emb, meta = EmbeddingStore.open(sample_store).embeddings()
    labels = tile_labels(samples_dir)
    truth = np.array([labels[p] for p in meta["path"].to_pylist()])
    coords = umap_2d(emb, fit_sample=128, seed=0)
    fitted = np.zeros(len(emb), bool)
    fitted[np.sort(np.random.default_rng(0).choice(len(emb), 128, replace=False))] = True
    d = ((coords[~fitted, None, :] - coords[None, fitted, :]) ** 2).sum(-1)
    accuracy = float((truth[fitted][d.argmin(1)] == truth[~fitted]).mean())
    print(f"\nUMAP fitted on 128 rows, 128 projected: 1-NN class accuracy in 2-D {accuracy:.2f}")
    assert np.isfinite(coords).all() and accuracy >= 0.7


def test_hdbscan_and_bad_k():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 32))
    x = np.concatenate([c + 0.05 * rng.normal(size=(30, 32)) for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = cluster_embeddings(x, method="hdbscan", min_cluster_size=5)
    assert len(set(labels[labels >= 0])) == 3
    with pytest.raises(ValueError, match="-k"):
        cluster_embeddings(x, k=500)
    with pytest.raises(ValueError, match="kmeans"):
        cluster_embeddings(x, method="dbscan")


def test_cli_cluster(sample_store, tmp_path, capsys):
    from vlmlab.cli import main

    main(["cluster", str(sample_store), "-k", "3", "--out", str(tmp_path), "--where", "tile_x < 65540",
          "--per-cluster", "4"])
    summary = json.loads((tmp_path / "clusters.json").read_text())
    table = pq.read_table(tmp_path / "clusters.parquet")
    assert summary["n_clusters"] == 3 and summary["rows"] == len(table) < 256
    assert "n_clusters" in capsys.readouterr().out


def test_hdbscan_mostly_noise_warns_and_says_so_in_clusters_json(tmp_path, caplog):
    from tests.test_index import make_store, random_unit

    # 48 isotropic random points: no density structure, so HDBSCAN calls (nearly) all of them noise
    store = make_store(tmp_path / "store", random_unit(48, 32, seed=3))
    with caplog.at_level("WARNING", logger="vlmlab.clusters"):
        summary = cluster_store(store, tmp_path / "out", method="hdbscan", min_cluster_size=10, umap_neighbors=5)
    assert summary["noise"] > 24
    on_disk = json.loads((tmp_path / "out" / "clusters.json").read_text())
    assert on_disk["warnings"] == summary["warnings"] and len(on_disk["warnings"]) == 1
    assert f"{summary['noise']} of 48 points" in on_disk["warnings"][0]
    assert "min_cluster_size (now 10)" in on_disk["warnings"][0] and "kmeans" in on_disk["warnings"][0]
    assert on_disk["warnings"][0] in caplog.text
    assert noise_warning(np.array([0] * 24 + [-1] * 24), 10) is None  # half noise is not "most"
