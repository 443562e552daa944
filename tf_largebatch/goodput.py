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

One synchronous data-parallel update with n = workers × devices_per_worker replicas, global batch
B and k accumulation steps runs k micro-batches of m = B/(n·k) examples per replica, then one
all-reduce of the gradients:

    T = k·s·t(m) + C − H,   H = min(o·C, r·s·t(m)),   examples/s = B / T

where C is the all-reduce time, o the share of C that may run during the backward pass, r the
backward pass's share of the step (≈ 2/3: backward costs about twice the forward), H the hidden
communication, and s ≥ 1 a compute-sharing factor (1 for devices with their own compute; for
replicas that share one host's CPU cores, s = n/c once n exceeds the host's c parallel replicas).

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

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

from tf_largebatch._validation import (
    _fail,
    check_choice,
    check_non_negative,
    check_positive,
    check_positive_int,
)
from tf_largebatch.phases import PhasePlan, plan_phases

TOPOLOGIES = ("parameter_server", "ring", "halving_doubling", "hierarchical")
INTER_ALGORITHMS = ("ring", "halving_doubling")


@dataclasses.dataclass(frozen=True)
class Link:
    """A point-to-point link in the α–β model: sending x bytes takes latency + x/bandwidth.

    Attributes:
      bandwidth_bytes_per_second: bytes per second in one direction.
      latency_seconds: fixed cost of one message.
      source: where the figures come from.
    """

    bandwidth_bytes_per_second: float
    latency_seconds: float
    source: str = ""

    def __post_init__(self) -> None:
        check_positive("bandwidth_bytes_per_second", self.bandwidth_bytes_per_second)
        check_non_negative("latency_seconds", self.latency_seconds)


_ETH = "IEEE 802.3 line rate / 8; latency: typical TCP over a switched LAN (assumption)"
# Line rates in one direction; real collectives reach less (protocol overhead, congestion).
INTERCONNECTS: dict[str, Link] = {
    "nvlink_p100": Link(20e9, 5e-6, "NVIDIA Tesla P100 whitepaper: NVLink 1.0, 20 GB/s per link"),
    "nvlink_v100": Link(25e9, 5e-6, "NVIDIA Tesla V100 whitepaper: NVLink 2.0, 25 GB/s per link"),
    "nvlink_a100": Link(300e9, 5e-6, "NVIDIA A100 datasheet: NVLink 3, 600 GB/s bidirectional"),
    "pcie3_x16": Link(15.75e9, 5e-6, "PCI-SIG: PCIe 3.0, 8 GT/s x 16 lanes, 128b/130b"),
    "pcie4_x16": Link(31.5e9, 5e-6, "PCI-SIG: PCIe 4.0, 16 GT/s x 16 lanes, 128b/130b"),
    "10gbe": Link(10e9 / 8, 10e-6, _ETH),
    "25gbe": Link(25e9 / 8, 10e-6, _ETH),
    "50gbe": Link(50e9 / 8, 10e-6, _ETH),
    "100gbe": Link(100e9 / 8, 10e-6, _ETH),
    "ib_edr": Link(100e9 / 8, 1e-6, "InfiniBand EDR 4x: 100 Gb/s; ~1 us MPI latency"),
    "ib_hdr": Link(200e9 / 8, 1e-6, "InfiniBand HDR 4x: 200 Gb/s; ~1 us MPI latency"),
}


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


def gradient_bytes(num_parameters: int, bytes_per_parameter: int = 4) -> int:
    """P = parameters × bytes per parameter (4 for float32, 2 for float16/bfloat16 gradients).

    Example:
      >>> gradient_bytes(25_500_000)  # ResNet-50, float32
      102000000
    """
    check_positive_int("num_parameters", num_parameters)
    check_positive_int("bytes_per_parameter", bytes_per_parameter)
    return num_parameters * bytes_per_parameter


def ring_allreduce_seconds(num_bytes: float, participants: int, link: Link) -> float:
    """Ring all-reduce: reduce-scatter then all-gather, n − 1 steps each.

    Each participant sends 2(n − 1) chunks of P/n bytes: T = 2(n − 1)·a + 2(n − 1)/n · P/bw.
    0 for one participant. (Thakur et al. 2005 §4; Goyal et al. §4.1 "bucket algorithm".)

    Example:
      >>> ring_allreduce_seconds(1e6, 4, Link(1e9, 1e-5))  # 6·1e-5 + 1.5·1e6/1e9
      0.00156
    """
    check_non_negative("num_bytes", num_bytes)
    check_positive_int("participants", participants)
    n = participants
    if n == 1:
        return 0.0
    return 2 * (n - 1) * link.latency_seconds + 2 * (n - 1) / n * num_bytes / (
        link.bandwidth_bytes_per_second
    )


