"""Reproduction studies: the run grids, summaries, tables, files, and both binaries end to end."""

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tf_largebatch.experiment import ExperimentConfig, make_plan
from tf_largebatch.reproduce import (
    GOYAL_EXTRA_VARIANTS,
    GOYAL_VARIANTS,
    SMITH_MODES,
    goyal_runs,
    goyal_table,
    mean_curve,
    metrics_table,
    run_study,
    smith_runs,
    smith_table,
    summarize,
    text_max_bytes,
    write_study,
)
from tf_largebatch.text import TextExperimentConfig, text_plan

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0"}
N_DIGITS = 1437  # digits training examples
# The binaries' default recipe: n = 16 (89 steps/epoch on digits), η = 0.1 per 16.
GOYAL = ExperimentConfig(
    mode="decay_lr",
    epochs=20,
    decay_epochs=(10, 15),
    decay_factor=0.1,
    base_learning_rate=0.1,
    base_batch_size=16,
    global_batch_size=16,
    warmup_epochs=2,
)
SMITH = ExperimentConfig(
    mode="decay_lr",
    epochs=24,
    decay_epochs=(6, 12, 18),
    decay_factor=0.5,
    base_learning_rate=0.1,
    base_batch_size=16,
    global_batch_size=16,
    warmup="none",
    warmup_epochs=0,
)


def by_name(runs):
    return {r.name: r for r in runs}


# ---- goyal_runs ------------------------------------------------------------------------------


def test_goyal_grid_shape_and_names():
    runs = goyal_runs(GOYAL, ks=(1, 2, 8), seeds=(0, 1))
    assert len(runs) == 2 + 2 * 4 * 2  # reference per seed + (k > 1) × variants × seeds
    assert [r.name for r in runs[:4]] == [
        "reference_k1_seed0",
        "reference_k1_seed1",
        "gradual_warmup_k2_seed0",
        "gradual_warmup_k2_seed1",
    ]
    assert len({r.name for r in runs}) == len(runs)
    assert {(r.group, r.k) for r in runs} == {("reference", 1)} | {
        (v, k) for v in GOYAL_VARIANTS for k in (2, 8)
    }
    for r in runs:
        assert r.config.global_batch_size == 16 * r.k
        assert r.config.base_batch_size == 16 and r.config.seed == r.seed
    # k=1 listed or not: the reference runs once per seed either way.
    assert [r.name for r in goyal_runs(GOYAL, (8,), (0,))] == [
        r.name for r in goyal_runs(GOYAL, (1, 8), (0,))
    ]


def test_goyal_variants_learning_rates():
    """η = 0.1 per n = 16, k = 8, warmup 2 epochs = 2 · ⌊1437/128⌋ = 22 steps."""
    runs = by_name(goyal_runs(GOYAL, ks=(8,), seeds=(0,)))
    plans = {name: make_plan(r.config, N_DIGITS) for name, r in runs.items()}
    ref = plans["reference_k1_seed0"]
    assert ref.phases[0].steps_per_epoch == 89 and ref.warmup == "none"
    assert [ref.learning_rate_at_step(s) for s in (0, 889, 890)] == pytest.approx([0.1, 0.1, 0.01])

    gradual = plans["gradual_warmup_k8_seed0"]
    assert gradual.phases[0].steps_per_epoch == 11 and gradual.warmup_steps == 22
    lrs = [gradual.learning_rate_at_step(s) for s in (0, 11, 21, 22, 23, 110)]
    assert lrs == pytest.approx([0.1, 0.1 + 0.7 * 11 / 22, 0.1 + 0.7 * 21 / 22, 0.8, 0.8, 0.08])

    constant = plans["constant_warmup_k8_seed0"]
    lrs = [constant.learning_rate_at_step(s) for s in (0, 21, 22, 110)]
    assert lrs == pytest.approx([0.1, 0.1, 0.8, 0.08])

    none = plans["no_warmup_k8_seed0"]
    assert none.warmup_steps == 0 and none.learning_rate_at_step(0) == pytest.approx(0.8)

    unscaled = plans["no_scaling_k8_seed0"]
    lrs = [unscaled.learning_rate_at_step(s) for s in (0, 109, 110, 165)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.001])
    assert unscaled.total_steps == 20 * 11


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"ks": (0, 2)}, "ks"),
        ({"ks": ()}, "ks"),
        ({"ks": (2, 2)}, "ks"),
        ({"ks": (True,)}, "ks"),
        ({"seeds": ()}, "seeds"),
        ({"seeds": (0, 0)}, "seeds"),
        ({"seeds": (-1,)}, "seeds"),
        ({"variants": ("cosine",)}, "variants"),
        ({"variants": ()}, "variants"),
    ],
)
def test_goyal_runs_rejects(kwargs, name):
    args = {"ks": (1, 2), "seeds": (0,), **kwargs}
    with pytest.raises(ValueError, match=f"Argument `{name}`.*Received: {name}="):
        goyal_runs(GOYAL, **args)


