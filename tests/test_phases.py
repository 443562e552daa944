"""The phase planner against Smith et al. 2018's CIFAR-10 recipe and the formulas it keeps."""

import pytest

from tf_largebatch import plan_phases
from tf_largebatch.phases import PhasePlan

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
