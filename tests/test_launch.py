"""The local launcher: TF_CONFIG per worker, prefixed output, fail-fast, timeout, CLI.

Workers are tiny Python scripts written to tmp_path (about 50 ms each to start); one slow test runs
a real 2-worker MultiWorkerMirroredStrategy through the launcher.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tf_largebatch.distribute import build_tf_config
from tf_largebatch.launch import (
    TIMEOUT_EXIT_CODE,
    find_free_ports,
    launch,
    main,
    worker_tf_config,
)

REPO = Path(__file__).resolve().parents[1]

# Modes: print (TF_CONFIG, env, a stderr line), fail (worker 1 exits 3 once worker 0 is up),
# fail_stubborn (as fail, worker 0 ignores SIGTERM), sleep (all sleep), kill (worker 0 SIGKILLs
# itself once worker 1 is up). Sleeping workers write their pid to PID_DIR/<index>.pid.
WORKER = """
import json, os, signal, sys, time
config = json.loads(os.environ["TF_CONFIG"])
index = config["task"]["index"]
mode, pid_dir = sys.argv[1], sys.argv[2]
if mode == "print":
    print("index", index, "of", ",".join(config["cluster"]["worker"]), os.environ.get("EXTRA"))
    print("to stderr", index, file=sys.stderr, end="")
    sys.exit(0)
def wait_for_pid_file(other):
    deadline = time.time() + 20
    while not os.path.exists(os.path.join(pid_dir, f"{other}.pid")) and time.time() < deadline:
        time.sleep(0.02)
if mode == "kill" and index == 0:
    wait_for_pid_file(1)
    os.kill(os.getpid(), signal.SIGKILL)
if mode in ("fail", "fail_stubborn") and index == 1:
    wait_for_pid_file(0)
    sys.exit(3)
if mode == "fail_stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(os.path.join(pid_dir, f"{index}.tmp"), "w") as f:
    f.write(str(os.getpid()))
