"""NLVR2 data and metrics: the official accuracy/consistency, the lil-lab and hub-shaped Parquet loaders,
the manifest's SHA-256 check, bad rows, the offline hub message, bookmarks, gallery and sample verbs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.nlvr2 import DataConfig, DataSourceError, prepare, verify_dataset
from vlmlab.nlvr import MetricsError, nlvr_metrics, parse_answer, sentence_key
from vlmlab.nlvr_data import NlvrDataset


def _examples(labels: dict[str, str]) -> list[dict]:
    return [{"identifier": i, "label": lab} for i, lab in labels.items()]


def test_official_metric_on_hand_made_predictions():
    # two sentences of set 7 over four pairs, one sentence of set 8 over two pairs
    labels = {"dev-7-0-0": "True", "dev-7-1-0": "False", "dev-7-2-0": "True", "dev-7-3-0": "False",
              "dev-7-0-1": "False", "dev-7-1-1": "True", "dev-7-2-1": "False", "dev-7-3-1": "True",
              "dev-8-0-0": "True", "dev-8-1-0": "True"}
    predictions = dict(labels)
    predictions["dev-7-1-1"] = "False"  # one wrong: sentence dev-7--1 becomes inconsistent
    predictions["dev-8-0-0"] = "true"  # case does not matter, as in the official script
    predictions["test1-1-0-0"] = "True"  # extra predictions are ignored
    metrics = nlvr_metrics(predictions, _examples(labels))
    assert metrics["n"] == 10 and metrics["sentences"] == 3
    assert metrics["accuracy"] == pytest.approx(9 / 10)
    assert metrics["consistency"] == pytest.approx(2 / 3)
    assert sentence_key("dev-850-3-1") == "dev-850--1"
    all_false = {i: "False" for i in labels}
    worst = nlvr_metrics(all_false, _examples(labels))
    assert worst["accuracy"] == pytest.approx(4 / 10) and worst["consistency"] == 0.0
    with pytest.raises(MetricsError, match="missing"):
        nlvr_metrics({"dev-7-0-0": "True"}, _examples(labels))


def test_answers_parse_and_unparseable_ones_are_none():
    assert parse_answer("True.") == "True" and parse_answer(" false") == "False"
    assert parse_answer("The statement is false") == "False" and parse_answer("yes, it is") == "True"
    assert parse_answer("Left: a red circle") is None and parse_answer("") is None


def test_lil_lab_directory_loads_with_manifest_and_sha_check(samples_dir, nlvr_data, tmp_path):
    dataset = NlvrDataset.open(nlvr_data)
    source_rows = {s: sum(1 for _ in open(samples_dir / "nlvr" / f"{s}.json")) for s in ("train", "dev", "test1")}
    assert dataset.splits == source_rows and dataset.manifest["bad_rows"] == 0
    assert dataset.manifest["source_kind"] == "lil-lab" and "{sentence}" in dataset.prompt
    assert dataset.manifest["created_at"] and all(len(f["sha256"]) == 64 for f in dataset.manifest["files"].values())
    row = dataset.find(["dev-160-0-1"])[0]
    assert row["label"] in ("True", "False") and row["image0"][:4] == b"\x89PNG"
    assert (row["image0_width"], row["image0_height"]) == (96, 96) and row["phenomenon"]
    # set ids never cross splits
    sets = {s: {e["set_id"] for e in dataset.examples(s)} for s in dataset.splits}
    assert not (sets["train"] & sets["dev"]) and not (sets["train"] & sets["test1"])
    assert verify_dataset(nlvr_data)["changed"] == []

    # a copy whose part is altered: --verify names it; re-running rebuilds and says what changed
    copy = tmp_path / "copy"
    shutil.copytree(nlvr_data, copy)
    part = copy / "dev" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:-10] + b"0123456789")
    assert verify_dataset(copy)["changed"] == ["dev/part-00000.parquet"]
    report = prepare(DataConfig(source=str(samples_dir / "nlvr"), out=str(copy), splits=("dev",)))
    assert report["verify"]["changed"] == ["dev/part-00000.parquet"]
    assert report["changes"]["changed"] == [] and report["changes"]["added"] == []
    assert "train/part-00000.parquet" in report["changes"]["removed"]  # only dev was asked for this time
    assert verify_dataset(copy)["changed"] == [] and NlvrDataset.open(copy).splits == {"dev": source_rows["dev"]}


def test_bad_rows_are_listed_with_reasons_and_skipped(samples_dir, tmp_path):
    src = tmp_path / "lil"
    (src / "dev").mkdir(parents=True)
    lines = [json.loads(line) for line in open(samples_dir / "nlvr" / "dev.json")][:8]
    for row in lines[:4]:
        stem = "-".join(row["identifier"].split("-")[:3])
        for k in (0, 1):
            shutil.copy(samples_dir / "nlvr" / "images" / "dev" / f"{stem}-img{k}.png", src / "dev")
    lines[1]["label"] = "maybe"
    (src / "dev" / ("-".join(lines[2]["identifier"].split("-")[:3]) + "-img1.png")).write_bytes(b"not an image")
    (src / "dev.json").write_text("".join(json.dumps(r) + "\n" for r in lines) + "{broken\n")
    report = prepare(DataConfig(source=str(src), out=str(tmp_path / "data")))
    bad = [json.loads(line) for line in open(report["bad_rows_file"])]
    reasons = {b["identifier"]: b["reason"] for b in bad}
    assert "unknown label 'maybe'" in reasons[lines[1]["identifier"]]
    assert "undecodable image" in reasons[lines[2]["identifier"]]
    assert all("missing image" in reasons[r["identifier"]] for r in lines[4:])  # images never copied
    assert any("not JSON" in r for r in reasons.values())
    good = {r["identifier"] for r in NlvrDataset.open(tmp_path / "data").examples("dev")}
    assert report["bad_rows"] == len(bad) and good and not good & set(reasons)


def test_hub_shaped_parquet_export_loads(nlvr_data, tmp_path):
    """A local export shaped like pingzhili/nlvr2: identifier, sentence, label, image0/image1 structs."""
    rows = NlvrDataset.open(nlvr_data).rows("dev")[:24]
    table = pa.table({"identifier": [r["identifier"] for r in rows], "sentence": [r["sentence"] for r in rows],
                      "label": [r["label"] for r in rows],
                      "image0": [{"bytes": r["image0"], "path": "a.png"} for r in rows],
                      "image1": [{"bytes": r["image1"], "path": "b.png"} for r in rows]})
    (tmp_path / "export" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "export" / "data" / "validation-00000-of-00001.parquet")
    report = prepare(DataConfig(source=str(tmp_path / "export"), out=str(tmp_path / "data")))
    assert report["source_kind"] == "export" and report["splits"] == {"validation": 24} and report["bad_rows"] == 0
    loaded = NlvrDataset.open(tmp_path / "data").rows("validation")
    assert [r["identifier"] for r in loaded] == [r["identifier"] for r in rows]
    assert loaded[5]["image1"] == rows[5]["image1"] and loaded[5]["label"] == rows[5]["label"]


def test_offline_hub_id_fails_with_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataSourceError) as err:
        prepare(DataConfig(source="pingzhili/nlvr2", out=str(tmp_path / "data"), limit=4))
    message = str(err.value)
    assert "pingzhili/nlvr2" in message and "lil-lab" in message and "Parquet/JSONL export" in message
    assert not (tmp_path / "data").exists()


def test_bookmarks_gallery_and_sample(nlvr_data, tmp_path, capsys):
    from vlmlab import bookmarks, nlvr_pages
    from vlmlab import nlvr_data as data_module

    marks = tmp_path / "marks.json"
    bookmarks.main(["add", "dev-160-0-0", "dev-161-2-1", "--note", "counting", "--file", str(marks)])
    bookmarks.main(["add", "dev-162-1-0", "--file", str(marks)])
    bookmarks.main(["remove", "dev-161-2-1", "--file", str(marks)])
    assert [b["uid"] for b in bookmarks.load_bookmarks(marks)] == ["dev-160-0-0", "dev-162-1-0"]
    capsys.readouterr()

    nlvr_pages.main(["--data", str(nlvr_data), "--bookmarks", "--bookmarks-file", str(marks), "--random", "3",
                     "--split", "dev", "--out", str(tmp_path / "gallery")])
    page = Path(json.loads(capsys.readouterr().out)["page"])
    text = page.read_text()
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert len(sources) == 2 * 5 and all((page.parent / s).is_file() for s in sources)
    assert "dev-160-0-0" in text and "dev-162-1-0" in text

    data_module.main(["dev-160-0-0", "--data", str(nlvr_data), "--export", str(tmp_path / "pair")])
    meta = json.loads(capsys.readouterr().out)
    assert meta["identifier"] == "dev-160-0-0" and "image0" not in meta
    assert [Path(p).name for p in meta["exported"]] == ["dev-160-0-img0.png", "dev-160-0-img1.png"]
