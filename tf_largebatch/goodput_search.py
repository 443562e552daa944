r"""Grid search over (workers, global batch, accumulation) and the best point as a `PhasePlan`.

Pure Python (no TensorFlow); part of the goodput model (`tf_largebatch.goodput`). Each candidate
is priced by the throughput model (`tf_largebatch.goodput_throughput`) and the statistical
efficiency (`tf_largebatch.goodput_efficiency`); `grid_search` keeps those under a memory limit
and a budget, fastest to the target first, and `recommendation_plan` turns one into the plan
``examples/train.py --plan`` trains.

References:
  Qiao et al. 2021, "Pollux: Co-adaptive Cluster Scheduling for Goodput-Optimized Deep
    Learning", §3.
  Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", §2.1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

from tf_largebatch._validation import check_positive, check_positive_int
from tf_largebatch.goodput_efficiency import (
    examples_to_target,
    statistical_efficiency,
    time_to_target_seconds,
)
from tf_largebatch.goodput_throughput import Cluster, StepTimeModel, step_seconds
from tf_largebatch.phases import PhasePlan, plan_phases


@dataclasses.dataclass(frozen=True)
class GridPoint:
    """One candidate configuration and its predictions.

    Attributes:
      workers: hosts.
      devices_per_worker: replicas per host.
      num_replicas: workers × devices_per_worker.
      global_batch_size: B.
      accumulation_steps: k.
      per_replica_batch_size: the micro-batch m = B/(n·k) each replica computes at once.
      step_seconds: seconds per update.
      examples_per_second: B / step_seconds.
      scaling_efficiency: X / (n · X of one replica at the same micro-batch without
        communication).
      statistical_efficiency: E(B₀)/E(B).
      goodput: examples/s × statistical efficiency.
      time_to_target_seconds: E(B)/X.
      device_hours: n × time to target / 3600.
    """

    workers: int
    devices_per_worker: int
    num_replicas: int
    global_batch_size: int
    accumulation_steps: int
    per_replica_batch_size: int
    step_seconds: float
    examples_per_second: float
    scaling_efficiency: float
    statistical_efficiency: float
    goodput: float
    time_to_target_seconds: float
    device_hours: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def grid_search(
    step_time: StepTimeModel,
    cluster: Cluster,
    num_bytes: float,
    noise_scale: float,
    min_examples: float,
    base_batch_size: int,
    workers: Iterable[int],
    global_batch_sizes: Iterable[int],
    accumulation_steps: Iterable[int] = (1,),
    max_per_replica_batch_size: int | None = None,
    budget_devices: int | None = None,
    budget_device_hours: float | None = None,
) -> list[GridPoint]:
    """Predicts every feasible (workers, global batch, accumulation) and sorts by time to target.

    A point is feasible when m = B/(n·k) is a whole number ≥ 1 and ≤
    ``max_per_replica_batch_size``, n ≤ ``budget_devices`` and n × time to target ≤
    ``budget_device_hours``. Ties in time are broken by fewer device-hours.

    Args:
      step_time: the per-replica t(b).
      cluster: the hardware; its ``workers`` is replaced by each value of ``workers``.
      num_bytes: gradient bytes P.
      noise_scale: B_noise (≈ the measured B_simple).
      min_examples: E_min (`min_examples_from_reference`).
      base_batch_size: B₀ of the statistical efficiency.
      workers: host counts to try.
      global_batch_sizes: global batches to try.
      accumulation_steps: accumulation counts k to try.
      max_per_replica_batch_size: what fits in one device's memory (None: no limit).
      budget_devices: most devices (None: no limit).
      budget_device_hours: most device-hours to the target (None: no limit).

    Returns:
      The feasible `GridPoint`s, fastest to the target first (empty if none fits).
    """
    check_positive("noise_scale", noise_scale)
    check_positive("min_examples", min_examples)
    check_positive_int("base_batch_size", base_batch_size)
    if max_per_replica_batch_size is not None:
        check_positive_int("max_per_replica_batch_size", max_per_replica_batch_size)
    if budget_devices is not None:
        check_positive_int("budget_devices", budget_devices)
    if budget_device_hours is not None:
        check_positive("budget_device_hours", budget_device_hours)
    single = cluster.with_size(1, 1)
    points = []
    for w in workers:
        sized = cluster.with_size(w)
        n = sized.num_replicas
        if budget_devices is not None and n > budget_devices:
            continue
        for batch in global_batch_sizes:
            for k in accumulation_steps:
                if batch % (n * k):
                    continue
                micro = batch // (n * k)
                if max_per_replica_batch_size is not None and micro > max_per_replica_batch_size:
                    continue
                seconds = step_seconds(step_time, sized, batch, num_bytes, k)
                throughput = batch / seconds
                alone = micro / step_seconds(step_time, single, micro, num_bytes)
                efficiency = statistical_efficiency(batch, noise_scale, base_batch_size)
                time = time_to_target_seconds(throughput, batch, noise_scale, min_examples)
                hours = n * time / 3600
                if budget_device_hours is not None and hours > budget_device_hours:
                    continue
                points.append(
                    GridPoint(
                        workers=w,
                        devices_per_worker=sized.devices_per_worker,
                        num_replicas=n,
                        global_batch_size=batch,
                        accumulation_steps=k,
                        per_replica_batch_size=micro,
                        step_seconds=seconds,
                        examples_per_second=throughput,
                        scaling_efficiency=throughput / (n * alone),
                        statistical_efficiency=efficiency,
                        goodput=throughput * efficiency,
                        time_to_target_seconds=time,
                        device_hours=hours,
                    )
                )
    return sorted(points, key=lambda p: (p.time_to_target_seconds, p.device_hours))


def recommendation_plan(
    point: GridPoint,
    dataset_size: int,
    noise_scale: float,
    min_examples: float,
    base_learning_rate: float,
    base_batch_size: int,
    warmup_epochs: float = 0,
    momentum: float = 0.9,
    scaling_rule: str = "linear",
) -> PhasePlan:
    """The recommended configuration as a one-phase ``decay_lr`` `PhasePlan`.

    Epochs = ⌈E(B)/N⌉, the examples the noise-scale model says B needs; the learning rate
    follows ``scaling_rule`` from ``base_learning_rate`` at ``base_batch_size`` (Goyal et al.
    §2.1), with an optional gradual warmup. Train it with ``examples/train.py --plan=PATH
    --max_per_replica_batch_size=m`` (PATH holding ``plan.to_dict()`` as JSON, as
    ``examples/plan_cluster.py --plan_output=PATH`` writes it), or with the recipe flags
    ``--mode=decay_lr --decay_epochs= --epochs=E --global_batch_size=B``.
    """
    check_positive_int("dataset_size", dataset_size)
    epochs = max(
        1,
        math.ceil(
            examples_to_target(point.global_batch_size, noise_scale, min_examples) / dataset_size
        ),
    )
    return plan_phases(
        "decay_lr",
        dataset_size=dataset_size,
        epochs=epochs,
        global_batch_size=point.global_batch_size,
        base_learning_rate=base_learning_rate,
        base_batch_size=base_batch_size,
        warmup_epochs=min(warmup_epochs, epochs),
        warmup="gradual" if warmup_epochs > 0 else "none",
        momentum=momentum,
        scaling_rule=scaling_rule,
    )
