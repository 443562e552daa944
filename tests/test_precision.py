"""Mixed precision and XLA in the Trainer, on CPU: bfloat16 trains, float16 scales the loss,
jit_compile=True matches the plain step."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_largebatch import plan_phases
from tf_largebatch.data import load_data
from tf_largebatch.training import Trainer, TrainerConfig


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def mlp(d):
    def model_fn():
        return keras.Sequential(
            [
                keras.Input(d.input_shape),
                keras.layers.Flatten(),
                keras.layers.Dense(64, activation="relu", name="hidden"),
                keras.layers.Dense(d.num_classes, name="logits"),
            ]
        )

    return model_fn


def train(d, tmp_path, epochs=4, loss=None, **config):
    plan = plan_phases(
        "grow_batch", d.num_train_examples, epochs, 32, 0.1, base_batch_size=32,
        decay_epochs=(epochs // 2,), decay_factor=0.5, warmup_epochs=1,
    )  # fmt: skip
    trainer = Trainer(
        mlp(d),
        plan,
        TrainerConfig(model_dir=str(tmp_path), verbose=0, save_model=False, **config),
        loss=loss,
        strategy=tf.distribute.OneDeviceStrategy("/cpu:0"),
    )
    trainer.fit(d.x_train, d.y_train, validation_data=(d.x_test, d.y_test))
    results = trainer.results
    return trainer, results


def weights(trainer):
    return [np.asarray(w) for w in trainer.model.get_weights()]


@pytest.fixture(scope="module")
def float32_run(digits, tmp_path_factory):
    return train(digits, tmp_path_factory.mktemp("f32"))


def test_mixed_bfloat16_trains_digits(digits, tmp_path, float32_run):
    trainer, results = train(digits, tmp_path, mixed_precision="mixed_bfloat16")
    hidden = trainer.model.get_layer("hidden")
    assert hidden.compute_dtype == "bfloat16" and hidden.variable_dtype == "float32"
    assert all(w.dtype == np.float32 for w in weights(trainer))  # float32 master weights
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after building
    assert not isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    # Measured: 0.961, as float32 (0.961), after 4 epochs; bfloat16 really ran (weights differ
    # by up to 0.065).
    assert results["test_accuracy"] > 0.94
    assert results["test_accuracy"] == pytest.approx(float32_run[1]["test_accuracy"], abs=0.03)
    assert results["parameter_updates"] == float32_run[1]["parameter_updates"]
    diff = max(np.abs(a - b).max() for a, b in zip(weights(trainer), weights(float32_run[0])))
    assert 1e-4 < diff < 0.2


def test_mixed_float16_uses_a_loss_scale_optimizer(digits, tmp_path):
    trainer, results = train(digits, tmp_path, epochs=2, mixed_precision="mixed_float16")
    optimizer = trainer.optimizer
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    assert trainer.model.get_layer("hidden").compute_dtype == "float16"
    # Dynamic loss scaling: starts at 2^15 and halves on every non-finite step; here no step
    # overflowed, so the scale is unchanged and every step was applied.
    assert float(keras.ops.convert_to_numpy(optimizer.scale_loss(1.0))) == 2.0**15
    assert results["parameter_updates"] == trainer.plan.total_steps
    assert int(keras.ops.convert_to_numpy(optimizer.inner_optimizer.iterations)) == (
        trainer.plan.total_steps
    )
    assert all(np.isfinite(w).all() and w.dtype == np.float32 for w in weights(trainer))
    assert (
        np.isfinite(results["final_train_loss"]) and results["test_accuracy"] > 0.9
    )  # measured 0.944


def test_jit_compile_matches_the_plain_step(digits, tmp_path, float32_run):
    trainer, results = train(digits, tmp_path, jit_compile=True)
    reference_trainer, reference = float32_run
    assert results["parameter_updates"] == reference["parameter_updates"]
    assert results["trace_count"] == 1
    for a, b in zip(weights(trainer), weights(reference_trainer)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)  # measured max 3.6e-7
    assert results["final_train_loss"] == pytest.approx(reference["final_train_loss"], rel=1e-4)


def test_mixed_float16_overflow_skips_do_not_block_a_rerun(digits, tmp_path):
    """A loss × 100 overflows float16 gradients at the initial loss scale 2^15: Keras's
    LossScaleOptimizer skips those steps (halving the scale) without counting them."""
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def big_loss(y, logits):
        return 100.0 * cross_entropy(y, logits)

    trainer, results = train(
        digits, tmp_path, epochs=2, mixed_precision="mixed_float16", loss=big_loss
    )
    assert results["epochs_completed"] == 2
    scale = float(keras.ops.convert_to_numpy(trainer.optimizer.dynamic_scale))
    assert scale < 2.0**15  # halved at every skipped step (measured: 13 skips, scale 4)
    _, rerun = train(  # the same command again: nothing left to do
        digits, tmp_path, epochs=2, mixed_precision="mixed_float16", loss=big_loss
    )
    assert rerun["epochs_completed"] == 2
    skipped = results["skipped_steps"]
    assert skipped > 0 and results["parameter_updates"] + skipped == results["plan"]["total_steps"]
    assert rerun["parameter_updates"] == results["parameter_updates"]


def test_float16_overflow_steps_leave_noise_scale_finite_and_adaptive_grows(digits, tmp_path):
    """A loss scale of 2^40 overflows float16 gradients for the first ~25 steps: the loss
    scaler skips them, the noise-scale estimator ignores them, and the batch still grows."""
    plan = plan_phases(
        "decay_lr", digits.num_train_examples, 6, 32, 0.1, base_batch_size=32,
        decay_epochs=(3,), decay_factor=0.5, warmup="none",
    )  # fmt: skip

    def optimizer_fn(lr):
        from tf_largebatch.optimizers import SGD

        return keras.optimizers.LossScaleOptimizer(SGD(lr, momentum=0.9), initial_scale=2.0**40)

    trainer = Trainer(
        mlp(digits), plan,
        TrainerConfig(model_dir=str(tmp_path), verbose=0, save_model=False,
                      mixed_precision="mixed_float16", noise_scale_beta=0.95,
                      adaptive_max_global_batch_size=256, steps_per_execution=4),
        optimizer_fn=optimizer_fn, strategy=tf.distribute.OneDeviceStrategy("/cpu:0"),
    )  # fmt: skip
    trainer.fit(digits.x_train, digits.y_train)
    results = trainer.results
    assert results["skipped_steps"] >= 20  # overflowed steps, no update applied
    assert int(trainer.noise_estimator.skipped.numpy()) >= 20
    assert all(np.isfinite(h["noise_scale"]) for h in results["history"][1:])
    assert results["adaptive_decisions"]  # the batch grew
    assert max(h["global_batch_size"] for h in results["history"]) > 32
