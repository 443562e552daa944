"""Runs N local workers, each with its own TF_CONFIG: ``python -m tf_largebatch.launch``.

Usage::

    python -m tf_largebatch.launch --num_workers=2 -- examples/train.py --strategy=multi_worker
    python -m tf_largebatch.launch --num_workers=2 --timeout_seconds=600 -- -m package.module

Each worker is ``sys.executable SCRIPT ARGS...`` (or ``sys.executable -m MODULE ARGS...``) with

    TF_CONFIG = {"cluster": {"worker": ["127.0.0.1:P0", ...]}, "task": {"type": "worker",
                 "index": i}}

on free loopback ports. Worker output (stdout and stderr, merged) is streamed line by line to our
stdout as ``[worker i] line``.

Stopping and exit status (``128 + signal`` stands for a worker killed by that signal):

- every worker exits 0: the launcher exits 0;
- a worker exits non-zero: the others get SIGTERM, then SIGKILL if still running after
  ``--grace_seconds``, and the launcher exits with the failing worker's status;
- the launcher gets SIGTERM (a preemption: Slurm, Kubernetes, ``kill``): it forwards SIGTERM
  to every worker, lets them finish (e.g. save a checkpoint) for up to ``--grace_seconds``,
  SIGKILLs those still running, and exits with the status of the first worker (by index)
  that did not exit 0, or 0 if all did: 143 (128 + SIGTERM) from workers that saved and
  stopped, 137 (128 + SIGKILL) from workers that ran out of grace;
- ``--timeout_seconds`` stops everything the same way and exits with 124; Ctrl-C (SIGINT)
  stops everything the same way and exits with 130.

This module imports no TensorFlow and never starts a runtime (``python -m tf_largebatch.launch``
still runs the package's ``__init__``, which imports the Keras objects so that they are registered:
about 6 s on the 2-core machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

from tf_largebatch._validation import _fail, check_non_negative, check_positive, check_positive_int

HOST = "127.0.0.1"
TIMEOUT_EXIT_CODE = 124  # as timeout(1)
DEFAULT_GRACE_SECONDS = 60.0  # SIGTERM → SIGKILL; deploy/ gives the launcher more than this
_POLL_SECONDS = 0.05
_log = logging.getLogger(__name__)


def find_free_ports(n: int) -> list[int]:
    """Returns ``n`` distinct TCP ports that are free on 127.0.0.1 right now.

    The ports are found by binding to port 0 with all ``n`` sockets open at once (so they are
    distinct), then closed; another process could take one before the workers bind it.

    Args:
      n: number of ports, >= 1.

    Returns:
      The port numbers.

    Raises:
      ValueError: ``n`` is not a positive integer.
    """
    check_positive_int("n", n)
    sockets: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def worker_tf_config(ports: Sequence[int], index: int) -> dict[str, Any]:
    """The TF_CONFIG dict of worker ``index`` in a loopback cluster on ``ports``.

    Equal to ``distribute.build_tf_config([f"127.0.0.1:{p}" for p in ports], index)``, built here
    without importing TensorFlow.
    """
    workers = [f"{HOST}:{port}" for port in ports]
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}


def _exit_status(returncode: int) -> int:
    """A process return code as a shell exit status (``128 + signal`` for a signal)."""
    return returncode if returncode >= 0 else 128 - returncode


def _pump(stream: IO[bytes], prefix: str, out: IO[str], lock: threading.Lock) -> None:
    """Copies ``stream`` to ``out`` line by line, each line prefixed."""
    with stream:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            with lock:
                out.write(prefix + (line if line.endswith("\n") else line + "\n"))
                out.flush()


def _signal(process: subprocess.Popen, sig: int) -> None:
    """Sends ``sig`` to the process group of a running worker (it leads its own session)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)


