"""The phase planner against Smith et al. 2018's CIFAR-10 recipe and the formulas it keeps."""

import dataclasses
import json

import numpy as np
import pytest

from tf_largebatch import plan_phases
from tf_largebatch.phases import Phase, PhasePlan, steps_per_epoch
from tf_largebatch.scaling import scale_learning_rate, suggested_scaling_rule

# Smith et al. 2018 §5.1: N = 50,000, B0 = 128, ε = 0.1 per 128, m = 0.9, ÷5 at 60/120/160 of 200.
SMITH = dict(
    dataset_size=50_000,
    epochs=200,
    global_batch_size=128,
    base_learning_rate=0.1,
    base_batch_size=128,
    decay_epochs=(60, 120, 160),
    decay_factor=0.2,
    momentum=0.9,
)


def smith(mode, **kw):
    return plan_phases(mode, **{**SMITH, **kw})


def test_decay_lr_counts_and_rates():
    plan = smith("decay_lr")
    assert [p.global_batch_size for p in plan.phases] == [128] * 4
    assert [p.learning_rate for p in plan.phases] == pytest.approx([0.1, 0.02, 0.004, 0.0008])
    assert plan.total_steps == 390 * 200  # ⌊50000/128⌋ = 390
    assert plan.total_steps == pytest.approx(78_000, rel=0.01)


def test_grow_batch_counts():
    plan = smith("grow_batch")
    assert [p.global_batch_size for p in plan.phases] == [128, 640, 3200, 16000]
    assert [p.learning_rate for p in plan.phases] == pytest.approx([0.1] * 4)
    assert plan.total_steps == 390 * 60 + 78 * 60 + 15 * 40 + 3 * 40
    assert plan.total_steps == pytest.approx(29_000, rel=0.01)


def test_hybrid_counts():
    plan = smith("hybrid", max_global_batch_size=640)
    assert [p.global_batch_size for p in plan.phases] == [128, 640, 640, 640]
    assert [p.learning_rate for p in plan.phases] == pytest.approx([0.1, 0.1, 0.02, 0.004])
    assert plan.total_steps == pytest.approx(34_400, rel=0.01)


def test_grow_batch_and_decay_lr_keep_smith_quantity_per_interval():
    # g ≈ εN/(B(1 − m)): both modes keep ε/(B(1 − m)) equal in every epoch interval.
    decay, grow = smith("decay_lr"), smith("grow_batch")
    hybrid = smith("hybrid", max_global_batch_size=640)
    for d, g, h in zip(decay.phases, grow.phases, hybrid.phases):
        q = d.learning_rate / (d.global_batch_size * (1 - d.momentum))
        assert g.learning_rate / (g.global_batch_size * (1 - g.momentum)) == pytest.approx(q)
        assert h.learning_rate / (h.global_batch_size * (1 - h.momentum)) == pytest.approx(q)
        assert (d.start_epoch, d.end_epoch) == (g.start_epoch, g.end_epoch)


def test_momentum_scaling():
    # ε = 0.5 (linear rule from 0.1 per 128 at B = 640), m 0.9 → 0.98 multiplies B by 5: 3200.
    plan = smith("decay_lr", global_batch_size=640, scaled_momentum=0.98)
    first = plan.phases[0]
    assert (first.global_batch_size, first.momentum) == (3200, 0.98)
    assert first.learning_rate == pytest.approx(0.5)
    ref = smith("decay_lr").phases[0]
    assert first.learning_rate / (first.global_batch_size * (1 - first.momentum)) == pytest.approx(
        ref.learning_rate / (ref.global_batch_size * (1 - ref.momentum))
    )
    assert plan.noise_scale(first) == pytest.approx(0.5 * (50_000 / 3200 - 1) / 0.02)


def test_rounding_rule_is_the_users_choice():
    kept = smith("decay_lr", drop_remainder=False)
    assert kept.phases[0].steps_per_epoch == 391  # ⌈50000/128⌉
    assert kept.total_steps == 391 * 200
    assert "dropped" in str(smith("decay_lr")) and "kept" in str(kept)


