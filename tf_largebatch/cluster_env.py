"""Sets TF_CONFIG from the scheduler's environment, then runs a command: the cluster entrypoint.

Usage (the command after ``--`` replaces this process, with TF_CONFIG in its environment)::

    python -m tf_largebatch.cluster_env -- python examples/train.py --strategy=multi_worker
    python -m tf_largebatch.cluster_env --port=2222 -- python examples/imagenet_resnet50.py ...

Where the cluster comes from (first match):

- **Kubernetes Indexed Job** (``JOB_COMPLETION_INDEX`` is set): worker i is the pod
  ``<job>-<i>``, reachable as ``<job>-<i>.<service>`` when the pod template sets
  ``subdomain: <service>`` (a headless Service). ``<job>`` is ``$JOB_NAME`` (or the pod's
  ``$HOSTNAME`` without its ``-<index>`` suffix), ``<service>`` is ``$SERVICE_NAME`` (default
  the job name), the worker count is ``$NUM_WORKERS``; ``--port`` (default ``$WORKER_PORT`` or
  2222) is the gRPC port. See ``deploy/kubernetes/indexed-job.yaml``.
- **Slurm** (``SLURM_PROCID`` is set): one worker per task, from the job step's node list
  (`distribute.tf_config_from_slurm`, ports ``--port``, ``--port`` + 1, ... on each node).
- An existing ``TF_CONFIG`` is validated and kept.

References:
  Kubernetes, "Indexed Job for parallel processing with static work assignment".
  TensorFlow guide, "Multi-worker training with Keras" (TF_CONFIG).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from tf_largebatch._validation import _fail, check_positive_int

DEFAULT_PORT = 2222
_log = logging.getLogger(__name__)


def _int_env(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    if value is None or not value.strip().isdigit():
        raise ValueError(
            f"Environment variable {name} must be an integer >= 0. Received: {value!r}"
        )
    return int(value)


def indexed_job_tf_config(
    env: Mapping[str, str] | None = None, *, port: int | None = None
) -> dict[str, Any]:
    """The TF_CONFIG dict of this pod of a Kubernetes Indexed Job.

    Worker i of n is ``<job>-<i>.<service>:<port>``, this pod is worker ``JOB_COMPLETION_INDEX``.

    Args:
      env: the environment; default ``os.environ``. Reads ``JOB_COMPLETION_INDEX``,
        ``NUM_WORKERS``, ``JOB_NAME`` (or ``HOSTNAME``), ``SERVICE_NAME``, ``WORKER_PORT``.
      port: gRPC port; default ``WORKER_PORT`` or 2222.

    Returns:
      ``{"cluster": {"worker": [...]}, "task": {"type": "worker", "index": i}}``.

    Raises:
      ValueError: a missing or malformed variable, or an index out of range.

    Example:
      >>> env = {"JOB_COMPLETION_INDEX": "1", "NUM_WORKERS": "2", "JOB_NAME": "r50",
      ...        "SERVICE_NAME": "r50-workers"}
      >>> indexed_job_tf_config(env)["cluster"]["worker"]
      ['r50-0.r50-workers:2222', 'r50-1.r50-workers:2222']
    """
    from tf_largebatch.distribute import build_tf_config

    env = os.environ if env is None else env
    index = _int_env(env, "JOB_COMPLETION_INDEX")
    num_workers = _int_env(env, "NUM_WORKERS")
    check_positive_int("NUM_WORKERS", num_workers)
    job = env.get("JOB_NAME") or env.get("HOSTNAME", "").rsplit("-", 1)[0]
    if not job:
        raise ValueError("Set JOB_NAME (or HOSTNAME=<job>-<index>) to name the Indexed Job.")
    service = env.get("SERVICE_NAME") or job
    port = port if port is not None else int(env.get("WORKER_PORT", DEFAULT_PORT))
    if not 0 < port < 65536:
        _fail("port", "in [1, 65535]", port)
    workers = [f"{job}-{i}.{service}:{port}" for i in range(num_workers)]
    return build_tf_config(workers, index)


def tf_config_from_env(
    env: Mapping[str, str] | None = None, *, port: int | None = None
) -> dict[str, Any]:
    """TF_CONFIG for this process: Indexed Job, else Slurm, else the existing TF_CONFIG.

    Raises:
      ValueError: none of the three is there, or what is there is malformed.
    """
    from tf_largebatch import distribute

    env = os.environ if env is None else env
    if "JOB_COMPLETION_INDEX" in env:
        return indexed_job_tf_config(env, port=port)
    if "SLURM_PROCID" in env:
        return distribute.tf_config_from_slurm(port or DEFAULT_PORT, env=env)
    if env.get("TF_CONFIG"):
        return distribute.validate_tf_config(env["TF_CONFIG"])
    raise ValueError(
        "No cluster found: set JOB_COMPLETION_INDEX (Kubernetes Indexed Job), run under srun "
        "(Slurm: SLURM_PROCID) or set TF_CONFIG."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tf_largebatch.cluster_env [--port=P] -- COMMAND ...``: exec with TF_CONFIG."""
    parser = argparse.ArgumentParser(
        prog="python -m tf_largebatch.cluster_env",
        description="Build TF_CONFIG from Kubernetes/Slurm variables, then exec the command.",
    )
    parser.add_argument("--port", type=int, default=None, help="worker gRPC port (first port)")
    parser.add_argument("--print", action="store_true", help="print TF_CONFIG and exit")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command and not args.print:
        parser.error("missing the command: -- COMMAND [ARGS...]")
    try:
        tf_config = json.dumps(tf_config_from_env(port=args.port))
    except ValueError as error:
        print(f"cluster_env: error: {error}", file=sys.stderr)
        return 2
    if args.print:
        print(tf_config)
        return 0
    print(f"cluster_env: TF_CONFIG={tf_config}", file=sys.stderr, flush=True)
    os.execvpe(command[0], command, {**os.environ, "TF_CONFIG": tf_config})
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
