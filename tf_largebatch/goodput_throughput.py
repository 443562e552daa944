r"""Throughput of synchronous data parallelism: step time, the cluster, and seconds per update.

Pure Python (no TensorFlow); part of the goodput model (`tf_largebatch.goodput`).

- **Step time** per replica t(b) = α + β·b, fitted by least squares (`fit_step_time`) from
  timed steps of the user's own model (`tf_largebatch.goodput_measure`).
- **Cluster**: hosts, devices per host, their links and all-reduce topology
  (`tf_largebatch.goodput_allreduce`), and the share of communication that overlaps backprop.
- **Seconds per update** (`step_seconds`), examples/s and weak-scaling efficiency; and fits of a
  shared host's compute slots and link latencies from local measurements (`fit_shared_host`,
  `fit_link_latency`).

One synchronous data-parallel update with n = workers × devices_per_worker replicas, global batch
B and k accumulation steps runs k micro-batches of m = B/(n·k) examples per replica, then one
all-reduce of the gradients:

    T = k·s·t(m) + C − H,   H = min(o·C, r·s·t(m)),   examples/s = B / T

where C is the all-reduce time, o the share of C that may run during the backward pass, r the
backward pass's share of the step (≈ 2/3: backward costs about twice the forward), H the hidden
communication, and s ≥ 1 a compute-sharing factor (1 for devices with their own compute; for
replicas that share one host's CPU cores, s = n/c once n exceeds the host's c parallel replicas).

References:
  Peng et al. 2018, "Optimus: An Efficient Dynamic Resource Scheduler for Deep Learning
    Clusters", §4 (modelling training speed against resources).
  Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", §5.5.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tf_largebatch._validation import (
    _fail,
    check_choice,
    check_positive,
    check_positive_int,
)
from tf_largebatch.goodput_allreduce import (
    INTER_ALGORITHMS,
    TOPOLOGIES,
    Link,
    allreduce_seconds,
    overlap_fraction,
)


@dataclasses.dataclass(frozen=True)
class StepTimeModel:
    """Per-replica compute time of one forward/backward pass: t(b) = α + β·b.

    Attributes:
      alpha_seconds: fixed cost per step α (kernel launches, dispatch, optimizer update).
      beta_seconds_per_example: marginal cost per example β.
    """

    alpha_seconds: float
    beta_seconds_per_example: float

    def __call__(self, per_replica_batch_size: float) -> float:
        return self.alpha_seconds + self.beta_seconds_per_example * per_replica_batch_size


def fit_step_time(
    per_replica_batch_sizes: Sequence[float], seconds: Sequence[float]
) -> StepTimeModel:
    """Least-squares fit of t(b) = α + β·b to timed steps, with α ≥ 0 and β ≥ 0.

    Unconstrained: β = Σ(b − b̄)(t − t̄)/Σ(b − b̄)², α = t̄ − β·b̄. A step cannot take negative
    time, but noisy timings of tiny steps can give α < 0 (or β < 0), and then t(b) < 0 at small
    batches outside the measured range; the non-negative least-squares solution then lies on a
    boundary, and the better of α = 0 (β = Σbt/Σb²) and β = 0 (α = t̄) is returned.

    Args:
      per_replica_batch_sizes: the batches b_i (at least two distinct values).
      seconds: the measured step times t_i.

    Returns:
      A `StepTimeModel`.

    Raises:
      ValueError: lengths differ, fewer than two distinct batches, or a time is not > 0.

    Example:
      >>> model = fit_step_time([32, 64, 128], [0.02, 0.03, 0.05])
      >>> round(model.alpha_seconds, 6), round(model.beta_seconds_per_example, 7)
      (0.01, 0.0003125)
    """
    b, t = [float(v) for v in per_replica_batch_sizes], [float(v) for v in seconds]
    if len(b) != len(t):
        raise ValueError(
            f"Argument `seconds` must have one entry per batch size ({len(b)}). "
            f"Received: seconds={list(seconds)}"
        )
    if len(set(b)) < 2:
        _fail("per_replica_batch_sizes", "at least two distinct values", list(b))
    for value in t:
        check_positive("seconds", value)
    b_mean, t_mean = sum(b) / len(b), sum(t) / len(t)
    sxx = sum((x - b_mean) ** 2 for x in b)
    beta = sum((x - b_mean) * (y - t_mean) for x, y in zip(b, t)) / sxx
    alpha = t_mean - beta * b_mean
    if alpha >= 0 and beta >= 0:
        return StepTimeModel(alpha, beta)
    candidates = [
        StepTimeModel(0.0, sum(x * y for x, y in zip(b, t)) / sum(x * x for x in b)),
        StepTimeModel(t_mean, 0.0),
    ]
    return min(candidates, key=lambda m: sum((m(x) - y) ** 2 for x, y in zip(b, t)))


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Hardware and communication of a data-parallel run.

    Attributes:
      workers: hosts w.
      devices_per_worker: replicas per host g.
      network: link between hosts.
      intra: link between the devices of a host.
      topology: one of `TOPOLOGIES`.
      inter_algorithm: across hosts in the hierarchical topology.
      overlappable: share o of the communication that may run during the backward pass (0: the
        all-reduce starts after the whole backward pass, as in a Keras ``apply_gradients``).
      backward_share: the backward pass's share r of a step's compute.
      compute_slots: None when every replica has its own compute (GPUs); else all n replicas
        share one machine that runs c = ``compute_slots`` replicas at full speed, so compute
        slows by s = max(1, n/c) (logical CPU devices or local worker processes).
    """

    workers: int
    devices_per_worker: int = 1
    network: Link | None = None
    intra: Link | None = None
    topology: str = "hierarchical"
    inter_algorithm: str = "halving_doubling"
    overlappable: float = 0.0
    backward_share: float = 2 / 3
    compute_slots: float | None = None

    def __post_init__(self) -> None:
        check_positive_int("workers", self.workers)
        check_positive_int("devices_per_worker", self.devices_per_worker)
        check_choice("topology", self.topology, TOPOLOGIES)
        check_choice("inter_algorithm", self.inter_algorithm, INTER_ALGORITHMS)
        if not 0.0 <= self.overlappable <= 1.0:
            _fail("overlappable", "in [0, 1]", self.overlappable)
        if not 0.0 <= self.backward_share <= 1.0:
            _fail("backward_share", "in [0, 1]", self.backward_share)
        if self.compute_slots is not None:
            check_positive("compute_slots", self.compute_slots)

    @property
    def num_replicas(self) -> int:
        return self.workers * self.devices_per_worker

    @property
    def compute_sharing(self) -> float:
        """s = max(1, n/c), or 1 when replicas have their own compute."""
        if self.compute_slots is None:
            return 1.0
        return max(1.0, self.num_replicas / self.compute_slots)

    def allreduce_seconds(self, num_bytes: float) -> float:
        return allreduce_seconds(
            self.topology,
            num_bytes,
            self.workers,
            self.devices_per_worker,
            self.network,
            self.intra,
            self.inter_algorithm,
        )

    def with_size(self, workers: int, devices_per_worker: int | None = None) -> Cluster:
        """The same hardware with another number of hosts (and devices per host)."""
        g = self.devices_per_worker if devices_per_worker is None else devices_per_worker
        return dataclasses.replace(self, workers=workers, devices_per_worker=g)


