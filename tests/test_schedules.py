"""Warmup schedules and Goyal's recipe against NumPy references of the paper's formulas."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_largebatch import schedules
from tf_largebatch.schedules import (
    ConstantWarmup,
    InverseSqrtDecay,
    LinearWarmup,
    WarmupStableDecay,
    goyal_schedule,
)


def goyal_reference(
    step,
    eta,
    k,
    spe,
    warmup_epochs=5,
    warmup="gradual",
    decays=(30, 60, 80),
    factor=0.1,
    start=None,
):
    """NumPy transcription of Goyal et al. §2.1–2.2."""
    start = eta if start is None else start
    peak = eta * k
    w = warmup_epochs * spe
    if warmup == "gradual" and step < w:
        return start + (peak - start) * step / w
    if warmup == "constant" and step < w:
        return start
    return peak * factor ** np.sum(step >= np.array(decays) * spe)


SPE = 100  # steps per epoch (kn = 8192 on a 819,200-image data set)


def boundaries(spe=SPE):
    return [b * spe for b in (5, 30, 60, 80)]


@pytest.mark.parametrize("warmup", ["gradual", "constant", "none"])
def test_goyal_schedule_matches_reference_around_every_boundary(warmup):
    s = goyal_schedule(0.1, 8192, SPE, warmup=warmup)
    for b in boundaries():
        for step in (b - 1, b, b + 1):
            expected = goyal_reference(
                step, 0.1, 32, SPE, warmup=warmup if warmup != "none" else ""
            )
            assert float(s(step)) == pytest.approx(expected, rel=1e-6), (warmup, step)


def test_goyal_imagenet_numbers():
    s = goyal_schedule(0.1, 8192, SPE)
    got = [float(s(e * SPE)) for e in (0, 5, 30, 60, 80)]
    np.testing.assert_allclose(got, [0.1, 3.2, 0.32, 0.032, 0.0032], rtol=1e-6)


def test_goyal_warmup_from_zero_and_sqrt_rule():
    s = goyal_schedule(0.1, 8192, SPE, warmup_initial_learning_rate=0.0, scaling_rule="sqrt")
    peak = 0.1 * np.sqrt(32)
    assert float(s(0)) == 0.0
    assert float(s(250)) == pytest.approx(peak / 2, rel=1e-6)
    assert float(s(500)) == pytest.approx(peak, rel=1e-6)


@pytest.mark.parametrize("w", [1, 7, 100])
def test_linear_warmup_replaces_not_shifts(w):
    inner = keras.optimizers.schedules.CosineDecay(1.0, decay_steps=200)
    s = LinearWarmup(inner, warmup_steps=w, initial_learning_rate=0.05)
    target = float(inner(w))
    for step in range(0, w):
        assert float(s(step)) == pytest.approx(0.05 + (target - 0.05) * step / w, rel=1e-6)
    for step in (w, w + 1, 150):
        assert float(s(step)) == pytest.approx(float(inner(step)), rel=1e-6)


def test_constant_warmup_boundary():
    s = ConstantWarmup(3.2, warmup_steps=10, warmup_learning_rate=0.1)
    assert [float(s(i)) for i in (0, 9, 10, 11)] == pytest.approx([0.1, 0.1, 3.2, 3.2])


def test_zero_warmup_steps_is_the_inner_schedule():
    assert float(LinearWarmup(0.4, warmup_steps=0)(0)) == pytest.approx(0.4)


@pytest.mark.parametrize(
    "schedule",
    [
        goyal_schedule(0.1, 8192, SPE),
        goyal_schedule(0.1, 1024, SPE, warmup="constant"),
        LinearWarmup(keras.optimizers.schedules.CosineDecay(0.5, 1000), 50, 0.0),
        ConstantWarmup(0.3, 20, 0.01),
    ],
)
def test_config_round_trip(schedule):
    config = keras.saving.serialize_keras_object(schedule)
    clone = keras.saving.deserialize_keras_object(config)
    assert type(clone) is type(schedule)
    steps = np.arange(0, 9000, 37)
    np.testing.assert_array_equal(
        [float(clone(i)) for i in steps[:60]], [float(schedule(i)) for i in steps[:60]]
    )
    assert clone.get_config() == schedule.get_config()


def test_schedules_run_in_tf_function_with_int64_step():
    s = goyal_schedule(0.1, 8192, SPE)
    fn = tf.function(lambda step: s(step))
    assert float(fn(tf.constant(3000, tf.int64))) == pytest.approx(0.32)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: LinearWarmup(0.1, warmup_steps=-1), "warmup_steps"),
        (lambda: LinearWarmup(-0.1, warmup_steps=1), "after_warmup"),
        (
            lambda: LinearWarmup(0.1, warmup_steps=1, initial_learning_rate=-1),
            "initial_learning_rate",
        ),
        (lambda: ConstantWarmup(0.1, 5, warmup_learning_rate=0), "warmup_learning_rate"),
        (lambda: goyal_schedule(-0.1, 8192, SPE), "base_learning_rate"),
        (lambda: goyal_schedule(0.1, 0, SPE), "global_batch_size"),
        (lambda: goyal_schedule(0.1, 8192, 0), "steps_per_epoch"),
        (lambda: goyal_schedule(0.1, 8192, SPE, warmup_epochs=31), "warmup_epochs"),
        (lambda: goyal_schedule(0.1, 8192, SPE, decay_epochs=(60, 30)), "decay_epochs"),
        (lambda: goyal_schedule(0.1, 8192, SPE, scaling_rule="log"), "rule"),
        (lambda: goyal_schedule(0.1, 8192, SPE, warmup="slow"), "warmup"),
        (lambda: goyal_schedule(0.1, 8192, SPE, decay_factor=1.5), "decay_factor"),
    ],
)
def test_bad_input(make, name):
    with pytest.raises(ValueError, match=f"`{name}`.*Received"):
        make()


def test_piecewise_constant_switches_at_the_boundary_step():
    s = schedules.piecewise_constant([10, 20], [1.0, 0.5, 0.25])
    assert [float(s(i)) for i in (9, 10, 19, 20)] == [1.0, 0.5, 0.5, 0.25]


def test_goyal_small_batch_warmup_does_not_ramp_down():
    s = goyal_schedule(0.1, 64, SPE)  # k = 1/4: the scaled rate 0.025 from step 0
    assert float(s(0)) == pytest.approx(0.025) and float(s(499)) == pytest.approx(0.025)


# --- Transformer / LLM schedules, and warmup that shifts ---------------------------------------


def inverse_sqrt_reference(step, peak, w):
    """Vaswani et al. §5.3 with the peak η̂ = (d_model·W)^−0.5 written out."""
    return peak * step / w if step < w else peak * np.sqrt(w / step)


def test_inverse_sqrt_decay_at_the_transformer_steps():
    s = InverseSqrtDecay(1e-3, 4000)
    steps = [0, 1, 3999, 4000, 4001, 16000]
    got = [float(s(i)) for i in steps]
    want = [inverse_sqrt_reference(i, 1e-3, 4000) for i in steps]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0] == 0.0 and got[3] == pytest.approx(1e-3) and got[5] == pytest.approx(5e-4)
    assert got[2] < got[3] and got[4] < got[3]  # the peak is at W


def wsd_reference(step, peak, w, stable, d, final, decay):
    if step < w:
        return peak * step / w
    if step < w + stable:
        return peak
    if step >= w + stable + d:
        return final
    t = (step - w - stable) / d
    f = {"linear": 1 - t, "cosine": 0.5 * (1 + np.cos(np.pi * t)), "sqrt": 1 - np.sqrt(t)}
    return final + (peak - final) * f[decay]


@pytest.mark.parametrize("decay", ["linear", "cosine", "sqrt"])
@pytest.mark.parametrize(
    "w, stable, d, final", [(100, 500, 200, 0.0), (0, 50, 30, 0.1), (7, 0, 1, 0.2)]
)
def test_warmup_stable_decay_at_every_boundary(decay, w, stable, d, final):
    s = WarmupStableDecay(2.0, w, stable, d, final_learning_rate=final, decay=decay)
    points = {0, w + stable + d // 2, 10 * (w + stable + d)}
    for b in (w, w + stable, w + stable + d):
        points |= {b - 1, b, b + 1}
    for step in sorted(p for p in points if p >= 0):
        want = wsd_reference(step, 2.0, w, stable, d, final, decay)
        assert float(s(step)) == pytest.approx(want, rel=1e-6, abs=1e-7), step


def test_warmup_stable_decay_without_decay_steps_drops_at_once():
    s = WarmupStableDecay(1.0, 10, 20, 0, final_learning_rate=0.01)
    assert [float(s(i)) for i in (9, 10, 29, 30, 31)] == pytest.approx([0.9, 1, 1, 0.01, 0.01])


def test_shifted_warmup_starts_the_wrapped_schedule_after_the_warmup():
    cosine = keras.optimizers.schedules.CosineDecay(10.0, 1000)
    s = LinearWarmup(cosine, 2000, shift=True)
    assert float(s(2000)) == pytest.approx(10.0)
    assert float(s(2500)) == pytest.approx(float(cosine(500)), rel=1e-6)
    assert float(cosine(500)) == pytest.approx(5.0, rel=1e-6)
    for step in (0, 1, 1000, 1999, 2000, 2001, 2999, 3000, 3001, 5000):  # optax join_schedules
        want = 10.0 * step / 2000 if step < 2000 else float(cosine(step - 2000))
        assert float(s(step)) == pytest.approx(want, rel=1e-6, abs=1e-7), step


def test_replacing_warmup_refuses_a_schedule_already_at_zero():
    cosine = keras.optimizers.schedules.CosineDecay(10.0, 1000)
    with pytest.raises(ValueError, match="`after_warmup`.*shift=True"):
        LinearWarmup(cosine, 2000)
    with pytest.raises(ValueError, match="`after_warmup`"):
        LinearWarmup(cosine, 1000)  # exactly 0 at the end of the warmup
    s = LinearWarmup(cosine, 999)  # still > 0 at step 999: allowed, replaces as before
    assert float(s(999)) == pytest.approx(float(cosine(999)))
    floor = keras.optimizers.schedules.CosineDecay(10.0, 1000, alpha=0.1)
    assert float(LinearWarmup(floor, 2000)(2000)) == pytest.approx(1.0)


SAVED = [
    InverseSqrtDecay(1e-3, 40),
    WarmupStableDecay(0.5, 10, 30, 20, final_learning_rate=0.05, decay="sqrt"),
    LinearWarmup(keras.optimizers.schedules.CosineDecay(10.0, 100), 20, 1.0, shift=True),
    LinearWarmup(keras.optimizers.schedules.CosineDecay(10.0, 100), 20, 1.0),
]


@pytest.mark.parametrize("schedule", SAVED, ids=lambda s: type(s).__name__)
def test_new_schedules_round_trip_through_model_save(tmp_path, schedule):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=schedule), loss="mse")
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    clone = keras.saving.deserialize_keras_object(loaded.optimizer.get_config()["learning_rate"])
    assert type(clone) is type(schedule) and clone.get_config() == schedule.get_config()
    steps = [0, 1, 19, 20, 21, 39, 40, 41, 59, 60, 61, 500]
    np.testing.assert_array_equal(
        [float(clone(i)) for i in steps], [float(schedule(i)) for i in steps]
    )


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: InverseSqrtDecay(0.0, 4000), "peak_learning_rate"),
        (lambda: InverseSqrtDecay(1e-3, 0), "warmup_steps"),
        (lambda: InverseSqrtDecay(1e-3, 1.5), "warmup_steps"),
        (lambda: WarmupStableDecay(1.0, -1, 10, 10), "warmup_steps"),
        (lambda: WarmupStableDecay(1.0, 1, -10, 10), "stable_steps"),
        (lambda: WarmupStableDecay(1.0, 1, 10, -1), "decay_steps"),
        (lambda: WarmupStableDecay(1.0, 1, 10, 10, final_learning_rate=2.0), "final_learning_rate"),
        (lambda: WarmupStableDecay(1.0, 1, 10, 10, decay="exp"), "decay"),
        (lambda: LinearWarmup(0.1, 10, shift="yes"), "shift"),
    ],
)
def test_new_schedules_bad_input(make, name):
    with pytest.raises(ValueError, match=f"`{name}`.*Received"):
        make()