def test_goyal_uncorrected_variants_turn_momentum_correction_off():
    uncorrected = tuple(v for v in GOYAL_EXTRA_VARIANTS if v.endswith("_uncorrected"))
    runs = goyal_runs(GOYAL, ks=(8,), seeds=(0,), variants=uncorrected)
    assert [(r.name, r.config.momentum_correction) for r in runs] == [
        ("reference_k1_seed0", True),
        ("gradual_warmup_uncorrected_k8_seed0", False),
        ("no_warmup_uncorrected_k8_seed0", False),
    ]
    pair = goyal_runs(GOYAL, (8,), (0,), ("gradual_warmup", "gradual_warmup_uncorrected"))[1:]
    a, b = (make_plan(r.config, N_DIGITS) for r in pair)
    assert a.to_dict() == b.to_dict()  # the same schedule: only the optimizer differs


def test_goyal_warmup_variants_need_warmup_epochs():
    config = ExperimentConfig(global_batch_size=16, warmup_epochs=0)
    with pytest.raises(ValueError, match="`warmup_epochs`.*Received: warmup_epochs=0"):
        goyal_runs(config, (2,), (0,))
    assert len(goyal_runs(config, (2,), (0,), variants=("no_warmup", "no_scaling"))) == 3


# The language model's recipe: n = 8 windows, η = 3e-3 for AdamW, the plan's own schedule.
TEXT = TextExperimentConfig(
    schedule="goyal",
    mode="decay_lr",
    epochs=4,
    decay_epochs=(3,),
    decay_factor=0.1,
    base_learning_rate=3e-3,
    base_batch_size=8,
    global_batch_size=8,
    warmup_epochs=0.5,
    weight_decay=0.0,
)
N_WINDOWS = 2812  # ⌊(90,000 − 1)/32⌋ training windows of 100 kB at T = 32


def test_text_max_bytes():
    assert [text_max_bytes(d) for d in ("text", "text:5000", "mnist1d:20000", "digits")] == [
        0,
        5000,
        None,
        None,
    ]
    for bad in ("text:", "text:0", "text:1e5", "text:-3"):
        with pytest.raises(ValueError, match=f"Argument `dataset`.*Received: dataset='{bad}'"):
            text_max_bytes(bad)


@pytest.mark.parametrize(
    ("argv", "dataset", "epochs"),
    [
        ([], "mnist1d", 30),  # the flag defaults
        (["--quick"], "digits", 4),  # the quick profile
        (["--quick", "--epochs=7"], "digits", 7),  # a given flag wins
        (["--quick", "--dataset=mnist1d"], "mnist1d", 4),
        (["--dataset=text"], "text", 8),  # the text profile
        (["--dataset=text:5000", "--quick"], "text:5000", 2),  # text and quick
    ],
)
def test_flag_profile(argv, dataset, epochs):
    from absl import flags

    from tf_largebatch.reproduce import FlagProfile

    values = flags.FlagValues()
    flags.DEFINE_string("dataset", "mnist1d", "", flag_values=values)
    flags.DEFINE_bool("quick", False, "", flag_values=values)
    flags.DEFINE_integer("epochs", 30, "", flag_values=values)
    values(["prog", *argv])
    flag = FlagProfile(values, {"dataset": "digits", "epochs": 4}, {"epochs": 8}, {"epochs": 2})
    assert (flag.dataset(), flag("epochs")) == (dataset, epochs)


