"""vlmlab.search with the tiny model on the sample tiles: text queries find the described class,
image similarity finds the same class, filters hold, and the ``search``/``similar``/``index`` verbs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmlab.testing.samples import ROCK_CLASSES


@pytest.fixture(scope="module")
def tile_labels(samples_dir) -> dict[str, str]:
    """Store path (relative to samples_dir/tiles, e.g. ``17/65536/43690.png``) -> rock class."""
    with open(samples_dir / "tiles.csv") as f:
        return {row["path"].removeprefix("tiles/"): row["label"] for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def index(sample_store):
    """The sample store's exact (flat) index, built fresh for this module."""
    from vlmlab.index import build_index
    from vlmlab.store import EmbeddingStore

    return build_index(EmbeddingStore.open(sample_store), kind="flat")


@pytest.fixture(scope="module")
def encoder(tiny_model):
    from vlmlab.models import load_model

    return load_model(tiny_model, device="cpu")


def precision_at_k(hits, label: str, labels: dict[str, str]) -> float:
    return sum(labels[h.path] == label for h in hits) / len(hits)


def test_text_search_finds_each_described_class(index, encoder, tile_labels):
    from vlmlab.search import Query, search

    precisions = {}
    for label, phrases in ROCK_CLASSES.items():
        hits = search(index, encoder, Query(text=phrases[0], k=10))
        assert len(hits) == 10
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
        precisions[label] = precision_at_k(hits, label, tile_labels)
    mean = float(np.mean(list(precisions.values())))
    print(f"\nprecision@10 per class (plain template): {precisions}, mean {mean:.3f}")
    # Chance is about 1/6 per class; measured mean 1.0 with the tiny model.
    assert mean >= 0.9 and min(precisions.values()) >= 0.7

    # The rocks template set works too.
    rocks = [precision_at_k(search(index, encoder, Query(text=p[0], k=10, templates="rocks")), c, tile_labels)
             for c, p in ROCK_CLASSES.items()]
    print(f"precision@10 with rocks templates: mean {np.mean(rocks):.3f}")
    assert np.mean(rocks) >= 0.8


def test_negative_text_and_image_combine(index, encoder, tile_labels, samples_dir):
    from vlmlab.images import read_image
    from vlmlab.search import Query, query_vector, search

    v = query_vector(encoder, Query(text="layered sandstone"))
    assert v.shape == (encoder.embed_dim,) and abs(np.linalg.norm(v) - 1) < 1e-5
    with pytest.raises(ValueError, match="empty query"):
        query_vector(encoder, Query(text="  "))
    # Text (granite) + a little of an image (a sandstone tile): the text dominates the top 20;
    # a negative granite phrase steers the same query to sandstone.
    sandstone = next(p for p, lab in tile_labels.items() if lab == "sandstone")
    image = read_image(samples_dir / "tiles" / sandstone)
    text = ROCK_CLASSES["granite"][0]
    mixed = search(index, encoder, Query(text=text, image=image, weights=(1.0, 0.3, 0.0), k=20))
    steered = search(index, encoder, Query(text=text, image=image, negative=ROCK_CLASSES["granite"][1],
                                           weights=(1.0, 0.3, 0.8), k=20))
    counts = [sum(tile_labels[h.path] == "granite" for h in hits) for hits in (mixed, steered)]
    print(f"\ngranite tiles in the top 20: {counts[0]} without, {counts[1]} with the negative term")
    assert counts[0] >= 15 and counts[1] <= 5
    assert sum(tile_labels[h.path] == "sandstone" for h in steered) >= 15
    # An image query of a basalt tile returns basalt tiles.
    basalt = next(p for p, lab in tile_labels.items() if lab == "basalt")
    hits = search(index, encoder, Query(image=read_image(samples_dir / "tiles" / basalt), k=10))
    assert hits[0].path == basalt and hits[0].score > 0.999
    assert precision_at_k(hits, "basalt", tile_labels) >= 0.8