def halving_doubling_allreduce_seconds(num_bytes: float, participants: int, link: Link) -> float:
    """Recursive halving (reduce-scatter) then recursive doubling (all-gather).

    log₂n steps each way with messages P/2, P/4, ...: T = 2⌈log₂n⌉·a + 2(n − 1)/n · P/bw. For a
    non-power-of-two n the ⌈log₂n⌉ steps approximate Rabenseifner's binary blocks (Goyal et al.
    §4.1 report no significant degradation).

    Example:
      >>> round(halving_doubling_allreduce_seconds(1e6, 4, Link(1e9, 1e-5)), 9)  # 4e-5 + 1.5e-3
      0.00154
    """
    check_non_negative("num_bytes", num_bytes)
    check_positive_int("participants", participants)
    n = participants
    if n == 1:
        return 0.0
    steps = math.ceil(math.log2(n))
    return 2 * steps * link.latency_seconds + 2 * (n - 1) / n * num_bytes / (
        link.bandwidth_bytes_per_second
    )


def parameter_server_seconds(num_bytes: float, participants: int, link: Link) -> float:
    """One parameter server on one of n participants: every other one pushes, then pulls, P.

    The server's link carries (n − 1)·P in (push), then, once the sum is complete, (n − 1)·P
    out (pull): T = 2·a + 2(n − 1)·P/bw. Linear in n, unlike the ring's 2(n − 1)/n < 2.

    Example:
      >>> parameter_server_seconds(1e6, 4, Link(1e9, 1e-5))  # 2e-5 + 6e6/1e9
      0.00602
    """
    check_non_negative("num_bytes", num_bytes)
    check_positive_int("participants", participants)
    n = participants
    if n == 1:
        return 0.0
    return 2 * link.latency_seconds + 2 * (n - 1) * num_bytes / link.bandwidth_bytes_per_second


def allreduce_seconds(
    topology: str,
    num_bytes: float,
    workers: int,
    devices_per_worker: int = 1,
    network: Link | None = None,
    intra: Link | None = None,
    inter_algorithm: str = "halving_doubling",
) -> float:
    """All-reduce time of P bytes over ``workers`` hosts with g = ``devices_per_worker`` each.

    With n = w·g devices, a = latency, bw = bandwidth, "i" the intra-host link and "n" the
    network (one NIC per host, shared by its g devices):

    - ``"parameter_server"``: server on one host; the other hosts' n − g devices push and pull
      P through its NIC: 2·a_n + 2(n − g)·P/bw_n (w = 1: `parameter_server_seconds` over g).
    - ``"ring"``: one flat ring of n devices, hosts contiguous: each of the 2(n − 1) steps waits
      for a network hop, each NIC carries 2(n − 1)/n·P: 2(n − 1)·a_n + 2(n − 1)/n·P/bw_n.
    - ``"halving_doubling"``: flat, nearest partners first, so log₂g steps stay in the host:
      2[log₂g·a_i + (g − 1)/g·P/bw_i] + 2[log₂w·a_n + (w − 1)/w·P/bw_n].
    - ``"hierarchical"``: intra-host ring reduce-scatter, an all-reduce of each device's P/g
      shard across hosts with ``inter_algorithm`` (g shards share the NIC: 2(w − 1)/w·P through
      it), intra-host all-gather: 2[(g − 1)·a_i + (g − 1)/g·P/bw_i] + inter(P, w, network).

    Args:
      topology: one of `TOPOLOGIES`.
      num_bytes: gradient bytes P (`gradient_bytes`).
      workers: hosts w.
      devices_per_worker: devices per host g.
      network: the link between hosts (needed when w > 1).
      intra: the link inside a host (needed when g > 1).
      inter_algorithm: ``"ring"`` or ``"halving_doubling"`` across hosts (hierarchical only).

    Returns:
      Seconds.

    Raises:
      ValueError: unknown topology or algorithm, bad counts, a needed link missing.

    Example:
      >>> link = Link(1e9, 0.0)
      >>> allreduce_seconds("ring", 1e6, 4, network=link)  # 2·3/4·1e6/1e9
      0.0015
    """
    check_choice("topology", topology, TOPOLOGIES)
    check_choice("inter_algorithm", inter_algorithm, INTER_ALGORITHMS)
    check_non_negative("num_bytes", num_bytes)
    check_positive_int("workers", workers)
    check_positive_int("devices_per_worker", devices_per_worker)
    w, g = workers, devices_per_worker
    if w > 1 and network is None:
        raise ValueError(f"Argument `network` is required for workers={w}. Received: network=None")
    if g > 1 and intra is None:
        raise ValueError(
            f"Argument `intra` is required for devices_per_worker={g}. Received: intra=None"
        )
    n, p = w * g, float(num_bytes)
    if w == 1:  # one host: every topology runs over the intra-host link
        if g == 1:
            return 0.0
        if topology == "parameter_server":
            return parameter_server_seconds(p, g, intra)
        if topology in ("ring", "hierarchical"):
            return ring_allreduce_seconds(p, g, intra)
        return halving_doubling_allreduce_seconds(p, g, intra)
    net_bw, net_lat = network.bandwidth_bytes_per_second, network.latency_seconds
    if topology == "parameter_server":
        return 2 * net_lat + 2 * (n - g) * p / net_bw
    if topology == "ring":
        return 2 * (n - 1) * net_lat + 2 * (n - 1) / n * p / net_bw
    intra_part = 0.0
    if topology == "halving_doubling":
        if g > 1:
            intra_part = halving_doubling_allreduce_seconds(p, g, intra)
        return intra_part + halving_doubling_allreduce_seconds(p, w, network)
    if g > 1:
        intra_part = ring_allreduce_seconds(p, g, intra)
    inter = (
        ring_allreduce_seconds(p, w, network)
        if inter_algorithm == "ring"
        else halving_doubling_allreduce_seconds(p, w, network)
    )
    return intra_part + inter


