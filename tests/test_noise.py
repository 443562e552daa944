"""Gradient-noise-scale estimator and adaptive batch policy against known gradient statistics.

The synthetic problem is linear regression with per-example loss ½(x·w − y)², x ~ N(0, C) with
diagonal C, y = x·w* + ε, ε ~ N(0, σ²). At a fixed w, with u = w − w*, the per-example gradient
is g = x(x·u − ε), and Isserlis' theorem gives

    G = E[g] = Cu,    Σ = (uᵀCu + σ²)·C + Cu(Cu)ᵀ,    tr(Σ) = (uᵀCu + σ²)·tr(C) + |Cu|².
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from tf_largebatch.noise import (
    NoiseScaleEstimator,
    gradient_noise_components,
    scaled_learning_rate_for_batch,
    squared_norm,
    suggest_global_batch_size,
)

DIM = 8
VARIANCES = np.linspace(0.5, 1.5, DIM)  # diag(C)
U = np.full(DIM, 0.2)  # w − w*
NOISE_VARIANCE = 1.0  # σ²
TRUE_G2 = float(np.sum((VARIANCES * U) ** 2))
TRUE_TRACE = float((U @ (VARIANCES * U) + NOISE_VARIANCE) * VARIANCES.sum() + TRUE_G2)
TRUE_B_SIMPLE = TRUE_TRACE / TRUE_G2  # ≈ 30.8


def _per_example_gradients(rng, shape):
    x = rng.standard_normal((*shape, DIM)) * np.sqrt(VARIANCES)
    eps = rng.standard_normal(shape) * math.sqrt(NOISE_VARIANCE)
    return x * (x @ U - eps)[..., None]


def _simulate_data_parallel(seed, num_steps, num_replicas, per_replica_batch):
    """Per-step (|G_small|² averaged over replicas, |G_big|²), as the Trainer measures them."""
    rng = np.random.default_rng(seed)
    g = _per_example_gradients(rng, (num_steps, num_replicas, per_replica_batch))
    g_small = g.mean(axis=2)  # (steps, replicas, dim)
    small_sq = np.sum(g_small**2, axis=-1).mean(axis=-1)
    big_sq = np.sum(g_small.mean(axis=1) ** 2, axis=-1)
    return small_sq, big_sq


def _numpy_ema(values, beta):
    m = 0.0
    for v in values:
        m = beta * m + (1.0 - beta) * v
    return m / (1.0 - beta ** len(values))


@tf.function
def _feed(estimator, g2s, traces):
    for i in tf.range(tf.shape(g2s)[0]):
        estimator.update(g2s[i], traces[i])


def test_analytic_statistics_match_monte_carlo():
    g = _per_example_gradients(np.random.default_rng(0), (400_000,))
    mean = g.mean(axis=0)
    assert np.sum(mean**2) == pytest.approx(TRUE_G2, rel=0.03)
    assert np.sum(g.var(axis=0)) == pytest.approx(TRUE_TRACE, rel=0.02)


def test_components_are_exact_on_expected_norms():
    # E|G_b|² = |G|² + tr(Σ)/b, so the expected norms must give back |G|² and tr(Σ) exactly.
    g2, trace, b, B = 0.35, 10.9, 32, 128
    small, big = g2 + trace / b, g2 + trace / B
    assert gradient_noise_components(small, big, b, B) == pytest.approx((g2, trace), rel=1e-12)
    out = gradient_noise_components(np.array([small, small]), np.array([big, big]), b, B)
    np.testing.assert_allclose(out, [[g2, g2], [trace, trace]], rtol=1e-12)
    tf_g2, tf_trace = gradient_noise_components(tf.constant(small), tf.constant(big), b, B)
    assert tf_g2.dtype == tf.float32
    assert float(tf_g2) == pytest.approx(g2, rel=1e-5)
    assert float(tf_trace) == pytest.approx(trace, rel=1e-5)
    assert gradient_noise_components(3.0, 1.5, 32, 128) == pytest.approx((1.0, 64.0))


@pytest.mark.parametrize(
    "small_batch, big_batch, name",
    [(128, 128, "small_batch"), (256, 128, "small_batch"), (0, 128, "small_batch"),
     (32, -1, "big_batch"), (np.int64(64), np.int64(64), "small_batch")],
)  # fmt: skip
def test_components_reject_bad_batches(small_batch, big_batch, name):
    with pytest.raises(ValueError, match=f"`{name}`.*Received: {name}="):
        gradient_noise_components(1.0, 1.0, small_batch, big_batch)


@pytest.mark.parametrize("num_replicas, per_replica_batch", [(4, 32), (2, 64), (8, 16)])
def test_recovers_known_noise_scale(num_replicas, per_replica_batch):
    big_batch, beta = num_replicas * per_replica_batch, 0.999
    small_sq, big_sq = _simulate_data_parallel(7, 2000, num_replicas, per_replica_batch)
    g2s, traces = gradient_noise_components(small_sq, big_sq, per_replica_batch, big_batch)
    estimator = NoiseScaleEstimator(beta=beta)
    _feed(estimator, tf.constant(g2s, tf.float32), tf.constant(traces, tf.float32))
    assert int(estimator.count) == 2000
    # The float32 estimator is exactly the float64 bias-corrected EMA ...
    ref_g2, ref_trace = _numpy_ema(g2s, beta), _numpy_ema(traces, beta)
    assert float(estimator.g2()) == pytest.approx(ref_g2, rel=1e-4)
    assert float(estimator.trace()) == pytest.approx(ref_trace, rel=1e-4)
    assert float(estimator.b_simple()) == pytest.approx(ref_trace / ref_g2, rel=1e-4)
    # ... and it recovers the true statistics.
    assert float(estimator.g2()) == pytest.approx(TRUE_G2, rel=0.10)
    assert float(estimator.trace()) == pytest.approx(TRUE_TRACE, rel=0.10)
    assert float(estimator.b_simple()) == pytest.approx(TRUE_B_SIMPLE, rel=0.10)
    # Whereas the naive |G_big|² is biased by tr(Σ)/B (≈ 24% at B = 128): the test can fail.
    assert np.mean(big_sq) > 1.15 * TRUE_G2


def test_estimate_independent_of_replica_count_at_fixed_global_batch():
    estimates = []
    for seed, (num_replicas, per_replica_batch) in enumerate([(2, 64), (4, 32)]):
        small_sq, big_sq = _simulate_data_parallel(
            100 + seed, 2000, num_replicas, per_replica_batch
        )
        g2s, traces = gradient_noise_components(small_sq, big_sq, per_replica_batch, 128)
        estimates.append(_numpy_ema(traces, 0.999) / _numpy_ema(g2s, 0.999))
    assert estimates[0] == pytest.approx(estimates[1], rel=0.10)
    assert estimates[1] == pytest.approx(TRUE_B_SIMPLE, rel=0.10)


def test_bias_correction_and_empty_state():
    estimator = NoiseScaleEstimator(beta=0.99)
    assert math.isnan(float(estimator.b_simple()))
    assert math.isnan(float(estimator.g2())) and math.isnan(float(estimator.trace()))
    b_simple = estimator.update(0.5, 20.0)
    assert float(b_simple) == pytest.approx(40.0, rel=1e-6)
    assert float(estimator.g2()) == pytest.approx(0.5, rel=1e-6)
    assert float(estimator.trace()) == pytest.approx(20.0, rel=1e-6)
    estimator.update(tf.constant(1.5, tf.float64), np.float64(10.0))
    # (β·x₁ + x₂)/(1 + β)
    assert float(estimator.g2()) == pytest.approx((0.99 * 0.5 + 1.5) / 1.99, rel=1e-6)
    assert float(estimator.trace()) == pytest.approx((0.99 * 20 + 10) / 1.99, rel=1e-6)
    estimator.reset()
    assert int(estimator.count) == 0 and math.isnan(float(estimator.b_simple()))


def test_non_finite_updates_are_skipped_and_counted():
    """Issue 11's reproduction: one inf pair used to make B_simple NaN for good."""
    estimator = NoiseScaleEstimator(beta=0.9)
    estimator.update(float("inf"), float("inf"))
    values = [float(estimator.update(1.0, 10.0)) for _ in range(3)]
    assert values == pytest.approx([10.0, 10.0, 10.0], rel=1e-6)
    assert int(estimator.count) == 3 and int(estimator.skipped) == 1
    # Mixed finite/non-finite pairs and NaN are skipped too; the EMA is over the finite ones.
    finite = [(2.0, 64.0), (1.0, 10.0), (0.5, 30.0)]
    updates = [finite[0], (math.nan, 5.0), finite[1], (3.0, -math.inf), finite[2]]
    estimator = NoiseScaleEstimator(beta=0.9)
    for g2, trace in updates:
        estimator.update(g2, trace)
    g2s, traces = zip(*finite)
    assert float(estimator.g2()) == pytest.approx(_numpy_ema(g2s, 0.9), rel=1e-6)
    assert float(estimator.trace()) == pytest.approx(_numpy_ema(traces, 0.9), rel=1e-6)
    assert float(estimator.b_simple()) == pytest.approx(
        _numpy_ema(traces, 0.9) / _numpy_ema(g2s, 0.9), rel=1e-6
    )
    assert (int(estimator.count), int(estimator.skipped)) == (3, 2)
    estimator.reset()
    assert (int(estimator.count), int(estimator.skipped)) == (0, 0)