def step_seconds(
    step_time: StepTimeModel,
    cluster: Cluster,
    global_batch_size: int,
    num_bytes: float,
    accumulation_steps: int = 1,
) -> float:
    """Seconds per update: T = k·s·t(m) + C − min(o·C, r·s·t(m)), m = B/(n·k).

    Args:
      step_time: the per-replica t(b).
      cluster: hardware and communication.
      global_batch_size: B.
      num_bytes: gradient bytes P.
      accumulation_steps: k micro-batches per update (one all-reduce per update).

    Returns:
      Seconds per parameter update.

    Example:
      >>> cluster = Cluster(2, network=Link(1e9, 0.0))
      >>> round(step_seconds(StepTimeModel(0.01, 0.001), cluster, 64, 1e7), 9)  # 0.042 + 0.01
      0.052
    """
    check_positive_int("global_batch_size", global_batch_size)
    check_positive_int("accumulation_steps", accumulation_steps)
    if global_batch_size % (cluster.num_replicas * accumulation_steps):
        requirement = f"divisible by {cluster.num_replicas} replicas x {accumulation_steps} steps"
        _fail("global_batch_size", requirement, global_batch_size)
    micro = global_batch_size / (cluster.num_replicas * accumulation_steps)
    compute = cluster.compute_sharing * step_time(micro)
    comm = cluster.allreduce_seconds(num_bytes)
    hidden = comm * overlap_fraction(comm, cluster.backward_share * compute, cluster.overlappable)
    return accumulation_steps * compute + comm - hidden


def examples_per_second(
    step_time: StepTimeModel,
    cluster: Cluster,
    global_batch_size: int,
    num_bytes: float,
    accumulation_steps: int = 1,
) -> float:
    """Throughput B/T (see `step_seconds`)."""
    return global_batch_size / step_seconds(
        step_time, cluster, global_batch_size, num_bytes, accumulation_steps
    )