def test_goyal_runs_on_the_language_model_sqrt_and_linear_rules():
    variants = ("sqrt_gradual_warmup", "gradual_warmup", "sqrt_no_warmup", "no_scaling")
    runs = by_name(goyal_runs(TEXT, ks=(16,), seeds=(0,), variants=variants))
    plans = {name: text_plan(r.config, N_WINDOWS) for name, r in runs.items()}
    assert all(isinstance(r.config, TextExperimentConfig) for r in runs.values())
    ref = plans["reference_k1_seed0"]
    assert ref.phases[0].steps_per_epoch == 351 and ref.warmup_steps == 0
    assert [ref.learning_rate_at_step(s) for s in (0, 1052, 1053)] == pytest.approx(
        [3e-3, 3e-3, 3e-4]
    )
    sqrt = plans["sqrt_gradual_warmup_k16_seed0"]  # batch 128: 21 steps per epoch, warmup 10
    assert sqrt.phases[0].global_batch_size == 128 and sqrt.warmup_steps == 10
    lrs = [sqrt.learning_rate_at_step(s) for s in (0, 5, 10, 62, 63)]
    assert lrs == pytest.approx([3e-3, 3e-3 + 9e-3 * 5 / 10, 12e-3, 12e-3, 1.2e-3])  # √16·η
    linear = plans["gradual_warmup_k16_seed0"]
    assert linear.learning_rate_at_step(10) == pytest.approx(48e-3)  # 16·η
    assert plans["sqrt_no_warmup_k16_seed0"].learning_rate_at_step(0) == pytest.approx(12e-3)
    assert plans["no_scaling_k16_seed0"].learning_rate_at_step(0) == pytest.approx(3e-3)


def test_goyal_and_smith_runs_reject_what_the_language_model_lacks():
    with pytest.raises(ValueError, match="Argument `variants`.*gradual_warmup_uncorrected"):
        goyal_runs(TEXT, (4,), (0,), ("gradual_warmup_uncorrected",))
    inverse_sqrt = dataclasses.replace(TEXT, schedule="inverse_sqrt")
    with pytest.raises(ValueError, match="Argument `schedule`.*Received: schedule='inverse_sqrt'"):
        goyal_runs(inverse_sqrt, (4,), (0,))
    with pytest.raises(ValueError, match="Argument `schedule`"):
        smith_runs(inverse_sqrt, (0,), max_global_batch_size=16, modes=("decay_lr",))
    with pytest.raises(ValueError, match="Argument `modes`.*scaled_momentum"):
        smith_runs(TEXT, (0,), max_global_batch_size=16)


def test_smith_runs_on_the_language_model():
    recipe = dataclasses.replace(TEXT, epochs=6, decay_epochs=(2, 4), decay_factor=0.5)
    modes = ("decay_lr", "hybrid", "grow_batch", "no_decay", "adaptive")
    runs = {r.group: r for r in smith_runs(recipe, (0,), max_global_batch_size=16, modes=modes)}
    plans = {m: text_plan(r.config, N_WINDOWS) for m, r in runs.items()}
    batches = {m: [p.global_batch_size for p in plans[m].phases] for m in plans}
    assert batches == {
        "decay_lr": [8, 8, 8],
        "hybrid": [8, 16, 16],
        "grow_batch": [8, 16, 32],
        "no_decay": [8],
        "adaptive": [8, 8, 8],
    }
    lrs = {m: [p.learning_rate for p in plans[m].phases] for m in plans}
    assert lrs["decay_lr"] == pytest.approx([3e-3, 1.5e-3, 0.75e-3])
    assert lrs["hybrid"] == pytest.approx([3e-3, 3e-3, 1.5e-3])
    assert lrs["grow_batch"] == pytest.approx([3e-3] * 3)
    assert (runs["adaptive"].config.max_global_batch_size, runs["adaptive"].config.mode) == (
        32,
        "adaptive",
    )
    assert runs["adaptive"].config.measure_noise_scale
    ratio = plans["grow_batch"].total_steps / plans["decay_lr"].total_steps
    assert ratio == pytest.approx((351 + 175 + 87) / (3 * 351))


# ---- smith_runs ------------------------------------------------------------------------------


def test_smith_modes_from_one_recipe():
    runs = by_name(smith_runs(SMITH, seeds=(0, 3), max_global_batch_size=64))
    assert list(runs) == [f"{m}_seed{s}" for m in SMITH_MODES for s in (0, 3)]
    assert [r.config.seed for r in runs.values()] == [0, 3] * len(SMITH_MODES)
    plans = {r.group: make_plan(r.config, N_DIGITS) for r in runs.values()}
    batches = {m: [p.global_batch_size for p in plans[m].phases] for m in plans}
    assert batches == {
        "decay_lr": [16] * 4,
        "hybrid": [16, 32, 64, 64],
        "grow_batch": [16, 32, 64, 128],
        "scaled_momentum": [32, 64, 128, 256],  # × (1 − 0.9)/(1 − 0.95) = 2
        "no_decay": [16],
    }
    lrs = {m: [p.learning_rate for p in plans[m].phases] for m in plans}
    assert lrs["decay_lr"] == pytest.approx([0.1, 0.05, 0.025, 0.0125])
    assert lrs["hybrid"] == pytest.approx([0.1, 0.1, 0.1, 0.05])
    assert lrs["grow_batch"] == lrs["scaled_momentum"] == pytest.approx([0.1] * 4)
    assert {p.momentum for p in plans["scaled_momentum"].phases} == {0.95}
    steps = {m: plans[m].total_steps for m in plans}
    assert steps == {
        "decay_lr": 24 * 89,
        "hybrid": 6 * (89 + 44 + 22 + 22),
        "grow_batch": 6 * (89 + 44 + 22 + 11),
        "scaled_momentum": 6 * (44 + 22 + 11 + 5),
        "no_decay": 24 * 89,
    }
    assert steps["grow_batch"] / steps["decay_lr"] == pytest.approx(996 / 2136)


