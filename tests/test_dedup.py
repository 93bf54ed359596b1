"""``vlmlab dedup`` (vlmlab/dedup.py): near-duplicate groups."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from vlmlab.dedup import connected_groups, dedup_store, near_duplicate_groups
from vlmlab.images import stable_id
from vlmlab.store import EmbeddingStore

PLANTED = 5
# The tiny model packs a class tightly: two different sample tiles reach cosine 0.9999943 (measured),
# so "strict" must sit between that and an identical image's 1.0 (0.9999996 in float32 arithmetic).
STRICT = 0.999999


@pytest.fixture(scope="module")
def store_with_copies(sample_store, tmp_path_factory):
    """The sample store's rows plus copies of five tiles under ``copies/``, as if the same files had
    been saved again elsewhere (extraction is deterministic: same bytes, same embedding)."""
    source = EmbeddingStore.open(sample_store)
    table = source.read()
    rng = np.random.default_rng(0)
    picked = table.take(pa.array(rng.choice(len(table), PLANTED, replace=False)))
    paths = [f"copies/{p}" for p in picked["path"].to_pylist()]
    copies = picked.set_column(0, "id", pa.array([stable_id(p) for p in paths], pa.int64()))
    copies = copies.set_column(1, "path", pa.array(paths))
    out = tmp_path_factory.mktemp("dedup") / "store"
    manifest = source.manifest
    store = EmbeddingStore.create(out, manifest["model"], manifest["embed_dim"], manifest["source_root"])
    store.write_part(table)
    store.write_part(copies)
    store.update_manifest()
    return out, dict(zip(paths, picked["path"].to_pylist(), strict=True))


def test_finds_planted_copies_and_nothing_else(store_with_copies):
    out, planted = store_with_copies
    store = EmbeddingStore.open(out)
    _, emb, meta = store.embeddings()
    sims = emb @ emb.T
    np.fill_diagonal(sims, -1)
    real = meta["path"].to_pylist()
    is_real = np.array([not p.startswith("copies/") for p in real])
    closest_distinct = sims[np.ix_(is_real, is_real)].max()
    print(f"\nhighest cosine between two different sample tiles: {closest_distinct:.7f}; "
          f"planted copies: {min(sims[i].max() for i in np.flatnonzero(~is_real)):.7f} or more")
    assert closest_distinct < STRICT  # else the test would not tell copies from neighbours
    result = dedup_store(store, threshold=STRICT)
    assert result["rows"] == 256 + PLANTED and result["duplicates"] == PLANTED
    found = {g["duplicates"][0]["path"]: g["keep"]["path"] for g in result["groups"]}
    assert all(len(g["duplicates"]) == 1 and g["duplicates"][0]["cosine"] >= STRICT for g in result["groups"])
    assert found == planted  # the copy ("copies/...") pairs with its original, kept as first by path


def test_ivf_path_matches_exact(store_with_copies):
    out, _ = store_with_copies
    _, emb, _ = EmbeddingStore.open(out).embeddings()
    exact = near_duplicate_groups(emb, STRICT)
    approximate = near_duplicate_groups(emb, STRICT, exact_limit=0, neighbors=8)
    assert [g.tolist() for g in exact] == [g.tolist() for g in approximate] and len(exact) == PLANTED


def test_loose_threshold_groups_whole_classes(sample_store):
    """At a loose threshold the tiny model's same-class tiles chain into groups; never across
    most of the store."""
    store = EmbeddingStore.open(sample_store)
    result = dedup_store(store, threshold=0.9)
    sizes = sorted((1 + len(g["duplicates"]) for g in result["groups"]), reverse=True)
    print(f"\nthreshold 0.9: {len(sizes)} groups, sizes {sizes[:8]}")
    assert 1 <= len(sizes) and sizes[0] < 200


def test_union_find_chains():
    groups = connected_groups(7, np.array([[0, 1], [1, 2], [5, 4], [2, 0]]))
    assert [g.tolist() for g in groups] == [[0, 1, 2], [4, 5]]
    assert connected_groups(3, np.zeros((0, 2), np.int64)) == []


def test_cli_dedup(store_with_copies, tmp_path, capsys):
    from vlmlab.cli import main

    out, _ = store_with_copies
    groups_json = tmp_path / "groups.json"
    main(["dedup", str(out), "--threshold", str(STRICT), "--out", str(groups_json)])
    printed = capsys.readouterr().out
    assert f"{PLANTED} groups, {PLANTED} duplicates among {256 + PLANTED} rows" in printed
    assert printed.count("copies/") == PLANTED
    result = json.loads(groups_json.read_text())
    assert len(result["groups"]) == PLANTED and result["method"] == "exact"
    # filtered to the originals only, nothing is duplicated at the strict threshold
    main(["dedup", str(out), "--threshold", str(STRICT), "--where", "path < 'copies'", "--quiet",
          "--out", str(tmp_path / "none.json")])
    assert json.loads((tmp_path / "none.json").read_text())["groups"] == []
