"""Tests for tf_largebatch.sharpness against analytic Hessians and dense NumPy eigenvalues."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_largebatch.sharpness import sharpness

_SCALES = np.array([3.0, 1.5, 1.0, 0.5, 0.2])  # column scales: a clear top eigenvalue


def _mse(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(tf.square(tf.reshape(y_true, [-1, 1]) - y_pred), axis=-1)


def _regression(n: int = 300) -> tuple[keras.Model, np.ndarray, np.ndarray, np.ndarray]:
    """Dense(1) at the exact least-squares optimum; the Hessian (2/n)·[X 1]ᵀ[X 1]."""
    rng = np.random.default_rng(0)
    d = len(_SCALES)
    x = (rng.normal(size=(n, d)) * _SCALES + 0.3).astype(np.float32)
    y = (x @ rng.normal(size=d) + 0.5 + 0.01 * rng.normal(size=n)).astype(np.float32)
    design = np.hstack([x, np.ones((n, 1))]).astype(np.float64)
    optimum = np.linalg.lstsq(design, y.astype(np.float64), rcond=None)[0]
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(1)])
    model.layers[0].kernel.assign(optimum[:d, None].astype(np.float32))
    model.layers[0].bias.assign(optimum[d:].astype(np.float32))
    return model, x, y, 2.0 / n * design.T @ design


def _classifier(seed: int = 0) -> keras.Model:
    init = keras.initializers.RandomNormal(stddev=1.0, seed=seed)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, activation="tanh", kernel_initializer=init),
            keras.layers.Dense(3, kernel_initializer=init, bias_initializer="ones"),
        ]
    )


def _classification_data(n: int = 101) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)


def _dense_hessian(model: keras.Model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The full Hessian of the mean cross-entropy, by the Jacobian of the gradient (float64)."""
    variables = model.trainable_variables
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = loss_fn(y, model(x))
        grads = inner.gradient(loss, variables)
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], 0)
    blocks = outer.jacobian(flat, variables)
    size = int(flat.shape[0])
    return np.concatenate([np.reshape(b.numpy(), (size, -1)) for b in blocks], 1)


def _weights(model: keras.Model) -> list[np.ndarray]:
    return [np.array(v.numpy(), copy=True) for v in model.trainable_variables]


def test_linear_regression_top_eigenvalue_is_analytic() -> None:
    model, x, y, hessian = _regression()
    result = sharpness(
        model, x, y, loss=_mse, global_batch_size=128, num_power_iterations=30, tolerance=0.0
    )
    top = np.linalg.eigvalsh(hessian)[-1]
    np.testing.assert_allclose(result["hessian_top_eigenvalue"], top, rtol=1e-3)
    assert result["hessian_power_iterations"] == 30 == len(result["hessian_eigenvalue_estimates"])
    assert result["hessian_residual"] < 1e-3 and result["hessian_relative_change"] < 1e-6
    residuals = y - model(x).numpy()[:, 0]
    np.testing.assert_allclose(result["loss"], np.mean(residuals**2), rtol=1e-4)
    assert result["num_examples"] == 300 and result["num_parameters"] == 6


def test_tolerance_stops_early_and_compiled_loss_is_the_default() -> None:
    model, x, y, hessian = _regression()
    model.compile(loss="mean_squared_error")
    result = sharpness(model, x, y, global_batch_size=128, num_power_iterations=100)
    assert result["hessian_power_iterations"] < 100  # tolerance 1e-4 reached
    assert result["hessian_relative_change"] <= 1e-4
    np.testing.assert_allclose(
        result["hessian_top_eigenvalue"], np.linalg.eigvalsh(hessian)[-1], rtol=1e-3
    )


def test_softmax_classifier_matches_dense_hessian() -> None:
    model = _classifier()
    x, y = _classification_data()
    eigenvalues = np.linalg.eigvalsh(_dense_hessian(model, x, y).astype(np.float64))
    dominant = eigenvalues[np.argmax(np.abs(eigenvalues))]  # what power iteration converges to
    assert dominant == eigenvalues[-1] > 1.2 * abs(eigenvalues[-2])  # a gap: 100 steps suffice
    result = sharpness(
        model, x, y, global_batch_size=32, num_power_iterations=100, tolerance=1e-6
    )  # default loss: sparse categorical cross-entropy from logits
    np.testing.assert_allclose(result["hessian_top_eigenvalue"], dominant, rtol=1e-2)
    assert result["num_parameters"] == 4 * 3 + 3 + 3 * 3 + 3 == len(eigenvalues)


