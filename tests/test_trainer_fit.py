"""The Trainer as a drop-in for model.fit: any compiled model, any input, Keras callbacks."""

import csv
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import mirrored

from tf_largebatch import plan_phases
from tf_largebatch.training import NonFiniteLossError, Trainer, TrainerConfig

N, N_VAL = 512, 96


@pytest.fixture(scope="module")
def regression():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(N + N_VAL, 4)).astype("float32")
    b = rng.normal(size=(N + N_VAL, 3)).astype("float32")
    y = a.sum(1, keepdims=True) - 2 * b[:, :1] + 0.1 * rng.normal(size=(N + N_VAL, 1))
    y = y.astype("float32")  # targets of shape (N, 1)
    x = {"a": a, "b": b}
    train = ({k: v[:N] for k, v in x.items()}, y[:N])
    val = ({k: v[N:] for k, v in x.items()}, y[N:])
    return train, val


def regression_model(seed=0):
    a = keras.Input((4,), name="a")
    b = keras.Input((3,), name="b")
    h = keras.layers.Concatenate()([a, b])
    h = keras.layers.Dense(
        16, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(seed)
    )(h)
    out = keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed + 1))(h)
    model = keras.Model({"a": a, "b": b}, out)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse", metrics=["mae"])
    return model


def grow_plan(epochs=4, batch=32):
    return plan_phases(
        "grow_batch", N, epochs, batch, 0.02, base_batch_size=batch,
        decay_epochs=(epochs // 2,), decay_factor=0.5, warmup="none", warmup_epochs=0,
    )  # fmt: skip


def trainer_for(tmp_path, name, replicas=1, plan=None, model_fn=regression_model, **config):
    config = {"verbose": 0, "save_model": False, **config}
    return Trainer(
        model_fn,
        plan or grow_plan(),
        TrainerConfig(model_dir=str(tmp_path / name), **config),
        strategy=mirrored(replicas),
    )


def test_dict_inputs_regression_from_arrays_and_dataset(regression, tmp_path):
    (x, y), val = regression
    trainer = trainer_for(tmp_path, "arrays")
    history = trainer.fit(x, y, validation_data=val)
    keys = set(history.history)
    assert {"loss", "mae", "val_loss", "val_mae", "learning_rate", "global_batch_size"} <= keys
    assert {"momentum"} <= keys and not any("accuracy" in k for k in keys)
    assert history.history["global_batch_size"] == [32, 32, 64, 64]
    loss = history.history["loss"]
    assert loss[-1] < 0.2 * loss[0]
    results = trainer.results
    assert "test_mae" in results and "test_accuracy" not in results
    assert results["test_loss"] == pytest.approx(history.history["val_loss"][-1])
    assert results["trace_count"] == 1 and results["parameter_updates"] == 16 * 2 + 8 * 2

    dataset = tf.data.Dataset.from_tensor_slices((x, y))  # unbatched examples
    from_dataset = trainer_for(tmp_path, "dataset")
    history_ds = from_dataset.fit(
        dataset, validation_data=tf.data.Dataset.from_tensor_slices(val).batch(40)
    )
    loss_ds = history_ds.history["loss"]
    assert loss_ds[-1] < 0.2 * loss_ds[0]
    assert history_ds.history["val_mae"][-1] < 2 * history.history["val_mae"][-1]
    assert from_dataset.results["parameter_updates"] == 48 and from_dataset.trace_count == 1


def test_dict_inputs_same_weights_on_1_and_2_replicas(regression, tmp_path):
    (x, y), _ = regression
    weights = {}
    for replicas in (1, 2):
        trainer = trainer_for(tmp_path, f"r{replicas}", replicas)
        trainer.fit(x, y)
        weights[replicas] = trainer.model.get_weights()
    for one, two in zip(weights[1], weights[2]):
        np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-6)


def test_unbatched_dataset_same_weights_on_1_and_2_replicas(regression, tmp_path):
    (x, y), _ = regression
    w = np.random.default_rng(1).uniform(0.5, 2.0, size=(N,)).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y, w))  # with sample weights
    weights = {}
    for replicas in (1, 2):
        trainer = trainer_for(tmp_path, f"ds{replicas}", replicas)
        trainer.fit(dataset)
        weights[replicas] = trainer.model.get_weights()
    for one, two in zip(weights[1], weights[2]):
        np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-6)