os.replace(os.path.join(pid_dir, f"{index}.tmp"), os.path.join(pid_dir, f"{index}.pid"))
time.sleep(60)
"""


@pytest.fixture()
def script(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_find_free_ports():
    ports = find_free_ports(3)
    assert len(set(ports)) == 3
    assert all(0 < port < 65536 for port in ports)
    with pytest.raises(ValueError, match="`n`.*Received: n=0"):
        find_free_ports(0)


def test_worker_tf_config_matches_build_tf_config():
    for index in range(3):
        expected = build_tf_config([f"127.0.0.1:{p}" for p in (5000, 5001, 5002)], index)
        assert worker_tf_config([5000, 5001, 5002], index) == expected


def test_two_workers_get_their_tf_config_and_prefixed_output(script, tmp_path, capsys):
    status = launch([str(script), "print", str(tmp_path)], 2, env={"EXTRA": "x"})
    assert status == 0
    lines = capsys.readouterr().out.splitlines()
    printed = {}
    for index in (0, 1):
        (line,) = [s for s in lines if s.startswith(f"[worker {index}] index ")]
        _, got, _, workers, extra = line.removeprefix(f"[worker {index}] ").split(" ")
        printed[index] = workers
        assert (int(got), extra) == (index, "x")
        assert f"[worker {index}] to stderr {index}" in lines  # stderr merged, newline added
    assert printed[0] == printed[1]
    addresses = printed[0].split(",")
    assert len(set(addresses)) == 2
    assert all(a.startswith("127.0.0.1:") for a in addresses)
    assert len(lines) == 4


def test_no_prefix_and_port_base(script, tmp_path, capsys):
    assert launch([str(script), "print", str(tmp_path)], 2, prefix=False, port_base=20000) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(lines) == [
        "index 0 of 127.0.0.1:20000,127.0.0.1:20001 None",
        "index 1 of 127.0.0.1:20000,127.0.0.1:20001 None",
        "to stderr 0",
        "to stderr 1",
    ]


@pytest.mark.parametrize("mode", ["fail", "fail_stubborn"])
def test_failing_worker_stops_the_others(script, tmp_path, mode):
    start = time.monotonic()
    status = launch([str(script), mode, str(tmp_path)], 2, grace_seconds=1.0)
    elapsed = time.monotonic() - start
    assert status == 3
    assert elapsed < 10  # the sibling sleeps 60 s
    assert _gone(int((tmp_path / "0.pid").read_text()))


def test_worker_killed_by_signal(script, tmp_path):
    status = launch([str(script), "kill", str(tmp_path)], 2, grace_seconds=1.0)
    assert status == 128 + signal.SIGKILL
    assert _gone(int((tmp_path / "1.pid").read_text()))


def test_timeout_stops_everything(script, tmp_path):
    start = time.monotonic()
    status = launch([str(script), "sleep", str(tmp_path)], 2, timeout_seconds=1.5)
    elapsed = time.monotonic() - start
    assert status == TIMEOUT_EXIT_CODE
    assert 1.5 <= elapsed < 10
    assert all(_gone(int((tmp_path / f"{i}.pid").read_text())) for i in (0, 1))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"script_argv": "train.py"}, "script_argv"),
        ({"script_argv": []}, "script_argv"),
        ({"num_workers": 0}, "num_workers"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
        ({"grace_seconds": -1}, "grace_seconds"),
        ({"port_base": -1}, "port_base"),
        ({"port_base": 65535}, "port_base"),
    ],
)
def test_launch_rejects(kwargs, name):
    args = {"script_argv": ["train.py"], "num_workers": 2, **kwargs}
    with pytest.raises(ValueError, match=f"`{name}`.*Received: {name}="):
        launch(**args)


def test_main_script_form(script, tmp_path, capsys):
    argv = ["--num_workers=2", "--timeout_seconds=30", "--", str(script), "print", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[worker 0] index 0 of" in out and "[worker 1] index 1 of" in out


def test_main_module_form(script, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert main(["--num_workers=2", "--", "-m", "worker", "print", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[worker 0] index 0 of" in out and "[worker 1] index 1 of" in out


def test_main_fail_and_usage_errors(script, tmp_path):
    assert (
        main(["--num_workers=2", "--grace_seconds=1", "--", str(script), "fail", str(tmp_path)])
        == 3
    )
    assert main(["--num_workers=0", "--", str(script)]) == 2
    with pytest.raises(SystemExit) as info:
        main(["--num_workers=2"])
    assert info.value.code == 2


@pytest.mark.slow
def test_multi_worker_mirrored_strategy_smoke(capsys):
    """Two real MWMS workers over loopback: one all-reduce and one synchronous SGD step."""
    worker = str(REPO / "tests" / "_mw_worker.py")
    env = {"PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.monotonic()
    status = launch([worker, "ring"], 2, env=env, timeout_seconds=120)
    out = capsys.readouterr().out
    assert status == 0, out
    assert time.monotonic() - start < 120
    results = {}
    for line in out.splitlines():
        if "] RESULT " in line:
            prefix, payload = line.split(" RESULT ", 1)
            results[prefix] = json.loads(payload)
    assert sorted(results) == ["[worker 0]", "[worker 1]"], out
    for index in (0, 1):
        result = results[f"[worker {index}]"]
        assert result["task"] == ["worker", index]
        assert result["is_chief"] is result["should_checkpoint"] is (index == 0)
        assert result["num_replicas"] == 2
        assert result["rank_sum"] == 3.0  # (0 + 1) + (1 + 1)
        assert result["grad"] == pytest.approx(2.5)  # w (1² + 2²) / 2 with w = 1
        assert result["w"] == pytest.approx(0.75)  # 1 - 0.1 * 2.5, the same on both workers


def test_cli_runs_as_module(script, tmp_path):
    """``python -m tf_largebatch.launch`` end to end (exit status of the process)."""
    command = [sys.executable, "-m", "tf_largebatch.launch", "--num_workers=2", "--"]
    done = subprocess.run(
        [*command, str(script), "fail", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 3
    assert "Worker 1 exited with 3" in done.stderr