def test_smith_adaptive_mode():
    """McCandlish's adaptive batch: the decay_lr recipe, capped at grow_batch's last batch."""
    (run,) = smith_runs(SMITH, seeds=(1,), max_global_batch_size=64, modes=("adaptive",))
    assert (run.name, run.config.mode, run.config.measure_noise_scale) == (
        "adaptive_seed1",
        "adaptive",
        True,
    )
    assert run.config.max_global_batch_size == 16 * 2**3  # ×2 at each of 3 decay epochs
    (capped,) = smith_runs(
        SMITH,
        (0,),
        max_global_batch_size=64,
        modes=("adaptive",),
        adaptive_max_global_batch_size=64,
    )
    assert capped.config.max_global_batch_size == 64
    assert make_plan(run.config, N_DIGITS).phases[0].global_batch_size == 16


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"scaled_momentum": 0.9}, "scaled_momentum"),
        ({"scaled_momentum": 1.0}, "scaled_momentum"),
        ({"max_global_batch_size": 0}, "max_global_batch_size"),
        ({"modes": ("decay_lr", "decay_lr")}, "modes"),
        ({"modes": ("sgdr",)}, "modes"),
        ({"seeds": ()}, "seeds"),
        ({"adaptive_max_global_batch_size": 0}, "adaptive_max_global_batch_size"),
    ],
)
def test_smith_runs_rejects(kwargs, name):
    args = {"seeds": (0,), "max_global_batch_size": 64, **kwargs}
    with pytest.raises(ValueError, match=f"Argument `{name}`.*Received: {name}="):
        smith_runs(SMITH, **args)


# ---- summaries and tables --------------------------------------------------------------------


def record(group, k, seed, error, updates=100, batch=16, history=None):
    return {
        "name": f"{group}_k{k}_seed{seed}",
        "group": group,
        "k": k,
        "seed": seed,
        "global_batch_size": batch,
        "test_error": error,
        "test_accuracy": 1 - error / 100,
        "parameter_updates": updates,
        "history": history or [],
    }


def test_summarize_mean_and_sample_std():
    errors = {("reference", 1): [1.94, 2.22, 2.5], ("gradual_warmup", 8): [1.67, 2.78]}
    records = [
        record(g, k, s, e, updates=10 * k, batch=16 * k)
        for (g, k), es in errors.items()
        for s, e in enumerate(es)
    ]
    rows = summarize(records)
    assert [(r["group"], r["k"]) for r in rows] == list(errors)
    for row, values in zip(rows, errors.values()):
        assert row["mean"] == pytest.approx(np.mean(values))
        assert row["std"] == pytest.approx(np.std(values, ddof=1))
        assert (row["min"], row["max"], row["num_seeds"]) == (min(values), max(values), len(values))
    assert (rows[1]["parameter_updates"], rows[1]["global_batch_size"]) == (80, 128)
    one = summarize([record("a", 1, 0, 3.0)])[0]
    assert (one["mean"], one["std"], one["metric"]) == (3.0, 0.0, "test_error")
    acc = summarize(records, "test_accuracy")[0]
    assert acc["mean"] == pytest.approx(1 - np.mean(errors[("reference", 1)]) / 100)


def test_mean_curve_over_seeds():
    hist = [
        [{"epoch": 0, "steps": 89, "loss": 1.0}, {"epoch": 1, "steps": 178, "loss": 0.5}],
        [{"epoch": 0, "steps": 89, "loss": 3.0}, {"epoch": 1, "steps": 178, "loss": 0.1}],
    ]
    records = [record("a", 2, s, 1.0, history=h) for s, h in enumerate(hist)]
    records.append(record("a", 4, 0, 1.0, history=[{"epoch": 0, "steps": 1, "loss": 9.0}]))
    assert mean_curve(records, "a", "loss", k=2) == ([0.0, 1.0], [2.0, 0.3], [1.0, 0.1], [3.0, 0.5])
    assert mean_curve(records, "a", "loss", k=2, x="steps")[0] == [89.0, 178.0]
    with pytest.raises(ValueError, match="Argument `group`.*Received: group='b'"):
        mean_curve(records, "b", "loss")


