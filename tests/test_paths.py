"""Model paths survive another working directory: stores record them resolved, compare them by resolved
identity, and every store-reading verb takes --model when the model has moved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vlmlab.cli import main
from vlmlab.models import same_spec
from vlmlab.store import EmbeddingStore


def test_a_store_records_a_relative_model_path_resolved(tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("tiny-clip").symlink_to(tiny_model)
    store = EmbeddingStore.create("store", model="tiny-clip", embed_dim=64, source_root=".")
    assert store.model == str((tmp_path / "tiny-clip").resolve()) == str(Path(tiny_model).resolve())
    # the same model under any of its names is the same model
    assert store.holds("tiny-clip") and store.holds(str(tmp_path / "tiny-clip"))
    assert not store.holds(f"hf:{tiny_model}")  # the transformers view of the directory is another spec
    assert same_spec("tiny-clip", str(Path(tiny_model).resolve())) and same_spec("./tiny-clip", "tiny-clip")
    assert not same_spec("tiny-clip", "open_clip:ViT-B-32")


def test_store_verbs_take_model_when_the_recorded_one_moved(sample_store, tiny_model, tmp_path, capsys):
    moved = tmp_path / "store"
    shutil.copytree(sample_store, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["model"] = str(tmp_path / "gone" / "tiny-clip")  # the model directory moved away
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit) as gone:
        main(["search", str(moved), "--text", "granite", "-k", "3"])
    err = capsys.readouterr().err
    assert gone.value.code == 2 and "--model" in err and "Traceback" not in err
    main(["search", str(moved), "--text", "granite", "-k", "3", "--json", "--model", tiny_model])
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(hits) == 3
    main(["classify", str(moved), "--classes", "granite", "basalt", "--out", str(tmp_path / "p.parquet"),
          "--model", tiny_model])
    assert (tmp_path / "p.parquet").is_file()


def test_extract_with_a_relative_model_path_embeds_in_the_actors(ray_local, samples_dir, tiny_model, tmp_path,
                                                                  monkeypatch):
    # readers and encoders run in Ray's working directory, not the user's: the spec must reach them resolved
    monkeypatch.chdir(tmp_path)
    Path("tiny-clip").symlink_to(tiny_model)
    shutil.copytree(samples_dir / "tiles" / "17", "images")  # the sample tiles: z/x/y.png
    main(["extract", "images", "--model", "tiny-clip", "--out", "store", "--readers", "1"])
    store = EmbeddingStore.open("store")
    assert store.count() == sum(1 for _ in Path("images").rglob("*.png")) > 0
    assert store.model == str((tmp_path / "tiny-clip").resolve())
