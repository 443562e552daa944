"""Preemption wiring in deploy/: the Slurm script forwards SIGTERM, the manifest's grace period.

The Slurm script runs with a fake ``srun`` (a Python script that traps SIGTERM like a training
worker: it "saves" and exits 143); the Kubernetes manifest is parsed as YAML.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "deploy" / "slurm" / "train.sbatch"
MANIFEST = ROOT / "deploy" / "kubernetes" / "indexed-job.yaml"
README = ROOT / "deploy" / "README.md"

FAKE_SRUN = f"""#!{sys.executable}
import os, signal, sys, time
log = os.environ["LOG"]
with open(log, "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
def on_sigterm(signum, frame):
    time.sleep(0.5)  # "saving a checkpoint"
    with open(log + ".saved", "w") as f:
        f.write("saved")
    sys.exit(143)
signal.signal(signal.SIGTERM, on_sigterm)
open(log + ".started", "w").close()
time.sleep(30)
sys.exit(0)
"""


@pytest.fixture()
def slurm_env(tmp_path):
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    fake.write_text(FAKE_SRUN)
    fake.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{fake.parent}:{os.environ['PATH']}",
        "LOG": str(tmp_path / "calls"),
        "MODEL_DIR": str(tmp_path / "run"),
        "RESTART_DELAY": "0",
        "SLURM_JOB_NAME": "t",
    }


def _wait_for(path: Path, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_sbatch_asks_for_a_sigterm_before_the_time_limit():
    text = SBATCH.read_text()
    assert re.search(r"^#SBATCH --signal=B:TERM@120$", text, re.MULTILINE)
    assert "trap on_sigterm TERM" in text


def test_sbatch_forwards_sigterm_and_does_not_restart(tmp_path, slurm_env):
    script = subprocess.Popen(
        ["bash", str(SBATCH), "--epochs=2"],
        env=slurm_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(tmp_path / "calls.started")
    start = time.monotonic()
    script.send_signal(signal.SIGTERM)  # what --signal=B:TERM does
    out, err = script.communicate(timeout=30)
    assert script.returncode == 143, err
    assert time.monotonic() - start < 10  # not the fake's 30 s sleep
    assert (tmp_path / "calls.saved").read_text() == "saved"  # srun got SIGTERM and finished
    assert len((tmp_path / "calls").read_text().splitlines()) == 1  # no restart
    assert "SIGTERM: forwarding it to the workers (they checkpoint and exit 143)" in err
    assert f"preempted (step exit status 143): resume from {tmp_path / 'run'}" in err
    assert "done:" not in out


def test_sbatch_still_finishes_normally(tmp_path, slurm_env):
    fake = Path(slurm_env["PATH"].split(":")[0]) / "srun"
    fake.write_text('#!/bin/bash\necho "$*" >> "$LOG"\n')
    proc = subprocess.run(
        ["bash", str(SBATCH)], env=slurm_env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(f"done: {tmp_path / 'run'}/results.json")


def test_manifest_grace_period_and_preemption_policy():
    yaml = pytest.importorskip("yaml")
    _, job = yaml.safe_load_all(MANIFEST.read_text())
    pod = job["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 120
    assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy
    (rule,) = job["spec"]["podFailurePolicy"]["rules"]
    assert rule == {
        "action": "Ignore",
        "onExitCodes": {"containerName": "worker", "operator": "In", "values": [143]},
    }
    assert pod["containers"][0]["name"] == "worker"


def test_readme_documents_the_exit_statuses():
    text = README.read_text()
    for needle in ("143", "137", "124", "130", "--grace_seconds", "--signal=B:TERM@120",
                   "terminationGracePeriodSeconds"):  # fmt: skip
        assert needle in text, needle
