"""Extraction (pipelines.extract) on a real local Ray with the tiny model: fidelity, resume,
bad input, kill-and-restart, heterogeneous GPU types, export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmlab.store import EmbeddingStore, StoreError

REPO = Path(__file__).resolve().parents[1]


def run_extract(images: Path, model: str, out: Path, **kw):
    from pipelines.extract import ExtractConfig, extract

    return extract(ExtractConfig(images=str(images), model=model, out=str(out), readers=1, **kw))


def raw_rows(store_dir: Path) -> int:
    """Rows over all parts, duplicates included: what a recomputation would inflate."""
    return sum(pq.read_metadata(p).num_rows for p in EmbeddingStore.open(store_dir).part_paths())


def copy_tiles(samples_dir: Path, dest: Path, n: int) -> list[Path]:
    tiles = sorted((samples_dir / "tiles").rglob("*.png"))[:n]
    out = []
    for tile in tiles:
        target = dest / tile.relative_to(samples_dir / "tiles")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tile, target)
        out.append(target)
    return out


def test_store_matches_a_direct_encode(sample_store, samples_dir, tiny_model):
    from vlmlab.images import read_image
    from vlmlab.models import load_model

    store = EmbeddingStore.open(sample_store)
    ids, emb, meta = store.embeddings()
    assert len(ids) == 256 and len(set(ids.tolist())) == 256
    assert store.manifest["rows"] == 256 and store.manifest["model"] == tiny_model
    assert set(meta["source"].to_pylist()) == {"real"}
    assert set(meta["tile_z"].to_pylist()) == {17} and None not in meta["tile_x"].to_pylist()
    encoder = load_model(tiny_model)
    paths = meta["path"].to_pylist()[:24]
    direct = encoder.encode_images([read_image(samples_dir / "tiles" / p) for p in paths])
    cosine = np.sum(direct * emb[:24], axis=1)
    print(f"min cosine store vs direct encode: {cosine.min():.6f}")
    assert cosine.min() > 0.999
    row = meta.slice(0, 1).to_pylist()[0]
    z, x, y = row["tile_z"], row["tile_x"], row["tile_y"]
    assert row["path"] == f"{z}/{x}/{y}.png" and row["width"] == row["height"] == 128


def test_second_run_adds_only_new_files(samples_dir, tiny_model, tmp_path, ray_local):
    images, store_dir = tmp_path / "images", tmp_path / "store"
    copy_tiles(samples_dir, images, 20)
    first = run_extract(images, tiny_model, store_dir)
    assert (first.processed, first.skipped, first.errors) == (20, 0, 0)
    parts_before = {p: p.stat().st_mtime_ns for p in EmbeddingStore.open(store_dir).part_paths()}
    # five new tiles, and one old tile whose content changed
    extra = sorted((samples_dir / "tiles").rglob("*.png"))[20:25]
    for tile in extra:
        target = images / tile.relative_to(samples_dir / "tiles")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tile, target)
    changed = sorted(images.rglob("*.png"))[0]
    Image.open(extra[0]).save(changed)
    second = run_extract(images, tiny_model, store_dir)
    assert (second.listed, second.processed, second.skipped) == (25, 6, 19)
    store = EmbeddingStore.open(store_dir)
    assert store.count() == 25 and raw_rows(store_dir) == 26  # the changed image's old row is superseded
    for part, mtime in parts_before.items():
        assert part.stat().st_mtime_ns == mtime  # nothing already stored was rewritten
    third = run_extract(images, tiny_model, store_dir)
    assert (third.processed, third.skipped) == (0, 25)


def _bomb_png() -> bytes:
    """A valid 1x1 PNG whose header claims 20000x20000 pixels (a decompression bomb)."""
    import io

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", 20000, 20000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_bad_files_are_recorded_and_skipped_and_tiffs_mapped(samples_dir, tiny_model, tmp_path, ray_local):
    from vlmlab.images import read_image
    from vlmlab.models import load_model

    images, store_dir = tmp_path / "images", tmp_path / "store"
    good = copy_tiles(samples_dir, images, 6)
    (images / "empty.png").write_bytes(b"")
    (images / "notes.JPG").write_text("not an image at all")
    (images / "truncated.png").write_bytes(good[0].read_bytes()[:300])
    (images / "bomb.png").write_bytes(_bomb_png())
    import tifffile

    rng = np.random.default_rng(0)
    rgbn = (rng.random((64, 64, 4)) * 4000 + 1000).astype(np.uint16)  # 16-bit RGB + NIR
    tifffile.imwrite(images / "scene.TIF", rgbn)
    summary = run_extract(images, tiny_model, store_dir, bands=(3, 0, 1))
    assert (summary.processed, summary.errors) == (7, 4)
    errors = dict(zip(*EmbeddingStore.open(store_dir).errors().select(["path", "reason"]).to_pydict().values(),
                      strict=True))
    assert set(errors) == {"empty.png", "notes.JPG", "truncated.png", "bomb.png"}
    assert "0 bytes" in errors["empty.png"] and "bomb" in errors["bomb.png"]
    print("recorded errors:", errors)
    store = EmbeddingStore.open(store_dir)
    _, emb, meta = store.embeddings(where="path = 'scene.TIF'")
    direct = load_model(tiny_model).encode_images([read_image(images / "scene.TIF", bands=(3, 0, 1))])
    assert meta["tile_z"].to_pylist() == [None] and float(direct[0] @ emb[0]) > 0.999
    # a fixed file is embedded on the next run and leaves the error list
    shutil.copy(good[1], images / "truncated.png")
    again = run_extract(images, tiny_model, store_dir, bands=(3, 0, 1))
    assert again.processed == 1 and "truncated.png" not in EmbeddingStore.open(store_dir).errors()["path"].to_pylist()


def test_another_model_is_refused_unless_new_store(sample_store, samples_dir, tiny_model, ray_local):
    with pytest.raises(StoreError, match="new-store"):
        run_extract(samples_dir / "tiles", f"hf:{tiny_model}", sample_store)
    with pytest.raises(StoreError, match="one store per image folder"):
        run_extract(samples_dir / "synthetic", tiny_model, sample_store)


N_KILL = 192


def test_killed_run_restarts_with_every_image_once(samples_dir, tiny_model, tmp_path, ray_local):
    import ray

    images, store_dir = tmp_path / "images", tmp_path / "store"
    copy_tiles(samples_dir, images, N_KILL)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "run.log", "w")  # noqa: SIM115
    # batches of 4, so that parts land one after another while the run is killed
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.extract", str(images), "--model", tiny_model,
                             "--out", str(store_dir), "--batch-size", "4", "--chunk-size", "4", "--readers", "1"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        parts = list((store_dir / "embeddings").glob("part-*.parquet")) if store_dir.exists() else []
        if len(parts) >= 2:
            break
        time.sleep(0.02)  # the tiny model embeds hundreds of images a second
    assert proc.poll() is None, "the run ended before it could be killed:\n" + (tmp_path / "run.log").read_text()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    done_before = raw_rows(store_dir)
    assert 0 < done_before < N_KILL, f"kill landed at {done_before} rows"
    assert not list((store_dir / "embeddings").glob("*.tmp"))  # nothing half-written is visible
    summary = run_extract(images, tiny_model, store_dir)
    print(f"killed after {done_before} images; restart embedded {summary.processed}")
    assert summary.skipped == done_before and summary.processed == N_KILL - done_before
    assert raw_rows(store_dir) == EmbeddingStore.open(store_dir).count() == N_KILL


def test_both_gpu_types_receive_work(ray_two_gpu_types, samples_dir, tiny_model, tmp_path, busy_cpu):
    # with both cores taken by busy processes, actors start in any order and at any speed: the gate's
    # start-together and fair-start guarantees still give every pool work
    images, store_dir = tmp_path / "images", tmp_path / "store"
    copy_tiles(samples_dir, images, 64)
    summary = run_extract(images, tiny_model, store_dir, chunk_size=4, batch_size=4)
    print("work per pool:", summary.devices)
    assert {p["gpu_type"] for p in summary.pipelines} == {"titan_rtx", "a30"}
    assert set(summary.devices) == {"titan_rtx/cpu int8", "a30/cpu int8"}
    assert sum(summary.devices.values()) == 64 == EmbeddingStore.open(store_dir).count()


def test_plans_follow_the_gpu_profiles():
    from pipelines.extract import ExtractConfig, plan_pipelines

    cfg = ExtractConfig(model="open_clip:ViT-L-14/openai")
    plans = {p.gpu_type: p for p in plan_pipelines(cfg, {"CPU": 48, "GPU": 6, "titan_rtx": 2, "a30": 4})}
    assert plans["titan_rtx"].batch_size == 128 and plans["a30"].batch_size == 192
    assert plans["titan_rtx"].workers == 2 and plans["a30"].workers == 4
    assert plans["titan_rtx"].dtype == "float16" and plans["a30"].dtype == "bfloat16"
    assert plans["a30"].resources == {"a30": 1.0} and plans["a30"].num_gpus == 1.0
    small = plan_pipelines(ExtractConfig(model="open_clip:ViT-B-32/openai", gpus_per_worker=0.25),
                           {"GPU": 2, "titan_rtx": 2})
    assert small[0].workers == 8 and small[0].resources == {"titan_rtx": 0.25}
    (cpu,) = plan_pipelines(ExtractConfig(model="x"), {"CPU": 2})
    assert cpu.gpu_type == "cpu" and cpu.num_gpus == 0 and cpu.dtype == "int8"
    (exact,) = plan_pipelines(ExtractConfig(model="x", dtype="float32"), {"CPU": 2})
    assert exact.dtype == "float32"
    # GPUs whose node declares no type are used through the generic profile, never left idle
    (generic,) = plan_pipelines(ExtractConfig(model="open_clip:ViT-B-32/openai"), {"CPU": 16, "GPU": 1})
    assert generic.gpu_type == "gpu" and generic.num_gpus == 0.5 and generic.workers == 2
    assert generic.dtype == "auto" and generic.resources == {}



def test_readers_take_the_cores_their_encoders_leave():
    from pipelines.extract import PipelinePlan, reader_count

    def node(cpus, **res):
        return {"Alive": True, "Resources": {"CPU": cpus, **res}}

    cpu = PipelinePlan("cpu", 1, 32, 0.0, "int8", {})
    assert reader_count(cpu, [node(2)]) == 1  # a CPU encoder uses both cores; one reader keeps up
    gpu = PipelinePlan("gpu", 2, 256, 0.5, "auto", {})
    assert reader_count(gpu, [node(16, GPU=1)]) == 15
    a30 = PipelinePlan("a30", 4, 384, 0.5, "bfloat16", {"a30": 0.5})
    nodes = [node(8), node(32, GPU=2, a30=2), node(16, GPU=2, titan_rtx=2)]
    assert reader_count(a30, nodes) == 30  # only the cores of the a30 node, less 4 x 0.5 for encoders


def test_export_writes_the_old_format(sample_store, samples_dir, tmp_path):
    from pipelines.export import main

    main([str(sample_store), "--npy", str(tmp_path / "old")])
    emb = np.load(tmp_path / "old" / "image_embeddings.npy")
    paths = json.loads((tmp_path / "old" / "image_paths.json").read_text())
    assert emb.shape == (256, EmbeddingStore.open(sample_store).manifest["embed_dim"]) and len(paths) == 256
    assert all(Path(p).is_file() for p in paths)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