def test_same_answer_on_one_and_two_replicas() -> None:
    x, y = _classification_data(101)  # 101 = 3 × 32 + 5: partial batches, uneven split
    results = []
    for devices in (["/cpu:0"], ["/cpu:0", "/cpu:1"]):
        strategy = tf.distribute.MirroredStrategy(devices, tf.distribute.ReductionToOneDevice())
        with strategy.scope():
            model = _classifier()
        results.append(
            sharpness(
                model,
                x,
                y,
                global_batch_size=32,
                strategy=strategy,
                num_power_iterations=12,
                num_perturbations=3,
                perturbation_size=0.05,
            )
        )
        assert strategy.num_replicas_in_sync == len(devices)
    one, two = results
    assert one["num_examples"] == two["num_examples"] == 101
    assert one["hessian_power_iterations"] == two["hessian_power_iterations"]
    np.testing.assert_allclose(
        one["hessian_eigenvalue_estimates"], two["hessian_eigenvalue_estimates"], rtol=1e-5
    )
    np.testing.assert_allclose(one["loss"], two["loss"], rtol=1e-6)
    np.testing.assert_allclose(
        one["perturbed_loss_increases"], two["perturbed_loss_increases"], rtol=1e-3, atol=1e-6
    )
    # The replicas see every example once: the loss over the whole data.
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    np.testing.assert_allclose(two["loss"], float(loss_fn(y, _classifier()(x))), rtol=1e-5)


def _expected_increase(model: keras.Model, hessian: np.ndarray, rho: float, draws: int):
    """Mean and std of ½δᵀHδ for layer-wise δ_v = ρ‖w_v‖·g/‖g‖ (NumPy Monte Carlo for std)."""
    kernel, bias = (v.numpy().astype(np.float64).ravel() for v in model.trainable_variables)
    blocks = [slice(0, kernel.size), slice(kernel.size, kernel.size + bias.size)]
    scales = [rho * np.linalg.norm(kernel), rho * np.linalg.norm(bias)]
    # E[g gᵀ/‖g‖²] = I/n_v, so E[½δᵀHδ] = ½ Σ_v (ρ‖w_v‖)²/n_v · tr(H_vv).
    mean = 0.5 * sum(
        c**2 / (b.stop - b.start) * np.trace(hessian[b, b]) for b, c in zip(blocks, scales)
    )
    rng = np.random.default_rng(123)
    deltas = []
    for block, scale in zip(blocks, scales):
        g = rng.standard_normal((draws, block.stop - block.start))
        deltas.append(scale * g / np.linalg.norm(g, axis=1, keepdims=True))
    delta = np.concatenate(deltas, 1)
    quadratic = 0.5 * np.einsum("ki,ij,kj->k", delta, hessian, delta)
    np.testing.assert_allclose(quadratic.mean(), mean, rtol=0.05)  # the formula itself
    return mean, quadratic.std()


def test_perturbed_loss_increase_is_half_the_quadratic_form() -> None:
    model, x, y, hessian = _regression()
    before = _weights(model)
    rho, count = 0.02, 40
    result = sharpness(
        model,
        x,
        y,
        loss=_mse,
        num_power_iterations=1,
        num_perturbations=count,
        perturbation_size=rho,
        seed=7,
    )
    after = _weights(model)
    for old, new in zip(before, after):
        np.testing.assert_array_equal(old, new)  # restored bit-exactly
    assert result["hessian_power_iterations"] == 1 and result["hessian_relative_change"] is None
    json.dumps(result, allow_nan=False)  # ready for results.json
    mean, std = _expected_increase(model, hessian, rho, draws=200_000)
    increases = np.array(result["perturbed_loss_increases"])
    assert increases.shape == (count,) and np.all(increases > 0)  # a minimum: every δ goes up
    assert result["perturbed_loss_increase"] == pytest.approx(increases.mean())
    assert abs(result["perturbed_loss_increase"] - mean) < 4 * std / np.sqrt(count)
    assert abs(increases.std() / std - 1) < 0.5  # spread of a 40-sample std
    # Each rise is ½δᵀHδ with ‖δ_v‖ = ρ‖w_v‖: bounded by the extreme eigenvalues.
    kernel, bias = before
    delta_sq = rho**2 * (np.sum(kernel.astype(np.float64) ** 2) + float(bias[0]) ** 2)
    eigenvalues = np.linalg.eigvalsh(hessian)
    assert np.all(increases <= 0.5 * eigenvalues[-1] * delta_sq * (1 + 1e-3))
    assert np.all(increases >= 0.5 * eigenvalues[0] * delta_sq * (1 - 1e-3))