def test_goyal_table_rows():
    records = [
        record("reference", 1, 0, 2.0, updates=1780),
        record("reference", 1, 1, 3.0, updates=1780),
        record("gradual_warmup", 8, 0, 2.5, updates=220, batch=128),
        record("gradual_warmup", 8, 1, 2.5, updates=220, batch=128),
        record("no_warmup", 8, 0, 40.0, updates=220, batch=128),
    ]
    table = goyal_table(summarize(records), ("gradual_warmup", "no_warmup", "no_scaling"))
    assert table.splitlines() == [
        "| k | kn | updates | gradual warmup | no warmup | no scaling | Δ gradual − ref |",
        "|---|---|---|---|---|---|---|",
        "| 1 | 16 | 1780 | 2.50 ± 0.71 | 2.50 ± 0.71 | 2.50 ± 0.71 | +0.00 |",
        "| 8 | 128 | 220 | 2.50 ± 0.00 | 40.00 ± 0.00 | – | +0.00 |",
    ]


def test_tables_of_bits_per_byte():
    """The language model's tables: bits per byte with 3 decimals, the Δ of the sqrt rule."""

    def rec(group, k, seed, bits, updates, batch=8):
        return {**record(group, k, seed, 60.0, updates, batch), "validation_bits_per_byte": bits}

    records = [
        rec("reference", 1, 0, 3.0, 1404),
        rec("reference", 1, 1, 3.1, 1404),
        rec("sqrt_gradual_warmup", 4, 0, 3.2, 348, 32),
        rec("no_scaling", 4, 0, 3.5, 348, 32),
    ]
    summary = summarize(records, "validation_bits_per_byte")
    table = goyal_table(
        summary,
        ("sqrt_gradual_warmup", "no_scaling"),
        delta_variant="sqrt_gradual_warmup",
        digits=3,
    )
    assert table.splitlines() == [
        "| k | kn | updates | sqrt gradual warmup | no scaling | Δ sqrt gradual warmup − ref |",
        "|---|---|---|---|---|---|",
        "| 1 | 8 | 1404 | 3.050 ± 0.071 | 3.050 ± 0.071 | +0.000 |",
        "| 4 | 32 | 348 | 3.200 ± 0.000 | 3.500 ± 0.000 | +0.150 |",
    ]
    phases = {"phases": [{"global_batch_size": 8, "learning_rate": 3e-3, "momentum": 0.0}]}
    smith = [{**rec("decay_lr", 1, s, 3.0 + s / 10, 2100), "plan": phases} for s in (0, 1)]
    smith.append({**rec("grow_batch", 1, 0, 3.1, 900), "plan": phases})
    lines = smith_table(summarize(smith, "validation_bits_per_byte"), smith).splitlines()
    assert "validation bits/byte" in lines[0]
    assert lines[2:] == [
        "| decay_lr | 8 | 0.003 | 0 | 2100 | 1.00 | 3.050 ± 0.071 | +0.000 |",
        "| grow_batch | 8 | 0.003 | 0 | 900 | 0.43 | 3.100 ± 0.000 | +0.050 |",
    ]


def test_smith_table_rows():
    def plan(batches, lrs, momentum=0.9):
        phases = [
            {"global_batch_size": b, "learning_rate": lr, "momentum": momentum}
            for b, lr in zip(batches, lrs)
        ]
        return {"phases": phases}

    records = [
        {**record("decay_lr", 1, 0, 2.0, updates=2136), "plan": plan([16, 16], [0.1, 0.05])},
        {**record("decay_lr", 1, 1, 1.0, updates=2136), "plan": plan([16, 16], [0.1, 0.05])},
        {**record("grow_batch", 1, 0, 2.5, updates=996), "plan": plan([16, 32], [0.1, 0.1])},
    ]
    table = smith_table(summarize(records, "test_accuracy"), records)
    assert table.splitlines()[2:] == [
        "| decay_lr | 16, 16 | 0.1, 0.05 | 0.9 | 2136 | 1.00 | 98.50 ± 0.71 | +0.00 |",
        "| grow_batch | 16, 32 | 0.1, 0.1 | 0.9 | 996 | 0.47 | 97.50 ± 0.00 | -1.00 |",
    ]