def test_sample_weights_match_model_fit_loss(regression, tmp_path):
    """Weighted loss as Keras reduces it: Σ w·l over the number of examples."""
    (x, y), _ = regression
    w = np.zeros((N,), "float32")
    w[: N // 2] = 2.0
    plan = plan_phases("decay_lr", N, 1, N, 1e-9, base_batch_size=N, warmup="none", momentum=0.0)
    trainer = trainer_for(tmp_path, "sw", plan=plan)
    trainer.fit(x, y, sample_weight=w)
    model = trainer.model
    pred = model.predict(x, verbose=0)
    expected = np.sum(w * (pred[:, 0] - y[:, 0]) ** 2) / N
    assert trainer.results["final_train_loss"] == pytest.approx(expected, rel=1e-4)


def test_dataset_fn_input(regression, tmp_path):
    (x, y), _ = regression
    calls = []

    def dataset_fn(global_batch_size, input_context):
        calls.append(global_batch_size)
        per_replica = input_context.get_per_replica_batch_size(global_batch_size)
        data = tf.data.Dataset.from_tensor_slices((x, y)).shard(
            input_context.num_input_pipelines, input_context.input_pipeline_id
        )
        return data.batch(per_replica, drop_remainder=True)

    trainer = trainer_for(tmp_path, "fn", 2)
    history = trainer.fit(dataset_fn)
    assert sorted(set(calls)) == [32, 64]
    assert history.history["loss"][-1] < 0.3 * history.history["loss"][0]
    assert trainer.results["parameter_updates"] == 48


def test_bad_inputs_are_clear(regression, tmp_path):
    (x, y), _ = regression
    trainer = trainer_for(tmp_path, "bad")
    with pytest.raises(ValueError, match="dataset_size=512 examples. Received: 100"):
        trainer.fit({k: v[:100] for k, v in x.items()}, y[:100])
    with pytest.raises(ValueError, match="same number"):
        trainer.fit(x, y[:10])
    with pytest.raises(ValueError, match="pass the dataset unbatched"):
        trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
    with pytest.raises(ValueError, match="infinite"):
        trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).repeat())
    with pytest.raises(ValueError, match="`y` and `sample_weight` must be None"):
        trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)), y)


def test_uncompiled_regression_reports_no_accuracy(regression, tmp_path):
    (x, y), val = regression

    def model_fn():
        model = regression_model()
        return keras.Model(model.inputs, model.outputs)  # uncompiled

    trainer = Trainer(
        model_fn, grow_plan(), TrainerConfig(model_dir=str(tmp_path / "u"), verbose=0),
        loss="mse", metrics=["mae"], strategy=mirrored(1),
    )  # fmt: skip
    trainer.fit(x, y, validation_data=val)
    assert "test_accuracy" not in trainer.results and "test_mae" in trainer.results
    # 1-D labels after a fit on (N, 1) labels evaluate without a retrace failure
    result = trainer.evaluate(val[0], val[1][:, 0])
    assert set(result) == {"loss", "mae"}


def two_output_classifier():
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Flatten()(inputs)
    h = keras.layers.Dense(32, activation="relu")(h)
    digit = keras.layers.Dense(10, name="digit")(h)
    parity = keras.layers.Dense(2, name="parity")(h)
    model = keras.Model(inputs, {"digit": digit, "parity": parity})
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss={
            "digit": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "parity": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        },
        loss_weights={"digit": 1.0, "parity": 0.5},
        metrics={"digit": ["accuracy"], "parity": ["accuracy"]},
    )
    return model


