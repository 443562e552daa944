"""The goodput model: every formula against values computed by hand, and Goyal et al.'s setup.

Hand values are written out as arithmetic in the test (latency terms + bandwidth terms), never
taken from the code under test. Goyal et al. 2017 report "∼90% scaling efficiency when moving
from 8 to 256 GPUs" (abstract, §5.5, Figure 8); the model must land within 10 points.
"""

import math
import os
import subprocess
import sys

import pytest

from tf_largebatch import (
    goodput,
    goodput_allreduce,
    goodput_efficiency,
    goodput_goyal,
    goodput_search,
    goodput_throughput,
)
from tf_largebatch.goodput import (
    INTERCONNECTS,
    Cluster,
    Link,
    StepTimeModel,
    allreduce_seconds,
    examples_to_target,
    fit_link_latency,
    fit_shared_host,
    fit_step_time,
    goyal_scaling_efficiency,
    grid_search,
    halving_doubling_allreduce_seconds,
    min_examples_from_reference,
    overlap_fraction,
    parameter_server_seconds,
    recommendation_plan,
    ring_allreduce_seconds,
    scaling_efficiency,
    statistical_efficiency,
    step_seconds,
    steps_to_target,
    time_to_target_seconds,
)

LINK = Link(1e9, 1e-5)  # 1 GB/s, 10 µs
P = 1e6


def test_fit_step_time_hand_values():
    # b = 1, 2, 3; t = 1, 3, 2: b̄ = 2, t̄ = 2, Σ(b − b̄)(t − t̄) = 1, Σ(b − b̄)² = 2.
    model = fit_step_time([1, 2, 3], [1.0, 3.0, 2.0])
    assert model.beta_seconds_per_example == pytest.approx(0.5)
    assert model.alpha_seconds == pytest.approx(1.0)
    assert model(10) == pytest.approx(6.0)


def test_fit_step_time_recovers_a_line_exactly():
    batches = [8, 16, 64, 256]
    model = fit_step_time(batches, [2e-4 + 3e-6 * b for b in batches])
    assert model.alpha_seconds == pytest.approx(2e-4)
    assert model.beta_seconds_per_example == pytest.approx(3e-6)


def test_fit_step_time_keeps_alpha_and_beta_non_negative():
    # Unconstrained: t = −1 + 2b (b = 1, 2, 3; t = 1, 3, 5). With α = 0: β = Σbt/Σb² = 22/14.
    model = fit_step_time([1, 2, 3], [1.0, 3.0, 5.0])
    assert model.alpha_seconds == 0.0
    assert model.beta_seconds_per_example == pytest.approx(22 / 14)
    # Falling times: β = 0 and α = the mean (better than α = 0 here).
    model = fit_step_time([1, 2, 3], [3.0, 2.0, 1.0])
    assert model.beta_seconds_per_example == 0.0
    assert model.alpha_seconds == pytest.approx(2.0)


