"""fit_phases: plain model.fit through a PhasePlan on real data (scikit-learn digits)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_largebatch import plan_phases
from tf_largebatch.data import load_data, make_dataset
from tf_largebatch.fitting import fit_phases
from tf_largebatch.optimizers import SGD


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def make_model(d, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input(d.input_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(d.num_classes),
        ]
    )


class Recorder(keras.callbacks.Callback):
    """Records what the optimizer uses at each epoch start, and train begin/end calls."""

    def __init__(self):
        super().__init__()
        self.begins = self.ends = 0
        self.seen = []

    def on_train_begin(self, logs=None):
        self.begins += 1

    def on_train_end(self, logs=None):
        self.ends += 1

    def on_epoch_begin(self, epoch, logs=None):
        opt = self.model.optimizer
        self.seen.append(
            (epoch, int(opt.iterations), float(opt.learning_rate), float(opt.momentum.numpy()))
        )


def test_fit_phases_follows_the_plan(digits, tmp_path):
    plan = plan_phases(
        "hybrid",
        digits.num_train_examples,
        6,
        32,
        0.05,
        base_batch_size=32,
        decay_epochs=(2, 4),
        decay_factor=0.5,
        max_global_batch_size=64,
        warmup_epochs=1,
        warmup_initial_learning_rate=0.0,
    )
    assert [p.global_batch_size for p in plan.phases] == [32, 64, 64]
    model = make_model(digits)
    model.compile(
        SGD(0.01, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    recorder = Recorder()
    ckpt = keras.callbacks.ModelCheckpoint(str(tmp_path / "m.keras"))

    def make(batch):
        return make_dataset(digits.x_train, digits.y_train, batch, seed=0, epochs=1)

    history = fit_phases(model, make, plan, callbacks=[recorder, ckpt], verbose=0)
    assert int(model.optimizer.iterations) == plan.total_steps
    assert history.epoch == list(range(6))
    assert len(history.history["loss"]) == 6
    assert history.history["global_batch_size"] == [32, 32, 64, 64, 64, 64]
    assert recorder.begins == 1 and recorder.ends == 1  # one run across three phases
    for epoch, iterations, lr, _ in recorder.seen:
        assert iterations == plan.step_at_epoch(epoch)
        assert lr == pytest.approx(plan.learning_rate_at_step(iterations), rel=1e-6)
    assert [lr for *_, lr, _ in recorder.seen][4] == pytest.approx(0.025)
    assert history.history["accuracy"][-1] > 0.9
    assert (tmp_path / "m.keras").exists()


def test_fit_phases_sets_momentum_per_phase(digits):
    plan = plan_phases(
        "decay_lr",
        digits.num_train_examples,
        2,
        64,
        0.1,
        base_batch_size=64,
        decay_epochs=(1,),
        momentum=0.5,
        scaled_momentum=0.75,
    )
    model = make_model(digits)
    model.compile(
        SGD(0.1, momentum=0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    recorder = Recorder()
    fit_phases(
        model,
        lambda b: make_dataset(digits.x_train, digits.y_train, b, seed=1, epochs=1),
        plan,
        callbacks=[recorder],
        verbose=0,
    )
    assert [m for *_, m in recorder.seen] == pytest.approx([0.75, 0.75])
    assert plan.phases[0].global_batch_size == 128  # 64 · (1 − 0.5)/(1 − 0.75)


def test_early_stopping_ends_all_phases(digits):
    plan = plan_phases(
        "grow_batch",
        digits.num_train_examples,
        6,
        32,
        0.1,
        base_batch_size=32,
        decay_epochs=(2, 4),
        decay_factor=0.5,
    )
    model = make_model(digits)
    model.compile(SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=10.0)
    history = fit_phases(
        model,
        lambda b: make_dataset(digits.x_train, digits.y_train, b, seed=0, epochs=1),
        plan,
        callbacks=[stop],
        verbose=0,
    )
    assert history.epoch == [0, 1]  # stops in the first phase, later phases never start


def test_fit_phases_rejects_uncompiled_and_owned_kwargs(digits):
    plan = plan_phases("decay_lr", digits.num_train_examples, 2, 32, 0.1)
    with pytest.raises(ValueError, match="compiled"):
        fit_phases(make_model(digits), lambda b: None, plan)
    model = make_model(digits)
    model.compile(SGD(0.1), "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="epochs"):
        fit_phases(model, lambda b: None, plan, epochs=3)


def test_model_fit_mirrored_goyal_schedule_and_reload(digits, tmp_path):
    """Issue 2: model.fit on 2 logical devices reads back the schedule at optimizer.iterations."""
    from tf_largebatch.schedules import goyal_schedule

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    spe = digits.num_train_examples // 128
    schedule = goyal_schedule(0.1, 128, spe, base_batch_size=32, warmup_epochs=2, decay_epochs=(3,))
    with strategy.scope():
        model = make_model(digits)
        model.compile(SGD(schedule), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ds = make_dataset(digits.x_train, digits.y_train, 128, seed=0, epochs=4)
    model.fit(ds, epochs=4, steps_per_epoch=spe, verbose=0)
    it = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    assert it == 4 * spe
    assert float(model.optimizer.learning_rate) == pytest.approx(float(schedule(it)), rel=1e-6)
    assert float(schedule(it)) == pytest.approx(0.04)  # 0.1·128/32 ÷ 10 after epoch 3
    path = str(tmp_path / "goyal.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    restored = loaded.optimizer._learning_rate
    steps = np.arange(0, 5 * spe)
    np.testing.assert_array_equal(
        [float(restored(s)) for s in steps], [float(schedule(s)) for s in steps]
    )
    assert int(keras.ops.convert_to_numpy(loaded.optimizer.iterations)) == it


def test_tensorboard_callback_spans_phases(digits, tmp_path):
    plan = plan_phases(
        "grow_batch",
        digits.num_train_examples,
        4,
        32,
        0.1,
        base_batch_size=32,
        decay_epochs=(2,),
        decay_factor=0.5,
    )
    model = make_model(digits)
    model.compile(SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    board = keras.callbacks.TensorBoard(log_dir=str(tmp_path / "tb"))
    history = fit_phases(
        model,
        lambda b: make_dataset(digits.x_train, digits.y_train, b, seed=0, epochs=1),
        plan,
        callbacks=[board],
        verbose=0,
    )
    assert history.epoch == [0, 1, 2, 3]
    # Keras opens a writer per model.fit call (TensorBoard merges the files of one run dir);
    # what matters is one epoch axis across phases, not restarting at 0 in each phase.
    epochs_logged = []
    for path in sorted((tmp_path / "tb" / "train").glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            epochs_logged += [event.step for v in event.summary.value if v.tag == "epoch_loss"]
    assert sorted(epochs_logged) == [0, 1, 2, 3]


# --- Plans with phases inside an epoch (batch ramp-up) -----------------------------------------

_N = 200
_RNG = np.random.default_rng(12)
_X = _RNG.normal(size=(_N, 3)).astype(np.float32)
_Y = (_X @ np.array([[1.0], [-2.0], [0.5]]) + 0.1 * _RNG.normal(size=(_N, 1))).astype(np.float32)
_RAMP = dict(
    dataset_size=_N,
    epochs=2,
    global_batch_size=40,
    base_learning_rate=0.01,
    base_batch_size=10,
    rampup_batch_size=(10, 10, 150),
    momentum=0.0,
)


def _order(epoch):
    return np.random.default_rng(100 + epoch).permutation(_N)


def _megatron_reference(steps=None):
    """Plain NumPy: Megatron's batch from the examples consumed, each epoch's order walked
    without repeats (last partial batch dropped), w ← w − η_B·∇ mean squared error."""
    w, consumed, epoch, offset, done = np.zeros((3, 1)), 0, 0, 0, 0
    while steps is None or done < steps:
        b = 10 + 10 * min(3, int(consumed / 50))  # K = 3 increments over 150 examples
        if _N - offset < b:
            epoch, offset = epoch + 1, 0
        if epoch == 2:
            break
        idx = _order(epoch)[offset : offset + b]
        x, y = _X[idx].astype(np.float64), _Y[idx].astype(np.float64)
        w = w - (0.01 * b / 10) * 2.0 / b * x.T @ (x @ w - y)
        offset, consumed, done = offset + b, consumed + b, done + 1
    return w, done


def _ramp_model():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")]
    )
    model.compile(SGD(0.01, momentum=0.0), "mse")
    return model


def _segment_dataset(calls):
    def make(global_batch_size, epoch, example_offset):
        calls.append((global_batch_size, epoch, example_offset))
        idx = _order(epoch)[example_offset:]
        ds = tf.data.Dataset.from_tensor_slices((_X[idx], _Y[idx]))
        return ds.batch(global_batch_size, drop_remainder=True)

    return make


def test_fit_phases_follows_a_rampup_inside_the_epoch():
    plan = plan_phases("rampup", **_RAMP)
    # 5×10 (c = 50), 3×20 (110), 2×30 (170), 30 left < 40: epoch 1, 5×40.
    assert [(p.global_batch_size, p.num_steps) for p in plan.phases] == [
        (10, 5),
        (20, 3),
        (30, 2),
        (40, 5),
    ]
    calls, model = [], _ramp_model()
    history = fit_phases(model, _segment_dataset(calls), plan, verbose=0)
    assert calls == [(10, 0, 0), (20, 0, 50), (30, 0, 110), (40, 1, 0)]
    assert calls == [
        (plan.phases[s.phase_index].global_batch_size, s.epoch, s.example_offset)
        for s in plan.segments()
    ]
    want, steps = _megatron_reference()
    assert int(model.optimizer.iterations) == plan.total_steps == steps == 15
    np.testing.assert_allclose(model.get_weights()[0], want, rtol=1e-5)
    assert history.history["global_batch_size"] == [10, 20, 30, 40]
    assert history.history["step"] == [0, 5, 8, 10] and history.history["epoch"] == [0, 0, 0, 1]
    assert history.history["learning_rate"] == pytest.approx([0.01, 0.02, 0.03, 0.04])


@pytest.mark.parametrize("resume", [5, 6, 9, 10, 11])
def test_fit_phases_resumes_a_rampup_at_any_step(resume):
    plan = plan_phases("rampup", **_RAMP)
    partial, _ = _megatron_reference(steps=resume)
    model = _ramp_model()
    model.optimizer.build(model.trainable_variables)
    model.set_weights([partial.astype(np.float32)])
    model.optimizer.iterations.assign(resume)
    calls = []
    fit_phases(model, _segment_dataset(calls), plan, initial_step=resume, verbose=0)
    epoch, offset = plan.position_at_step(resume)
    assert calls[0] == (plan.batch_size_at_step(resume), epoch, offset)
    assert int(model.optimizer.iterations) == plan.total_steps
    np.testing.assert_allclose(model.get_weights()[0], _megatron_reference()[0], rtol=1e-5)


def test_fit_phases_initial_step_needs_a_step_plan():
    model = _ramp_model()
    whole = plan_phases("decay_lr", _N, 2, 20, 0.01, base_batch_size=20)
    with pytest.raises(ValueError, match="`initial_step`"):
        fit_phases(model, lambda b: None, whole, initial_step=3)
    with pytest.raises(ValueError, match="`initial_step`"):
        fit_phases(model, lambda b: None, plan_phases("rampup", **_RAMP), initial_step=16)
