"""The compiled step: its gradient-noise-scale measurement (through the Trainer) and its
compiled loss computed with the batch size known once per call."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_largebatch import plan_phases
from tf_largebatch.data import load_data
from tf_largebatch.training import Trainer, TrainerConfig


def strategy_for(replicas):
    if replicas == 1:
        return tf.distribute.OneDeviceStrategy("/cpu:0")
    devices = [f"/cpu:{i}" for i in range(replicas)]
    return tf.distribute.MirroredStrategy(devices, tf.distribute.ReductionToOneDevice())


def regression_data(n=16_384, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w_star = rng.normal(size=d).astype(np.float32)
    y = (x @ w_star + rng.normal(size=n)).astype(np.float32)
    return x, y[:, None], w_star


def true_noise_scale(x, y, w):
    """tr(Σ)/|G|² of per-example gradients of (x·w − y)² over the whole data set."""
    residual = x @ w - y[:, 0]
    per_example = 2 * x * residual[:, None]
    g = per_example.mean(0)
    trace = ((per_example - g) ** 2).sum(1).mean()
    return trace / (g @ g)


@pytest.mark.parametrize("replicas", [1, 2])
def test_recovers_noise_scale_of_linear_regression(replicas, tmp_path):
    x, y, w_star = regression_data()
    w0 = (w_star + 0.5).astype(np.float32)  # |w0 − w*|² = 1: B_simple ≈ (5 + 4)/1 (Isserlis)
    expected = true_noise_scale(x, y, w0)
    assert 7 < expected < 11

    def model_fn():
        init = keras.initializers.Constant(w0[:, None])
        return keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(1, use_bias=False, kernel_initializer=init)]
        )

    # A learning rate so small the weights stay at w0: the statistics are those of w0.
    plan = plan_phases("decay_lr", len(x), 4, 64, 1e-9, base_batch_size=64, momentum=0.0)
    trainer = Trainer(
        model_fn,
        plan,
        TrainerConfig(
            model_dir=str(tmp_path),
            verbose=0,
            measure_noise_scale=True,
            noise_scale_beta=0.998,
            save_model=False,
        ),
        loss=keras.losses.MeanSquaredError(),
        strategy=strategy_for(replicas),
    )
    trainer.fit(x, y)
    results = trainer.results
    measured = results["history"][-1]["noise_scale"]
    assert measured == pytest.approx(expected, rel=0.10)
    assert len(results["noise_scale_steps"]) == plan.total_steps


def run_digits(tmp_path, replicas, measure, name):
    d = load_data("digits")
    plan = plan_phases("decay_lr", d.num_train_examples, 3, 64, 0.05, base_batch_size=64)

    def model_fn():
        return keras.Sequential(
            [
                keras.Input(d.input_shape),
                keras.layers.Flatten(),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(d.num_classes),
            ]
        )

    trainer = Trainer(
        model_fn,
        plan,
        TrainerConfig(
            model_dir=str(tmp_path / name),
            verbose=0,
            measure_noise_scale=measure,
            noise_scale_beta=0.95,
            save_model=False,
        ),
        strategy=strategy_for(replicas),
    )
    trainer.fit(d.x_train, d.y_train)
    return trainer, trainer.results


def test_estimate_does_not_depend_on_replica_count(tmp_path):
    _, two = run_digits(tmp_path, 2, True, "two")
    _, four = run_digits(tmp_path, 4, True, "four")
    _, one = run_digits(tmp_path, 1, True, "one")  # two halves of one batch: same b as 2 replicas
    for a, b, c in zip(two["history"], four["history"], one["history"]):
        assert b["noise_scale"] == pytest.approx(a["noise_scale"], rel=0.15)
        assert c["noise_scale"] == pytest.approx(a["noise_scale"], rel=1e-3)


def test_measuring_does_not_change_training(tmp_path):
    plain, r_plain = run_digits(tmp_path, 2, False, "plain")
    measured, r_measured = run_digits(tmp_path, 2, True, "measured")
    for a, b in zip(plain.model.get_weights(), measured.model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert "noise_scale" not in r_plain["history"][0]
    assert np.isfinite(r_measured["history"][-1]["noise_scale"])


# ---- the compiled loss computed with the batch size known once per call ----------------------


def classifier(vocab=None):
    """Digits-sized logits; with ``vocab``, per-token logits [b, 6, vocab] from token ids."""
    if vocab is None:
        return keras.Sequential([keras.Input((8,)), keras.layers.Dense(10)])
    return keras.Sequential(
        [keras.Input((6,), dtype="int32"), keras.layers.Embedding(vocab, 4),
         keras.layers.Dense(vocab)]
    )  # fmt: skip


LOSS_CASES = {
    "sparse_ce": (None, {"loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True)}),
    "string_with_weight": (None, {"loss": "sparse_categorical_crossentropy",
                                  "loss_weights": 0.5}),
    "per_token": (11, {"loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True)}),
}  # fmt: skip


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_compiled_loss_shortcut_is_kerass_value(case, replicas):
    """`TrainStep._compiled_loss` with the batch size known (data on the devices) gives the
    bits Keras's compiled loss gives on every replica, and is taken for these losses."""
    from tf_largebatch.optimizers import SGD
    from tf_largebatch.steps import TrainStep, single_batch_mean_loss

    vocab, compile_kw = LOSS_CASES[case]
    strategy = strategy_for(replicas)
    rng = np.random.default_rng(0)
    batch = 24
    if vocab is None:
        x = rng.normal(size=(batch, 8)).astype(np.float32)
        y = rng.integers(0, 10, size=batch).astype(np.int64)
    else:
        x = rng.integers(0, vocab, size=(batch, 6)).astype(np.int32)
        y = rng.integers(0, vocab, size=(batch, 6)).astype(np.int32)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = classifier(vocab)
        model.compile(optimizer=SGD(0.1), **compile_kw)
    step = TrainStep(model, model.optimizer, strategy)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    data = next(iter(strategy.experimental_distribute_dataset(dataset)))
    taken = []

    @tf.function
    def both(data):
        step._examples = tf.constant(float(batch // replicas))

        def replica(xb, yb):
            y_pred = model(xb, training=True)
            taken.append(single_batch_mean_loss(model._compile_loss, yb, y_pred, None))
            return step._compiled_loss(yb, y_pred, None), model._compile_loss(yb, y_pred, None)

        return strategy.run(replica, args=data)

    ours, kerass = both(data)
    step._examples = None
    assert taken and all(t is not None for t in taken)
    ours = strategy.experimental_local_results(ours)
    kerass = strategy.experimental_local_results(kerass)
    assert len(ours) == replicas
    for a, b in zip(ours, kerass):
        assert a.numpy() == b.numpy()  # the same float32, bit for bit
        assert np.isfinite(a.numpy()) and a.numpy() > 0


def test_compiled_loss_shortcut_only_for_one_batch_mean_loss():
    from tf_largebatch.optimizers import SGD
    from tf_largebatch.steps import single_batch_mean_loss

    y = tf.constant([1, 2, 3])
    y_pred = tf.zeros([3, 10])

    def compiled(**kw):
        model = classifier()
        model.compile(optimizer=SGD(0.1), **kw)
        return model._compile_loss

    plain = compiled(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert single_batch_mean_loss(plain, y, y_pred, None) is not None
    assert single_batch_mean_loss(plain, y, y_pred, tf.ones([3])) is None  # sample weights
    summed = compiled(loss=keras.losses.SparseCategoricalCrossentropy(reduction="sum"))
    assert single_batch_mean_loss(summed, y, y_pred, None) is None
    assert single_batch_mean_loss(None, y, y_pred, None) is None  # no compiled loss
    two = compiled(loss=["sparse_categorical_crossentropy", "mse"])
    assert single_batch_mean_loss(two, [y, y], [y_pred, y_pred], None) is None
    masked = tf.zeros([3, 10])
    masked._keras_mask = tf.constant([True, True, False])
    assert single_batch_mean_loss(plain, y, masked, None) is None