def test_two_outputs_with_loss_weights(tmp_path):
    from tf_largebatch.data import load_data

    d = load_data("digits")
    n = 1024
    x, y = d.x_train[:n], d.y_train[:n]
    targets = {"digit": y, "parity": y % 2}
    val = (d.x_test, {"digit": d.y_test, "parity": d.y_test % 2})
    plan = plan_phases("grow_batch", n, 6, 32, 0.05, base_batch_size=32, decay_epochs=(3,),
                       warmup="none", warmup_epochs=0)  # fmt: skip
    trainer = Trainer(
        two_output_classifier, plan, TrainerConfig(model_dir=str(tmp_path), verbose=0),
        strategy=mirrored(2),
    )  # fmt: skip
    history = trainer.fit(x, targets, validation_data=val).history
    assert "val_digit_accuracy" in history and "val_parity_accuracy" in history
    assert history["val_digit_accuracy"][-1] > 0.85
    assert history["val_parity_accuracy"][-1] > 0.85
    # the evaluation equals model.evaluate's (same keys, same numbers)
    expected = trainer.model.evaluate(*val, batch_size=64, verbose=0, return_dict=True)
    got = trainer.evaluate(*val, batch_size=64)
    assert set(got) == set(expected)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-4), key


def text_model(vocab=64, length=16):
    tokens = keras.Input((length,), dtype="int32")
    h = keras.layers.Embedding(vocab, 16)(tokens)
    attn = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)(h, h, use_causal_mask=True)
    h = keras.layers.LayerNormalization()(h + attn)
    logits = keras.layers.Dense(vocab)(h)
    model = keras.Model(tokens, logits)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def test_text_model_from_unbatched_token_dataset(tmp_path):
    rng = np.random.default_rng(0)
    starts = rng.integers(0, 64, size=(512, 1))
    seq = (starts + np.arange(17)) % 64  # next token = token + 1: learnable
    dataset = tf.data.Dataset.from_tensor_slices((seq[:, :-1].astype("int32"), seq[:, 1:]))
    plan = plan_phases("decay_lr", 512, 3, 32, 1e-2, base_batch_size=32, warmup="none",
                       decay_epochs=(), momentum=0.0)  # fmt: skip
    trainer = Trainer(text_model, plan, TrainerConfig(model_dir=str(tmp_path), verbose=0))
    history = trainer.fit(dataset).history
    assert history["loss"][-1] < 0.5 * np.log(64)


class Spy(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __getattribute__(self, name):
        if name.startswith("on_") and not name.startswith("on_phase"):
            calls = object.__getattribute__(self, "calls")

            def record(*args, **kwargs):
                calls.append((name, *[a for a in args if isinstance(a, int)]))

            return record
        return object.__getattribute__(self, name)


def digits_mlp():
    layers = [keras.layers.Flatten(), keras.layers.Dense(32, "relu"), keras.layers.Dense(10)]
    model = keras.Sequential([keras.Input((8, 8, 1)), *layers])
    model.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def test_callback_hooks_match_model_fit_and_early_stopping(tmp_path):
    from tf_largebatch.data import load_data

    d = load_data("digits")
    x, y, xv, yv = d.x_train[:256], d.y_train[:256], d.x_test[:100], d.y_test[:100]
    stop = lambda: keras.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=1e9)  # noqa: E731
    keras.utils.set_random_seed(0)
    model = digits_mlp()
    fit_spy = Spy()
    fit_stop = stop()
    model.fit(x, y, batch_size=32, epochs=4, validation_data=(xv, yv), validation_batch_size=50,
              callbacks=[fit_spy, fit_stop], verbose=0)  # fmt: skip
    plan = plan_phases("decay_lr", 256, 4, 32, 0.05, base_batch_size=32, warmup="none",
                       decay_epochs=(), momentum=0.0)  # fmt: skip
    trainer = Trainer(
        digits_mlp, plan,
        TrainerConfig(model_dir=str(tmp_path), verbose=0, eval_batch_size=50),
    )  # fmt: skip
    spy, trainer_stop = Spy(), stop()
    history = trainer.fit(x, y, validation_data=(xv, yv), callbacks=[spy, trainer_stop])
    assert len(spy.calls) > 20 and spy.calls == fit_spy.calls
    assert fit_stop.stopped_epoch == trainer_stop.stopped_epoch == 1
    assert len(history.history["loss"]) == 2
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["stopped_early"] is True and results["epochs_completed"] == 2
    assert os.path.exists(tmp_path / "model.keras")


class PhaseRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.events = []

    def on_phase_begin(self, phase_index, phase):
        self.events.append(("begin", phase_index, phase.global_batch_size))

    def on_phase_end(self, phase_index, phase):
        self.events.append(("end", phase_index, phase.global_batch_size))


