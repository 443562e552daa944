"""The controller: phases inside an epoch (ramp-up), resume at any step, elasticity, signals."""

import json
import os
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import Dying, mirrored

from tf_largebatch import plan_phases
from tf_largebatch.controller import Preempted, make_dataset_fn
from tf_largebatch.inputs import ArraysSource, DatasetSource
from tf_largebatch.steps import TrainStep
from tf_largebatch.training import Trainer, TrainerConfig

N = 1000


def rampup_plan(epochs=2):
    return plan_phases(
        "rampup", dataset_size=N, epochs=epochs, global_batch_size=64, base_learning_rate=0.05,
        base_batch_size=16, rampup_batch_size=(16, 16, 600), warmup="none", decay_epochs=(),
    )  # fmt: skip


def megatron_batch(consumed, start=16, increment=16, ramp=600, target=64):
    increments = (target - start) // increment
    return min(target, start + increment * (consumed // (ramp / increments)))


@pytest.mark.parametrize("kind", ["arrays", "dataset"])
def test_rampup_pipelines_read_megatron_batches_without_repeats(kind):
    plan = rampup_plan()
    x = np.arange(N, dtype=np.int64)
    source = ArraysSource(x, x) if kind == "arrays" else DatasetSource(
        tf.data.Dataset.from_tensor_slices((x, x))
    )  # fmt: skip
    seen = {0: [], 1: []}
    consumed, step = 0, 0
    for seg in plan.segments():
        batch = plan.phases[seg.phase_index].global_batch_size
        fn = make_dataset_fn(source, batch, seed=3, start_epoch=seg.epoch, end_epoch=seg.epoch + 1,
                             example_offset=seg.example_offset)  # fmt: skip
        for xb, _ in fn(tf.distribute.InputContext()).take(seg.num_steps):
            if seg.epoch == 0:  # Megatron's calculator: batch from the samples consumed so far
                assert len(xb) == megatron_batch(consumed) == plan.batch_size_at_step(step)
                consumed += len(xb)
            seen[seg.epoch] += list(xb.numpy())
            step += 1
    assert step == plan.total_steps
    for epoch in (0, 1):
        assert len(set(seen[epoch])) == len(seen[epoch])  # no example twice in an epoch
        assert N - len(seen[epoch]) < 64  # only the last partial batch is dropped


def mlp():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3)])  # fmt: skip
    model.compile(
        optimizer=keras.optimizers.SGD(momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0.5).astype("int32")
    return x, y


def trainer(tmp_path, name, replicas=1, **config):
    config = {"verbose": 0, "save_model": False, "steps_per_execution": 1, **config}
    return Trainer(mlp, rampup_plan(), TrainerConfig(model_dir=str(tmp_path / name), **config),
                   strategy=mirrored(replicas))  # fmt: skip


class StopAt(keras.callbacks.Callback):
    def __init__(self, step, action="stop"):
        super().__init__()
        self.step, self.action, self.count = step, action, 0

    def on_train_batch_end(self, batch, logs=None):
        self.count += 1
        if self.count == self.step:
            if self.action == "stop":
                self.model.stop_training = True
            else:
                os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    run = trainer(tmp_path_factory.mktemp("whole"), "whole")
    run.fit(*data)
    return run


def test_rampup_run_follows_the_plan(uninterrupted):
    plan = rampup_plan()
    results = uninterrupted.results
    assert results["parameter_updates"] == plan.total_steps
    assert results["trace_count"] == 1
    assert len(results["phase_switch_seconds"]) == len(plan.phases) - 1
    assert [h["global_batch_size"] for h in results["history"]] == [16, 64]


@pytest.mark.parametrize(("replicas_before", "replicas_after"), [(1, 1), (1, 2), (2, 1)])
def test_resume_inside_the_ramp_on_any_replica_count(
    data, tmp_path, uninterrupted, replicas_before, replicas_after
):
    first = trainer(tmp_path, "run", replicas_before)
    first.fit(*data, callbacks=[StopAt(23)])  # inside the ramp, mid-phase, mid-epoch
    assert first.results["parameter_updates"] == 23
    second = trainer(tmp_path, "run", replicas_after)
    second.fit(*data)
    assert second.results["parameter_updates"] == uninterrupted.results["parameter_updates"]
    for a, b in zip(uninterrupted.model.get_weights(), second.model.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_sigterm_saves_at_the_step_reached_and_resumes(data, tmp_path, uninterrupted):
    run = trainer(tmp_path, "term")
    with pytest.raises(Preempted, match="SIGTERM at step 31") as info:
        run.fit(*data, callbacks=[StopAt(30, action="sigterm")])  # one more call, then stop
    assert info.value.exit_status == 143 and info.value.step == 31
    assert tf.train.latest_checkpoint(str(tmp_path / "term" / "ckpt")).endswith("-31")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    again = trainer(tmp_path, "term")
    again.fit(*data)
    for a, b in zip(uninterrupted.model.get_weights(), again.model.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_killed_inside_the_ramp_resumes_from_the_last_checkpoint(data, tmp_path, uninterrupted):
    run = trainer(tmp_path, "killed", checkpoint_every_steps=7)
    run.train_step = Dying(run.train_step, 25)  # dies at step 25: the last checkpoint is 21
    with pytest.raises(RuntimeError, match="killed"):
        run.fit(*data)
    assert tf.train.latest_checkpoint(str(tmp_path / "killed" / "ckpt")).endswith("-21")
    again = trainer(tmp_path, "killed", checkpoint_every_steps=7)
    again.fit(*data)
    assert again.results["parameter_updates"] == uninterrupted.results["parameter_updates"]
    for a, b in zip(uninterrupted.model.get_weights(), again.model.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_corrupt_latest_checkpoint_falls_back_and_the_run_finishes(
    data, tmp_path, uninterrupted, caplog
):
    import logging

    run = trainer(tmp_path, "corrupt", checkpoint_every_steps=7)
    run.train_step = Dying(run.train_step, 25)
    with pytest.raises(RuntimeError, match="killed"):
        run.fit(*data)
    latest = tmp_path / "corrupt" / "ckpt" / "ckpt-21.data-00000-of-00001"
    with open(latest, "rb+") as f:  # half of the newest checkpoint's data is lost
        f.truncate(os.path.getsize(latest) // 2)
    again = trainer(tmp_path, "corrupt", checkpoint_every_steps=7)
    with caplog.at_level(logging.WARNING):
        again.fit(*data)
    assert any("Skipping unreadable checkpoint" in r.getMessage() for r in caplog.records)
    assert any("resuming at epoch 1, step 14" in r.getMessage() for r in caplog.records)
    assert again.results["parameter_updates"] == uninterrupted.results["parameter_updates"]
    for a, b in zip(uninterrupted.model.get_weights(), again.model.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("interval", "replicas"), [(0, 1), (0, 2), (3600, 1), (3600, 2)])
def test_epoch_end_checkpoints_follow_the_interval(data, tmp_path, interval, replicas):
    run = trainer(tmp_path, "cadence", replicas, checkpoint_interval_seconds=interval)
    saved = []
    save = run.state.save
    run.state.save = lambda step: (saved.append(step), save(step))
    run.fit(*data)
    plan = rampup_plan()
    # 0: every epoch end; an hour: only the run's last step (always saved)
    expected = [plan.step_at_epoch(1), plan.total_steps] if interval == 0 else [plan.total_steps]
    assert saved == expected
    history = json.loads((tmp_path / "cadence" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]


def test_callback_stop_saves_whatever_the_interval(data, tmp_path):
    run = trainer(tmp_path, "stopped", checkpoint_interval_seconds=3600)
    run.fit(*data, callbacks=[StopAt(23)])
    assert tf.train.latest_checkpoint(str(tmp_path / "stopped" / "ckpt")).endswith("-23")


def tensorboard_scalars(log_dir, tag):
    """``[(step, value)]`` of one scalar in the event files under `log_dir`."""
    found = []
    for path in sorted(tf.io.gfile.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag:
                    found.append((event.step, float(tf.make_ndarray(value.tensor))))
    return found


@pytest.mark.parametrize("seconds", [0.0, 3600.0])
def test_tensorboard_gets_every_epoch_in_batches(data, tmp_path, monkeypatch, seconds):
    """Summaries go to the background thread at most every SUMMARY_SECONDS (0: after every
    epoch; an hour: once, at the end), and every epoch's scalars reach the event file."""
    from tf_largebatch import controller

    monkeypatch.setattr(controller, "SUMMARY_SECONDS", seconds)
    batches = []
    write = controller.Controller._summaries
    monkeypatch.setattr(
        controller.Controller, "_summaries",
        lambda self, records: (batches.append(len(records)), write(self, records)),
    )  # fmt: skip
    run = trainer(tmp_path, "tb")
    run.fit(*data)
    plan = rampup_plan()
    assert batches == ([1, 1] if seconds == 0 else [2])
    scalars = tensorboard_scalars(str(tmp_path / "tb" / "tensorboard"), "loss")
    history = run.results["history"]
    assert [step for step, _ in scalars] == [plan.step_at_epoch(1), plan.total_steps]
    np.testing.assert_allclose([v for _, v in scalars], [h["loss"] for h in history], rtol=1e-6)


class CountingAccuracy(keras.metrics.SparseCategoricalAccuracy):
    """A metric whose reset_state keeps Python state: it must be reset eagerly."""

    resets = 0

    def reset_state(self):
        CountingAccuracy.resets += 1
        super().reset_state()


@pytest.mark.parametrize("replicas", [1, 2])
def test_metrics_reset_in_graph_equal_eager_resets(data, tmp_path, replicas):
    def accuracy_by_epoch(name, in_graph):
        run = trainer(tmp_path, name, replicas)
        run.fit(*data)
        assert run.train_step.resets_metrics_in_graph is in_graph
        return [h["accuracy"] for h in run.results["history"]]

    def eager(self):  # the same run with the metrics reset eagerly, as model.fit does
        return False

    in_graph = accuracy_by_epoch("graph", True)
    original = TrainStep.resets_metrics_in_graph
    TrainStep.resets_metrics_in_graph = property(eager)
    try:
        eagerly = accuracy_by_epoch("eager", False)
    finally:
        TrainStep.resets_metrics_in_graph = original
    assert in_graph == eagerly  # per-epoch accuracies: reset at each epoch's first call


def test_metric_with_its_own_reset_state_is_reset_eagerly(data, tmp_path):
    def model():
        m = mlp()
        m.compile(optimizer=keras.optimizers.SGD(momentum=0.9), loss=m.loss,
                  metrics=[CountingAccuracy(name="acc")])  # fmt: skip
        return m

    config = TrainerConfig(model_dir=str(tmp_path / "own"), verbose=0, save_model=False)
    run = Trainer(model, rampup_plan(), config)
    CountingAccuracy.resets = 0
    run.fit(*data)
    assert run.train_step.resets_metrics_in_graph is False
    assert CountingAccuracy.resets == rampup_plan().epochs  # once per epoch, in Python


def test_plan_momentum_on_an_optimizer_built_without_it_is_a_clear_error(data, tmp_path):
    def model():
        m = mlp()
        m.compile(optimizer="sgd", loss=m.loss)  # Keras SGD, momentum 0: no momentum slots
        return m

    run = Trainer(model, rampup_plan(), TrainerConfig(model_dir=str(tmp_path / "m0"), verbose=0))
    with pytest.raises(ValueError, match="built with momentum=0"):
        run.fit(*data)