def test_metrics_table_skips_unmeasured():
    records = [
        {**record("reference", 1, s, 2.0 + s), "noise_scale_epoch1": 100.0 + 20 * s}
        for s in range(2)
    ]
    records.append({**record("no_scaling", 8, 0, 5.0, batch=128), "noise_scale_epoch1": None})
    table = metrics_table(records, ("test_error", "noise_scale_epoch1")).splitlines()
    assert table == [
        "| group | k | batch | test_error | noise_scale_epoch1 |",
        "|---|---|---|---|---|",
        "| reference | 1 | 16 | 2.5 ± 0.71 | 110 ± 14 |",
        "| no_scaling | 8 | 128 | 5 ± 0 | – |",
    ]
    assert metrics_table(records, ("test_accuracy",), scale={"test_accuracy": 100}).endswith(
        "| 95 ± 0 |"
    )


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_write_study_files(tmp_path):
    hist = [{"epoch": e, "train_loss": 1.0 / (e + 1), "steps": 89 * (e + 1)} for e in range(3)]
    records = [record("reference", 1, s, 2.0 + s, history=hist) for s in range(2)]
    summary = summarize(records)
    paths = write_study(str(tmp_path / "out"), "goyal", records, summary, command="x --quick")
    assert [os.path.basename(p) for p in paths] == [
        "goyal_results.json",
        "goyal_runs.csv",
        "goyal_history.csv",
        "goyal_summary.csv",
    ]
    data = json.loads(Path(paths[0]).read_text())
    assert data["command"] == "x --quick"
    assert [h["train_loss"] for h in data["runs"][1]["history"]] == [1.0, 0.5, 0.3333333]
    for r in records:
        r["history"][2]["train_loss"] = 0.3333333  # 7 significant digits
    assert data["runs"] == records
    assert data["summary"][0] == {**summary[0], "std": 0.7071068}  # 7 significant digits
    runs = read_csv(paths[1])
    assert [float(r["test_error"]) for r in runs] == [2.0, 3.0]
    history = read_csv(paths[2])
    assert len(history) == 6 and history[4]["name"] == "reference_k1_seed1"
    assert [int(h["steps"]) for h in history[:3]] == [89, 178, 267]
    rows = read_csv(paths[3])
    assert float(rows[0]["mean"]) == 2.5 and float(rows[0]["std"]) == pytest.approx(2**-0.5)


# ---- run_study (trains) ----------------------------------------------------------------------


def test_run_study_trains_and_resumes(tmp_path):
    config = ExperimentConfig(
        mode="decay_lr",
        model="mlp",
        epochs=2,
        decay_epochs=(1,),
        base_learning_rate=0.1,
        base_batch_size=32,
        global_batch_size=32,
        warmup_epochs=1,
        strategy="one_device",
        steps_per_execution=8,
        verbose=0,
    )
    runs = goyal_runs(config, ks=(2,), seeds=(0,), variants=("gradual_warmup",))
    seen = []
    records = run_study(runs, str(tmp_path), on_run=lambda i, n, r: seen.append((i, n, r["name"])))
    assert seen == [(0, 2, "reference_k1_seed0"), (1, 2, "gradual_warmup_k2_seed0")]
    for rec, updates in zip(records, (2 * 44, 2 * 22)):  # ⌊1437/32⌋, ⌊1437/64⌋ per epoch
        assert rec["parameter_updates"] == updates == rec["plan"]["total_steps"]
        assert rec["test_error"] == pytest.approx(100 * (1 - rec["test_accuracy"]))
        assert [h["epoch"] for h in rec["history"]] == [0, 1]
        assert rec["history"][-1]["steps"] == updates
        assert rec["test_accuracy"] > 0.8  # two epochs of digits
        assert (tmp_path / rec["name"] / "results.json").exists()
        assert rec["noise_scale_epoch1"] is None and rec["noise_scale_steps"] == []
        assert rec["hessian_top_eigenvalue"] is None  # not measured
    assert records[1]["config"]["global_batch_size"] == 64
    assert records[1]["plan"]["warmup"] == "gradual"
    again = run_study(runs, str(tmp_path))  # finished runs resume: nothing left to train
    assert [r["test_accuracy"] for r in again] == [r["test_accuracy"] for r in records]
    assert [r["history"] for r in again] == [r["history"] for r in records]
    with pytest.raises(ValueError, match="Argument `runs`"):
        run_study([runs[0], runs[0]], str(tmp_path))


# ---- the binaries, end to end ------------------------------------------------------------------


def run_binary(name, *args):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        cwd=ROOT,
    )
    return proc


def check_outputs(out, prefix, figures):
    for name in ("results.json", "runs.csv", "history.csv", "summary.csv", "table.md", *figures):
        path = out / f"{prefix}_{name}"
        assert path.stat().st_size > 0, path
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / f"{prefix}_results.json").read_text())


