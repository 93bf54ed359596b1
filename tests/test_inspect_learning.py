"""train inspect learns on the model it is given, and says so loudly when it did not.

On a real-photo condition set (skimage textures with drawn defects) the tiny CLIP is at chance
zero-shot. The lab's ViT-L/14 learning rate (2e-5) moves nothing in a tiny tower: the run keeps the
zero-shot head and must say so (console and evaluation.json); the default, scaled to the model's
width, must beat zero-shot on the held-out test crops.
"""

from __future__ import annotations

import json

import pytest

from training.inspection import InspectConfig, learning_rate_for, train_inspect

GAIN_FLOOR = 0.12  # measured +0.27 test accuracy over zero-shot (0.167 -> 0.438) with the defaults, 6 classes


@pytest.mark.slow
def test_a_run_that_learns_nothing_says_so(ray_local, textures_dir, tiny_model, tmp_path, capsys):
    from vlmlab.cli import main

    data = textures_dir / "data.yaml"
    main(["train", "inspect", "--data", str(data), "--model", tiny_model, "--run-dir", str(tmp_path),
          "--name", "recipe", "--workers", "1", "lr=2e-5", "epochs=2"])
    out = capsys.readouterr().out
    assert "did not beat zero-shot" in out and "NOT fine-tuned" in out
    result = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert result["kept"] == "zero-shot" and result["best_epoch"] == -1
    main(["evaluate", "inspect", "--run", str(tmp_path / "recipe"), "--split", "test"])
    assert "zero-shot head" in capsys.readouterr().out
    evaluation = json.loads((tmp_path / "recipe" / "evaluation.json").read_text())
    assert evaluation["kept"] == "zero-shot" and evaluation["best_val_accuracy"] == evaluation[
        "zero_shot_val_accuracy"]


@pytest.mark.slow
def test_the_default_recipe_beats_zero_shot_on_real_photos(ray_local, textures_dir, tiny_model, tmp_path):
    from training.inspect_eval import InspectEvalConfig, evaluate_inspect
    from vlmlab.models import load_model

    cfg = InspectConfig(data=str(textures_dir / "data.yaml"), model=tiny_model, run_dir=str(tmp_path),
                        name="defaults", epochs=8)
    assert cfg.lr == 0  # the default: scaled to the model
    out = train_inspect(cfg)
    assert out["kept"] == "fine-tuned"
    assert out["metrics"]["peak_lr"] == pytest.approx(learning_rate_for(load_model(tiny_model)))
    evaluation = evaluate_inspect(InspectEvalConfig(run=str(out["log_dir"]), split="test"))
    tuned, zero = evaluation["fine_tuned"]["accuracy"], evaluation["zero_shot"]["accuracy"]
    print(f"textures test accuracy: zero-shot {zero:.3f}, default recipe {tuned:.3f}")
    assert tuned > zero + GAIN_FLOOR
