"""Training under faults: a killed Ray Train worker restarts the run from its last checkpoint (DDP and
DeepSpeed, optimizer moments included), and a killed driver's run resumes when relaunched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from training.lora import LoraTrainConfig, train_lora
from training.run import RESUMES_FILE, read_training_log

REPO = Path(__file__).resolve().parents[2]
STEPS, EPOCHS = 4, 2


def _config(pairs, model, run_dir, name, strategy) -> LoraTrainConfig:
    return LoraTrainConfig(pairs=str(pairs), model=model, run_dir=str(run_dir), name=name, strategy=strategy,
                           workers=2, cpus_per_worker=0.5, epochs=EPOCHS, steps_per_epoch=STEPS, batch_size=8,
                           lr=2e-3, warmup_steps=1, fine_grained_weight=0.0, zero_stage=2, seed=0)


def _wait_for(predicate, what: str, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.2)


def _first_checkpoint_registered(log_dir: Path) -> bool:
    snapshot = log_dir / "checkpoint_manager_snapshot.json"
    return snapshot.is_file() and "checkpoint_" in snapshot.read_text()


def _train_workers_of_this_ray() -> list:
    """The Ray Train worker processes of this test session's Ray (children of its raylet)."""
    import psutil
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    workers = []
    for child in psutil.Process(raylet).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "RayTrainWorker" in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.Error:  # exited while we looked
            continue
    return workers


def _adapter_tensors(adapter: Path):
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_a_killed_worker_restarts_from_the_last_checkpoint_and_ends_where_an_unbroken_run_ends(
        ray_local, relabelled_pairs, tiny_model, tmp_path, strategy):
    straight = train_lora(_config(relabelled_pairs, tiny_model, tmp_path, "straight", strategy))
    cfg = _config(relabelled_pairs, tiny_model, tmp_path, "killed", strategy)
    log_dir = tmp_path / "killed"
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(train_lora(cfg)))
    thread.start()
    _wait_for(lambda: _first_checkpoint_registered(log_dir), "the epoch-0 checkpoint")
    _wait_for(lambda: len(_train_workers_of_this_ray()) == 2, "the two train workers")
    victim = _train_workers_of_this_ray()[1]
    os.kill(victim.pid, signal.SIGKILL)
    thread.join(timeout=900)
    assert not thread.is_alive() and out["metrics"]["step"] == EPOCHS * STEPS
    # it picked up after epoch 0 (max_failures defaults to 1), not from scratch
    resumes = [json.loads(line) for line in (log_dir / RESUMES_FILE).read_text().splitlines()]
    assert len(resumes) == 1 and resumes[0]["epoch"] >= 1 and resumes[0]["step"] >= STEPS
    assert [r["step"] for r in read_training_log(tmp_path, "killed")] == list(range(1, EPOCHS * STEPS + 1))
    # weights, scheduler and optimizer moments (DeepSpeed: every rank's ZeRO partition) came back: the
    # restarted run ends where the unbroken one does; restarting Adam's moments would not
    killed, unbroken = _adapter_tensors(out["adapter"]), _adapter_tensors(straight["adapter"])
    assert killed.keys() == unbroken.keys()
    worst = max(float((killed[k] - unbroken[k]).abs().max()) for k in killed)
    moved = max(float(unbroken[k].abs().max()) for k in unbroken if "lora_B" in k)
    print(f"{strategy}: resumed at {resumes[0]}; largest difference to the unbroken run {worst:.2e} "
          f"(lora_B weights up to {moved:.2e})")
    assert moved > 1e-3 and worst < 1e-5


@pytest.mark.slow
def test_a_killed_driver_resumes_when_relaunched(ray_local, relabelled_pairs, tiny_model, tmp_path):
    import ray

    command = [sys.executable, "-m", "training.lora", "--pairs", str(relabelled_pairs), "--model", tiny_model,
               "--run-dir", str(tmp_path), "--name", "driver", "--workers", "1", "--cpus-per-worker", "0.5",
               f"epochs={EPOCHS}", f"steps_per_epoch={STEPS}", "batch_size=8", "fine_grained_weight=0"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    log_dir = tmp_path / "driver"
    first = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        _wait_for(lambda: _first_checkpoint_registered(log_dir), "the epoch-0 checkpoint")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # the killed driver's Train run ends with it; wait for its workers to be gone before relaunching
    _wait_for(lambda: not _train_workers_of_this_ray(), "the killed run's workers to exit")
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("{")))["metrics"]
    assert metrics["step"] == EPOCHS * STEPS
    resumes = [json.loads(line) for line in (log_dir / RESUMES_FILE).read_text().splitlines()]
    assert resumes and resumes[-1]["epoch"] >= 1