def overlap_fraction(
    communication_seconds: float, backward_seconds: float, overlappable: float = 1.0
) -> float:
    """Share of the communication hidden behind the backward pass.

    Gradients of late layers are ready early in the backward pass, so their all-reduce can run
    while earlier layers are differentiated. If a share o (``overlappable``) of the
    communication may start before the backward pass ends, the hidden time is
    H = min(o·C, t_backward) and the fraction H/C (0 when C = 0).

    Example:
      >>> overlap_fraction(0.04, 0.12), overlap_fraction(0.2, 0.12), overlap_fraction(0.04, 0.12, 0)
      (1.0, 0.6, 0.0)
    """
    check_non_negative("communication_seconds", communication_seconds)
    check_non_negative("backward_seconds", backward_seconds)
    if not 0.0 <= overlappable <= 1.0:
        _fail("overlappable", "in [0, 1]", overlappable)
    if communication_seconds == 0:
        return 0.0
    return min(overlappable * communication_seconds, backward_seconds) / communication_seconds


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


def examples_to_target(global_batch_size: float, noise_scale: float, min_examples: float) -> float:
    """E(B) = E_min·(1 + B/B_noise) (McCandlish et al. 2018, §2.3: the fit
    (S/S_min − 1)(E/E_min − 1) = 1 with B_crit = E_min/S_min ≈ B_noise).

    Example:
      >>> examples_to_target(200, 100, 1e6)
      3000000.0
    """
    check_positive("global_batch_size", global_batch_size)
    check_positive("noise_scale", noise_scale)
    check_positive("min_examples", min_examples)
    return min_examples * (1.0 + global_batch_size / noise_scale)


def steps_to_target(global_batch_size: float, noise_scale: float, min_steps: float) -> float:
    """S(B) = S_min·(1 + B_noise/B) (McCandlish et al. 2018, §2.3: the fit
    (S/S_min − 1)(E/E_min − 1) = 1 with B_crit = E_min/S_min ≈ B_noise).

    Example:
      >>> steps_to_target(50, 100, 1000)
      3000.0
    """
    check_positive("global_batch_size", global_batch_size)
    check_positive("noise_scale", noise_scale)
    check_positive("min_steps", min_steps)
    return min_steps * (1.0 + noise_scale / global_batch_size)


def min_examples_from_reference(
    reference_examples: float, reference_batch_size: float, noise_scale: float
) -> float:
    """E_min = E(B_ref)/(1 + B_ref/B_noise) from a run known to reach the target at B_ref.

    Example:
      >>> min_examples_from_reference(3e6, 200, 100)
      1000000.0
    """
    check_positive("reference_examples", reference_examples)
    check_positive("reference_batch_size", reference_batch_size)
    check_positive("noise_scale", noise_scale)
    return reference_examples / (1.0 + reference_batch_size / noise_scale)


def statistical_efficiency(
    global_batch_size: float, noise_scale: float, base_batch_size: float
) -> float:
    """Examples needed at B₀ over examples needed at B: E(B₀)/E(B) = (B_noise + B₀)/(B_noise + B).

    1 at B = B₀, ½ at B = B_noise + 2B₀; Pollux's EFFICIENCY (Qiao et al. 2021, §3).

    Example:
      >>> statistical_efficiency(300, 100, 100)
      0.5
    """
    check_positive("global_batch_size", global_batch_size)
    check_positive("noise_scale", noise_scale)
    check_positive("base_batch_size", base_batch_size)
    return (noise_scale + base_batch_size) / (noise_scale + global_batch_size)