@pytest.mark.parametrize(
    "batches, seconds, name",
    [
        ([8, 8], [1.0, 2.0], "per_replica_batch_sizes"),
        ([8, 16], [1.0], "seconds"),
        ([8, 16], [1.0, 0.0], "seconds"),
    ],
)
def test_fit_step_time_errors(batches, seconds, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        fit_step_time(batches, seconds)


def test_gradient_bytes():
    assert goodput.gradient_bytes(25_500_000) == 102_000_000  # Goyal's ~100 MB
    assert goodput.gradient_bytes(1000, 2) == 2000
    with pytest.raises(ValueError, match="`num_parameters`.*Received: num_parameters=0"):
        goodput.gradient_bytes(0)


@pytest.mark.parametrize(
    "n, ring, hd, ps",
    [
        (1, 0.0, 0.0, 0.0),
        # n = 2: ring 2 latencies; halving/doubling 2·1; PS 2 latencies + 2·1·P.
        (2, 2 * 1e-5 + 1 * 1e-3, 2 * 1e-5 + 1 * 1e-3, 2 * 1e-5 + 2e-3),
        # n = 4: ring 6 latencies + 1.5·P/bw; HD 4 latencies + 1.5·P/bw; PS 2 + 6·P/bw.
        (4, 6e-5 + 1.5e-3, 4e-5 + 1.5e-3, 2e-5 + 6e-3),
        # n = 5: HD uses ⌈log₂5⌉ = 3 steps each way; bytes 2·4/5.
        (5, 8e-5 + 1.6e-3, 6e-5 + 1.6e-3, 2e-5 + 8e-3),
        # n = 8: ring 14 latencies, HD 6, bytes 2·7/8 = 1.75; PS 2·7.
        (8, 14e-5 + 1.75e-3, 6e-5 + 1.75e-3, 2e-5 + 14e-3),
    ],
)
def test_flat_allreduce_hand_values(n, ring, hd, ps):
    assert ring_allreduce_seconds(P, n, LINK) == pytest.approx(ring)
    assert halving_doubling_allreduce_seconds(P, n, LINK) == pytest.approx(hd)
    assert parameter_server_seconds(P, n, LINK) == pytest.approx(ps)


def test_ring_and_halving_doubling_send_the_same_bytes_latency_differs():
    no_latency = Link(1e9, 0.0)
    for n in (2, 4, 16, 256):
        assert ring_allreduce_seconds(P, n, no_latency) == pytest.approx(
            halving_doubling_allreduce_seconds(P, n, no_latency)
        )
    latency_only = Link(1e30, 1.0)
    assert ring_allreduce_seconds(P, 32, latency_only) == pytest.approx(62.0)  # 2(p − 1)
    assert halving_doubling_allreduce_seconds(P, 32, latency_only) == pytest.approx(10.0)  # 2 log₂p


# w = 4 hosts of g = 2 devices, P = 8 MB, intra 10 GB/s and 1 µs, network 1 GB/s and 10 µs.
INTRA = Link(1e10, 1e-6)
NET = Link(1e9, 1e-5)
P8 = 8e6
INTRA_RING_2 = 2 * 1 * 1e-6 + 2 * (1 / 2) * P8 / 1e10  # ring over g = 2 = 8.02e-4
INTER_HD_4 = 2 * 2 * 1e-5 + 2 * (3 / 4) * P8 / 1e9  # halving/doubling over w = 4 = 0.01204
INTER_RING_4 = 2 * 3 * 1e-5 + 2 * (3 / 4) * P8 / 1e9


@pytest.mark.parametrize(
    "topology, inter, expected",
    [
        ("hierarchical", "halving_doubling", INTRA_RING_2 + INTER_HD_4),
        ("hierarchical", "ring", INTRA_RING_2 + INTER_RING_4),
        # nearest partners first: one intra step each way, then log₂4 network steps.
        ("halving_doubling", "halving_doubling", 2 * 1e-6 + P8 / 1e10 + INTER_HD_4),
        # flat ring of 8 devices: 14 network latencies, 2·7/8 of P through each NIC.
        ("ring", "halving_doubling", 14 * 1e-5 + 2 * (7 / 8) * P8 / 1e9),
        # the server host's NIC carries push + pull of the other 6 devices' gradients.
        ("parameter_server", "halving_doubling", 2 * 1e-5 + 2 * 6 * P8 / 1e9),
    ],
)
def test_cluster_allreduce_hand_values(topology, inter, expected):
    got = allreduce_seconds(topology, P8, 4, 2, network=NET, intra=INTRA, inter_algorithm=inter)
    assert got == pytest.approx(expected)


def test_single_host_uses_the_intra_link():
    assert allreduce_seconds("ring", P8, 1, 4, intra=INTRA) == pytest.approx(
        6 * 1e-6 + 1.5 * P8 / 1e10
    )
    assert allreduce_seconds("hierarchical", P8, 1, 1) == 0.0
    assert allreduce_seconds("parameter_server", P8, 1, 4, intra=INTRA) == pytest.approx(
        2e-6 + 6 * P8 / 1e10
    )


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"topology": "star"}, "topology"),
        ({"inter_algorithm": "tree"}, "inter_algorithm"),
        ({"network": None}, "network"),
        ({"intra": None}, "intra"),
        ({"workers": 0}, "workers"),
    ],
)
def test_allreduce_errors(kwargs, name):
    args = {"topology": "ring", "num_bytes": P8, "workers": 2, "devices_per_worker": 2}
    args.update(network=NET, intra=INTRA)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"`{name}`"):
        allreduce_seconds(**args)