def test_similar_returns_same_class_and_excludes_itself(index, tile_labels):
    from vlmlab.search import similar

    per_class = {}
    for label in ROCK_CLASSES:
        paths = [p for p, lab in tile_labels.items() if lab == label][:5]
        ids = [index.store.read(columns=["id"], where=f"path = '{p}'")["id"][0].as_py() for p in paths]
        precisions = []
        for image_id in ids:
            hits = similar(index, image_id, k=10)
            assert len(hits) == 10 and image_id not in [h.id for h in hits]
            precisions.append(precision_at_k(hits, label, tile_labels))
        per_class[label] = float(np.mean(precisions))
    print(f"\nsimilar precision@10 per class: {per_class}")
    assert np.mean(list(per_class.values())) >= 0.8
    with pytest.raises(KeyError):
        similar(index, 123, k=5)


def test_where_filter_on_tile_coordinates(index, encoder):
    from vlmlab.search import Query, search

    xs = sorted(index.store.read(columns=["tile_x"])["tile_x"].to_pylist())
    cut = xs[len(xs) // 4]
    where = f"tile_x <= {cut} AND source = 'real'"
    allowed = len(index.store.read(columns=["id"], where=where))
    hits = search(index, encoder, Query(text="dark vesicular basalt full of holes", k=10, where=where))
    assert len(hits) == min(10, allowed)
    assert all(h.tile_x <= cut and h.source == "real" for h in hits)
    # Asking for as many hits as rows match returns exactly the matching rows.
    filtered = search(index, encoder, Query(text="dark vesicular basalt full of holes", k=allowed + 5, where=where))
    assert sorted(h.id for h in filtered) == sorted(index.store.read(columns=["id"], where=where)["id"].to_pylist())


def test_search_cli_table_json_and_montage(sample_store, index, tmp_path, capsys, tile_labels):
    from vlmlab.search import main

    main([str(sample_store), "--text", "layered sandstone with tan bands", "-k", "5"])
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].split() == ["rank", "id", "score", "path"] and len(table) == 6

    montage = tmp_path / "hits.png"
    main([str(sample_store), "--text", "layered sandstone with tan bands", "-k", "6", "--json",
          "--where", "source = 'real'", "--negative", "speckled granite with pink and grey crystals",
          "--montage", str(montage)])
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all({"id", "path", "score", "source"} <= r.keys() and r["source"] == "real" for r in rows)
    assert sum(tile_labels[r["path"]] == "sandstone" for r in rows) >= 5
    with Image.open(montage) as im:
        assert im.width >= 3 * 128 and im.height >= 2 * 128
        assert np.asarray(im.convert("L")).std() > 10  # thumbnails drawn, not a blank sheet


def test_similar_cli_by_id_and_by_image(sample_store, index, samples_dir, capsys, tile_labels, tmp_path):
    from vlmlab.similar import main

    path = next(p for p, lab in tile_labels.items() if lab == "weathered")
    image_id = index.store.read(columns=["id"], where=f"path = '{path}'")["id"][0].as_py()
    main([str(sample_store), "--id", str(image_id), "-k", "4", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 4 and image_id not in [r["id"] for r in rows]
    main([str(sample_store), "--image", str(samples_dir / "tiles" / path), "-k", "3"])
    out = capsys.readouterr().out
    # a file already in the store is found by its bytes and ranks first, whatever the store's precision
    assert path in out.splitlines()[1] and "1.0000" in out.splitlines()[1]
    # a file the store does not hold is embedded with the store's model
    outside = tmp_path / "rotated.png"
    Image.open(samples_dir / "tiles" / path).rotate(90).save(outside)
    main([str(sample_store), "--image", str(outside), "-k", "5", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 5 and sum(tile_labels[r["path"]] == "weathered" for r in rows) >= 4


def test_index_cli_builds_then_updates(sample_store, tmp_path, capsys):
    import shutil

    from vlmlab.index import SearchIndex
    from vlmlab.index import main as index_main
    from vlmlab.store import EmbeddingStore

    copy = tmp_path / "store"
    shutil.copytree(sample_store, copy, ignore=shutil.ignore_patterns("index"))
    index_main([str(copy), "--kind", "flat"])
    assert "flat index of" in capsys.readouterr().out
    store = EmbeddingStore.open(copy)
    some = store.read(columns=["path"])["path"].to_pylist()[:3]
    store.remove_paths(some)
    index_main([str(copy)])
    out = capsys.readouterr().out
    assert "'removed': 3" in out and "updated in place" in out
    assert len(SearchIndex.load(EmbeddingStore.open(copy))) == len(store.read(columns=["id"]))
    assert Path(copy / "index" / "index.json").is_file()

