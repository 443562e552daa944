r"""All-reduce cost of each reduction topology in the α–β (latency–bandwidth) model.

Pure Python (no TensorFlow); part of the goodput model (`tf_largebatch.goodput`). Sending x
bytes over a `Link` takes latency + x/bandwidth; `allreduce_seconds` prices P gradient bytes over
w hosts of g devices for a single parameter server, a ring, recursive halving/doubling and a
two-level hierarchy (NVLink, then the network), with bandwidth and latency presets for common
interconnects in `INTERCONNECTS`. `overlap_fraction` is the share of that communication hidden
behind the backward pass.

References:
  Thakur, Rabenseifner & Gropp 2005, "Optimization of Collective Communication Operations in
    MPICH" (ring and recursive halving/doubling costs).
  Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", §4.
"""

from __future__ import annotations

import dataclasses
import math

from tf_largebatch._validation import (
    _fail,
    check_choice,
    check_non_negative,
    check_positive,
    check_positive_int,
)

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


class _Presets(dict):
    """A dict whose missing key names the presets there are."""

    def __missing__(self, key: str) -> Link:
        raise KeyError(f"No interconnect preset {key!r}. Presets: {', '.join(self)}")


_ETH = "IEEE 802.3 line rate / 8; latency: typical TCP over a switched LAN (assumption)"
# Line rates in one direction; real collectives reach less (protocol overhead, congestion).
INTERCONNECTS: dict[str, Link] = _Presets(
    {
        "nvlink_p100": Link(
            20e9, 5e-6, "NVIDIA Tesla P100 whitepaper: NVLink 1.0, 20 GB/s per link"
        ),
        "nvlink_v100": Link(
            25e9, 5e-6, "NVIDIA Tesla V100 whitepaper: NVLink 2.0, 25 GB/s per link"
        ),
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
)


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