def _stop(processes: Sequence[subprocess.Popen], grace_seconds: float) -> None:
    """SIGTERM to every running worker, SIGKILL to those still running after the grace period.

    The grace period is the workers' time to save a checkpoint and exit (TensorFlow's
    preemption handler, installed by MultiWorkerMirroredStrategy, acts on SIGTERM).
    """
    running = [p for p in processes if p.poll() is None]
    for process in running:
        _signal(process, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    for process in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
    late = [i for i, p in enumerate(processes) if p.poll() is None]
    if late:
        _log.warning("Workers %s still running after %gs; sending SIGKILL.", late, grace_seconds)
    for process in processes:
        _signal(process, signal.SIGKILL)
        process.wait()


def _workers_status(processes: Sequence[subprocess.Popen]) -> int:
    """The status of the first worker (by index) that did not exit 0; 0 if all did."""
    for process in processes:
        if process.returncode:
            return _exit_status(process.returncode)
    return 0


def launch(
    script_argv: Sequence[str],
    num_workers: int,
    env: Mapping[str, str] | None = None,
    timeout_seconds: float | None = None,
    prefix: bool = True,
    *,
    port_base: int = 0,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    stop_event: threading.Event | None = None,
) -> int:
    """Runs ``num_workers`` copies of a Python program as a loopback TF_CONFIG cluster.

    Args:
      script_argv: what follows ``python``: ``["train.py", "--flag"]`` or ``["-m", "pkg.mod"]``.
      num_workers: number of worker processes, >= 1.
      env: variables added to (overriding) this process's environment for every worker.
      timeout_seconds: stop everything after this long and return 124; None waits forever.
      prefix: prefix each output line with ``[worker i] ``.
      port_base: 0 picks free ports; otherwise workers use ``port_base + i``.
      grace_seconds: time between SIGTERM and SIGKILL when stopping workers.
      stop_event: when set (`main` sets it on SIGTERM), SIGTERM is forwarded to every worker,
        which gets ``grace_seconds`` to finish before SIGKILL.

    Returns:
      0 if every worker exited 0; else the exit status of the first worker seen failing
      (``128 + signal`` if killed by a signal); 124 on timeout; after ``stop_event``, the
      status of the first worker (by index) that did not exit 0, or 0.

    Raises:
      ValueError: naming a bad argument.
      OSError: a worker process could not be started.

    Example:
      >>> launch(["examples/train.py", "--strategy=multi_worker"], num_workers=2)
      0
    """
    if isinstance(script_argv, str) or not script_argv:
        _fail("script_argv", "a non-empty list such as ['train.py', '--flag']", script_argv)
    check_positive_int("num_workers", num_workers)
    if timeout_seconds is not None:
        check_positive("timeout_seconds", timeout_seconds)
    check_non_negative("grace_seconds", grace_seconds)
    if isinstance(port_base, bool) or not isinstance(port_base, int) or port_base < 0:
        _fail("port_base", "an integer >= 0", port_base)
    if port_base + num_workers > 65536:
        _fail("port_base", f"<= {65536 - num_workers} for {num_workers} workers", port_base)
    ports = (
        find_free_ports(num_workers)
        if port_base == 0
        else [port_base + i for i in range(num_workers)]
    )
    command = [sys.executable, *script_argv]
    base_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    out, lock = sys.stdout, threading.Lock()
    _log.info("Starting %d workers on %s: %s", num_workers, ports, " ".join(command))

    processes: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    status = 0
    try:
        for index in range(num_workers):
            worker_env = {**base_env, "TF_CONFIG": json.dumps(worker_tf_config(ports, index))}
            process = subprocess.Popen(
                command,
                env=worker_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stopping a worker stops its children
            )
            processes.append(process)
            line_prefix = f"[worker {index}] " if prefix else ""
            pump = threading.Thread(target=_pump, args=(process.stdout, line_prefix, out, lock))
            pump.daemon = True
            pump.start()
            pumps.append(pump)
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        while True:
            codes = [process.poll() for process in processes]
            failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                index, code = failed[0]
                status = _exit_status(code)
                _log.error("Worker %d exited with %d; stopping the others.", index, code)
                break
            if all(code == 0 for code in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                status = TIMEOUT_EXIT_CODE
                _log.error("Timeout after %gs; stopping all workers.", timeout_seconds)
                break
            if stop_event is not None and stop_event.is_set():
                _log.warning(
                    "SIGTERM: forwarding it to the workers, waiting up to %gs for them.",
                    grace_seconds,
                )
                _stop(processes, grace_seconds)
                status = _workers_status(processes)
                statuses = [_exit_status(p.returncode) for p in processes]
                _log.warning("Workers stopped with statuses %s; exiting %d.", statuses, status)
                break
            time.sleep(_POLL_SECONDS)
    finally:
        _stop(processes, grace_seconds)
        for pump in pumps:
            pump.join(timeout=5.0)
    return status


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tf_largebatch.launch",
        description="Run N local workers of a Python program, each with its own TF_CONFIG.",
        epilog="Example: python -m tf_largebatch.launch --num_workers=2 -- train.py --flag=1",
    )
    parser.add_argument("--num_workers", type=int, required=True, help="worker processes")
    parser.add_argument("--port_base", type=int, default=0, help="first port; 0: free ports")
    parser.add_argument("--timeout_seconds", type=float, default=None, help="stop after this")
    parser.add_argument(
        "--grace_seconds",
        type=float,
        default=DEFAULT_GRACE_SECONDS,
        help="time the workers get between SIGTERM and SIGKILL",
    )
    parser.add_argument("--no_prefix", action="store_true", help="no [worker i] line prefix")
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="SCRIPT ARGS... or -m MODULE ARGS... after --"
    )
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("missing the worker program: -- SCRIPT [ARGS...] or -- -m MODULE [ARGS...]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (see :func:`launch`)."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[launch] %(message)s")

    stop = threading.Event()

    def _on_sigterm(signum: int, frame: Any) -> None:
        stop.set()  # launch() forwards it to the workers and waits for them

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return launch(
            args.command,
            args.num_workers,
            timeout_seconds=args.timeout_seconds,
            prefix=not args.no_prefix,
            port_base=args.port_base,
            grace_seconds=args.grace_seconds,
            stop_event=stop,
        )
    except KeyboardInterrupt:
        return 130
    except ValueError as error:
        _log.error("%s", error)
        return 2
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