def test_non_finite_updates_are_skipped_inside_tf_function():
    estimator = NoiseScaleEstimator(beta=0.5)
    g2s = tf.constant([np.inf, 2.0, np.nan, 4.0], tf.float32)
    traces = tf.constant([np.inf, 8.0, 1.0, 4.0], tf.float32)
    _feed(estimator, g2s, traces)
    assert float(estimator.g2()) == pytest.approx(_numpy_ema([2.0, 4.0], 0.5), rel=1e-6)
    assert float(estimator.trace()) == pytest.approx(_numpy_ema([8.0, 4.0], 0.5), rel=1e-6)
    assert (int(estimator.count), int(estimator.skipped)) == (2, 2)


def test_beta_zero_reports_last_update():
    estimator = NoiseScaleEstimator(beta=0.0)
    estimator.update(2.0, 8.0)
    estimator.update(4.0, 6.0)
    assert float(estimator.b_simple()) == pytest.approx(1.5)


@pytest.mark.parametrize("beta", [1.0, -0.1, 1.5, True, "0.9"])
def test_estimator_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match="`beta`.*Received: beta="):
        NoiseScaleEstimator(beta=beta)


def test_estimator_variables_and_checkpoint_round_trip(tmp_path):
    estimator = NoiseScaleEstimator(beta=0.9, name="noise")
    assert {v.name for v in estimator.variables} == {
        "noise/ema_g2:0", "noise/ema_trace:0", "noise/count:0", "noise/skipped:0"}  # fmt: skip
    assert not estimator.trainable_variables
    estimator.update(1.0, 30.0)
    estimator.update(0.5, 40.0)
    path = tf.train.Checkpoint(noise=estimator).save(str(tmp_path / "ckpt"))
    expected = float(estimator.b_simple())
    estimator.update(100.0, 1.0)  # diverge after saving

    restored = NoiseScaleEstimator(beta=0.9, name="noise")
    tf.train.Checkpoint(noise=restored).restore(path).assert_consumed()
    assert int(restored.count) == 2
    assert float(restored.b_simple()) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx((0.9 * 30 + 40) / (0.9 * 1.0 + 0.5), rel=1e-6)


