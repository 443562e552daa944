"""The goodput model fitted to, and checked against, this machine's local configurations.

Pure arithmetic (no TensorFlow) on the timings `tf_largebatch.goodput_measure.measure_local`
takes of `LOCAL_CONFIGS` (1, 2 and 4 logical CPU devices, 2 localhost workers): `fit_local`
fits the step time, the host's compute slots and the local link latencies on part of them and
predicts all of them, so the held-out ones check the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tf_largebatch import goodput

# Local links: only their latency is fitted; bandwidths are order-of-magnitude assumptions (the
# digits MLP's 38 KB of gradients make the bandwidth term a few percent of the step at most).
SHARED_MEMORY_BYTES_PER_SECOND = 10e9  # memcpy between logical devices of one process
LOOPBACK_BYTES_PER_SECOND = 1e9  # gRPC over 127.0.0.1 between worker processes

LOCAL_CONFIGS = (
    {"name": "1 device", "num_workers": 1, "num_cpu_devices": 1},
    {"name": "2 devices", "num_workers": 1, "num_cpu_devices": 2},
    {"name": "4 devices", "num_workers": 1, "num_cpu_devices": 4},
    {"name": "2 workers", "num_workers": 2, "num_cpu_devices": 1},
)


def fit_local(measurements: dict[str, Any]) -> dict[str, Any]:
    """Fits the local model on a subset of the measurements and predicts all of them.

    Fitted on: t(b) = α + β·b from ``1 device`` (every batch); compute slots c and the
    shared-memory latency from ``2 devices`` (every batch, `goodput.fit_shared_host`); the
    loopback latency from ``2 workers`` at its smallest batch only (`goodput.fit_link_latency`).
    Held out: ``4 devices`` and ``2 workers`` at the other batches. Pure arithmetic.

    Args:
      measurements: the `measure_local` dict.

    Returns:
      ``{"step_time": {...}, "compute_slots", "shared_memory_latency_seconds",
      "loopback_latency_seconds", "validation": [{"config", "per_replica_batch_size",
      "predicted_examples_per_second", "measured_examples_per_second", "relative_error",
      "used_for_fit"}]}``, relative error = predicted/measured − 1.
    """
    by_name = {c["name"]: c for c in measurements["configs"]}
    num_bytes = measurements["gradient_bytes"]

    def columns(name: str) -> tuple[list[int], list[float]]:
        rows = by_name[name]["measurements"]
        return [r["per_replica_batch_size"] for r in rows], [r["seconds_per_step"] for r in rows]

    step_time = goodput.fit_step_time(*columns("1 device"))
    b2, t2 = columns("2 devices")
    slots, shared = goodput.fit_shared_host(
        step_time, [2] * len(b2), b2, t2, num_bytes, SHARED_MEMORY_BYTES_PER_SECOND
    )
    loopback = goodput.Link(LOOPBACK_BYTES_PER_SECOND, 0.0)
    two_workers = goodput.Cluster(2, network=loopback, topology="ring", compute_slots=slots)
    bw, tw = columns("2 workers")
    first = bw.index(min(bw))
    loopback = goodput.fit_link_latency(step_time, two_workers, [bw[first]], [tw[first]], num_bytes)
    fit_points = {("1 device", b) for b in columns("1 device")[0]}
    fit_points |= {("2 devices", b) for b in b2} | {("2 workers", bw[first])}
    validation = []
    for config in measurements["configs"]:
        cluster = goodput.Cluster(
            config["num_workers"],
            config["num_cpu_devices"],
            network=loopback,
            intra=shared,
            topology="ring",
            compute_slots=slots,
        )
        for row in config["measurements"]:
            b = row["per_replica_batch_size"]
            predicted = goodput.examples_per_second(
                step_time, cluster, b * cluster.num_replicas, num_bytes
            )
            measured = row["examples_per_second"]
            validation.append(
                {
                    "config": config["name"],
                    "per_replica_batch_size": b,
                    "predicted_examples_per_second": predicted,
                    "measured_examples_per_second": measured,
                    "relative_error": predicted / measured - 1.0,
                    "used_for_fit": (config["name"], b) in fit_points,
                }
            )
    return {
        "step_time": dataclasses.asdict(step_time),
        "compute_slots": slots,
        "shared_memory_latency_seconds": shared.latency_seconds,
        "loopback_latency_seconds": loopback.latency_seconds,
        "validation": validation,
    }