def test_presets_state_their_figures():
    assert INTERCONNECTS["50gbe"].bandwidth_bytes_per_second == 6.25e9  # 50 Gbit/s / 8
    assert INTERCONNECTS["10gbe"].bandwidth_bytes_per_second == 1.25e9
    assert INTERCONNECTS["ib_edr"].bandwidth_bytes_per_second == 12.5e9
    assert INTERCONNECTS["ib_hdr"].bandwidth_bytes_per_second == 25e9
    assert INTERCONNECTS["nvlink_p100"].bandwidth_bytes_per_second == 20e9
    assert all(link.source for link in INTERCONNECTS.values())
    with pytest.raises(ValueError, match="`bandwidth_bytes_per_second`"):
        Link(0.0, 1e-6)
    with pytest.raises(KeyError, match="'ethernet_10g'. Presets: nvlink_p100, .*10gbe"):
        INTERCONNECTS["ethernet_10g"]
    assert INTERCONNECTS.get("ethernet_10g") is None and "10gbe" in INTERCONNECTS


@pytest.mark.parametrize(
    "comm, backward, overlappable, expected",
    [
        (0.04, 0.12, 1.0, 1.0),  # all of it fits in the backward pass
        (0.2, 0.12, 1.0, 0.6),  # 0.12 of 0.2 hidden
        (0.04, 0.12, 0.5, 0.5),  # only half may start early
        (0.04, 0.12, 0.0, 0.0),
        (0.0, 0.12, 1.0, 0.0),
    ],
)
def test_overlap_fraction(comm, backward, overlappable, expected):
    assert overlap_fraction(comm, backward, overlappable) == pytest.approx(expected)


def test_step_seconds_hand_values():
    t = StepTimeModel(0.01, 0.001)
    cluster = Cluster(2, network=Link(1e9, 0.0))  # C = 2·1/2·1e7/1e9 = 0.01
    # B = 64 on 2 replicas: m = 32, t = 0.042; no overlap: 0.042 + 0.01.
    assert step_seconds(t, cluster, 64, 1e7) == pytest.approx(0.052)
    # k = 2: m = 16, t = 0.026, two micro-batches then one all-reduce.
    assert step_seconds(t, cluster, 64, 1e7, 2) == pytest.approx(2 * 0.026 + 0.01)
    # fully overlappable: hidden = min(0.01, 2/3·0.026) = 0.01.
    overlapped = Cluster(2, network=Link(1e9, 0.0), overlappable=1.0)
    assert step_seconds(t, overlapped, 64, 1e7, 2) == pytest.approx(2 * 0.026)
    # backward too short to hide it all: hidden = 2/3·0.011 with m = 1.
    assert step_seconds(t, overlapped, 2, 1e7) == pytest.approx(0.011 + 0.01 - 2 / 3 * 0.011)
    assert goodput.examples_per_second(t, cluster, 64, 1e7) == pytest.approx(64 / 0.052)
    # a batch that does not split over 2 replicas x 2 micro-batches is refused, not rounded
    with pytest.raises(ValueError, match="by 2 replicas x 2 steps. Received: global_batch_size=66"):
        step_seconds(t, cluster, 66, 1e7, 2)
    with pytest.raises(ValueError, match="global_batch_size=63"):
        goodput.examples_per_second(t, cluster, 63, 1e7)


def test_compute_sharing_on_one_host():
    t = StepTimeModel(0.0, 1e-3)
    host = Cluster(1, 4, intra=Link(1e9, 0.0), topology="ring", compute_slots=2.0)
    assert host.compute_sharing == 2.0  # 4 replicas on 2 slots
    assert host.with_size(1, 1).compute_sharing == 1.0  # never faster than alone
    ring = 2 * 3 / 4 * 1e6 / 1e9
    assert step_seconds(t, host, 4 * 10, 1e6) == pytest.approx(2.0 * 0.01 + ring)