def test_mirrored_strategy_step_matches_numpy():
    """The Trainer's pattern: estimator outside the scope, update in cross-replica context."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    num_replicas, b = 2, 16
    B = num_replicas * b
    rng = np.random.default_rng(3)
    w_init = rng.standard_normal(DIM).astype(np.float32)
    with strategy.scope():
        w = tf.Variable(w_init)
    estimator = NoiseScaleEstimator(beta=0.5)

    def replica_fn(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(0.5 * (tf.linalg.matvec(x, w) - y) ** 2) / B  # global average
        grads = tape.gradient(loss, [w])
        # The replica's share of the global-average gradient is (b/B)·G_small.
        small_sq = squared_norm([g * num_replicas for g in grads])
        return small_sq, grads

    @tf.function
    def step(x, y):
        small_sq, grads = strategy.run(replica_fn, args=(x, y))
        small_sq = strategy.reduce(tf.distribute.ReduceOp.MEAN, small_sq, axis=None)
        big = [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None) for g in grads]
        g2, trace = gradient_noise_components(small_sq, squared_norm(big), b, B)
        return estimator.update(g2, trace)

    ref_g2s, ref_traces = [], []
    for _ in range(3):
        x = rng.standard_normal((B, DIM)).astype(np.float32)
        y = rng.standard_normal(B).astype(np.float32)
        shards = [(x[r * b : (r + 1) * b], y[r * b : (r + 1) * b]) for r in range(num_replicas)]
        dist_x, dist_y = (
            strategy.experimental_distribute_values_from_function(
                lambda ctx, i=i, shards=shards: tf.constant(shards[ctx.replica_id_in_sync_group][i])
            )
            for i in range(2)
        )
        result = step(dist_x, dist_y)
        g = x.astype(np.float64) * (x @ w_init - y)[:, None].astype(np.float64)
        small = np.mean([np.sum(g[r * b : (r + 1) * b].mean(0) ** 2) for r in range(num_replicas)])
        g2, trace = gradient_noise_components(small, np.sum(g.mean(0) ** 2), b, B)
        ref_g2s.append(g2)
        ref_traces.append(trace)
    assert float(estimator.g2()) == pytest.approx(_numpy_ema(ref_g2s, 0.5), rel=1e-4)
    assert float(estimator.trace()) == pytest.approx(_numpy_ema(ref_traces, 0.5), rel=1e-4)
    assert float(result) == pytest.approx(
        _numpy_ema(ref_traces, 0.5) / _numpy_ema(ref_g2s, 0.5), rel=1e-4
    )


def test_squared_norm():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    slices = tf.IndexedSlices(
        tf.constant([[1.0, 2.0], [3.0, 4.0]]), tf.constant([0, 0]), tf.constant([3, 2])
    )  # both rows land on row 0: densified [[4, 6], [0, 0], [0, 0]]
    total = squared_norm([tf.constant(a), None, slices, tf.constant([2.0], tf.float16)])
    assert total.dtype == tf.float32
    assert float(total) == pytest.approx(55.0 + 16.0 + 36.0 + 4.0)
    assert float(squared_norm([])) == 0.0
    assert float(squared_norm([None])) == 0.0


@pytest.mark.parametrize(
    "b_simple, current, kwargs, expected",
    [
        (255.9, 128, {}, 128),  # just below current·factor
        (256.0, 128, {}, 256),  # at
        (256.1, 128, {}, 256),  # just above
        (511.9, 128, {}, 256),
        (512.0, 128, {}, 512),
        (100.0, 128, {}, 128),  # never shrinks
        (1e9, 128, {}, 4096),  # max cap, at a power
        (1e9, 128, {"max_global_batch_size": 4095}, 2048),
        (1e9, 128, {"max_global_batch_size": 128}, 128),
        (1e9, 128, {"dataset_size": 1000}, 512),
        (1e9, 128, {"dataset_size": 1024}, 1024),
        (511.9, 128, {"factor": 4}, 128),
        (512.0, 128, {"factor": 4}, 512),
        (100.0, 24, {"multiple_of": 8}, 96),
        (100.0, 24, {"multiple_of": 8, "max_global_batch_size": 95}, 48),
        (float("nan"), 128, {}, 128),
        (float("inf"), 128, {}, 128),
        (0.0, 128, {}, 128),
        (-500.0, 128, {}, 128),
        (np.float32(300.0), 128, {}, 256),
        (tf.constant(300.0), 128, {}, 256),
    ],
)  # fmt: skip
def test_suggest_global_batch_size(b_simple, current, kwargs, expected):
    kwargs = {"max_global_batch_size": 4096, **kwargs}
    result = suggest_global_batch_size(b_simple, current, **kwargs)
    assert result == expected and isinstance(result, int)


@pytest.mark.parametrize(
    "b_simple, current, kwargs, name",
    [
        (1e3, 0, {}, "current"),
        (1e3, -128, {}, "current"),
        (1e3, 128.0, {}, "current"),
        (1e3, 128, {"max_global_batch_size": 0}, "max_global_batch_size"),
        (1e3, 128, {"factor": 1}, "factor"),
        (1e3, 128, {"factor": 0}, "factor"),
        (1e3, 128, {"factor": 2.0}, "factor"),
        (1e3, 128, {"multiple_of": 0}, "multiple_of"),
        (1e3, 20, {"multiple_of": 8}, "current"),
        (1e3, 8192, {}, "current"),  # above max_global_batch_size
        (1e3, 128, {"dataset_size": 100}, "current"),
        (1e3, 128, {"dataset_size": 0}, "dataset_size"),
        ("big", 128, {}, "b_simple"),
        (None, 128, {}, "b_simple"),
    ],
)  # fmt: skip
def test_suggest_global_batch_size_rejects_bad_input(b_simple, current, kwargs, name):
    kwargs = {"max_global_batch_size": 4096, **kwargs}
    with pytest.raises(ValueError, match=f"`{name}`.*Received: {name}="):
        suggest_global_batch_size(b_simple, current, **kwargs)


@pytest.mark.parametrize(
    "rule, expected",
    [("keep", 0.1), ("linear", 0.4), ("sqrt", 0.2)],
)
def test_scaled_learning_rate_for_batch(rule, expected):
    assert scaled_learning_rate_for_batch(0.1, 128, 512, rule=rule) == pytest.approx(expected)


def test_scaled_learning_rate_for_batch_default_keeps_rate():
    assert scaled_learning_rate_for_batch(0.1, 128, 1024) == 0.1


@pytest.mark.parametrize(
    "args, name",
    [((0.0, 128, 512, "keep"), "learning_rate"), ((0.1, 0, 512, "keep"), "old_batch"),
     ((0.1, 128, -1, "keep"), "new_batch"), ((0.1, 128, 512, "none"), "rule")],
)  # fmt: skip
def test_scaled_learning_rate_for_batch_rejects_bad_input(args, name):
    with pytest.raises(ValueError, match=f"`{name}`.*Received: {name}="):
        scaled_learning_rate_for_batch(*args)


def test_grow_plan_splits_the_phase_and_rescales_later_phases():
    from tf_largebatch import plan_phases
    from tf_largebatch.noise import grow_plan

    plan = plan_phases("decay_lr", 50_000, 90, 256, 0.1, decay_epochs=(30, 60), decay_factor=0.1)
    grown = grow_plan(plan, 10, 1024, rule="linear")
    assert [(p.start_epoch, p.end_epoch) for p in grown.phases] == [
        (0, 10),
        (10, 30),
        (30, 60),
        (60, 90),
    ]
    assert [p.global_batch_size for p in grown.phases] == [256, 1024, 1024, 1024]
    assert [p.learning_rate for p in grown.phases] == pytest.approx([0.1, 0.4, 0.04, 0.004])
    assert grown.phases[1].steps_per_epoch == 50_000 // 1024
    assert grown.mode == "adaptive"
    # Smith's ε/B is kept in every epoch interval (the linear rule).
    for old, new in zip(plan.phases[1:], grown.phases[2:]):
        assert new.learning_rate / new.global_batch_size == pytest.approx(
            old.learning_rate / old.global_batch_size
        )
    kept = grow_plan(plan, 30, 512, rule="keep")
    assert [p.learning_rate for p in kept.phases] == pytest.approx([0.1, 0.01, 0.001])
    with pytest.raises(ValueError, match="global_batch_size"):
        grow_plan(plan, 10, 256)
    with pytest.raises(ValueError, match="epoch"):
        grow_plan(plan, 90, 512)


def test_adapt_plan_decides_at_epoch_ends():
    from tf_largebatch import plan_phases
    from tf_largebatch.noise import adapt_plan

    plan = plan_phases(
        "decay_lr", 10_000, 10, 32, 0.1, base_batch_size=32, decay_epochs=(8,), warmup_epochs=2
    )
    kwargs = dict(max_global_batch_size=256, multiple_of=2)
    assert adapt_plan(plan, 1, 500.0, **kwargs) is None  # inside the warmup
    assert adapt_plan(plan, 10, 500.0, **kwargs) is None  # past the end
    assert adapt_plan(plan, 3, 40.0, **kwargs) is None  # B_simple < 2 × 32: stay
    grown, decision = adapt_plan(plan, 3, 150.0, **kwargs)  # 32 → 128 (≤ 150, powers of 2)
    assert decision == {
        "epoch": 3,
        "noise_scale": 150.0,
        "from_global_batch_size": 32,
        "to_global_batch_size": 128,
        "learning_rate": pytest.approx(0.4),
    }
    assert [p.global_batch_size for p in grown.phases] == [32, 128, 128]


def test_fold_sums_equals_one_update_per_step():
    """A compiled call folds its m finite steps at once; the averages equal m `update` calls."""
    steps = [(1.0, 10.0), (math.inf, 5.0), (3.0, 30.0), (2.0, 25.0), (4.0, math.nan)]
    one_by_one, at_once = NoiseScaleEstimator(0.9), NoiseScaleEstimator(0.9)
    for estimator in (one_by_one, at_once):
        estimator.update(2.0, 64.0)  # a state from an earlier call
    for g2, trace in steps:
        one_by_one.update(g2, trace)
    sums, folded = np.zeros(2), 0
    for pair in steps:
        if all(math.isfinite(v) for v in pair):
            sums, folded = 0.9 * sums + np.array(pair), folded + 1
    at_once.fold_sums(sums[0], sums[1], folded, len(steps))
    assert float(at_once.g2()) == pytest.approx(float(one_by_one.g2()), rel=1e-6)
    assert float(at_once.trace()) == pytest.approx(float(one_by_one.trace()), rel=1e-6)
    assert int(at_once.count.numpy()) == int(one_by_one.count.numpy()) == 4
    assert int(at_once.skipped.numpy()) == int(one_by_one.skipped.numpy()) == 2
