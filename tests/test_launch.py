"""The local launcher: TF_CONFIG per worker, prefixed output, fail-fast, timeout, CLI.

Workers are tiny Python scripts written to tmp_path (about 50 ms each to start); one slow test runs
a real 2-worker MultiWorkerMirroredStrategy through the launcher.
"""

import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tf_largebatch.distribute import build_tf_config
from tf_largebatch.launch import (
    DEFAULT_GRACE_SECONDS,
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


# A worker that traps SIGTERM like a preempted training worker: it writes <index>.term, takes
# DELAY[index] seconds "to save a checkpoint", writes <index>.saved and exits STATUS[index]
# (IGNORE: it ignores SIGTERM and never finishes). It writes <index>.pid once the handler is set.
TRAPPING_WORKER = """
import json, os, signal, sys, time
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
out_dir, delays, statuses = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
def touch(name):
    with open(os.path.join(out_dir, f"{index}.{name}"), "w") as f:
        f.write(str(time.time()))
def on_sigterm(signum, frame):
    touch("term")
    time.sleep(delays[index])
    touch("saved")
    sys.exit(statuses[index])
if statuses[index] == "IGNORE":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, on_sigterm)
with open(os.path.join(out_dir, f"{index}.tmp"), "w") as f:
    f.write(str(os.getpid()))
os.replace(os.path.join(out_dir, f"{index}.tmp"), os.path.join(out_dir, f"{index}.pid"))
time.sleep(60)
sys.exit(99)
"""


def _when_ready(out_dir, num_workers, action):
    """Runs `action` in a thread once every worker has written its pid file."""

    def wait_then_act():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all((out_dir / f"{i}.pid").exists() for i in range(num_workers)):
                break
            time.sleep(0.02)
        action()

    thread = threading.Thread(target=wait_then_act, daemon=True)
    thread.start()
    return thread


def _trapping(tmp_path, delays, statuses):
    path = tmp_path / "trap.py"
    path.write_text(TRAPPING_WORKER)
    return [str(path), str(tmp_path), json.dumps(delays), json.dumps(statuses)]


def test_stop_event_forwards_sigterm_and_waits_for_the_workers(tmp_path, capsys):
    """Worker 0 takes 1.5 s after SIGTERM and exits 143, worker 1 exits 0 at once."""
    argv = _trapping(tmp_path, [1.5, 0.0], [143, 0])
    stop = threading.Event()
    thread = _when_ready(tmp_path, 2, stop.set)
    start = time.monotonic()
    status = launch(argv, 2, grace_seconds=20.0, stop_event=stop, timeout_seconds=60)
    elapsed = time.monotonic() - start
    thread.join()
    assert status == 143  # worker 0's status; not the launcher's own
    for index in (0, 1):
        assert (tmp_path / f"{index}.term").exists() and (tmp_path / f"{index}.saved").exists()
    saved = float((tmp_path / "0.saved").read_text()) - float((tmp_path / "0.term").read_text())
    assert saved >= 1.5  # it was not killed while "saving"
    assert elapsed < 15  # it did not wait out the 20 s grace period either


def test_all_workers_exiting_0_after_sigterm_give_0(tmp_path):
    stop = threading.Event()
    thread = _when_ready(tmp_path, 2, stop.set)
    status = launch(_trapping(tmp_path, [0.2, 0.2], [0, 0]), 2, grace_seconds=20.0,
                    stop_event=stop, timeout_seconds=60)  # fmt: skip
    thread.join()
    assert status == 0 and (tmp_path / "1.saved").exists()


def test_worker_out_of_grace_is_killed(tmp_path):
    """Worker 0 ignores SIGTERM: SIGKILL after the grace period, status 137; worker 1 saved."""
    stop = threading.Event()
    thread = _when_ready(tmp_path, 2, stop.set)
    start = time.monotonic()
    status = launch(_trapping(tmp_path, [0.0, 0.0], ["IGNORE", 143]), 2, grace_seconds=1.0,
                    stop_event=stop, timeout_seconds=60)  # fmt: skip
    elapsed = time.monotonic() - start
    thread.join()
    assert status == 128 + signal.SIGKILL
    assert (tmp_path / "1.saved").exists() and not (tmp_path / "0.term").exists()
    assert 1.0 <= elapsed < 10
    assert _gone(int((tmp_path / "0.pid").read_text()))


def test_main_forwards_sigterm_sent_to_the_launcher(tmp_path):
    """The real signal path: SIGTERM to this (the launcher's) process during `main`."""
    argv = _trapping(tmp_path, [1.0, 0.0], [0, 143])
    thread = _when_ready(tmp_path, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    status = main(["--num_workers=2", "--grace_seconds=20", "--timeout_seconds=60", "--", *argv])
    thread.join()
    assert status == 143  # worker 1's status (worker 0 exited 0)
    assert (tmp_path / "0.saved").exists() and (tmp_path / "1.saved").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # main restored the handler


def test_default_grace_period():
    assert DEFAULT_GRACE_SECONDS == 60.0
    assert inspect.signature(launch).parameters["grace_seconds"].default == 60.0


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


@pytest.mark.slow  # `import tf_largebatch` imports TensorFlow (registers the Keras classes)
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


@pytest.mark.slow  # `import tf_largebatch` imports TensorFlow (registers the Keras classes)
def test_cli_sigterm_to_the_launcher_process(tmp_path):
    """As Slurm or Kubernetes preempt: SIGTERM to the launcher process, workers save, 143."""
    command = [sys.executable, "-m", "tf_largebatch.launch", "--num_workers=2"]
    argv = _trapping(tmp_path, [1.0, 0.5], [143, 143])
    launcher = subprocess.Popen(
        [*command, "--grace_seconds=30", "--timeout_seconds=120", "--", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    thread = _when_ready(tmp_path, 2, lambda: launcher.send_signal(signal.SIGTERM))
    out, err = launcher.communicate(timeout=120)
    thread.join()
    assert launcher.returncode == 143, err
    assert all((tmp_path / f"{i}.saved").exists() for i in (0, 1))
    assert "SIGTERM: forwarding it to the workers, waiting up to 30s for them." in err
    assert "Workers stopped with statuses [143, 143]; exiting 143." in err