def test_scaling_efficiency_is_the_step_time_ratio():
    t = StepTimeModel(0.1, 0.0)
    big = Cluster(4, network=Link(1e9, 0.0))  # C = 1.5·1e8/1e9 = 0.15
    small = Cluster(1)
    assert scaling_efficiency(t, big, small, 32, 1e8) == pytest.approx(0.1 / 0.25)


def test_noise_scale_formulas():
    # McCandlish eq. 2.11 with B_noise = 100.
    assert examples_to_target(200, 100, 1e6) == pytest.approx(3e6)
    assert steps_to_target(50, 100, 1000) == pytest.approx(3000)
    assert min_examples_from_reference(3e6, 200, 100) == pytest.approx(1e6)
    # E_min = S_min·B_noise makes S(B)·B = E(B) at every B.
    for batch in (10, 100, 1000):
        assert steps_to_target(batch, 100, 1e4) * batch == pytest.approx(
            examples_to_target(batch, 100, 1e6)
        )
    assert statistical_efficiency(100, 100, 100) == 1.0
    assert statistical_efficiency(300, 100, 100) == pytest.approx(0.5)  # B = B_noise + 2B₀
    assert statistical_efficiency(50, 100, 100) == pytest.approx(200 / 150)  # smaller than B₀
    assert goodput.goodput(1000.0, 300, 100, 100) == pytest.approx(500.0)
    assert time_to_target_seconds(1000.0, 100, 100, 1e5) == pytest.approx(200.0)
    with pytest.raises(ValueError, match="`noise_scale`.*Received: noise_scale=0"):
        examples_to_target(10, 0, 1.0)


def _grid(**kwargs):
    t = StepTimeModel(0.01, 1e-4)
    cluster = Cluster(1, network=Link(1e8, 1e-3), topology="ring")
    args = dict(
        step_time=t,
        cluster=cluster,
        num_bytes=1e6,
        noise_scale=100.0,
        min_examples=1e5,
        base_batch_size=32,
        workers=[1, 2, 4],
        global_batch_sizes=[32, 128, 512],
        accumulation_steps=[1, 2],
    )
    args.update(kwargs)
    return grid_search(**args)


def test_grid_search_hand_checked_point():
    points = _grid()
    point = next(
        p for p in points if (p.workers, p.global_batch_size, p.accumulation_steps) == (2, 128, 1)
    )
    # m = 64, t = 0.0164; ring over 2: 2·1e-3 + 1e6/1e8 = 0.012; T = 0.0284.
    assert point.per_replica_batch_size == 64
    assert point.step_seconds == pytest.approx(0.0284)
    assert point.examples_per_second == pytest.approx(128 / 0.0284)
    assert point.scaling_efficiency == pytest.approx((128 / 0.0284) / (2 * 64 / 0.0164))
    assert point.statistical_efficiency == pytest.approx(132 / 228)
    e = 1e5 * (1 + 128 / 100)
    assert point.time_to_target_seconds == pytest.approx(e / (128 / 0.0284))
    assert point.device_hours == pytest.approx(2 * point.time_to_target_seconds / 3600)
    times = [p.time_to_target_seconds for p in points]
    assert times == sorted(times)
    # B = 32 on 4 workers with k = 2 is m = 4; B = 32 with k = 2 on 1 worker is m = 16.
    assert len(points) == 3 * 3 * 2


def test_grid_search_best_point_by_brute_force():
    points = _grid()
    best = min(points, key=lambda p: p.time_to_target_seconds)
    assert points[0] == best
    # hand check of the winner's time: one worker, B = 128, k = 1: T = 0.01 + 0.0128.
    assert (best.workers, best.global_batch_size, best.accumulation_steps) == (1, 128, 1)
    assert best.time_to_target_seconds == pytest.approx(1e5 * 2.28 * 0.0228 / 128)


def test_grid_search_constraints():
    assert all(p.per_replica_batch_size <= 64 for p in _grid(max_per_replica_batch_size=64))
    assert {p.num_replicas for p in _grid(budget_devices=2)} == {1, 2}
    limited = _grid(budget_device_hours=0.02)  # the best point needs 40.6 s = 0.0113 h
    assert limited and all(p.device_hours <= 0.02 for p in limited)
    assert len(limited) < len(_grid())
    assert {p.num_replicas for p in _grid(global_batch_sizes=[3])} == {1}  # 3 % 2 != 0
    with pytest.raises(ValueError, match="`budget_devices`"):
        _grid(budget_devices=0)


