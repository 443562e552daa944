"""Tests for tf_largebatch.optimizers: exact numbers vs NumPy references, no-retrace momentum
changes, serialisation (config and ``model.save``), and 2-replica MirroredStrategy == 1 device."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_largebatch import optimizers
from tf_largebatch.optimizers import LARS, SGD, Lamb

PiecewiseConstantDecay = keras.optimizers.schedules.PiecewiseConstantDecay


def _run(opt, variables, grads_per_step, between=None):
    """Applies each step's gradients eagerly; returns the variables' values after every step."""
    history = []
    for step, grads in enumerate(grads_per_step):
        if between is not None:
            between(step)
        opt.apply_gradients([(tf.constant(g), v) for g, v in zip(grads, variables)])
        history.append([v.numpy().copy() for v in variables])
    return history


def _moves_constant_gradient(momentum_correction, nesterov=False):
    w = keras.Variable(0.0)
    lr = PiecewiseConstantDecay(boundaries=[2], values=[1.0, 0.1])  # η = 1, 1, 1, 0.1
    opt = SGD(learning_rate=lr, momentum=0.9, momentum_correction=momentum_correction)
    values = [0.0] + [h[0] for h in _run(opt, [w], [[np.float32(1.0)]] * 4)]
    return -np.diff(values)


# --- SGD: exact numbers -------------------------------------------------------------------


def test_momentum_correction_exact_moves():
    np.testing.assert_allclose(_moves_constant_gradient(True), [1.0, 1.9, 2.71, 0.3439], rtol=1e-6)


def test_without_correction_lags_after_lr_drop():
    np.testing.assert_allclose(_moves_constant_gradient(False), [1.0, 1.9, 2.71, 2.539], rtol=1e-6)


def test_lr_assigned_between_steps_takes_effect_immediately_with_correction():
    w = keras.Variable(0.0)
    opt = SGD(learning_rate=1.0, momentum=0.9)

    def drop_lr(step):
        if step == 3:
            opt.learning_rate = 0.1

    values = [0.0] + [h[0] for h in _run(opt, [w], [[np.float32(1.0)]] * 4, drop_lr)]
    np.testing.assert_allclose(-np.diff(values), [1.0, 1.9, 2.71, 0.3439], rtol=1e-6)


def _numpy_sgd(w0, grads, lrs, m, nesterov, correction, wd=None):
    w, buf, out = w0.astype(np.float64), np.zeros_like(w0, np.float64), []
    for g, lr in zip(grads, lrs):
        if wd is not None:
            w = w - wd * lr * w  # Keras decoupled decay, before the update
        if correction:
            buf = m * buf + g
            w = w - lr * ((g + m * buf) if nesterov else buf)
        else:
            buf = m * buf - lr * g
            w = w + ((m * buf - lr * g) if nesterov else buf)
        out.append(w.copy())
    return out


_W0 = np.array([0.5, -1.0, 2.0], np.float32)
_GRADS = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
_LRS = [0.5, 0.5, 0.5, 0.05, 0.05]  # PiecewiseConstantDecay([2], [0.5, 0.05])


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("correction", [False, True])
@pytest.mark.parametrize("wd", [None, 0.1])
def test_sgd_matches_numpy_reference(nesterov, correction, wd):
    w = keras.Variable(_W0.copy())
    opt = SGD(
        learning_rate=PiecewiseConstantDecay([2], [0.5, 0.05]),
        momentum=0.8,
        nesterov=nesterov,
        momentum_correction=correction,
        weight_decay=wd,
    )
    got = [h[0] for h in _run(opt, [w], [[g] for g in _GRADS])]
    want = _numpy_sgd(_W0, _GRADS, _LRS, 0.8, nesterov, correction, wd)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_without_correction_equals_keras_sgd(nesterov):
    lr = PiecewiseConstantDecay([2], [0.5, 0.05])
    w_ours, w_keras = keras.Variable(_W0.copy()), keras.Variable(_W0.copy())
    ours = SGD(learning_rate=lr, momentum=0.8, nesterov=nesterov, momentum_correction=False)
    ref = keras.optimizers.SGD(learning_rate=lr, momentum=0.8, nesterov=nesterov)
    got = _run(ours, [w_ours], [[g] for g in _GRADS])
    want = _run(ref, [w_keras], [[g] for g in _GRADS])
    np.testing.assert_array_equal(np.array(got), np.array(want))


def test_zero_momentum_is_plain_sgd():
    w = keras.Variable(_W0.copy())
    got = [h[0] for h in _run(SGD(learning_rate=0.5, momentum=0.0), [w], [[g] for g in _GRADS])]
    np.testing.assert_allclose(got[-1], _W0 - 0.5 * _GRADS.sum(0), rtol=1e-5)


# --- Momentum variable ----------------------------------------------------------------------


def test_momentum_is_float32_scalar_variable_before_build():
    opt = SGD(momentum=0.9)
    assert isinstance(opt.momentum, keras.Variable)
    assert opt.momentum.dtype == "float32" and tuple(opt.momentum.shape) == ()
    assert not opt.momentum.trainable and not opt.built
    assert any(v is opt.momentum for v in opt.variables)
    opt.set_momentum(0.98)
    assert float(opt.momentum.numpy()) == np.float32(0.98)
    assert opt.get_config()["momentum"] == 0.98


@pytest.mark.parametrize("cls", [SGD, LARS])
def test_momentum_change_takes_effect_without_retrace(cls):
    w = keras.Variable(np.float32(5.0))  # rank 0: LARS default excludes it -> plain momentum SGD
    opt = cls(learning_rate=1.0, momentum=0.9, **({} if cls is SGD else {"weight_decay": 0.0}))
    opt.build([w])  # create slot variables eagerly (variable creation would trace twice)
    traces = []

    @tf.function
    def train_step():
        traces.append(1)
        opt.apply_gradients([(tf.constant(1.0), w)])

    moves, before = [], 5.0
    for step in range(4):
        if step == 2:
            opt.set_momentum(0.5)
        if step == 3:
            opt.momentum.assign(0.0)
        train_step()
        moves.append(before - float(w.numpy()))
        before = float(w.numpy())
    assert len(traces) == 1
    # u = 1, 1.9, then m=0.5: 0.5*1.9 + 1 = 1.95, then m=0: 1 (η = 1, so velocity = u).
    np.testing.assert_allclose(moves, [1.0, 1.9, 1.95, 1.0], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"momentum": 1.0}, "momentum=1.0"),
        ({"momentum": -0.1}, "momentum=-0.1"),
        ({"momentum": "0.9"}, "momentum='0.9'"),
        ({"nesterov": 1}, "nesterov=1"),
        ({"momentum_correction": None}, "momentum_correction=None"),
    ],
)
def test_sgd_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SGD(**kwargs)


def test_set_momentum_validates():
    opt = SGD()
    with pytest.raises(ValueError, match="momentum=1.5"):
        opt.set_momentum(1.5)
    assert float(opt.momentum.numpy()) == np.float32(0.9)


# --- Serialisation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda: SGD(
            learning_rate=0.3, momentum=0.7, nesterov=True, momentum_correction=False, clipnorm=1.0
        ),
        lambda: SGD(learning_rate=PiecewiseConstantDecay([5], [0.1, 0.01]), weight_decay=1e-4),
        lambda: LARS(
            learning_rate=2.0,
            momentum=0.8,
            weight_decay=5e-4,
            trust_coefficient=0.02,
            epsilon=1e-6,
            exclude_from_layer_adaptation=["bias", "gamma"],
            nesterov=True,
        ),
        LARS,
    ],
)
def test_config_round_trip(make_opt):
    opt = make_opt()
    config = opt.get_config()
    clone = type(opt).from_config(opt.get_config())
    assert clone.get_config() == config
    if not isinstance(config["learning_rate"], dict):  # a nested schedule needs from_config
        assert type(opt)(**config).get_config() == config  # config keys are constructor kwargs


def _tiny_model():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)]
    )
    return model


@pytest.mark.parametrize(
    "make_opt, attrs",
    [
        (
            lambda: SGD(
                learning_rate=PiecewiseConstantDecay([1], [0.1, 0.01]),
                momentum=0.8,
                nesterov=True,
                momentum_correction=False,
            ),
            {"nesterov": True, "momentum_correction": False},
        ),
        (
            lambda: LARS(
                learning_rate=1.5,
                weight_decay=2e-4,
                trust_coefficient=0.01,
                exclude_from_layer_adaptation=["bias"],
            ),
            {
                "weight_decay": 2e-4,
                "trust_coefficient": 0.01,
                "exclude_from_layer_adaptation": ("bias",),
            },
        ),
    ],
)
def test_save_and_load_model(tmp_path, make_opt, attrs):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(16, 3)).astype("float32"), rng.normal(size=(16, 1)).astype("float32")
    model = _tiny_model()
    model.compile(optimizer=make_opt(), loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    model.optimizer.set_momentum(0.95)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    opt = loaded.optimizer
    assert type(opt) is type(model.optimizer)
    for name, value in attrs.items():
        assert getattr(opt, name) == value, name
    assert float(opt.momentum.numpy()) == np.float32(0.95)
    assert int(opt.iterations.numpy()) == 2
    for a, b in zip(model.optimizer.variables, opt.variables):
        np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()), a.path)
    if isinstance(opt, SGD):
        schedule = opt._learning_rate
        assert isinstance(schedule, PiecewiseConstantDecay)
        assert schedule.boundaries == [1] and schedule.values == [0.1, 0.01]
        assert float(opt.learning_rate.numpy()) == pytest.approx(0.01)  # iteration 2 > 1


def test_tf_checkpoint_restores_momentum_and_velocity(tmp_path):
    w = keras.Variable(_W0.copy())
    opt = SGD(learning_rate=0.5, momentum=0.8)
    _run(opt, [w], [[g] for g in _GRADS[:2]])
    opt.set_momentum(0.6)
    path = tf.train.Checkpoint(optimizer=opt, w=w).save(str(tmp_path / "ckpt"))

    w2 = keras.Variable(np.zeros(3, np.float32))
    opt2 = SGD(learning_rate=0.5, momentum=0.8)
    opt2.build([w2])
    tf.train.Checkpoint(optimizer=opt2, w=w2).restore(path).assert_consumed()
    assert float(opt2.momentum.numpy()) == np.float32(0.6)
    np.testing.assert_array_equal(opt2.velocities[0].numpy(), opt.velocities[0].numpy())
    np.testing.assert_allclose(opt2.velocities[0].numpy(), 0.8 * _GRADS[0] + _GRADS[1], rtol=1e-6)


# --- model.fit ------------------------------------------------------------------------------


def test_model_fit_matches_numpy_linear_regression():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(32, 3)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5]]) + 0.3).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    opt = SGD(learning_rate=PiecewiseConstantDecay([1], [0.1, 0.02]), momentum=0.9)
    model.compile(optimizer=opt, loss="mse")
    history = model.fit(x, y, batch_size=32, epochs=4, shuffle=False, verbose=0)

    X = np.hstack([x, np.ones((32, 1))]).astype(np.float64)
    theta, u, losses = np.zeros((4, 1)), np.zeros((4, 1)), []
    for lr in [0.1, 0.1, 0.02, 0.02]:
        residual = X @ theta - y
        losses.append(float(np.mean(residual**2)))
        u = 0.9 * u + 2.0 / 32 * X.T @ residual
        theta = theta - lr * u
    kernel, bias = model.get_weights()
    np.testing.assert_allclose(np.vstack([kernel, bias[:, None]]), theta, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(history.history["loss"], losses, rtol=1e-4)


# --- LARS -----------------------------------------------------------------------------------


def _numpy_lars(params, grads_per_step, adapted, lr, m, wd, tc, eps, nesterov):
    params = [p.astype(np.float64) for p in params]
    vel = [np.zeros_like(p) for p in params]
    out = []
    for grads in grads_per_step:
        for i, (w, g) in enumerate(zip(params, grads)):
            g = g.astype(np.float64)
            local_lr = lr
            if adapted[i]:
                w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
                if w_norm > 0 and g_norm + wd * w_norm + eps > 0:
                    local_lr = lr * tc * w_norm / (g_norm + wd * w_norm + eps)
                g = g + wd * w
            vel[i] = m * vel[i] + local_lr * g
            params[i] = w - ((m * vel[i] + local_lr * g) if nesterov else vel[i])
        out.append([p.copy() for p in params])
    return out


_RNG = np.random.default_rng(3)
_KERNEL = _RNG.normal(size=(3, 2)).astype(np.float32)
_BIAS = _RNG.normal(size=(2,)).astype(np.float32)
_LARS_GRADS = [
    [_RNG.normal(size=(3, 2)).astype(np.float32), _RNG.normal(size=2).astype(np.float32)]
    for _ in range(2)
]
_LARS_KW = {
    "learning_rate": 0.5,
    "momentum": 0.9,
    "weight_decay": 0.01,
    "trust_coefficient": 0.02,
    "epsilon": 1e-3,
}


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize(
    "exclude, adapted",
    [(None, [True, False]), (["kernel"], [False, True]), ([], [True, True])],
)
def test_lars_matches_numpy(nesterov, exclude, adapted):
    kernel = keras.Variable(_KERNEL.copy(), name="kernel")
    bias = keras.Variable(_BIAS.copy(), name="bias")
    opt = LARS(**_LARS_KW, nesterov=nesterov, exclude_from_layer_adaptation=exclude)
    got = _run(opt, [kernel, bias], _LARS_GRADS)
    want = _numpy_lars([_KERNEL, _BIAS], _LARS_GRADS, adapted, 0.5, 0.9, 0.01, 0.02, 1e-3, nesterov)
    for got_step, want_step in zip(got, want):
        for g, w in zip(got_step, want_step):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    # An excluded kernel takes the plain first step -η·g (nesterov: -(1+m)·η·g); an adapted
    # one does not.
    plain = -0.5 * (1.9 if nesterov else 1.0) * _LARS_GRADS[0][0]
    plain_step = np.allclose(got[0][0] - _KERNEL, plain, rtol=1e-5)
    assert plain_step == (not adapted[0])


def test_lars_first_step_by_hand():
    # w = [3, 4] (‖w‖=5), g = [0, 1] (‖g‖=1), λ=0.1, tc=0.01, η=2:
    # local_lr = 2·0.01·5/(1 + 0.5) = 1/15; v = (g + λw)/15 = [0.3, 1.4]/15.
    w = keras.Variable(np.array([[3.0, 4.0]], np.float32))
    opt = LARS(learning_rate=2.0, weight_decay=0.1, trust_coefficient=0.01)
    opt.apply_gradients([(tf.constant([[0.0, 1.0]]), w)])
    np.testing.assert_allclose(w.numpy(), [[3.0 - 0.02, 4.0 - 1.4 / 15]], rtol=1e-6)


def _lars_one_step(w0, g, **kwargs):
    w = keras.Variable(np.asarray(w0, np.float32))
    LARS(**kwargs).apply_gradients([(tf.constant(np.asarray(g, np.float32)), w)])
    return w.numpy()


@pytest.mark.parametrize(
    "w0, g, want",
    [
        (np.zeros((2, 2)), np.ones((2, 2)), -0.5 * np.ones((2, 2))),  # ‖w‖=0: local_lr = η
        # ‖g‖=0: local_lr = 0.5·0.001·2/(0.1·2) = 0.005, step 0.005·λw = 5e-4·w = η·tc·w
        (np.ones((2, 2)), np.zeros((2, 2)), np.ones((2, 2)) * (1 - 0.5 * 0.001)),
    ],
)
def test_lars_trust_ratio_is_one_only_at_zero_weight_norm(w0, g, want):
    got = _lars_one_step(w0, g, learning_rate=0.5, weight_decay=0.1, trust_coefficient=0.001)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("scale", [0.0, 1e-12, 1e-9])
def test_lars_zero_gradient_follows_the_formula(scale):
    # Issue 11: η = 1, η_LARS = 1e-3, λ = 1e-4. A zero gradient moves w by η·η_LARS·w, and
    # a tiny one by about as much (the step is continuous in ‖g‖ → 0), not by η·λ·w.
    rng = np.random.default_rng(11)
    w0 = rng.normal(size=(4, 3))
    g = scale * rng.normal(size=(4, 3))
    kw = dict(learning_rate=1.0, weight_decay=1e-4, trust_coefficient=1e-3, momentum=0.9)
    got = _lars_one_step(w0, g, **kw)
    want = _numpy_lars(
        [w0.astype(np.float32)], [[g.astype(np.float32)]], [True], 1.0, 0.9, 1e-4, 1e-3, 0.0, False
    )[0][0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    if scale == 0.0:
        np.testing.assert_allclose(w0.astype(np.float32) - got, 1e-3 * w0, rtol=1e-4)
    np.testing.assert_allclose(w0 - got, 1e-3 * w0, rtol=1e-2)  # far from η·λ·w = 1e-4·w


def test_lars_zero_gradient_without_decay_or_epsilon_stays_put():
    # ‖g‖ + λ‖w‖ + ε = 0: the ratio is undefined, but the step g + λw is 0; no NaN.
    got = _lars_one_step(np.ones((2, 2)), np.zeros((2, 2)), weight_decay=0.0, epsilon=0.0)
    np.testing.assert_array_equal(got, np.ones((2, 2)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"trust_coefficient": 0.0}, "trust_coefficient=0.0"),
        ({"epsilon": -1e-8}, "epsilon=-1e-08"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1"),
        ({"momentum": 1.0}, "momentum=1.0"),
        ({"exclude_from_layer_adaptation": "bias"}, "exclude_from_layer_adaptation='bias'"),
        ({"exclude_from_layer_adaptation": ["("]}, "invalid regex"),
    ],
)
def test_lars_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LARS(**kwargs)


def test_lamb_is_keras_lamb():
    assert Lamb is keras.optimizers.Lamb
    assert sorted(optimizers.__all__) == ["LARS", "Lamb", "SGD"]


# --- tf.distribute ---------------------------------------------------------------------------

_GLOBAL_BATCH = 8
_X = np.random.default_rng(4).normal(size=(_GLOBAL_BATCH, 3)).astype("float32")
_Y = np.random.default_rng(5).normal(size=(_GLOBAL_BATCH, 1)).astype("float32")
_INIT = [
    np.random.default_rng(6).normal(size=(3, 4)).astype("float32"),
    np.full(4, 0.1, "float32"),
    np.random.default_rng(7).normal(size=(4, 1)).astype("float32"),
    np.full(1, -0.2, "float32"),
]


def _train_custom_loop(strategy, make_opt, steps=4):
    """Custom loop: loss averaged over the global batch, apply_gradients in replica context."""
    with strategy.scope():
        model = _tiny_model()
        model.set_weights(_INIT)
        opt = make_opt()
        opt.build(model.trainable_variables)
    per_replica = _GLOBAL_BATCH // strategy.num_replicas_in_sync

    def shard(ctx):
        i = ctx.replica_id_in_sync_group
        return _X[i * per_replica : (i + 1) * per_replica], _Y[
            i * per_replica : (i + 1) * per_replica
        ]

    x, y = strategy.experimental_distribute_values_from_function(shard)

    @tf.function
    def train_step(x, y):
        def step_fn(xb, yb):
            with tf.GradientTape() as tape:
                per_example = tf.reduce_sum(tf.square(model(xb, training=True) - yb), axis=-1)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=_GLOBAL_BATCH)
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))

        strategy.run(step_fn, args=(x, y))

    for step in range(steps):
        if step == 2:
            opt.set_momentum(0.5)
        train_step(x, y)
    return model, opt


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda: SGD(learning_rate=PiecewiseConstantDecay([1], [0.2, 0.05]), momentum=0.9),
        lambda: SGD(learning_rate=0.2, nesterov=True, momentum_correction=False, weight_decay=0.01),
        lambda: LARS(
            learning_rate=PiecewiseConstantDecay([1], [5.0, 1.0]),
            weight_decay=1e-3,
            trust_coefficient=0.01,
        ),
    ],
    ids=["sgd_corrected", "sgd_keras_nesterov_wd", "lars"],
)
def test_mirrored_two_replicas_equal_one_device(make_opt):
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert mirrored.num_replicas_in_sync == 2
    model_2, opt_2 = _train_custom_loop(mirrored, make_opt)
    assert len(mirrored.experimental_local_results(opt_2.momentum.value)) == 2  # mirrored
    model_1, _ = _train_custom_loop(tf.distribute.OneDeviceStrategy("/cpu:0"), make_opt)
    assert int(opt_2.iterations.numpy()) == 4
    assert float(opt_2.momentum.numpy()) == np.float32(0.5)
    for v2, v1, w0 in zip(model_2.trainable_variables, model_1.trainable_variables, _INIT):
        replicas = [r.numpy() for r in mirrored.experimental_local_results(v2.value)]
        np.testing.assert_array_equal(replicas[0], replicas[1])  # replicas stay in sync
        np.testing.assert_allclose(replicas[0], v1.numpy(), rtol=1e-5, atol=1e-6)
        assert not np.allclose(v1.numpy(), w0)  # training actually moved the weights
