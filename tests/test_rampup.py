"""Phases inside an epoch (tf_largebatch.rampup): Megatron's batch ramp-up and plans from
example counts, step by step against reference loops."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tf_largebatch import plan_phases, rampup
from tf_largebatch.phases import PhasePlan, plan_from_examples

# --- Batch ramp-up inside an epoch (Megatron's rampup_batch_size) ----------------------------

RAMP = dict(
    dataset_size=10_000,
    epochs=1,
    global_batch_size=128,
    base_learning_rate=0.1,
    base_batch_size=32,
    rampup_batch_size=(32, 32, 3000),
)


def megatron_batch(consumed, start, increment, ramp_samples, target):
    """Megatron-LM's RampupBatchsizeNumMicroBatchesCalculator.update, global batch only."""
    per_increment = ramp_samples / ((target - start) // increment)
    if consumed > ramp_samples:
        return target
    return start + int(consumed / per_increment) * increment


def megatron_run(n, epochs, target, rampup, drop_remainder=True):
    """Reference loop: each step's batch from the examples consumed, as example indices into
    one permutation per epoch; an epoch drops (or keeps) its last partial batch."""
    perms = [np.random.default_rng(e).permutation(n) for e in range(epochs)]
    consumed, epoch, offset, steps = 0, 0, 0, []
    while True:
        b = megatron_batch(consumed, *rampup, target)
        if n - offset == 0 or (drop_remainder and n - offset < b):
            epoch, offset = epoch + 1, 0
        if epoch == epochs:
            return perms, steps
        batch = perms[epoch][offset : offset + b]
        steps.append((b, batch))
        offset, consumed = offset + len(batch), consumed + len(batch)


def examples_through_segments(plan, perms):
    """The example indices a loop that follows `plan.segments()` trains on, step by step."""
    out = []
    for seg in plan.segments():
        b = plan.phases[seg.phase_index].global_batch_size
        for j in range(seg.num_steps):
            start = seg.example_offset + j * b
            out.append(perms[seg.epoch][start : start + b])
    return out


def test_rampup_follows_megatron_step_by_step():
    plan = plan_phases("rampup", **RAMP)
    perms, ref = megatron_run(10_000, 1, 128, (32, 32, 3000))
    assert plan.total_steps == len(ref) == 32 + 16 + 10 + 54
    assert [plan.batch_size_at_step(s) for s in range(len(ref))] == [b for b, _ in ref]
    got = examples_through_segments(plan, perms)
    for (b, want), have in zip(ref, got):
        assert len(have) == b and np.array_equal(have, want)
    seen = np.concatenate(got)
    assert len(seen) == len(np.unique(seen)) == 9_920 == plan.total_examples  # no repeats
    assert np.array_equal(np.sort(seen), np.sort(perms[0][:9_920]))  # only the last 80 dropped
    assert [(p.global_batch_size, p.num_steps) for p in plan.phases] == [
        (32, 32),
        (64, 16),
        (96, 10),
        (128, 54),
    ]
    assert plan.epochs == 1 and plan.position_at_step(plan.total_steps) == (1, 0)


@pytest.mark.parametrize("rule", ["linear", "sqrt", "none"])
def test_rampup_learning_rate_follows_the_scaling_rule(rule):
    plan = plan_phases("rampup", **RAMP, scaling_rule=rule)
    factor = {"linear": lambda k: k, "sqrt": np.sqrt, "none": lambda k: 1.0}[rule]
    schedule = plan.learning_rate_schedule()
    for b in plan.phase_start_steps()[1:]:
        for step in (b - 1, b, b + 1):
            batch = megatron_run(10_000, 1, 128, (32, 32, 3000))[1][step][0]
            assert plan.batch_size_at_step(step) == batch
            want = 0.1 * factor(batch / 32)
            assert plan.learning_rate_at_step(step) == pytest.approx(want)
            assert float(schedule(step)) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("drop_remainder", [True, False])
@pytest.mark.parametrize(
    "n, epochs, target, rampup",
    [(1_000, 3, 128, (32, 32, 3_000)), (997, 4, 100, (10, 45, 1_234)), (500, 2, 64, (16, 16, 1))],
)
def test_rampup_across_epochs_matches_the_reference(n, epochs, target, rampup, drop_remainder):
    plan = plan_phases(
        "rampup",
        dataset_size=n,
        epochs=epochs,
        global_batch_size=target,
        base_learning_rate=0.1,
        rampup_batch_size=rampup,
        drop_remainder=drop_remainder,
    )
    perms, ref = megatron_run(n, epochs, target, rampup, drop_remainder)
    assert plan.total_steps == len(ref) and plan.epochs == epochs
    assert [plan.batch_size_at_step(s) for s in range(len(ref))] == [b for b, _ in ref]
    got = examples_through_segments(plan, perms)
    assert all(np.array_equal(h, w) for h, (_, w) in zip(got, ref))
    for seg in plan.segments():  # each epoch's examples at most once
        assert seg.example_offset < n


def test_rampup_table_and_round_trip():
    plan = plan_phases("rampup", **RAMP, warmup_epochs=0.05)
    assert plan.warmup_steps == round(0.05 * 312)
    assert "0.102" in plan.table() and "total steps=112" in plan.table()
    d = json.loads(json.dumps(plan.to_dict()))
    assert [p["num_steps"] for p in d["phases"]] == [32, 16, 10, 54]
    assert PhasePlan.from_dict(d) == plan


@pytest.mark.parametrize(
    "mode, kwargs, name",
    [
        ("rampup", {"rampup_batch_size": (32, 30, 3000)}, "rampup_batch_size"),  # 96/30
        ("rampup", {"rampup_batch_size": (128, 32, 3000)}, "rampup_batch_size"),
        ("rampup", {"rampup_batch_size": (32, 32, 0)}, "rampup_batch_size"),
        ("rampup", {"rampup_batch_size": (32, 32)}, "rampup_batch_size"),
        ("rampup", {"rampup_batch_size": None}, "rampup_batch_size"),
        ("rampup", {"decay_epochs": (1,), "epochs": 2}, "decay_epochs"),
        ("rampup", {"warmup_epochs": 0.5}, "warmup_epochs"),  # longer than the batch-32 phase
        ("decay_lr", {}, "rampup_batch_size"),
    ],
)
def test_rampup_bad_input(mode, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        plan_phases(mode, **{**RAMP, **kwargs})


def test_plan_from_examples_changes_phase_at_the_first_step_past_the_boundary():
    # c before each step: 0, 30 (< 60), 60 → batch 50; 40 left in epoch 0 < 50: epoch 1.
    plan = plan_from_examples(100, 2, [30, 50], [0.1, 0.2], boundary_examples=[60])
    assert [dataclasses.astuple(s) for s in plan.segments()] == [
        (0, 0, 0, 2, 0),
        (1, 1, 2, 2, 0),
    ]
    for boundary in (59, 61):  # b-1, b+1: one more step of 30 before the switch
        other = plan_from_examples(100, 2, [30, 50], [0.1, 0.2], boundary_examples=[boundary])
        assert [p.num_steps for p in other.phases] == ([2, 2] if boundary == 59 else [3, 2])
    with pytest.raises(ValueError, match="`boundary_examples`"):
        plan_from_examples(100, 2, [30, 50, 60], [0.1] * 3, boundary_examples=[60, 59])
    skipped = plan_from_examples(100, 2, [30, 50, 60], [0.1] * 3, boundary_examples=[60, 60])
    assert [p.global_batch_size for p in skipped.phases] == [30, 60]


def test_rampup_plot(tmp_path):
    path = tmp_path / "ramp.png"
    plan_phases("rampup", **RAMP).plot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_names_moved_to_rampup_stay_importable_from_phases():
    from tf_largebatch import phases

    assert phases.Segment is rampup.Segment
    assert phases.plan_from_examples is rampup.plan_from_examples
    with pytest.raises(AttributeError, match="no_such_name"):
        phases.no_such_name  # noqa: B018


_LOADER = """
import importlib, sys, types
sys.modules["tensorflow"] = None  # any `import tensorflow` / `import keras` now fails
sys.modules["keras"] = None
stub = types.ModuleType("tf_largebatch")  # the real __init__ imports Keras objects
stub.__path__ = [sys.argv[1]]
sys.modules["tf_largebatch"] = stub
rampup = importlib.import_module("tf_largebatch.rampup")
plan = rampup.plan_rampup(10_000, 1, 128, (32, 32, 3000), base_learning_rate=0.1,
    base_batch_size=32, scaling_rule="sqrt", momentum=0.9, drop_remainder=True,
    warmup="none", warmup_epochs=0, warmup_initial_learning_rate=None)
print(plan.total_steps, len(plan.segments()))
"""


def test_rampup_imports_no_tensorflow():
    import tf_largebatch

    package_dir = os.path.dirname(tf_largebatch.__file__)
    result = subprocess.run(
        [sys.executable, "-c", _LOADER, package_dir], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["112", "4"]
