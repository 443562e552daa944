"""tf_largebatch.cluster_env and the deploy/ files: TF_CONFIG from Kubernetes and Slurm variables,
the Indexed Job manifest, the Slurm batch script."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tf_largebatch.cluster_env import indexed_job_tf_config, main, tf_config_from_env

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "deploy" / "kubernetes" / "indexed-job.yaml"
SBATCH = ROOT / "deploy" / "slurm" / "train.sbatch"
POD = {  # what Kubernetes (JOB_COMPLETION_INDEX, HOSTNAME) and the manifest (the rest) set
    "JOB_COMPLETION_INDEX": "2",
    "HOSTNAME": "r50-2",
    "NUM_WORKERS": "3",
    "JOB_NAME": "r50",
    "SERVICE_NAME": "r50-svc",
}
WORKERS = ["r50-0.r50-svc:2222", "r50-1.r50-svc:2222", "r50-2.r50-svc:2222"]


def test_indexed_job_tf_config():
    config = indexed_job_tf_config(POD)
    assert config == {"cluster": {"worker": WORKERS}, "task": {"type": "worker", "index": 2}}
    assert indexed_job_tf_config(POD, port=9000)["cluster"]["worker"][0] == "r50-0.r50-svc:9000"
    assert indexed_job_tf_config({**POD, "WORKER_PORT": "7777"})["cluster"]["worker"][1] == (
        "r50-1.r50-svc:7777"
    )
    # Without JOB_NAME the job is the pod hostname minus "-<index>"; the service defaults to it.
    bare = {"JOB_COMPLETION_INDEX": "0", "HOSTNAME": "my-job-0", "NUM_WORKERS": "2"}
    assert indexed_job_tf_config(bare)["cluster"]["worker"] == [
        "my-job-0.my-job:2222",
        "my-job-1.my-job:2222",
    ]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"JOB_COMPLETION_INDEX": "3"}, "task_index.*Received: task_index=3"),
        ({"NUM_WORKERS": None}, "NUM_WORKERS must be an integer.*None"),
        ({"NUM_WORKERS": "0"}, "NUM_WORKERS.*Received: NUM_WORKERS=0"),
        ({"JOB_COMPLETION_INDEX": "x"}, "JOB_COMPLETION_INDEX must be an integer.*'x'"),
        ({"JOB_NAME": None, "HOSTNAME": None}, "JOB_NAME"),
        ({"WORKER_PORT": "70000"}, "port=70000"),
    ],
)
def test_indexed_job_bad_environment(change, message):
    env = {k: v for k, v in {**POD, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        indexed_job_tf_config(env)


def test_tf_config_from_slurm_and_existing_and_none():
    slurm = {
        "SLURM_PROCID": "1",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    }
    assert tf_config_from_env(slurm, port=8888) == {
        "cluster": {"worker": ["gpu07:8888", "gpu08:8888"]},
        "task": {"type": "worker", "index": 1},
    }
    existing = {"cluster": {"worker": ["h:1", "h:2"]}, "task": {"type": "worker", "index": 0}}
    assert tf_config_from_env({"TF_CONFIG": json.dumps(existing)}) == existing
    assert tf_config_from_env({**POD, **slurm})["cluster"]["worker"] == WORKERS  # k8s first
    with pytest.raises(ValueError, match="No cluster found"):
        tf_config_from_env({})
    with pytest.raises(ValueError, match="Invalid TF_CONFIG"):
        tf_config_from_env({"TF_CONFIG": "{not json"})


def test_entrypoint_execs_the_command_with_tf_config():
    """The command replaces the entrypoint process (same pid) and sees TF_CONFIG."""
    show = "import json, os; print(json.dumps([os.getpid(), json.loads(os.environ['TF_CONFIG'])]))"
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tf_largebatch.cluster_env", "--", sys.executable, "-c", show],
        env={**env, **POD, "TF_CPP_MIN_LOG_LEVEL": "3"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    pid, config = json.loads(out.strip().splitlines()[-1])
    assert pid == proc.pid
    assert config["cluster"]["worker"] == WORKERS and config["task"]["index"] == 2
    assert "cluster_env: TF_CONFIG=" in err


def test_entrypoint_errors(capsys, monkeypatch):
    for name in ("JOB_COMPLETION_INDEX", "SLURM_PROCID", "TF_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--", "true"]) == 2
    assert "cluster_env: error: No cluster found" in capsys.readouterr().err
    for key, value in POD.items():
        monkeypatch.setenv(key, value)
    assert main(["--print"]) == 0
    assert json.loads(capsys.readouterr().out)["cluster"]["worker"] == WORKERS
    with pytest.raises(SystemExit):
        main([])  # no command


def _documents(text: str) -> list[str]:
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return [doc for doc in body.split("\n---\n") if doc.strip()]


def _value(doc: str, key: str) -> str:
    match = re.search(rf"^[\s-]*{key}:\s*(\S+)", doc, re.MULTILINE)
    assert match, f"{key} missing"
    return match.group(1).strip('"')


def test_manifest_is_an_indexed_job_with_a_headless_service():
    """Checked as text (no YAML parser is a dependency); see the next test for a full parse."""
    text = MANIFEST.read_text()
    assert "\t" not in text
    service, job = _documents(text)
    assert _value(service, "kind") == "Service" and _value(job, "kind") == "Job"
    assert _value(service, "clusterIP") == "None"
    name = _value(job, "name")
    assert _value(service, "name") == name == _value(service, "job-name")
    assert _value(job, "completionMode") == "Indexed"
    workers = _value(job, "completions")
    assert _value(job, "parallelism") == workers
    env = dict(re.findall(r"- name: (\w+)\s+value: \"?([^\"\s]+)\"?", job))
    assert env["NUM_WORKERS"] == workers and env["JOB_NAME"] == name
    assert env["SERVICE_NAME"] == _value(job, "subdomain") == _value(service, "name")
    assert env["WORKER_PORT"] == _value(service, "port") == _value(job, "containerPort")
    command = re.findall(r"^\s+- (\S+)$", job.split("command:")[1].split("env:")[0], re.MULTILINE)
    assert command[:4] == ["python", "-m", "tf_largebatch.cluster_env", "--"]
    assert "--strategy=multi_worker" in command and (ROOT / command[5]).exists()


def test_manifest_parses_as_yaml():
    yaml = pytest.importorskip("yaml")
    service, job = yaml.safe_load_all(MANIFEST.read_text())
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    assert pod["containers"][0]["command"][2] == "tf_largebatch.cluster_env"


def test_sbatch_script():
    assert shutil.which("bash")
    proc = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = SBATCH.read_text()
    assert re.search(r"^#SBATCH --nodes=\d+", text, re.MULTILINE)
    assert "srun --kill-on-bad-exit=1" in text and "--strategy=multi_worker" in text
    assert "-m tf_largebatch.cluster_env" in text
    assert (ROOT / "examples" / "imagenet_resnet50.py").exists()


def test_sbatch_restarts_a_failed_step_and_passes_arguments(tmp_path):
    """Runs the script with a fake srun that fails once, then succeeds."""
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    fake.write_text(
        '#!/bin/bash\necho "$*" >> "$LOG"\n'
        '[ "$(wc -l < "$LOG")" -ge 2 ]\n'  # the first call fails, the second succeeds
    )
    fake.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{fake.parent}:{os.environ['PATH']}",
        "LOG": str(tmp_path / "calls"),
        "MODEL_DIR": str(tmp_path / "run"),
        "DATA_DIR": "/data/tfds",
        "RESTART_DELAY": "0",
        "SLURM_JOB_NAME": "t",
    }
    proc = subprocess.run(
        ["bash", str(SBATCH), "--epochs=2"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2 and "restart 1/2" in proc.stderr
    assert calls[0].startswith("--kill-on-bad-exit=1 --distribution=block")
    assert "-m tf_largebatch.cluster_env --port=8888 -- " in calls[0]
    assert "--port=8904" in calls[1]  # a new port for the restart
    assert calls[0].endswith(
        f"examples/imagenet_resnet50.py --strategy=multi_worker --data_dir=/data/tfds "
        f"--model_dir={tmp_path / 'run'} --epochs=2"
    )
    env["MAX_RESTARTS"] = "0"
    (tmp_path / "calls").unlink()
    proc = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "failed after 0 restarts" in proc.stderr