def test_recommendation_plan():
    point = _grid()[0]  # B = 128
    plan = recommendation_plan(point, 1000, 100.0, 1e5, 0.1, 32, warmup_epochs=2)
    assert plan.epochs == math.ceil(1e5 * (1 + 128 / 100) / 1000)  # 228
    assert [p.global_batch_size for p in plan.phases] == [128]
    assert plan.phases[0].learning_rate == pytest.approx(0.1 * 128 / 32)
    assert plan.warmup == "gradual" and plan.warmup_epochs == 2
    assert plan.mode == "decay_lr"


def test_fit_shared_host_recovers_its_parameters():
    t = StepTimeModel(1e-4, 2e-6)
    host = Cluster(1, 1, intra=Link(5e9, 1.5e-4), topology="ring", compute_slots=1.5)
    devices, batches, seconds = [], [], []
    for d in (2, 4):
        for b in (8, 64, 512):
            devices.append(d)
            batches.append(b)
            seconds.append(step_seconds(t, host.with_size(1, d), b * d, 4e4))
    slots, link = fit_shared_host(t, devices, batches, seconds, 4e4, 5e9)
    assert slots == pytest.approx(1.5)
    assert link.latency_seconds == pytest.approx(1.5e-4)
    with pytest.raises(ValueError, match="`num_devices`"):
        fit_shared_host(t, [1, 1], [8, 64], [1e-4, 2e-4], 4e4, 5e9)  # no d > 1: no latency


def test_fit_link_latency_recovers_it():
    t = StepTimeModel(1e-4, 2e-6)
    workers = Cluster(2, network=Link(1e9, 2e-3), topology="ring", compute_slots=1.5)
    seconds = [step_seconds(t, workers, 2 * b, 4e4) for b in (8, 128)]
    link = fit_link_latency(t, workers, [8, 128], seconds, 4e4)
    assert link.latency_seconds == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="`cluster`"):
        fit_link_latency(t, Cluster(1), [8], [1.0], 4e4)


# Goyal et al. 2017 §4.1/§4.3: 8 P100s per server on NVLink, 50 GbE, ResNet-50 25.5M float32
# parameters, backprop 120 ms, 32 images per GPU.
GOYAL_P = 25.5e6 * 4
GOYAL_COMPUTE = 0.12 * 1.5  # backward 120 ms + forward ≈ half of it
INTRA_8 = 2 * 7 * 5e-6 + 2 * (7 / 8) * GOYAL_P / 20e9  # NVLink ring reduce-scatter + all-gather
INTER_32 = 2 * 5 * 10e-6 + 2 * (31 / 32) * GOYAL_P / 6.25e9  # halving/doubling over 32 servers


def test_goyal_hand_computation():
    expected = (GOYAL_COMPUTE + INTRA_8) / (GOYAL_COMPUTE + INTRA_8 + INTER_32)
    assert expected == pytest.approx(0.8563, abs=1e-4)
    assert goyal_scaling_efficiency() == pytest.approx(expected)


def test_goyal_within_ten_points_of_their_ninety_percent():
    """Goyal et al.: ∼90% from 8 to 256 GPUs. No overlap and full overlap bracket it."""
    no_overlap = goyal_scaling_efficiency("hierarchical", overlappable=0.0)
    pipelined = goyal_scaling_efficiency("hierarchical", overlappable=1.0)
    assert 0.80 <= no_overlap <= 1.00
    assert 0.80 <= pipelined <= 1.00
    assert no_overlap <= 0.90 <= pipelined
    # The communication (40.7 ms) fits in the 120 ms backward pass: pipelining hides all of it.
    assert pipelined == pytest.approx(1.0)


