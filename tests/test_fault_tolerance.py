"""A worker of a 2-worker MultiWorkerMirroredStrategy job dies: the job stops, and resumes.

Through the local launcher, ``examples/train.py --strategy=multi_worker`` on the digits, with
three batch-size phases (16, 32, 64) and a checkpoint every 10 steps. One worker gets SIGKILL in
the middle of the second phase; the launcher must stop the other one within a bounded time
(fail-fast: SIGTERM, then SIGKILL after ``--grace_seconds``; the survivor also fails by itself
within ~10 s, when TensorFlow's coordination service misses the dead worker's heartbeats). The
same command run again resumes from the chief's last checkpoint on both workers and must end
like an uninterrupted run: same parameter updates, epochs, phases and final weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "examples" / "train.py")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0"}
ENV.pop("TF_CONFIG", None)
ARGS = [
    "--strategy=multi_worker",
    "--epochs=6",
    "--decay_epochs=2,4",
    "--global_batch_size=16",
    "--base_batch_size=16",
    "--warmup_epochs=1",
    "--verbose=0",
    "--checkpoint_every_steps=10",
]
SECOND_PHASE_SECOND_EPOCH = 2 * 89 + 44  # first step of epoch 3 (batch 32, 44 steps/epoch)
STOP_SECONDS = 30  # bound on kill → launcher exit (grace 5 s + TensorFlow's ~10 s heartbeat)

pytestmark = pytest.mark.slow


PREEMPT_GRACE_SECONDS = 60  # SIGTERM → checkpoint → exit must fit in it


def command(model_dir: Path, grace_seconds: float = 5) -> list[str]:
    launcher = [sys.executable, "-m", "tf_largebatch.launch", "--num_workers=2"]
    grace = f"--grace_seconds={grace_seconds}"
    return [*launcher, grace, "--", TRAIN, f"--model_dir={model_dir}", *ARGS]


def run(model_dir: Path) -> dict:
    proc = subprocess.run(
        command(model_dir), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((model_dir / "results.json").read_text())


def workers(launcher_pid: int) -> dict[int, int]:
    """Worker index → pid, for the launcher's child processes (from /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if parent != launcher_pid:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        tf_config = [e for e in environ if e.startswith(b"TF_CONFIG=")]
        if tf_config:
            found[json.loads(tf_config[0][len("TF_CONFIG=") :])["task"]["index"]] = int(
                stat.parent.name
            )
    return found


def latest_checkpoint_step(model_dir: Path) -> int:
    steps = [
        int(p.name[len("ckpt-") : -len(".index")]) for p in model_dir.glob("ckpt/ckpt-*.index")
    ]
    return max(steps, default=-1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return run(tmp_path_factory.mktemp("whole"))


@pytest.mark.parametrize("victim", [1, 0], ids=["worker1", "chief"])
def test_killed_worker_stops_the_job_and_the_rerun_resumes(tmp_path, uninterrupted, victim):
    model_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        command(model_dir),
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while latest_checkpoint_step(model_dir) <= SECOND_PHASE_SECOND_EPOCH:
            assert launcher.poll() is None, "the job ended before the kill"
            assert time.monotonic() < deadline, "no checkpoint inside the second phase"
            time.sleep(0.05)
        pids = workers(launcher.pid)
        assert sorted(pids) == [0, 1]
        os.kill(pids[victim], signal.SIGKILL)
        killed_at = time.monotonic()
        status = launcher.wait(timeout=STOP_SECONDS)
        stopped_after = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:  # only on failure: do not leave the job running
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert status == 128 + signal.SIGKILL  # the launcher reports the killed worker
    assert stopped_after < STOP_SECONDS
    time.sleep(0.5)
    assert not any(alive(pid) for pid in pids.values())  # the survivor was stopped too
    assert not (model_dir / "results.json").exists()
    killed_step = latest_checkpoint_step(model_dir)
    assert SECOND_PHASE_SECOND_EPOCH < killed_step < uninterrupted["parameter_updates"]

    resumed = run(model_dir)  # the same command again
    assert resumed["parameter_updates"] == uninterrupted["parameter_updates"] == 310
    assert resumed["epochs_completed"] == uninterrupted["epochs_completed"] == 6
    assert [h["epoch"] for h in resumed["history"]] == list(range(6))
    assert [p["global_batch_size"] for p in resumed["phases"]] == [16, 32, 64]
    assert resumed["weights_sha256"] == uninterrupted["weights_sha256"]
    assert resumed["test_accuracy"] == uninterrupted["test_accuracy"]
    assert not list(model_dir.glob(".tmp_*"))  # the non-chief's temporary checkpoints are gone


@pytest.mark.parametrize("target", ["launcher", "worker1"])
def test_sigterm_saves_at_the_step_reached_and_the_rerun_loses_nothing(
    tmp_path, uninterrupted, target
):
    """Preemption: SIGTERM to the launcher (forwarded to both workers) or to one worker (its
    peer is stopped with SIGTERM by the launcher): every worker checkpoints and exits 143."""
    model_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        command(model_dir, grace_seconds=PREEMPT_GRACE_SECONDS),
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while latest_checkpoint_step(model_dir) <= SECOND_PHASE_SECOND_EPOCH:
            assert launcher.poll() is None, "the job ended before the signal"
            assert time.monotonic() < deadline, "no checkpoint inside the second phase"
            time.sleep(0.05)
        pids = workers(launcher.pid)
        assert sorted(pids) == [0, 1]
        os.kill(launcher.pid if target == "launcher" else pids[1], signal.SIGTERM)
        signalled_at = time.monotonic()
        out, _ = launcher.communicate(timeout=PREEMPT_GRACE_SECONDS + 30)
        stopped_after = time.monotonic() - signalled_at
    finally:
        if launcher.poll() is None:  # only on failure: do not leave the job running
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode == 128 + signal.SIGTERM, out[-4000:]
    assert stopped_after < PREEMPT_GRACE_SECONDS  # nobody needed SIGKILL
    assert "SIGKILL" not in out
    time.sleep(0.5)
    assert not any(alive(pid) for pid in pids.values())
    assert not (model_dir / "results.json").exists()
    saved_step = latest_checkpoint_step(model_dir)
    assert SECOND_PHASE_SECOND_EPOCH < saved_step < uninterrupted["parameter_updates"]

    resumed = run(model_dir)  # the same command again
    assert resumed["parameter_updates"] == uninterrupted["parameter_updates"] == 310
    assert [h["epoch"] for h in resumed["history"]] == list(range(6))
    assert resumed["weights_sha256"] == uninterrupted["weights_sha256"]