@pytest.mark.slow
def test_reproduce_goyal_quick(tmp_path):
    proc = run_binary("reproduce_goyal.py", "--quick", f"--output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = check_outputs(tmp_path, "goyal", ("training_loss.png", "error_vs_batch.png"))
    assert (data["ks"], data["seeds"], data["variants"]) == ([1, 4], [0], list(GOYAL_VARIANTS))
    runs = data["runs"]
    assert [(r["group"], r["k"], r["global_batch_size"]) for r in runs] == [
        ("reference", 1, 16),
        *((v, 4, 64) for v in GOYAL_VARIANTS),
    ]
    # 4 epochs at ⌊1437/16⌋ = 89 and ⌊1437/64⌋ = 22 steps per epoch.
    assert [r["parameter_updates"] for r in runs] == [356, 88, 88, 88, 88]
    for r in runs:
        assert [h["epoch"] for h in r["history"]] == [0, 1, 2, 3]
        correct = round(r["test_accuracy"] * 360)  # digits test set: 360 examples
        assert r["test_accuracy"] == pytest.approx(correct / 360, abs=1e-6)
        assert r["test_error"] == pytest.approx(100 * (360 - correct) / 360, abs=1e-5)
        assert r["test_error"] < 15  # four epochs of digits learn something in every variant
    lrs = {r["group"]: [h["learning_rate"] for h in r["history"]] for r in runs}
    assert lrs["reference"] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    assert lrs["no_warmup"] == pytest.approx([0.4, 0.4, 0.04, 0.004])
    assert lrs["gradual_warmup"][0] == pytest.approx(0.1)  # warmup starts at η
    assert lrs["no_scaling"] == lrs["reference"]
    summary = {(s["group"], s["k"]): s for s in data["summary"]}
    assert summary[("reference", 1)]["mean"] == pytest.approx(runs[0]["test_error"])
    table = (tmp_path / "goyal_table.md").read_text()
    assert f"| 4 | 64 | 88 | {runs[1]['test_error']:.2f} ± 0.00 |" in table
    assert table in proc.stdout + "\n"
    # Direction only (one seed of digits): η kept at 4n gives 1/4 of the steps and learns less.
    errors = {r["group"]: r["test_error"] for r in runs}
    assert errors["no_scaling"] > errors["reference"]
    assert (tmp_path / "goyal_metrics.md").read_text().startswith("| group | k | batch |")


@pytest.mark.slow
def test_reproduce_smith_quick(tmp_path):
    proc = run_binary("reproduce_smith.py", "--quick", f"--output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = check_outputs(tmp_path, "smith", ("accuracy.png", "schedules.png"))
    runs = {r["group"]: r for r in data["runs"]}
    assert list(runs) == list(SMITH_MODES) and data["seeds"] == [0]
    # 4 epochs, growth ×2 at epochs 1, 2, 3 from 16 (hybrid capped at 64; scaled from 32).
    updates = {m: r["parameter_updates"] for m, r in runs.items()}
    assert updates == {
        "decay_lr": 4 * 89,
        "hybrid": 89 + 44 + 22 + 22,
        "grow_batch": 89 + 44 + 22 + 11,
        "scaled_momentum": 44 + 22 + 11 + 5,
        "no_decay": 4 * 89,
    }
    batches = [h["global_batch_size"] for h in runs["grow_batch"]["history"]]
    assert batches == [16, 32, 64, 128]
    assert [h["steps"] for h in runs["grow_batch"]["history"]] == [89, 133, 155, 166]
    assert {h["momentum"] for h in runs["scaled_momentum"]["history"]} == {0.95}
    for r in runs.values():
        assert r["test_accuracy"] > 0.85
    table = (tmp_path / "smith_table.md").read_text()
    assert "| grow_batch | 16, 32, 64, 128 | 0.1, 0.1, 0.1, 0.1 | 0.9 | 166 | 0.47 |" in table


@pytest.mark.slow
def test_reproduce_goyal_text_quick(tmp_path):
    """The language model (40 kB, 2 epochs, k = 1, 4): bits per byte fall, tables say so."""
    proc = run_binary("reproduce_goyal.py", "--dataset=text", "--quick", f"--output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = check_outputs(tmp_path, "goyal", ("training_loss.png", "error_vs_batch.png"))
    assert (data["dataset"], data["metric"], data["ks"]) == (
        "text",
        "validation_bits_per_byte",
        [1, 4],
    )
    runs = {r["group"]: r for r in data["runs"]}
    assert list(runs) == ["reference", "sqrt_gradual_warmup", "no_scaling"]
    ref = runs["reference"]
    assert ref["config"]["max_bytes"] == 40_000 and ref["config"]["schedule"] == "goyal"
    # ⌊(36,000 − 1)/32⌋ = 1124 windows: 140 steps per epoch at 8, 35 at 32.
    assert [r["parameter_updates"] for r in runs.values()] == [280, 70, 70]
    for r in runs.values():
        bits = [h["validation_bits_per_byte"] for h in r["history"]]
        assert r["validation_bits_per_byte"] == pytest.approx(bits[-1], rel=1e-6)
        assert bits[-1] == pytest.approx(r["test_loss"] / np.log(2), rel=1e-6)
        assert bits[-1] < bits[0] < 8  # it learns: below the 8 bits of a uniform byte
    assert ref["validation_bits_per_byte"] < ref["unigram_bits_per_byte"]
    sqrt_lrs = [h["learning_rate"] for h in runs["sqrt_gradual_warmup"]["history"]]
    assert sqrt_lrs[0] == pytest.approx(3e-3) and sqrt_lrs[1] == pytest.approx(6e-4)  # √4·η/10
    # Direction only (one seed): η kept at 4n gives 1/4 of the updates and learns less.
    assert runs["no_scaling"]["validation_bits_per_byte"] > ref["validation_bits_per_byte"]
    table = (tmp_path / "goyal_table.md").read_text()
    assert "Δ sqrt gradual warmup − ref" in table.splitlines()[0]
    assert (
        f"| 4 | 32 | 70 | {runs['sqrt_gradual_warmup']['validation_bits_per_byte']:.3f} ± 0.000 |"
        in table
    )


@pytest.mark.slow
def test_reproduce_smith_text_quick(tmp_path):
    proc = run_binary(
        "reproduce_smith.py", "--dataset=text:30000", "--quick", f"--output_dir={tmp_path}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = check_outputs(tmp_path, "smith", ("accuracy.png", "schedules.png"))
    assert data["metric"] == "validation_bits_per_byte"
    runs = {r["group"]: r for r in data["runs"]}
    assert list(runs) == ["decay_lr", "hybrid", "grow_batch", "no_decay"]
    # ⌊(27,000 − 1)/32⌋ = 843 windows: 105 steps per epoch at 8, 52 at 16.
    updates = {m: r["parameter_updates"] for m, r in runs.items()}
    assert updates == {"decay_lr": 210, "hybrid": 157, "grow_batch": 157, "no_decay": 210}
    for r in runs.values():
        assert r["config"]["optimizer"] == "adamw" and r["config"]["weight_decay"] == 0
        assert r["validation_bits_per_byte"] < r["unigram_bits_per_byte"]
    table = (tmp_path / "smith_table.md").read_text()
    assert "| validation bits/byte |" in table.splitlines()[0]


@pytest.mark.slow
def test_reproduce_goyal_reference_only(tmp_path):
    """--ks=1 trains only the reference (a learning-rate sweep of n, say)."""
    args = ("--quick", "--ks=1", "--epochs=2", "--decay_epochs=1", f"--output_dir={tmp_path}")
    proc = run_binary("reproduce_goyal.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = check_outputs(tmp_path, "goyal", ("training_loss.png", "error_vs_batch.png"))
    assert [(r["name"], r["parameter_updates"]) for r in data["runs"]] == [
        ("reference_k1_seed0", 2 * 89)
    ]
    table = (tmp_path / "goyal_table.md").read_text().splitlines()
    assert len(table) == 3 and table[2].startswith("| 1 | 16 | 178 |")


@pytest.mark.parametrize(
    "binary, flag, message",
    [
        ("reproduce_goyal.py", "--ks=1,0", "Argument `ks`"),
        ("reproduce_goyal.py", "--ks=1,x", "Flag --ks must be a comma list of integers"),
        ("reproduce_smith.py", "--scaled_momentum=0.5", "Argument `scaled_momentum`"),
    ],
)
def test_binaries_reject_bad_flags(tmp_path, binary, flag, message):
    proc = run_binary(binary, "--quick", flag, f"--output_dir={tmp_path}")
    assert proc.returncode != 0 and message in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_smith_binary_rejects_scaled_momentum_without_sgd(tmp_path):
    proc = run_binary(
        "reproduce_smith.py",
        "--quick",
        "--optimizer=adam",
        "--modes=decay_lr,scaled_momentum",
        f"--output_dir={tmp_path}",
    )
    assert proc.returncode != 0 and "needs --optimizer=sgd" in proc.stderr
    assert not list(tmp_path.iterdir())