def test_goyal_needed_a_bandwidth_optimal_allreduce():
    """A single parameter server over the same 50 GbE would be far below their 90%."""
    server = goyal_scaling_efficiency("parameter_server")
    # 8 GPUs: PS over NVLink, 2·7·P/20e9 = 71.4 ms; 256: 2·(256 − 8)·P/6.25e9 = 8.09 s.
    hand = (GOYAL_COMPUTE + 2 * 5e-6 + 14 * GOYAL_P / 20e9) / (
        GOYAL_COMPUTE + 2 * 10e-6 + 2 * 248 * GOYAL_P / 6.25e9
    )
    assert server == pytest.approx(hand)
    assert server < 0.05
    assert goyal_scaling_efficiency("ring") > 0.8  # a flat ring moves the same bytes per NIC


def test_goyal_bandwidth_analysis_matches_the_paper():
    """§4.3: "allreduce requires ∼2× bytes on the network", 200 MB per iteration."""
    nic_bytes = 2 * (31 / 32) * GOYAL_P
    assert nic_bytes == pytest.approx(197.6e6, rel=1e-3)
    inter = allreduce_seconds(
        "hierarchical",
        GOYAL_P,
        32,
        8,
        network=INTERCONNECTS["50gbe"],
        intra=INTERCONNECTS["nvlink_p100"],
    )
    assert inter == pytest.approx(INTRA_8 + INTER_32)


_PURE_LOADER = """
import importlib.util, pathlib, sys, types
sys.modules["tensorflow"] = None
sys.modules["keras"] = None
package_dir = pathlib.Path(sys.argv[1])
stub = types.ModuleType("tf_largebatch")
stub.__path__ = [str(package_dir)]
sys.modules["tf_largebatch"] = stub
for name in ("_validation", "scaling", "phases", "goodput"):
    spec = importlib.util.spec_from_file_location(
        f"tf_largebatch.{name}", package_dir / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
print(round(sys.modules["tf_largebatch.goodput"].goyal_scaling_efficiency(), 4))
"""


def test_goodput_imports_no_tensorflow():
    package_dir = os.path.dirname(goodput.__file__)
    result = subprocess.run(
        [sys.executable, "-c", _PURE_LOADER, package_dir],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0.8563"


GOODPUT_MODULES = (
    goodput_allreduce,
    goodput_throughput,
    goodput_efficiency,
    goodput_search,
    goodput_goyal,
)


def test_docstring_examples():
    import doctest

    results = [doctest.testmod(module) for module in GOODPUT_MODULES]
    assert sum(r.attempted for r in results) >= 12 and sum(r.failed for r in results) == 0


def test_goodput_exports_every_public_name_of_its_modules():
    """`tf_largebatch.goodput.X` keeps working for everything the split modules define."""
    for module in GOODPUT_MODULES:
        defined = {
            name
            for name, value in vars(module).items()
            if not name.startswith("_")
            and (getattr(value, "__module__", None) == module.__name__ or name.isupper())
        }
        assert defined <= set(goodput.__all__), module.__name__
        for name in defined:
            assert getattr(goodput, name) is getattr(module, name)
    assert sorted(goodput.__all__) == sorted(set(goodput.__all__))


def test_goyal_iteration_and_epoch_times_against_the_paper():
    """§5.5/Fig. 7: epoch "over 16 minutes" at kn = 256 (8 GPUs), "just 30 seconds" at kn = 11k
    (352 GPUs); "the time per iteration increases only 12%" between them."""
    epoch = 1_281_167
    t8 = goodput.goyal_iteration_seconds(1)
    t352 = goodput.goyal_iteration_seconds(44)
    assert t8 == pytest.approx(GOYAL_COMPUTE + INTRA_8)
    inter_44 = 2 * 6 * 10e-6 + 2 * (43 / 44) * GOYAL_P / 6.25e9  # ⌈log₂44⌉ = 6
    assert t352 == pytest.approx(GOYAL_COMPUTE + INTRA_8 + inter_44)
    assert abs(t352 / t8 - 1.12) < 0.10  # model +16.9 % against their +12 %
    assert epoch / 256 * t8 / 60 == pytest.approx(16, rel=0.05)  # model 15.8 min
    assert epoch / (256 * 44) * t352 == pytest.approx(30, rel=0.2)  # model 25.1 s
