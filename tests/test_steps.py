"""The compiled step's gradient-noise-scale measurement, through the Trainer."""

import keras
import numpy as np
import pytest
from _helpers import mirrored

from tf_largebatch import plan_phases
from tf_largebatch.data import load_data
from tf_largebatch.training import Trainer, TrainerConfig


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
        strategy=mirrored(replicas),
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
        strategy=mirrored(replicas),
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
