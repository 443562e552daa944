r"""Goodput model: throughput × statistical efficiency, to plan a cluster before paying for it.

Pure Python (no TensorFlow). The pieces, each a small function:

- **Step time** per replica t(b) = α + β·b, fitted by least squares (`fit_step_time`) from
  timed steps of the user's own model (`tf_largebatch.goodput_measure`).
- **All-reduce time** of P gradient bytes in the α–β (latency–bandwidth) model, for a single
  parameter server, a ring, recursive halving/doubling and a two-level hierarchy
  (`allreduce_seconds`), with bandwidth and latency presets in `INTERCONNECTS`.
- **Overlap**: the share of communication hidden behind the backward pass (`overlap_fraction`).
- **Statistical efficiency** from the gradient noise scale B_noise (McCandlish et al. 2018):
  examples to a target E(B) = E_min·(1 + B/B_noise), steps S(B) = S_min·(1 + B_noise/B);
  efficiency relative to a batch B₀ is E(B₀)/E(B); goodput = examples/s × efficiency
  (Pollux's definition, Qiao et al. 2021); time to target = E(B)/(examples/s).
- **Grid search** over (workers, global batch, accumulation steps) under a memory limit and a
  budget (`grid_search`), and the best point as a `PhasePlan` (`recommendation_plan`).
- **Goyal et al.'s setup** (`goyal_scaling_efficiency`): ResNet-50 on Big Basin servers.

The seconds of one synchronous update, T = k·s·t(m) + C − H (compute of k micro-batches,
all-reduce C, the part H of it hidden behind the backward pass), are defined and explained in
`tf_largebatch.goodput_throughput`.

The model lives in five modules, all re-exported here (import from this module):

- `tf_largebatch.goodput_allreduce`: `Link`, `INTERCONNECTS`, `TOPOLOGIES`, `gradient_bytes`,
  the ring / halving-doubling / parameter-server costs, `allreduce_seconds`, `overlap_fraction`.
- `tf_largebatch.goodput_throughput`: `StepTimeModel`, `fit_step_time`, `Cluster`,
  `step_seconds`, `examples_per_second`, `scaling_efficiency`, `fit_shared_host`,
  `fit_link_latency`.
- `tf_largebatch.goodput_efficiency`: `examples_to_target`, `steps_to_target`,
  `min_examples_from_reference`, `statistical_efficiency`, `goodput`, `time_to_target_seconds`.
- `tf_largebatch.goodput_search`: `GridPoint`, `grid_search`, `recommendation_plan`.
- `tf_largebatch.goodput_goyal`: Goyal et al.'s setup (`goyal_scaling_efficiency`, ...).

References:
  McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training", §2.2–2.3
    (B_simple, E = E_min(1 + B/B_noise), S = S_min(1 + B_noise/B)).
  Qiao et al. 2021, "Pollux: Co-adaptive Cluster Scheduling for Goodput-Optimized Deep
    Learning", §3 (goodput = throughput × statistical efficiency).
  Peng et al. 2018, "Optimus: An Efficient Dynamic Resource Scheduler for Deep Learning
    Clusters", §4 (modelling training speed against resources).
  Thakur, Rabenseifner & Gropp 2005, "Optimization of Collective Communication Operations in
    MPICH" (ring and recursive halving/doubling costs).
  Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", §4 and §5.5.
"""

from __future__ import annotations

from tf_largebatch.goodput_allreduce import (
    INTER_ALGORITHMS,
    INTERCONNECTS,
    TOPOLOGIES,
    Link,
    allreduce_seconds,
    gradient_bytes,
    halving_doubling_allreduce_seconds,
    overlap_fraction,
    parameter_server_seconds,
    ring_allreduce_seconds,
)
from tf_largebatch.goodput_efficiency import (
    examples_to_target,
    goodput,
    min_examples_from_reference,
    statistical_efficiency,
    steps_to_target,
    time_to_target_seconds,
)
from tf_largebatch.goodput_goyal import (
    GOYAL_BACKWARD_SECONDS,
    GOYAL_GPUS_PER_SERVER,
    GOYAL_NUM_PARAMETERS,
    GOYAL_PER_GPU_BATCH,
    goyal_cluster,
    goyal_iteration_seconds,
    goyal_scaling_efficiency,
    goyal_step_time,
)
from tf_largebatch.goodput_search import GridPoint, grid_search, recommendation_plan
from tf_largebatch.goodput_throughput import (
    Cluster,
    StepTimeModel,
    examples_per_second,
    fit_link_latency,
    fit_shared_host,
    fit_step_time,
    scaling_efficiency,
    step_seconds,
)

__all__ = [
    "GOYAL_BACKWARD_SECONDS",
    "GOYAL_GPUS_PER_SERVER",
    "GOYAL_NUM_PARAMETERS",
    "GOYAL_PER_GPU_BATCH",
    "INTERCONNECTS",
    "INTER_ALGORITHMS",
    "TOPOLOGIES",
    "Cluster",
    "GridPoint",
    "Link",
    "StepTimeModel",
    "allreduce_seconds",
    "examples_per_second",
    "examples_to_target",
    "fit_link_latency",
    "fit_shared_host",
    "fit_step_time",
    "goodput",
    "goyal_cluster",
    "goyal_iteration_seconds",
    "goyal_scaling_efficiency",
    "goyal_step_time",
    "gradient_bytes",
    "grid_search",
    "halving_doubling_allreduce_seconds",
    "min_examples_from_reference",
    "overlap_fraction",
    "parameter_server_seconds",
    "recommendation_plan",
    "ring_allreduce_seconds",
    "scaling_efficiency",
    "statistical_efficiency",
    "step_seconds",
    "steps_to_target",
    "time_to_target_seconds",
]