def test_dict_inputs_and_datasets_give_the_same_answer() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(90, 3)).astype(np.float32)
    b = rng.normal(size=(90, 2)).astype(np.float32)
    labels = rng.integers(0, 3, 90)
    inputs = {"a": keras.Input((3,), name="a"), "b": keras.Input((2,), name="b")}
    init = keras.initializers.RandomNormal(stddev=1.0, seed=3)
    hidden = keras.layers.Dense(4, "tanh", kernel_initializer=init)(
        keras.layers.Concatenate()([inputs["a"], inputs["b"]])
    )
    model = keras.Model(inputs, keras.layers.Dense(3, kernel_initializer=init)(hidden))
    arrays = sharpness(model, {"a": a, "b": b}, labels, global_batch_size=40, max_examples=70)
    batches = tf.data.Dataset.from_tensor_slices(({"a": a, "b": b}, labels)).batch(16)
    dataset = sharpness(model, batches, global_batch_size=40, max_examples=70)
    assert arrays["num_examples"] == dataset["num_examples"] == 70
    np.testing.assert_allclose(
        arrays["hessian_top_eigenvalue"], dataset["hessian_top_eigenvalue"], rtol=1e-5
    )
    np.testing.assert_allclose(arrays["loss"], dataset["loss"], rtol=1e-6)
    # The same model on concatenated inputs: the dense reference on the first 70 examples.
    flat_in = keras.Input((5,))
    flat = keras.Model(flat_in, model.layers[-1](model.layers[-2](flat_in)))
    both = np.concatenate([a, b], 1)[:70]
    eigenvalues = np.linalg.eigvalsh(_dense_hessian(flat, both, labels[:70]))
    dominant = eigenvalues[np.argmax(np.abs(eigenvalues))]
    np.testing.assert_allclose(arrays["hessian_top_eigenvalue"], dominant, rtol=1e-2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"global_batch_size": 0}, r"`global_batch_size`.*global_batch_size=0"),
        ({"num_power_iterations": 0}, r"`num_power_iterations`.*num_power_iterations=0"),
        ({"num_perturbations": -1}, r"`num_perturbations`.*num_perturbations=-1"),
        ({"perturbation_size": 0.0}, r"`perturbation_size`.*perturbation_size=0.0"),
        ({"tolerance": -1e-3}, r"`tolerance`.*tolerance=-0.001"),
        ({"seed": -1}, r"`seed`.*seed=-1"),
        ({"max_examples": 0}, r"`max_examples`.*max_examples=0"),
        ({"strategy": "mirrored"}, r"`strategy`.*strategy='mirrored'"),
        ({"loss": "no_such_loss"}, r"`loss`.*loss='no_such_loss'"),
        ({"loss": {"out": "mse"}}, r"`loss`.*single loss"),
        ({"y": np.zeros(5)}, r"`y`.*as many examples as `x`.*\(5,\)"),
        ({"y": None}, r"`y`.*labels.*y=None"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    x, y = _classification_data(20)
    arguments = {"y": y, **kwargs}
    with pytest.raises(ValueError, match=message):
        sharpness(_classifier(), x, **arguments)


def test_bad_model_and_dataset_raise() -> None:
    x, y = _classification_data(20)
    with pytest.raises(ValueError, match=r"`model`.*a keras.Model"):
        sharpness(lambda t: t, x, y)
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    with pytest.raises(ValueError, match=r"`y`.*None when `x` is a tf.data.Dataset"):
        sharpness(_classifier(), batches, y)
    with pytest.raises(ValueError, match=r"`x`.*\(x, y\) batches"):
        sharpness(_classifier(), batches.map(lambda a, b: a))
    with pytest.raises(ValueError, match=r"`x`.*at least one example"):
        sharpness(_classifier(), x[:0], y[:0])


def test_batchnorm_runs_in_inference_mode_and_state_is_untouched() -> None:
    x, y = _classification_data(64)
    init = keras.initializers.RandomNormal(stddev=1.0, seed=4)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, "tanh", kernel_initializer=init),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3, kernel_initializer=init),
        ]
    )
    model.get_layer(index=1).moving_mean.assign([0.5, -0.5, 0.1])  # inference ≠ training mode
    before = [np.array(v.numpy(), copy=True) for v in model.weights]
    result = sharpness(model, x, y, num_power_iterations=3, num_perturbations=2)
    for old, variable in zip(before, model.weights):
        np.testing.assert_array_equal(old, variable.numpy())  # moving statistics not updated
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    np.testing.assert_allclose(result["loss"], float(loss_fn(y, model(x, training=False))), 1e-5)
    assert abs(result["loss"] - float(loss_fn(y, model(x, training=True)))) > 1e-3


def test_the_module_is_callable_as_the_function() -> None:
    """``tf_largebatch.sharpness`` may resolve to the module (see `_CallableModule`)."""
    import inspect

    import tf_largebatch.sharpness as module

    model, x, y, hessian = _regression()
    kwargs = {"loss": _mse, "num_power_iterations": 30, "num_perturbations": 1}
    assert module(model, x, y, **kwargs) == sharpness(model, x, y, **kwargs)
    assert inspect.signature(module) == inspect.signature(sharpness)
