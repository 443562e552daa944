"""In-graph batches from arrays on the devices: the same batches, weights and checkpoints as the
`tf.data` path, and asynchronous checkpoints that hold the state of the step they were taken at."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import mirrored

from tf_largebatch import plan_phases
from tf_largebatch.data import _permutation
from tf_largebatch.device_data import DeviceArrays, DeviceFeed, eligible
from tf_largebatch.inputs import ArraysSource
from tf_largebatch.training import Trainer, TrainerConfig

N = 480


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = {"a": rng.normal(size=(N, 5)).astype("float32"), "b": rng.normal(size=(N, 2))}
    y = (x["a"][:, :1] - 2 * x["b"][:, :1] + 0.1 * rng.normal(size=(N, 1))).astype("float32")
    w = rng.uniform(0.5, 2.0, size=(N,)).astype("float32")
    return x, y, w


@pytest.mark.parametrize("replicas", [1, 2, 4])
def test_gathered_batches_are_the_pipelines(data, replicas):
    """Replica k's gathered piece of each step equals the tf.data path's, from an offset."""
    x, y, w = data
    strategy = mirrored(replicas)
    source = ArraysSource(x, y, w)
    device = DeviceArrays(source.element, strategy, seed=3)
    batch, epoch, offset = 48, 2, 40
    dataset_fn = source.make_dataset_fn(
        batch, seed=3, start_epoch=epoch, end_epoch=epoch + 1, example_offset=offset,
        static_batch_size=False,
    )  # fmt: skip
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    device.load_epoch(epoch)

    @tf.function
    def gathered(start):
        return strategy.run(device.replica_batch, args=(start, tf.constant(batch, tf.int64)))

    for step in range(3):
        expected = [strategy.experimental_local_results(v) for v in tf.nest.flatten(next(iterator))]
        got = gathered(tf.constant(offset + step * batch, tf.int64))
        got = [strategy.experimental_local_results(v) for v in tf.nest.flatten(got)]
        assert len(got) == len(expected) == 4  # a, b, y, w
        for want_leaf, got_leaf in zip(expected, got):
            assert len(got_leaf) == replicas
            for want, have in zip(want_leaf, got_leaf):
                assert have.shape[0] == batch // replicas
                np.testing.assert_array_equal(have.numpy(), want.numpy())


def test_eligibility():
    small = (np.zeros((10, 3), "float32"), np.zeros((10,), "int64"))
    assert eligible(small, 1 << 20)
    assert not eligible(small, 0)  # 0 turns it off
    assert not eligible(small, 100)  # 160 bytes > 100
    assert not eligible((np.array(["a", "b"]), np.zeros(2)), 1 << 20)  # strings stay in tf.data


def model_fn():
    a, b = keras.Input((5,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Concatenate()([a, b])
    h = keras.layers.Dense(
        8, activation="tanh", kernel_initializer=keras.initializers.GlorotUniform(0)
    )(h)
    out = keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(1))(h)
    model = keras.Model({"a": a, "b": b}, out)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse", metrics=["mae"])
    return model


def rampup_plan():
    """Batches 16 → 32 → 48 in phases that start inside epochs, then a decay phase."""
    return plan_phases(
        "rampup", N, 4, 48, 0.02, base_batch_size=48, rampup_batch_size=(16, 16, 600),
        warmup="none", warmup_epochs=0,
    )  # fmt: skip


def fit(tmp_path, name, replicas, data, plan=None, **config):
    x, y, w = data
    trainer = Trainer(
        model_fn, plan or rampup_plan(),
        TrainerConfig(model_dir=str(tmp_path / name), verbose=0, save_model=False,
                      steps_per_execution=4, **config),
        strategy=mirrored(replicas),
    )  # fmt: skip
    trainer.fit(x, y, sample_weight=w)
    return trainer


@pytest.mark.parametrize("replicas", [1, 2])
def test_trainer_weights_equal_the_tf_data_path(tmp_path, data, replicas):
    """Phases inside epochs, accumulation and the noise estimator, through both input paths."""
    extra = {"max_per_replica_batch_size": 8, "measure_noise_scale": True}
    on = fit(tmp_path, "device", replicas, data, **extra)
    off = fit(tmp_path, "tf_data", replicas, data, in_graph_data_max_bytes=0, **extra)
    assert on.device_data is not None and off.device_data is None
    # one trace per micro-batch count (batches 16, 32, 48 in micro-batches of at most 8)
    assert on.trace_count == off.trace_count == 3
    assert on.results["parameter_updates"] == off.results["parameter_updates"] > 30
    for a, b in zip(on.model.get_weights(), off.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        on.results["noise_scale_steps"], off.results["noise_scale_steps"], rtol=1e-5
    )


@pytest.mark.parametrize("replicas", [1, 2])
def test_the_epochs_last_call_loads_the_next_permutation(tmp_path, data, replicas):
    """The call that ends an epoch puts π_{e+1} in place beside its steps (every replica's
    copy), one that does not leaves π_e; a call of another epoch loads its own."""
    trainer = fit(tmp_path, "run", replicas, data)
    device, step = trainer.device_data, trainer.train_step

    def loaded():
        epochs = {int(e) for e in trainer.strategy.experimental_local_results(device.loaded_epoch)}
        orders = trainer.strategy.experimental_local_results(device.permutation)
        assert len(epochs) == 1 and len(orders) == replicas
        (epoch,) = epochs
        want = _permutation(N, trainer.config.seed, tf.constant(epoch, tf.int64), True).numpy()
        for order in orders:
            np.testing.assert_array_equal(order.numpy(), want)
        return epoch

    step(DeviceFeed(device, 7, 0, 48), 4, 1)  # examples 0-191 of 480: not the last call
    assert loaded() == 7
    step(DeviceFeed(device, 7, 192, 48), 5, 1)  # up to 432: one more batch of 48 fits
    assert loaded() == 7
    step(DeviceFeed(device, 7, 432, 48), 1, 1)  # the last batch of epoch 7
    assert loaded() == 8
    step(DeviceFeed(device, 2, 0, 48), 2, 1)  # another epoch: its own permutation
    assert loaded() == 2


class ShapeProbe(keras.layers.Layer):
    """The identity, recording the batch dimension of every input it is traced with."""

    def __init__(self, seen, **kwargs):
        super().__init__(**kwargs)
        self.record = seen.append  # (Keras would track a list attribute as a copy)

    def call(self, inputs):
        self.record(inputs.shape[0])
        return inputs


def test_each_batch_size_is_traced_with_static_shapes(tmp_path, data):
    """Batches 16 → 32 → 48 on 2 replicas: one trace whose loops see per-replica batches of
    8, 16 and 24 examples (static shapes), where the tf.data path's batch dimension is None;
    a batch size the plan lacks is traced when it comes, and one that does not split into
    the call's micro-batches is refused."""
    x, y, w = data
    seen = {"device": [], "tf_data": []}

    def probed(name):
        def build():
            model = model_fn()
            model = keras.Model(model.inputs, ShapeProbe(seen[name])(model.outputs[0]))
            model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
            return model

        return build

    runs = {}
    for name, max_bytes in (("device", 1 << 20), ("tf_data", 0)):
        runs[name] = Trainer(
            probed(name), rampup_plan(),
            TrainerConfig(model_dir=str(tmp_path / name), verbose=0, save_model=False,
                          steps_per_execution=4, in_graph_data_max_bytes=max_bytes),
            strategy=mirrored(2),
        )  # fmt: skip
        runs[name].fit(x, y, sample_weight=w)
        del seen[name][:2]  # the model's construction and symbolic build: None
    device = runs["device"]
    assert device.trace_count == runs["tf_data"].trace_count == 1
    assert device.train_step.batch_sizes == (16, 32, 48)
    assert seen["device"] == [8, 8, 16, 16, 24, 24]  # per branch, per replica
    assert seen["tf_data"] == [None, None]
    for a, b in zip(device.model.get_weights(), runs["tf_data"].model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    out = device.train_step(DeviceFeed(device.device_data, 4, 0, 64), 1, 1)
    assert np.isfinite(float(out.loss_sum)) and device.trace_count == 2
    assert seen["device"][6:] == [8, 8, 16, 16, 24, 24, 32, 32]  # the new trace: 64 / 2 too
    assert device.train_step.batch_sizes == (16, 32, 48, 64)
    with pytest.raises(ValueError, match="split into num_micro=5 micro-batches"):
        device.train_step(DeviceFeed(device.device_data, 4, 0, 48), 1, 5)


class StopAt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.stop_epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.stop_epoch:
            self.model.stop_training = True


def test_async_checkpoints_resume_to_the_same_weights(tmp_path, data):
    """Stopped after epoch 2 with background writes, resumed on 2 replicas: the same weights
    as one uninterrupted synchronous run, and the final checkpoint holds the final state."""
    x, y, w = data
    plan = plan_phases(
        "grow_batch", N, 4, 32, 0.02, base_batch_size=32, decay_epochs=(2,),
        decay_factor=0.5, warmup="none", warmup_epochs=0,
    )  # fmt: skip
    whole = fit(tmp_path, "whole", 1, data, plan=plan, async_checkpoints=False)

    def trainer(replicas):
        return Trainer(
            model_fn, plan,
            TrainerConfig(model_dir=str(tmp_path / "async"), verbose=0, save_model=False,
                          async_checkpoints=True, checkpoint_every_steps=5),
            strategy=mirrored(replicas),
        )  # fmt: skip

    first = trainer(1)
    first.fit(x, y, sample_weight=w, callbacks=[StopAt(1)])
    assert first.results["stopped_early"] and first.results["epochs_completed"] == 2
    second = trainer(2)
    second.fit(x, y, sample_weight=w)
    assert second.results["epochs_completed"] == 4
    for a, b in zip(second.model.get_weights(), whole.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    restored = trainer(1)
    latest = tf.train.latest_checkpoint(str(tmp_path / "async" / "ckpt"))
    assert latest.endswith(f"-{plan.total_steps}")
    restored.state.checkpoint.restore(latest).expect_partial()
    for a, b in zip(restored.model.get_weights(), whole.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