def scaling_efficiency(
    step_time: StepTimeModel,
    cluster: Cluster,
    base_cluster: Cluster,
    per_replica_batch_size: int,
    num_bytes: float,
) -> float:
    """Weak-scaling efficiency X(n)/((n/n₀)·X(n₀)) at a fixed per-replica batch, = T(n₀)/T(n).

    Goyal et al. §5.5 measure it from 8 GPUs (one server) to 256 (32 servers) at 32 images per
    GPU: "∼90% scaling efficiency".
    """
    t_big = step_seconds(
        step_time, cluster, per_replica_batch_size * cluster.num_replicas, num_bytes
    )
    t_base = step_seconds(
        step_time, base_cluster, per_replica_batch_size * base_cluster.num_replicas, num_bytes
    )
    return t_base / t_big


def fit_shared_host(
    step_time: StepTimeModel,
    num_devices: Sequence[int],
    per_replica_batch_sizes: Sequence[float],
    seconds: Sequence[float],
    num_bytes: float,
    bandwidth_bytes_per_second: float,
) -> tuple[float, Link]:
    """Fits compute sharing and link latency of d replicas on one host (logical CPU devices).

    With all d replicas on one machine of c parallel replica slots (d ≥ c) and a ring all-reduce
    over a link of known bandwidth, `step_seconds` gives
    T = (d/c)·t(b) + 2(d − 1)·a + 2(d − 1)/d·P/bw, which is linear in u = 1/c and a:
    T − 2(d − 1)/d·P/bw = u·[d·t(b)] + a·[2(d − 1)]. Both are fitted by least squares (no
    intercept) over the given measurements, which must include d > 1.

    Args:
      step_time: t(b) of one replica alone (fitted on one device).
      num_devices: d of each measurement.
      per_replica_batch_sizes: b of each measurement.
      seconds: measured seconds per step.
      num_bytes: gradient bytes P.
      bandwidth_bytes_per_second: the intra-host link's bandwidth (assumed, not fitted).

    Returns:
      ``(compute_slots, link)``: c and the intra-host `Link` with the fitted latency.

    Raises:
      ValueError: lengths differ, or the fit is degenerate (e.g. only d = 1).
    """
    if not len(num_devices) == len(per_replica_batch_sizes) == len(seconds):
        raise ValueError(
            "Arguments `num_devices`, `per_replica_batch_sizes` and `seconds` must have the same "
            f"length. Received: lengths {len(num_devices)}, {len(per_replica_batch_sizes)}, "
            f"{len(seconds)}"
        )
    rows = []
    for d, b, t in zip(num_devices, per_replica_batch_sizes, seconds):
        check_positive_int("num_devices", d)
        comm_bytes = 2 * (d - 1) / d * num_bytes / bandwidth_bytes_per_second
        rows.append((d * step_time(b), 2.0 * (d - 1), t - comm_bytes))
    s11 = sum(x * x for x, _, _ in rows)
    s12 = sum(x * z for x, z, _ in rows)
    s22 = sum(z * z for _, z, _ in rows)
    r1 = sum(x * y for x, _, y in rows)
    r2 = sum(z * y for _, z, y in rows)
    det = s11 * s22 - s12 * s12
    if det <= 1e-12 * max(s11 * s22, 1e-300):
        _fail(
            "num_devices", "measurements with at least two configurations, some d > 1", num_devices
        )
    u = (r1 * s22 - r2 * s12) / det
    latency = (s11 * r2 - s12 * r1) / det
    if u <= 0:
        _fail("seconds", "step times that grow with the compute per step", list(seconds))
    link = Link(bandwidth_bytes_per_second, max(latency, 0.0), "fitted on this machine")
    return 1.0 / u, link


def fit_link_latency(
    step_time: StepTimeModel,
    cluster: Cluster,
    per_replica_batch_sizes: Sequence[float],
    seconds: Sequence[float],
    num_bytes: float,
) -> Link:
    """Fits the network latency of ``cluster`` (ring, one device per worker) from timed steps.

    T = s·t(b) + 2(w − 1)·a + 2(w − 1)/w·P/bw, so each measurement gives
    a = (T − s·t(b) − 2(w − 1)/w·P/bw)/(2(w − 1)); the mean is returned with the cluster's
    network bandwidth.

    Raises:
      ValueError: the cluster has one worker or no network, or lengths differ.
    """
    if cluster.workers < 2 or cluster.network is None:
        _fail("cluster", "a cluster of >= 2 workers with a network link", cluster)
    if len(per_replica_batch_sizes) != len(seconds) or not seconds:
        raise ValueError(
            "Arguments `per_replica_batch_sizes` and `seconds` must be non-empty and of equal "
            f"length. Received: {list(per_replica_batch_sizes)}, {list(seconds)}"
        )
    w, bw = cluster.num_replicas, cluster.network.bandwidth_bytes_per_second
    s = cluster.compute_sharing
    estimates = [
        (t - s * step_time(b) - 2 * (w - 1) / w * num_bytes / bw) / (2 * (w - 1))
        for b, t in zip(per_replica_batch_sizes, seconds)
    ]
    latency = max(sum(estimates) / len(estimates), 0.0)
    return Link(bw, latency, "fitted on this machine")