def goodput(
    examples_per_second: float, global_batch_size: float, noise_scale: float, base_batch_size: float
) -> float:
    """Goodput = examples/s × statistical efficiency: useful examples/s measured at B₀."""
    check_non_negative("examples_per_second", examples_per_second)
    return examples_per_second * statistical_efficiency(
        global_batch_size, noise_scale, base_batch_size
    )


def time_to_target_seconds(
    examples_per_second: float, global_batch_size: float, noise_scale: float, min_examples: float
) -> float:
    """E(B)/(examples/s) = E_min·(1 + B/B_noise)/X."""
    check_positive("examples_per_second", examples_per_second)
    return examples_to_target(global_batch_size, noise_scale, min_examples) / examples_per_second


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
    §2.1), with an optional gradual warmup. Train it with ``examples/train.py --mode=decay_lr
    --decay_epochs= --epochs=E --global_batch_size=B --max_per_replica_batch_size=m``.
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


# Goyal et al. 2017: §4.3 Big Basin servers, 8 Tesla P100 GPUs on NVLink, 50 Gbit Ethernet;
# ResNet-50 ≈ 25.5M float32 parameters (§4.3 rounds to 25M, 100 MB); "backprop for ResNet-50 on
# a single NVIDIA Tesla P100 GPU takes 120 ms" (§4.3); n = 32 images per GPU (§5.1).
GOYAL_NUM_PARAMETERS = 25_500_000
GOYAL_BACKWARD_SECONDS = 0.120
GOYAL_PER_GPU_BATCH = 32
GOYAL_GPUS_PER_SERVER = 8


def goyal_cluster(
    servers: int, topology: str = "hierarchical", overlappable: float = 0.0
) -> Cluster:
    """Goyal et al.'s cluster: ``servers`` Big Basin hosts, 8 P100s on NVLink, 50 GbE.

    Their all-reduce (§4.1) is hierarchical: NCCL inside a server, recursive halving/doubling
    across servers.
    """
    return Cluster(
        workers=servers,
        devices_per_worker=GOYAL_GPUS_PER_SERVER,
        network=INTERCONNECTS["50gbe"],
        intra=INTERCONNECTS["nvlink_p100"],
        topology=topology,
        inter_algorithm="halving_doubling",
        overlappable=overlappable,
    )


def goyal_step_time() -> StepTimeModel:
    """t(32) = 0.18 s: the paper's 120 ms backward pass plus a forward pass of half that.

    Only t(32) matters for weak scaling at 32 images per GPU, so α carries it all.
    """
    return StepTimeModel(GOYAL_BACKWARD_SECONDS * 1.5, 0.0)


def goyal_scaling_efficiency(
    topology: str = "hierarchical", overlappable: float = 0.0, servers: int = 32
) -> float:
    """Predicted scaling efficiency of Goyal et al.'s setup from 1 server (8 GPUs) to ``servers``.

    Goyal et al. report "∼90% scaling efficiency when moving from 8 to 256 GPUs" (abstract,
    §5.5 and Figure 8). With the defaults (hierarchical, no overlap) the model gives 0.856; with
    the all-reduce fully pipelined behind backprop (``overlappable=1``, what their Caffe2/Gloo
    implementation does, §4.2) it gives 1.0, so the paper's 90% lies between the two bounds. A
    single parameter server over the same 50 GbE gives 0.03.

    Example:
      >>> round(goyal_scaling_efficiency(), 3)
      0.856
    """
    p = gradient_bytes(GOYAL_NUM_PARAMETERS)
    return scaling_efficiency(
        goyal_step_time(),
        goyal_cluster(servers, topology, overlappable),
        goyal_cluster(1, topology, overlappable),
        GOYAL_PER_GPU_BATCH,
        p,
    )


def goyal_iteration_seconds(
    servers: int, topology: str = "hierarchical", overlappable: float = 0.0
) -> float:
    """Predicted seconds per iteration of Goyal et al.'s setup at 32 images per GPU.

    Their §5.5 and Figure 7: one epoch (1,281,167 images) takes "over 16 minutes" at kn = 256
    (1 server) and "just 30 seconds" at kn = 11k (44 servers, 352 GPUs), and "the time per
    iteration increases only 12%" over that range. The model: 0.189 s and 0.221 s (+17%),
    i.e. 15.8 min and 25.1 s per epoch.

    Example:
      >>> round(goyal_iteration_seconds(1), 4), round(goyal_iteration_seconds(44), 4)
      (0.189, 0.221)
    """
    cluster = goyal_cluster(servers, topology, overlappable)
    batch = GOYAL_PER_GPU_BATCH * cluster.num_replicas
    return step_seconds(goyal_step_time(), cluster, batch, gradient_bytes(GOYAL_NUM_PARAMETERS))
