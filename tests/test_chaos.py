"""Chaos and elasticity, end to end through the local launcher and `examples/train.py`.

- Chaos: a 2-worker MultiWorkerMirroredStrategy run on the digits in which a random worker is
  SIGKILLed at a random moment three times, restarted each time by the same command, ends with
  the plan's update count and the same weights as an uninterrupted run.
- Elasticity: a run preempted on 2 workers resumes on 1 process (and one preempted on 1 device
  resumes on 2 workers) and ends with the uninterrupted run's weights (relative 1e-4).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "examples" / "train.py")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0"}
ENV.pop("TF_CONFIG", None)
ARGS = ["--epochs=4", "--decay_epochs=2", "--global_batch_size=16", "--base_batch_size=16",
        "--warmup_epochs=1", "--verbose=0", "--checkpoint_every_steps=10"]  # fmt: skip
UPDATES = 2 * 89 + 2 * 44  # 266

pytestmark = pytest.mark.slow


def launcher(model_dir: Path, workers: int = 2) -> list[str]:
    if workers == 1:
        return [sys.executable, TRAIN, "--strategy=one_device", f"--model_dir={model_dir}", *ARGS]
    return [sys.executable, "-m", "tf_largebatch.launch", f"--num_workers={workers}",
            "--grace_seconds=30", "--", TRAIN, "--strategy=multi_worker",
            f"--model_dir={model_dir}", *ARGS]  # fmt: skip


def run(command: list[str]) -> None:
    done = subprocess.run(command, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def results(model_dir: Path) -> dict:
    return json.loads((model_dir / "results.json").read_text())


def latest_step(model_dir: Path) -> int:
    steps = [int(p.name[5:-6]) for p in model_dir.glob("ckpt/ckpt-*.index")]
    return max(steps, default=-1)


def worker_pids(launcher_pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == launcher_pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def interrupt(command: list[str], model_dir: Path, after_step: int, sig: int, pick) -> int:
    """Starts `command`, waits for a checkpoint past `after_step`, sends `sig` to pick(pids)."""
    proc = subprocess.Popen(command, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while latest_step(model_dir) <= after_step:
            assert proc.poll() is None, "the job ended before the interruption"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        targets = worker_pids(proc.pid) if "launch" in command else [proc.pid]
        os.kill(pick(targets), sig)
        return proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("whole")
    run(launcher(model_dir))
    return model_dir


def test_three_random_kills_end_like_the_uninterrupted_run(tmp_path, uninterrupted):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    model_dir = tmp_path / "chaos"
    reached = 0
    for _ in range(3):
        time.sleep(rng.uniform(0, 1.0))
        status = interrupt(launcher(model_dir), model_dir, reached, signal.SIGKILL, rng.choice)
        assert status != 0, f"seed {seed}"
        reached = latest_step(model_dir)
        assert 0 < reached < UPDATES, f"seed {seed}"
    run(launcher(model_dir))  # the same command, a fourth time: it finishes
    got, want = results(model_dir), results(uninterrupted)
    assert got["parameter_updates"] == want["parameter_updates"] == UPDATES, f"seed {seed}"
    assert got["weights_sha256"] == want["weights_sha256"], f"seed {seed}"


def weights(model_dir: Path) -> list[np.ndarray]:
    import keras

    return keras.models.load_model(model_dir / "model.keras", compile=False).get_weights()


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_preempted_run_resumes_on_another_worker_count(tmp_path, uninterrupted, before, after):
    model_dir = tmp_path / f"{before}to{after}"
    status = interrupt(launcher(model_dir, before), model_dir, 100, signal.SIGTERM, lambda p: p[0])
    assert status == 128 + signal.SIGTERM
    run(launcher(model_dir, after))
    assert results(model_dir)["parameter_updates"] == UPDATES
    for a, b in zip(weights(uninterrupted), weights(model_dir)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_workers_agree_on_every_epoch_end_checkpoint(tmp_path, uninterrupted):
    """With a zero interval each worker votes to save at every epoch end: both save together
    (a worker saving alone would hang on the other) and the run ends as the uninterrupted one."""
    model_dir = tmp_path / "every_epoch"
    command = launcher(model_dir)
    command[command.index("--checkpoint_every_steps=10")] = "--checkpoint_interval_seconds=0"
    run(command)
    got, want = results(model_dir), results(uninterrupted)
    assert got["weights_sha256"] == want["weights_sha256"]
    kept = sorted(int(p.name[5:-6]) for p in model_dir.glob("ckpt/ckpt-*.index"))
    assert kept == [UPDATES - 44, UPDATES]  # the last two epoch ends (2 kept; 44 steps each)
