"""training.run: a run is identified by what changes its result; relaunches resume, finished runs are
reported (never retrained), another run under the same name is refused, and every printed path exists."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from training.lora import LoraTrainConfig
from training.run import RunMismatchError, finish_run, identity, prepare_run, settings_of
from training.tune import LoraSearchConfig, claim_search


def test_prepare_run_resumes_the_same_run_refuses_another_and_reports_a_finished_one(tmp_path, relabelled_pairs):
    cfg = LoraTrainConfig(pairs=str(relabelled_pairs), model="open_clip:ViT-B-32", run_dir=str(tmp_path), name="r",
                          out=str(tmp_path / "A"), epochs=2)
    settings = settings_of(cfg)
    assert prepare_run(settings, identity(cfg, [cfg.pairs]), cfg.epochs) is None  # new: launch
    assert prepare_run(settings, identity(cfg, [cfg.pairs]), cfg.epochs) is None  # same, unfinished: resume
    other = replace(cfg, out=str(tmp_path / "B"), lr=1e-3)
    with pytest.raises(RunMismatchError, match=r"out: .*A.* -> .*B.*--name.*--fresh"):
        prepare_run(settings_of(other), identity(other, [other.pairs]), other.epochs)
    (tmp_path / "A").mkdir()
    finish_run(settings, {"step": 4}, {"adapter": tmp_path / "A"}, cfg.epochs)
    record = prepare_run(settings, identity(cfg, [cfg.pairs]), cfg.epochs)
    assert record["status"] == "finished" and record["metrics"] == {"step": 4}  # nothing to train
    assert prepare_run(settings, identity(cfg, [cfg.pairs]), 3) is None  # more epochs: extend the run
    with pytest.raises(RuntimeError, match="without writing"):
        finish_run(settings, {}, {"adapter": tmp_path / "missing"}, 3)
    # new data under the same name is another run too
    changed = tmp_path / "pairs.parquet"
    changed.write_bytes(Path(relabelled_pairs).read_bytes() + b"\0")
    moved = replace(cfg, pairs=str(changed))
    with pytest.raises(RunMismatchError, match="pairs"):
        prepare_run(settings, identity(moved, [moved.pairs]), 2)
    fresh = replace(other, fresh=True)
    assert prepare_run(settings_of(fresh), identity(fresh, [fresh.pairs]), 2) is None
    assert json.loads((tmp_path / "r" / "run.json").read_text())["identity"]["config"]["out"].endswith("B")


def test_another_search_under_the_same_name_is_refused(tmp_path, relabelled_pairs):
    cfg = LoraSearchConfig(run_dir=str(tmp_path), name="s", trial=LoraTrainConfig(pairs=str(relabelled_pairs)))
    claim_search(cfg, [str(relabelled_pairs)])
    claim_search(replace(cfg, max_concurrent_trials=4), [str(relabelled_pairs)])  # placement only: same search
    with pytest.raises(RunMismatchError, match="ranks.*fresh=true"):
        claim_search(replace(cfg, ranks=(32,)), [str(relabelled_pairs)])
    claim_search(replace(cfg, ranks=(32,), fresh=True), [str(relabelled_pairs)])


@pytest.mark.slow
def test_rerun_with_another_out_is_refused_and_printed_paths_exist(ray_local, relabelled_pairs, tiny_model,
                                                                   tmp_path, capsys, monkeypatch):
    from vlmlab.cli import main

    monkeypatch.chdir(tmp_path)  # relative --pairs/--model/--out, as a user types them
    Path("pairs.parquet").write_bytes(Path(relabelled_pairs).read_bytes())
    for folder in ("tiles", "synthetic"):  # the pairs' image paths are relative to the pairs file
        Path(folder).symlink_to(Path(relabelled_pairs).parent / folder)
    base = ["train", "lora", "--pairs", "pairs.parquet", "--model", str(tiny_model), "--workers", "1",
            "epochs=1", "steps_per_epoch=2", "batch_size=8", "fine_grained_weight=0"]

    def adapter_printed() -> Path:
        line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{"))
        return Path(json.loads(line)["adapter"])

    main([*base, "--out", "A"])
    first = adapter_printed()
    assert first == tmp_path / "A" and (first / "adapter_model.safetensors").is_file()
    with pytest.raises(SystemExit) as refused:
        main([*base, "--out", "B"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "--fresh" in err and "Traceback" not in err
    assert not (tmp_path / "B").exists()
    main([*base, "--out", "B", "--fresh"])
    second = adapter_printed()
    assert second == tmp_path / "B" and (second / "adapter_model.safetensors").is_file()
    checkpoints = sorted(Path("runs", "train").glob("checkpoint_*"))
    main([*base, "--out", "B"])  # the same, finished run: reported, not retrained
    assert adapter_printed() == second and sorted(Path("runs", "train").glob("checkpoint_*")) == checkpoints
