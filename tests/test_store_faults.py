"""Bad input loses nothing: one writer per store, an unreadable part is named and quarantined (its images
re-embedded next time), a garbled index is rebuilt, a lost manifest is refused, and a FIFO among the
images is skipped instead of hanging the run."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from pipelines.extract import ExtractConfig, extract
from vlmlab.cli import main
from vlmlab.images import list_images
from vlmlab.index import ensure_index
from vlmlab.store import EmbeddingStore, StoreError, rows_to_part


def _store(root, parts: int = 2, rows: int = 20, dim: int = 8) -> EmbeddingStore:
    store = EmbeddingStore.create(root, model="test:random", embed_dim=dim, source_root=root)
    rng = np.random.default_rng(0)
    for p in range(parts):
        ids = np.arange(p * rows, (p + 1) * rows)
        vectors = rng.normal(size=(rows, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        store.write_part(rows_to_part({
            "id": ids, "path": [f"img/{i}.png" for i in ids], "content_hash": [f"h{i}" for i in ids],
            "width": np.full(rows, 8), "height": np.full(rows, 8), "tile_z": np.full(rows, -1),
            "tile_x": np.full(rows, -1), "tile_y": np.full(rows, -1), "source": ["real"] * rows}, vectors))
    store.update_manifest()
    return store


def test_a_truncated_part_is_named_then_quarantined_and_the_rest_reads(tmp_path, capsys):
    store = _store(tmp_path / "store")
    bad = store.part_paths()[0]
    bad.write_bytes(bad.read_bytes()[:100])  # a writer's disk filled up, a copy was cut short
    with pytest.raises(StoreError, match=f"{bad.name}.*store verify .* --quarantine"):
        EmbeddingStore.open(store.root).count()
    with pytest.raises(SystemExit) as exit_info:
        main(["store", "verify", str(store.root)])
    assert exit_info.value.code == 1 and bad.name in capsys.readouterr().out
    main(["store", "verify", str(store.root), "--quarantine"])
    report = json.loads(capsys.readouterr().out)
    assert [b["part"] for b in report["bad"]] == [bad.name] and report["parts"] == 1
    assert (store.root / "quarantine" / bad.name).is_file()  # moved aside, not deleted
    reopened = EmbeddingStore.open(store.root)
    assert reopened.count() == 20 == reopened.manifest["rows"]
    # the quarantined rows are unknown again: the next extraction embeds those images
    assert set(reopened.known_hashes()) == {f"img/{i}.png" for i in range(20, 40)}


def test_a_garbled_index_json_is_rebuilt_not_a_traceback(tmp_path):
    store = _store(tmp_path / "store")
    ensure_index(store)
    (store.index_dir / "index.json").write_text('{"kind": "flat", "nt')  # torn write
    index = ensure_index(EmbeddingStore.open(store.root))
    assert len(index) == 40 and json.loads((store.index_dir / "index.json").read_text())["kind"] == "flat"


def test_a_store_whose_manifest_was_lost_is_refused_not_duplicated(tmp_path, tiny_model):
    store = _store(tmp_path / "store")
    (store.root / "manifest.json").unlink()
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(StoreError, match="2 embedding part.*no manifest.json"):
        extract(ExtractConfig(images=str(images), model=tiny_model, out=str(store.root)))
    assert len(store.part_paths()) == 2


def test_a_second_writer_is_refused_while_the_first_holds_the_store(tmp_path, tiny_model, samples_dir):
    images = tmp_path / "images"
    shutil.copytree(samples_dir / "photos", images)
    out = tmp_path / "store"
    with EmbeddingStore(out).writer_lock():  # an extraction in progress
        with pytest.raises(StoreError, match=f"being written by pid {os.getpid()}"):
            extract(ExtractConfig(images=str(images), model=tiny_model, out=str(out)))
    assert not (out / "manifest.json").exists()
    with EmbeddingStore(out).writer_lock():  # released: the next writer takes it
        pass


def test_a_fifo_named_like_an_image_is_skipped(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it for reading would block forever
    assert [p.name for p in list_images(tmp_path)] == ["a.png"]