def test_builtin_callbacks_and_phase_hooks(regression, tmp_path):
    (x, y), val = regression
    seen = []
    callbacks = [
        keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"), monitor="val_loss"),
        keras.callbacks.TensorBoard(str(tmp_path / "tb")),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: seen.append(logs["loss"])),
        PhaseRecorder(),
    ]
    trainer = trainer_for(tmp_path, "cb")
    history = trainer.fit(x, y, validation_data=val, callbacks=callbacks)
    rows = list(csv.DictReader((tmp_path / "log.csv").read_text().splitlines()))
    assert [float(r["loss"]) for r in rows] == pytest.approx(history.history["loss"])
    assert [int(float(r["global_batch_size"])) for r in rows] == [32, 32, 64, 64]
    assert os.path.exists(tmp_path / "best.keras")
    assert os.listdir(tmp_path / "tb")
    assert seen == pytest.approx(history.history["loss"])
    assert callbacks[-1].events == [("begin", 0, 32), ("end", 0, 32), ("begin", 1, 64),
                                    ("end", 1, 64)]  # fmt: skip


def test_early_stopping_inside_a_phase_writes_model_and_results(regression, tmp_path):
    (x, y), val = regression
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=1e9)
    trainer = trainer_for(tmp_path, "es", save_model=True)
    history = trainer.fit(x, y, validation_data=val, callbacks=[stop])
    run = tmp_path / "es"
    results = json.loads((run / "results.json").read_text())
    assert len(history.history["loss"]) == 2 and results["stopped_early"]
    assert results["parameter_updates"] == 32 and "test_mae" in results
    assert os.path.exists(run / "model.keras")


def test_stop_training_inside_an_epoch(regression, tmp_path):
    (x, y), _ = regression

    class StopAt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 4:
                self.model.stop_training = True

    trainer = trainer_for(tmp_path, "mid", steps_per_execution=1)
    trainer.fit(x, y, callbacks=[StopAt()])
    assert trainer.results["parameter_updates"] == 5 and trainer.results["stopped_early"]
    # rerunning resumes at the step where it stopped, and finishes the plan
    again = trainer_for(tmp_path, "mid", steps_per_execution=1)
    again.fit(x, y)
    assert again.results["parameter_updates"] == 48


def test_non_finite_loss_stops_and_keeps_last_checkpoint(regression, tmp_path):
    (x, y), _ = regression
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=1e9)
    trainer_for(tmp_path, "nan", save_model=True).fit(x, y, callbacks=[stop])  # 2 of 4 epochs
    run = tmp_path / "nan"
    checkpoint = tf.train.latest_checkpoint(str(run / "ckpt"))
    assert checkpoint.endswith("-32")
    model_written = os.path.getmtime(run / "model.keras")
    bad = {k: v.copy() for k, v in x.items()}
    bad["a"][7, 2] = np.nan  # one NaN in one input: the resumed run meets it in epoch 3
    resumed = trainer_for(tmp_path, "nan", save_model=True)
    with pytest.raises(NonFiniteLossError, match="training loss is nan at epoch 3"):
        resumed.fit(bad, y)
    assert tf.train.latest_checkpoint(str(run / "ckpt")) == checkpoint
    assert os.path.getmtime(run / "model.keras") == model_written
    assert len(json.loads((run / "history.json").read_text())) == 2


def test_accumulation_and_noise_scale_on_dict_inputs(regression, tmp_path):
    """Micro-batches split every input of the dict: same weights as one batch per replica."""
    (x, y), _ = regression
    plain = trainer_for(tmp_path, "plain", 2, measure_noise_scale=True)
    plain.fit(x, y)
    accumulated = trainer_for(tmp_path, "acc", 2, max_per_replica_batch_size=4,
                              measure_noise_scale=True)  # fmt: skip
    accumulated.fit(x, y)  # per-replica 16 and 32: 4 and 8 micro-batches
    for a, b in zip(plain.model.get_weights(), accumulated.model.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    noise = [h["noise_scale"] for h in accumulated.results["history"]]
    assert all(np.isfinite(noise)) and all(n > 0 for n in noise)