def test_plan_schedule_follows_steps_through_phases():
    plan = smith("hybrid", max_global_batch_size=640, warmup_epochs=5)
    schedule = plan.learning_rate_schedule()
    starts = plan.phase_start_steps()
    assert starts == [0, 23_400, 28_080, 31_200]
    for b in starts[1:] + [plan.warmup_steps]:
        for step in (b - 1, b, b + 1):
            assert float(schedule(step)) == pytest.approx(
                plan.learning_rate_at_step(step), rel=1e-6
            )
    # The phase at epoch 160 starts at step 31,200; a raw-step schedule with a fixed
    # 390 steps/epoch would put it at 62,400 — far past the end of this run (34,320 steps).
    assert float(schedule(31_200)) == pytest.approx(0.004)
    assert float(schedule(31_199)) == pytest.approx(0.02)
    assert plan.epoch_at_step(31_200) == 160
    assert plan.step_at_epoch(160) == 31_200


def test_gradual_warmup_in_plan():
    plan = smith("decay_lr", global_batch_size=1024, warmup_epochs=5)  # k = 8, 48 steps/epoch
    w = plan.warmup_steps
    assert w == 5 * (50_000 // 1024)
    assert plan.learning_rate_at_step(0) == pytest.approx(0.1)  # unscaled η
    assert plan.learning_rate_at_step(w // 2) == pytest.approx(0.1 + 0.7 * (w // 2) / w)
    assert plan.learning_rate_at_step(w) == pytest.approx(0.8)  # kη


def test_table_and_dict():
    plan = smith("grow_batch")
    table = plan.table()
    assert "16000" in table and "total steps=28800" in table
    d = plan.to_dict()
    assert d["total_steps"] == 28_800 and len(d["phases"]) == 4
    assert d["phases"][1]["steps"] == 78 * 60


def test_plot(tmp_path):
    path = tmp_path / "plan.png"
    smith("hybrid", max_global_batch_size=640).plot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "mode, kwargs, name",
    [
        ("decay_lr", {"decay_epochs": (0, 60)}, "decay_epochs"),
        ("decay_lr", {"decay_epochs": (60, 200)}, "decay_epochs"),
        ("decay_lr", {"decay_epochs": (120, 60)}, "decay_epochs"),
        ("grow_batch", {"decay_factor": 1.0}, "decay_factor"),
        ("grow_batch", {"decay_factor": 5.0}, "decay_factor"),
        ("hybrid", {"max_global_batch_size": 64}, "max_global_batch_size"),
        ("hybrid", {}, "max_global_batch_size"),
        ("grow_batch", {"max_global_batch_size": 1000}, "max_global_batch_size"),
        ("decay_lr", {"global_batch_size": 60_000}, "global_batch_size"),
        ("grow_batch", {"dataset_size": 10_000}, "global_batch_size"),  # 16000 > N
        ("decay_lr", {"global_batch_size": -128}, "global_batch_size"),
        ("decay_lr", {"momentum": 1.0}, "momentum"),
        ("decay_lr", {"warmup_epochs": 61}, "warmup_epochs"),
        ("decay_lr", {"base_learning_rate": 0}, "base_learning_rate"),
        ("shrink", {}, "mode"),
        ("decay_lr", {"scaling_rule": "cubic"}, "rule"),
        ("decay_lr", {"scaled_momentum": 0.5}, "scaled_momentum"),
    ],
)
def test_bad_input(mode, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        plan_phases(mode, **{**SMITH, **kwargs})


def test_warmup_at_boundary_is_allowed():
    plan = smith("decay_lr", warmup_epochs=60)
    assert isinstance(plan, PhasePlan) and plan.warmup_steps == 60 * 390


def test_warmup_never_ramps_down_below_the_reference_batch():
    plan = plan_phases("decay_lr", 50_000, 10, 8, 0.1, base_batch_size=256, warmup_epochs=1)
    assert plan.warmup_initial_learning_rate == pytest.approx(0.1 * 8 / 256)
    assert plan.learning_rate_at_step(0) == pytest.approx(plan.learning_rate_at_step(6250))


# --- The run step by step: segments, positions, batch sizes ---------------------------------


def reference_walk(plan):
    """Per-step reference: each step's batch and (epoch, offset) by walking the epochs."""
    batches = [p.global_batch_size for p in plan.phases for _ in range(p.steps)]
    n, epoch, offset, positions = plan.dataset_size, 0, 0, []
    for b in batches:
        if n - offset == 0 or (plan.drop_remainder and n - offset < b):
            epoch, offset = epoch + 1, 0
        positions.append((epoch, offset))
        offset = min(offset + b, n)
    return batches, positions


def grouped(plan, batches, positions):
    """Reference segments: maximal runs of steps with one phase and one epoch."""
    starts = plan.phase_start_steps()
    phase_of = [sum(s >= st for st in starts) - 1 for s in range(len(batches))]
    runs = []
    for s, (e, o) in enumerate(positions):
        if runs and runs[-1][0] == phase_of[s] and runs[-1][1] == e:
            runs[-1][3] += 1
        else:
            runs.append([phase_of[s], e, s, 1, o])
    return [tuple(r) for r in runs]


def step_plan(n, spec, drop_remainder=True):
    """A plan of step-defined phases from (global batch, steps) pairs (epochs filled in)."""
    phases = [
        Phase(0, 1, b, 0.1, 0.9, steps_per_epoch(n, b, drop_remainder), num_steps=k)
        for b, k in spec
    ]
    plan = PhasePlan(tuple(phases), "custom", n, drop_remainder=drop_remainder)
    epoch, offset = plan.position_at_step(plan.total_steps)
    end = epoch + (offset > 0)  # the run's last epoch is one it has started
    return dataclasses.replace(
        plan, phases=tuple(dataclasses.replace(p, end_epoch=end) for p in phases)
    )


@pytest.mark.parametrize(
    "mode, kwargs",
    [
        ("decay_lr", {}),
        ("decay_lr", {"drop_remainder": False}),
        ("grow_batch", {}),
        ("grow_batch", {"drop_remainder": False}),
        ("hybrid", {"max_global_batch_size": 640}),
    ],
)
def test_segments_of_epoch_aligned_plans_are_phase_epoch_pairs(mode, kwargs):
    plan = smith(mode, **kwargs)
    expected = [
        (i, e, plan.step_at_epoch(e), p.steps_per_epoch, 0)
        for i, p in enumerate(plan.phases)
        for e in range(p.start_epoch, p.end_epoch)
    ]
    got = [dataclasses.astuple(s) for s in plan.segments()]
    assert got == expected and len(got) == 200
    batches, positions = reference_walk(plan)
    assert got == grouped(plan, batches, positions)
    for b in plan.phase_start_steps()[1:] + [plan.step_at_epoch(61)]:
        for step in (b - 1, b, b + 1):
            assert plan.batch_size_at_step(step) == batches[step]
            assert plan.position_at_step(step) == positions[step]
    assert plan.position_at_step(plan.total_steps) == (200, 0)
    assert plan.batch_size_at_step(plan.total_steps) == plan.phases[-1].global_batch_size


def test_segments_and_positions_with_phases_inside_an_epoch():
    # N = 100: 2 steps of 30 (offsets 0, 30); then batch 50: 40 left < 50, so epoch 0's last
    # 40 are dropped; epoch 1 at 0 and 50; epoch 2 at 0; then batch 20 at 50 and 70; 10 left
    # < 20: epoch 3 at 0; the run stops at example 20 of epoch 3.
    plan = step_plan(100, [(30, 2), (50, 3), (20, 3)])
    assert [dataclasses.astuple(s) for s in plan.segments()] == [
        (0, 0, 0, 2, 0),
        (1, 1, 2, 2, 0),
        (1, 2, 4, 1, 0),
        (2, 2, 5, 2, 50),
        (2, 3, 7, 1, 0),
    ]
    positions = [plan.position_at_step(s) for s in range(plan.total_steps + 1)]
    assert positions == [
        (0, 0),
        (0, 30),
        (1, 0),
        (1, 50),
        (2, 0),
        (2, 50),
        (2, 70),
        (3, 0),
        (3, 20),
    ]
    assert [plan.batch_size_at_step(s) for s in range(9)] == [30, 30, 50, 50, 50, 20, 20, 20, 20]
    assert plan.phase_start_steps() == [0, 2, 5]
    assert plan.epochs == 4 and [plan.step_at_epoch(e) for e in range(5)] == [0, 2, 4, 7, 8]
    assert [plan.phase_index(e) for e in range(4)] == [0, 1, 1, 2]
    assert plan.epoch_at_step(6) == pytest.approx(2.7)


def test_segments_keep_the_partial_batch_when_asked():
    # drop_remainder=False: batch 50 at offset 60 takes the last 40 examples of epoch 0.
    plan = step_plan(100, [(30, 2), (50, 3), (20, 3)], drop_remainder=False)
    assert [dataclasses.astuple(s) for s in plan.segments()] == [
        (0, 0, 0, 2, 0),
        (1, 0, 2, 1, 60),
        (1, 1, 3, 2, 0),
        (2, 2, 5, 3, 0),
    ]
    batches, positions = reference_walk(plan)
    assert [dataclasses.astuple(s) for s in plan.segments()] == grouped(plan, batches, positions)
    assert plan.position_at_step(plan.total_steps) == (2, 60)


@pytest.mark.parametrize("drop_remainder", [True, False])
@pytest.mark.parametrize(
    "spec", [[(7, 5), (9, 20), (13, 11)], [(10, 10), (25, 4), (3, 40)], [(33, 1), (1, 150)]]
)
def test_positions_match_the_step_by_step_walk(spec, drop_remainder):
    plan = step_plan(100, spec, drop_remainder)
    batches, positions = reference_walk(plan)
    assert [plan.batch_size_at_step(s) for s in range(len(batches))] == batches
    assert [plan.position_at_step(s) for s in range(len(batches))] == positions
    segments = plan.segments()
    assert [dataclasses.astuple(s) for s in segments] == grouped(plan, batches, positions)
    assert sum(s.num_steps for s in segments) == plan.total_steps
    for s in segments:  # a segment never runs past the end of its epoch
        end = s.example_offset + (s.num_steps - 1) * plan.phases[s.phase_index].global_batch_size
        assert end < plan.dataset_size


def test_step_queries_reject_bad_steps():
    plan = smith("decay_lr")
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="`step`"):
            plan.batch_size_at_step(bad)
    with pytest.raises(ValueError, match="`step`"):
        plan.position_at_step(plan.total_steps + 1)
    assert plan.position_at_step(np.int64(391)) == (1, 128)  # NumPy integers are steps too


def test_epoch_aligned_phase_after_a_phase_that_stops_inside_an_epoch_is_an_error():
    first = Phase(0, 1, 30, 0.1, 0.9, 3, num_steps=2)  # stops at example 60 of epoch 0
    second = Phase(1, 2, 30, 0.1, 0.9, 3)
    with pytest.raises(ValueError, match="`phases`"):
        PhasePlan((first, second), "custom", 100).segments()


def test_old_plan_dicts_load_and_serialise_unchanged():
    plan = smith("grow_batch", warmup_epochs=2)
    d = plan.to_dict()
    assert all("num_steps" not in p for p in d["phases"])  # plan.json as before
    assert PhasePlan.from_dict(d) == plan
    assert PhasePlan.from_dict(json.loads(json.dumps(d))).segments() == plan.segments()


# --- Scaling rule by optimizer (scaling.py; the planner's learning rates use it) -------------


@pytest.mark.parametrize(
    "optimizer, rule, factor",
    [("Adam", "sqrt", 2.0), ("adamw", "sqrt", 2.0), ("LAMB", "sqrt", 2.0), ("sgd", "linear", 4.0)]
    + [("lars", "linear", 4.0)],
)
def test_suggested_scaling_rule(optimizer, rule, factor):
    assert suggested_scaling_rule(optimizer) == rule
    assert scale_learning_rate(1e-3, 1024, 256, suggested_scaling_rule(optimizer)) == pytest.approx(
        1e-3 * factor
    )  # k = 4: √k = 2 for the adaptive optimizers, k for SGD and LARS
    with pytest.raises(ValueError, match="`optimizer`.*Received"):
        suggested_scaling_rule("adagrad")
