"""The Trainer: replica-count invariance, accumulation, traces, checkpoints, results."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import Dying, mirrored

from tf_largebatch import plan_phases
from tf_largebatch.data import load_data
from tf_largebatch.training import Trainer, TrainerConfig, micro_batches


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def mlp(d):
    def model_fn():
        return keras.Sequential(
            [
                keras.Input(d.input_shape),
                keras.layers.Flatten(),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(d.num_classes),
            ]
        )

    return model_fn


def plan_for(d, epochs=4, batch=64, **kw):
    kw = {"decay_epochs": (2,), "decay_factor": 0.5, "warmup_epochs": 1, **kw}
    return plan_phases(
        "grow_batch", d.num_train_examples, epochs, batch, 0.1, base_batch_size=64, **kw
    )


def train(d, tmp_path, replicas=1, plan=None, name=None, die_after_calls=None, **config):
    """Trains (optionally dying after some compiled calls, like a killed process)."""
    strategy = mirrored(replicas)
    model_dir = str(tmp_path / (name or f"r{replicas}"))
    trainer = Trainer(
        mlp(d),
        plan or plan_for(d),
        TrainerConfig(model_dir=model_dir, verbose=0, **config),
        strategy=strategy,
    )
    if die_after_calls is not None:
        trainer.train_step = Dying(trainer.train_step, die_after_calls)
    trainer.fit(d.x_train, d.y_train, validation_data=(d.x_test, d.y_test))
    results = trainer.results
    return trainer, results


def weights(trainer):
    return [np.asarray(w) for w in trainer.model.get_weights()]


def test_same_weights_on_1_2_4_replicas(digits, tmp_path):
    runs = {n: train(digits, tmp_path, n) for n in (1, 2, 4)}
    reference = weights(runs[1][0])
    for n in (2, 4):
        for a, b in zip(reference, weights(runs[n][0])):
            np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)
        assert runs[n][1]["num_replicas"] == n
        assert runs[n][1]["parameter_updates"] == runs[1][1]["parameter_updates"]
    results = runs[1][1]
    plan = plan_for(digits)
    assert results["parameter_updates"] == plan.total_steps
    assert results["epochs_completed"] == 4
    assert results["test_accuracy"] > 0.9
    # One trace serves all phases (no static batch dimension), far below one per phase.
    assert all(r["trace_count"] == 1 for _, r in runs.values()) and len(plan.phases) == 2
    assert len(results["phase_switch_seconds"]) == len(plan.phases) - 1
    assert all(s < 2.0 for s in results["phase_switch_seconds"])
    assert [h["global_batch_size"] for h in results["history"]] == [64, 64, 128, 128]
    for h in results["history"]:
        assert h["learning_rate"] == pytest.approx(
            plan.learning_rate_at_step(plan.step_at_epoch(h["epoch"]))
        )


def test_gradient_accumulation_equals_one_big_batch(digits, tmp_path):
    plan = plan_for(digits, epochs=2, batch=128, decay_epochs=(), warmup_epochs=0)
    one, _ = train(digits, tmp_path, 1, plan, name="big")
    acc, results = train(digits, tmp_path, 1, plan, name="acc", max_per_replica_batch_size=32)
    assert micro_batches(128, 32) == 4
    for a, b in zip(weights(one), weights(acc)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)
    assert results["parameter_updates"] == plan.total_steps


def test_accumulation_under_two_replicas(digits, tmp_path):
    plan = plan_for(digits, epochs=1, batch=128, decay_epochs=(), warmup_epochs=0)
    one, _ = train(digits, tmp_path, 1, plan, name="one")
    two, _ = train(digits, tmp_path, 2, plan, name="two", max_per_replica_batch_size=16)
    for a, b in zip(weights(one), weights(two)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "b, cap, k", [(64, None, 1), (64, 64, 1), (64, 63, 2), (96, 40, 3), (100, 30, 4), (7, 3, 7)]
)
def test_micro_batches(b, cap, k):
    assert micro_batches(b, cap) == k


@pytest.mark.parametrize("every", [0, 5])
def test_interrupted_run_resumes_to_identical_weights(digits, tmp_path, every):
    plan = plan_for(digits)  # phases: 2 epochs at 64 (22 steps each), 2 at 128 (11 each)
    full, r_full = train(digits, tmp_path, 1, plan, name="full")
    die = plan.step_at_epoch(2) + 7  # inside the first epoch of the second phase
    with pytest.raises(RuntimeError, match="killed"):
        train(
            digits, tmp_path, 1, plan, name="cut", die_after_calls=die,
            checkpoint_every_steps=every, checkpoint_interval_seconds=0,
        )  # fmt: skip
    latest = tf.train.latest_checkpoint(str(tmp_path / "cut" / "ckpt"))
    assert int(latest.rsplit("-", 1)[1]) >= plan.step_at_epoch(2)  # resumes, not from scratch
    resumed, r = train(digits, tmp_path, 1, plan, name="cut", checkpoint_every_steps=every)
    assert r["parameter_updates"] == r_full["parameter_updates"] == plan.total_steps
    assert r["epochs_completed"] == r_full["epochs_completed"] == 4
    assert [h["epoch"] for h in r["history"]] == [0, 1, 2, 3]
    for a, b in zip(weights(full), weights(resumed)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    saved = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert saved["parameter_updates"] == plan.total_steps
    model = keras.models.load_model(tmp_path / "cut" / "model.keras")
    for a, b in zip(weights(resumed), model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_finished_run_rerun_trains_nothing_more(digits, tmp_path):
    plan = plan_for(digits, epochs=2, decay_epochs=())
    _, r1 = train(digits, tmp_path, 1, plan, name="done")
    _, r2 = train(digits, tmp_path, 1, plan, name="done")
    assert r2["parameter_updates"] == r1["parameter_updates"] == plan.total_steps
    assert len(r2["history"]) == 2


def test_batch_not_divisible_by_replicas(digits, tmp_path):
    plan = plan_for(digits, batch=66, decay_epochs=(), warmup_epochs=0)
    with pytest.raises(ValueError, match="global_batch_size.*divisible.*4"):
        Trainer(
            mlp(digits),
            plan,
            TrainerConfig(model_dir=str(tmp_path)),
            strategy=mirrored(4),
        )


def test_different_plan_in_same_model_dir_is_refused(digits, tmp_path):
    train(digits, tmp_path, 1, plan_for(digits, epochs=2, decay_epochs=()), name="d")
    before = sorted(os.listdir(tmp_path / "d" / "ckpt"))
    with pytest.raises(ValueError, match="model_dir"):
        train(digits, tmp_path, 1, plan_for(digits, epochs=3, decay_epochs=()), name="d")
    assert sorted(os.listdir(tmp_path / "d" / "ckpt")) == before


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_per_replica_batch_size", 0),
        ("steps_per_execution", 0),
        ("checkpoint_every_steps", -1),
        ("model_dir", ""),
    ],
)
def test_config_errors(field, value):
    kwargs = {"model_dir": "/tmp/x", field: value}
    with pytest.raises(ValueError, match=field):
        TrainerConfig(**kwargs)


def adaptive_setup(d):
    plan = plan_phases(
        "decay_lr",
        d.num_train_examples,
        12,
        16,
        0.05,
        base_batch_size=16,
        decay_epochs=(8, 11),
        warmup_epochs=1,
    )
    config = dict(adaptive_max_global_batch_size=256, noise_scale_beta=0.95, steps_per_execution=4)
    return plan, config


def test_adaptive_batch_follows_noise_scale_with_fewer_updates(digits, tmp_path):
    plan, config = adaptive_setup(digits)
    _, fixed = train(digits, tmp_path, 1, plan, name="fixed")
    _, adaptive = train(digits, tmp_path, 1, plan, name="adaptive", **config)
    decisions = adaptive["adaptive_decisions"]
    assert decisions, "no batch growth decided"
    for dec in decisions:  # grew by powers of 2 towards, never past, the measured B_simple
        assert dec["to_global_batch_size"] <= max(dec["noise_scale"], dec["from_global_batch_size"])
        assert dec["to_global_batch_size"] % dec["from_global_batch_size"] == 0
    batches = [h["global_batch_size"] for h in adaptive["history"]]
    assert batches == sorted(batches) and batches[-1] > 16
    assert adaptive["plan"]["mode"] == "adaptive"
    assert adaptive["parameter_updates"] == sum(p["steps"] for p in adaptive["phases"])
    # measured: 354 vs 1,068 updates; test accuracy 0.972 vs 0.975 (issue 7: within 1 point)
    assert adaptive["parameter_updates"] < 0.6 * fixed["parameter_updates"]
    assert adaptive["test_accuracy"] >= fixed["test_accuracy"] - 0.01


def test_adaptive_run_resumes_with_its_grown_plan(digits, tmp_path):
    plan, config = adaptive_setup(digits)
    _, whole = train(digits, tmp_path, 1, plan, name="whole", **config)
    first = whole["adaptive_decisions"][0]["epoch"]
    die = whole["history"][first]["steps"] // 4 + 2  # calls of 4 steps: inside epoch `first`+1
    with pytest.raises(RuntimeError, match="killed"):
        train(digits, tmp_path, 1, plan, name="cut", die_after_calls=die, **config)
    _, resumed = train(digits, tmp_path, 1, plan, name="cut", **config)
    assert resumed["parameter_updates"] == whole["parameter_updates"]
    assert resumed["phases"] == whole["phases"]
    assert resumed["weights_sha256"] == whole["weights_sha256"]


def test_extra_validation_metrics(digits, tmp_path):
    plan = plan_for(digits, epochs=2, decay_epochs=())
    metrics = [
        keras.metrics.SparseTopKCategoricalAccuracy(1, name="top1"),
        keras.metrics.SparseTopKCategoricalAccuracy(3, name="top3"),
    ]
    trainer = Trainer(
        mlp(digits),
        plan,
        TrainerConfig(model_dir=str(tmp_path), verbose=0),
        metrics=metrics,
        strategy=mirrored(2),
    )
    trainer.fit(digits.x_train, digits.y_train, validation_data=(digits.x_test, digits.y_test))
    r = trainer.results
    assert r["test_top1"] == pytest.approx(r["test_accuracy"])  # same quantity, two ways
    assert r["test_top3"] >= r["test_top1"] and r["test_top3"] > 0.95
    assert all("test_top3" in h for h in r["history"])


def test_eval_every_epochs(digits, tmp_path):
    plan = plan_for(digits, epochs=5, decay_epochs=())
    _, r = train(digits, tmp_path, 1, plan, eval_every_epochs=2)
    assert ["test_accuracy" in h for h in r["history"]] == [False, True, False, True, True]
    assert r["test_accuracy"] == r["history"][-1]["test_accuracy"]  # not evaluated twice
