"""Measures what the goodput model needs: step times t(b) and the gradient noise scale B_simple.

Two measurements feed `tf_largebatch.goodput` (both defined in `tf_largebatch.goodput_probes`
and re-exported here):

- `time_train_step`: seconds per synchronous SGD step of a model at several per-replica
  batches, under a strategy (one device, N logical CPU devices, or N workers), with no input
  pipeline timed.
- `measure_noise_scale`: B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, App. A.1) after a short
  training run.

Logical CPU devices and ``MultiWorkerMirroredStrategy`` must be configured before TensorFlow
starts, so every configuration is measured in its own process: `measure_in_subprocess` runs
``python -m tf_largebatch.goodput_measure`` (one process) or, with ``num_workers > 1``, the same
module under ``python -m tf_largebatch.launch``; each process prints ``RESULT {json}``.
`measure_local` measures every configuration of `LOCAL_CONFIGS` and B_simple; `fit_local`
(`tf_largebatch.goodput_local`, re-exported here) fits and checks the model on them.
TensorFlow is imported inside the measuring functions, so importing this module (and calling the
subprocess helpers) starts no TensorFlow runtime.

References:
  McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training", App. A.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from tf_largebatch._validation import check_positive_int
from tf_largebatch.goodput_local import (
    LOCAL_CONFIGS,
    LOOPBACK_BYTES_PER_SECOND,
    SHARED_MEMORY_BYTES_PER_SECOND,
    fit_local,
)
from tf_largebatch.goodput_probes import measure_noise_scale, time_train_step

__all__ = [
    "LOCAL_CONFIGS",
    "LOOPBACK_BYTES_PER_SECOND",
    "RESULT_PREFIX",
    "SHARED_MEMORY_BYTES_PER_SECOND",
    "fit_local",
    "main",
    "measure_in_subprocess",
    "measure_local",
    "measure_noise_scale",
    "time_train_step",
]

RESULT_PREFIX = "RESULT "


def _parse_result(output: str, prefix: str = "") -> list[dict[str, Any]]:
    results = []
    for line in output.splitlines():
        head, sep, payload = line.partition(RESULT_PREFIX)
        if sep and head.startswith(prefix):
            results.append(json.loads(payload))
    return results


def measure_in_subprocess(
    per_replica_batch_sizes: Sequence[int],
    *,
    num_cpu_devices: int = 1,
    num_workers: int = 1,
    model: str = "mlp",
    dataset: str = "digits",
    steps_per_call: int = 10,
    repeats: int = 30,
    timeout_seconds: float = 300,
) -> dict[str, Any]:
    """Runs `time_train_step` in fresh processes (logical devices need a fresh runtime).

    ``num_workers == 1``: one process with ``num_cpu_devices`` logical devices, strategy
    ``one_device`` for one device and ``mirrored`` otherwise. ``num_workers > 1``: that many
    ``MultiWorkerMirroredStrategy`` workers on localhost through ``python -m
    tf_largebatch.launch`` (one CPU device each); worker 0's result is returned.

    Args:
      per_replica_batch_sizes: per-replica batches to time.
      num_cpu_devices: logical CPU devices of a single process.
      num_workers: local worker processes.
      model: model name.
      dataset: data set name.
      steps_per_call: steps per compiled call.
      repeats: timed calls per batch size.
      timeout_seconds: the whole measurement's time limit.

    Returns:
      The `time_train_step` dict, plus ``num_workers``.

    Raises:
      RuntimeError: a process failed or printed no result (its output is in the message).
    """
    check_positive_int("num_cpu_devices", num_cpu_devices)
    check_positive_int("num_workers", num_workers)
    args = [
        "-m",
        "tf_largebatch.goodput_measure",
        "--per_replica_batch_sizes=" + ",".join(str(int(b)) for b in per_replica_batch_sizes),
        f"--model={model}",
        f"--dataset={dataset}",
        f"--steps_per_call={steps_per_call}",
        f"--repeats={repeats}",
    ]
    if num_workers > 1:
        command = [
            sys.executable,
            "-m",
            "tf_largebatch.launch",
            f"--num_workers={num_workers}",
            f"--timeout_seconds={timeout_seconds}",
            "--",
            *args,
            "--strategy=multi_worker",
        ]
        prefix = "[worker 0] "
    else:
        strategy = "one_device" if num_cpu_devices == 1 else "mirrored"
        command = [sys.executable, *args, f"--strategy={strategy}"]
        if num_cpu_devices > 1:
            command.append(f"--num_cpu_devices={num_cpu_devices}")
        prefix = ""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout_seconds + 30, env=env
    )
    results = _parse_result(done.stdout, prefix)
    if done.returncode != 0 or not results:
        raise RuntimeError(
            f"Measuring {num_workers} worker(s) x {num_cpu_devices} device(s) failed "
            f"(exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return {**results[0], "num_workers": num_workers}


def measure_local(
    per_replica_batch_sizes: Sequence[int],
    *,
    model: str = "mlp",
    dataset: str = "digits",
    configs: Sequence[dict[str, Any]] = LOCAL_CONFIGS,
    steps_per_call: int = 10,
    repeats: int = 30,
    rounds: int = 1,
    noise_scale_kwargs: dict[str, Any] | None = None,
    timeout_seconds: float = 300,
) -> dict[str, Any]:
    """Times every local configuration in its own process(es), then measures B_simple.

    With ``rounds`` > 1 the configurations are measured in turn that many times (fresh
    processes each time) and each (configuration, batch) keeps its fastest round, so load from
    other jobs that comes and goes is less likely to hit one configuration only.

    Returns:
      ``{"model", "dataset", "dataset_size", "num_parameters", "gradient_bytes", "configs":
      [{"name", "num_workers", "num_cpu_devices", "num_replicas", "measurements": [...]}],
      "noise_scale": {...}}`` (the ``--measurements`` JSON of ``examples/plan_cluster.py``).
    """
    check_positive_int("rounds", rounds)
    measured: list[dict[str, Any]] = []
    for round_index in range(rounds):
        for i, config in enumerate(configs):
            result = measure_in_subprocess(
                per_replica_batch_sizes,
                num_cpu_devices=config["num_cpu_devices"],
                num_workers=config["num_workers"],
                model=model,
                dataset=dataset,
                steps_per_call=steps_per_call,
                repeats=repeats,
                timeout_seconds=timeout_seconds,
            )
            if round_index == 0:
                measured.append({**result, **config})
                continue
            rows = measured[i]["measurements"]
            for j, row in enumerate(result["measurements"]):
                if row["seconds_per_step"] < rows[j]["seconds_per_step"]:
                    rows[j] = row
    command = [sys.executable, "-m", "tf_largebatch.goodput_measure", "--noise_scale"]
    command += [f"--model={model}", f"--dataset={dataset}"]
    if noise_scale_kwargs:
        command.append("--noise_scale_kwargs=" + json.dumps(noise_scale_kwargs))
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_seconds)
    results = _parse_result(done.stdout)
    if done.returncode != 0 or not results:
        raise RuntimeError(
            f"Measuring B_simple failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return {
        "model": model,
        "dataset": dataset,
        "dataset_size": results[0]["dataset_size"],
        "num_parameters": measured[0]["num_parameters"],
        "gradient_bytes": measured[0]["gradient_bytes"],
        "configs": measured,
        "noise_scale": results[0],
    }


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m tf_largebatch.goodput_measure``: prints ``RESULT {json}`` of one measurement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per_replica_batch_sizes", default="8,32,128")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--strategy", default="one_device")
    parser.add_argument("--num_cpu_devices", type=int, default=None)
    parser.add_argument("--steps_per_call", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--noise_scale", action="store_true", help="measure B_simple instead")
    parser.add_argument("--noise_scale_kwargs", default="{}", help="JSON for measure_noise_scale")
    args = parser.parse_args(argv)
    if args.noise_scale:
        kwargs = json.loads(args.noise_scale_kwargs)
        result = measure_noise_scale(model=args.model, dataset=args.dataset, **kwargs)
    else:
        result = time_train_step(
            [int(b) for b in args.per_replica_batch_sizes.split(",")],
            model=args.model,
            dataset=args.dataset,
            strategy=args.strategy,
            num_cpu_devices=args.num_cpu_devices,
            steps_per_call=args.steps_per_call,
            repeats=args.repeats,
        )
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
