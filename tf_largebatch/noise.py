"""Gradient-noise-scale estimation and the adaptive global-batch policy.

The *simple noise scale* B_simple = tr(Σ)/|G|² (G the true gradient, Σ the per-example gradient
covariance) is the batch size beyond which larger batches stop paying off. Data parallelism
measures it for free: the per-replica mean gradient G_small (batch b) and the all-reduced G_big
(global batch B) satisfy E|G_b|² = |G|² + tr(Σ)/b, hence the unbiased estimates

    |G|²  ≈ (B·|G_big|² − b·|G_small|²)/(B − b),
    tr(Σ) ≈ (|G_small|² − |G_big|²)/(1/b − 1/B).

Both are noisy (the |G|² one can be negative): `NoiseScaleEstimator` smooths each *separately*
with a bias-corrected exponential moving average and reports their ratio.

`suggest_global_batch_size` grows the global batch by whole factors towards B_simple; at a fixed
learning rate that lowers Smith's noise scale g ≈ εN/(B(1 − m)) like a learning-rate decay, so
`scaled_learning_rate_for_batch` keeps ε by default ("grow instead of decay").

References:
  McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training", App. A.1.
  Smith, Kindermans, Ying & Le 2018, "Don't Decay the Learning Rate, Increase the Batch Size", §3.
  Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", §2.1.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import tensorflow as tf

from tf_largebatch._validation import check_positive

# The adaptive policy's plan surgery is pure Python and lives with the phases (re-exported).
from tf_largebatch.plan_growth import (  # noqa: F401
    LR_RULES_FOR_BATCH_GROWTH,
    adapt_plan,
    grow_plan,
    scaled_learning_rate_for_batch,
    suggest_global_batch_size,
)


def gradient_noise_components(
    small_sq_norm: Any, big_sq_norm: Any, small_batch: Any, big_batch: Any
) -> tuple[Any, Any]:
    """Unbiased estimates of |G|² and tr(Σ) from two batch sizes (McCandlish et al. App. A.1).

    g2 = (B·|G_big|² − b·|G_small|²)/(B − b) and trace = (|G_small|² − |G_big|²)·bB/(B − b).
    Pure arithmetic on floats, NumPy arrays or TF tensors (tensor batch sizes need their dtype).

    Args:
      small_sq_norm: |G_small|² of a mean gradient over ``small_batch`` examples (averaged
        over the replicas in data-parallel training).
      big_sq_norm: |G_big|², the squared norm of the mean gradient over ``big_batch`` examples.
      small_batch: b, e.g. the per-replica batch size.
      big_batch: B, e.g. the global batch size.

    Returns:
      ``(g2, trace)``: the estimates of |G|² and tr(Σ).

    Raises:
      ValueError: when the batch sizes are Python/NumPy numbers and not 0 < b < B.

    Example:
      >>> gradient_noise_components(3.0, 1.5, 32, 128)
      (1.0, 64.0)
    """
    if isinstance(small_batch, numbers.Real) and isinstance(big_batch, numbers.Real):
        check_positive("small_batch", float(small_batch))
        check_positive("big_batch", float(big_batch))
        if small_batch >= big_batch:
            raise ValueError(
                f"Argument `small_batch` must be < big_batch ({big_batch}). "
                f"Received: small_batch={small_batch}"
            )
    denominator = big_batch - small_batch
    g2 = (big_batch * big_sq_norm - small_batch * small_sq_norm) / denominator
    trace = (small_sq_norm - big_sq_norm) * (small_batch * big_batch / denominator)
    return g2, trace


def squared_norm(tensors: Iterable[Any]) -> tf.Tensor:
    """Σ_t |t|², the summed squared L2 norms as a float32 scalar (``None`` entries skipped).

    Args:
      tensors: e.g. the gradients of a model's trainable variables; `tf.IndexedSlices` are
        densified (repeated indices summed, as in the gradient).

    Returns:
      A float32 scalar tensor (0.0 for an empty list).
    """
    # l2_loss(t) = Σt²/2 in one kernel (square and sum would be two ops a tensor)
    halves = [
        tf.nn.l2_loss(tf.cast(tf.convert_to_tensor(t), tf.float32))
        for t in tensors
        if t is not None
    ]
    if not halves:
        return tf.constant(0.0, tf.float32)
    return 2.0 * tf.add_n(halves)


class NoiseScaleEstimator(tf.Module):
    """Bias-corrected EMAs of |G|² and tr(Σ) and their ratio B_simple.

    ``update(g2, trace)``: m ← β·m + (1 − β)·x for each, t ← t + 1; ``g2()``/``trace()`` report
    m/(1 − βᵗ) (Adam's bias correction), ``b_simple() = trace()/g2()``; all are **NaN** before
    the first update (`suggest_global_batch_size` then keeps the batch). An update whose ``g2``
    or ``trace`` is not finite (e.g. a float16 step the loss scaler skipped for overflow) leaves
    the averages and t unchanged and adds 1 to ``skipped`` instead, so one bad step cannot turn
    B_simple into NaN for the rest of the run (gpt-neox likewise drops overflowed steps before
    its averages). State: plain non-trainable variables made in ``__init__`` (build it outside
    ``strategy.scope()``, update in cross-replica context), tracked by `tf.train.Checkpoint`.

    Args:
      beta: EMA decay β in [0, 1); the average spans about 1/(1 − β) updates.
      name: module name.

    Raises:
      ValueError: if ``beta`` is not in [0, 1).

    Example:
      >>> estimator = NoiseScaleEstimator(beta=0.9)
      >>> float(estimator.update(2.0, 64.0))
      32.0
    """

    def __init__(self, beta: float = 0.99, name: str | None = None) -> None:
        super().__init__(name=name)
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta < 1:
            raise ValueError(f"Argument `beta` must be in [0, 1). Received: beta={beta!r}")
        self.beta = float(beta)
        with self.name_scope:
            self.ema_g2 = tf.Variable(0.0, trainable=False, dtype=tf.float32, name="ema_g2")
            self.ema_trace = tf.Variable(0.0, trainable=False, dtype=tf.float32, name="ema_trace")
            self.count = tf.Variable(0, trainable=False, dtype=tf.int64, name="count")
            self.skipped = tf.Variable(0, trainable=False, dtype=tf.int64, name="skipped")

    def update(self, g2: Any, trace: Any) -> tf.Tensor:
        """Folds one pair of estimates into the averages and returns the new `b_simple`.

        A pair with a non-finite member (inf or NaN) is not folded in: it only increments
        ``skipped``. No Python control flow, so it traces into a `tf.function` unchanged.
        """
        g2, trace = tf.cast(g2, tf.float32), tf.cast(trace, tf.float32)
        finite = tf.logical_and(tf.math.is_finite(g2), tf.math.is_finite(trace))
        zero = tf.constant(0.0)
        # Select the value first: inf·0 would still be NaN in an arithmetic mask.
        self.fold_sums(tf.where(finite, g2, zero), tf.where(finite, trace, zero), finite, 1)
        return self.b_simple()

    def fold_sums(self, g2_sum: Any, trace_sum: Any, folded: Any, steps: Any) -> None:
        """`steps` updates at once, of which the `folded` finite ones count: with
        S = Σ_j β^(m−1−j)·x_j over those m (in order), m ← β^m·m + (1 − β)·S for each average,
        exactly what m calls of `update` give (the others only add to ``skipped``)."""
        beta = tf.constant(self.beta, tf.float32)
        folded = tf.cast(folded, tf.int64)
        decay = tf.pow(beta, tf.cast(folded, tf.float32))
        for ema, total in ((self.ema_g2, g2_sum), (self.ema_trace, trace_sum)):
            ema.assign(decay * ema + (1.0 - beta) * tf.cast(total, tf.float32))
        self.count.assign_add(folded)
        self.skipped.assign_add(tf.cast(steps, tf.int64) - folded)

    def _corrected(self, ema: tf.Variable) -> tf.Tensor:
        correction = 1.0 - tf.pow(tf.constant(self.beta), tf.cast(self.count, tf.float32))
        return tf.where(self.count > 0, ema / correction, tf.constant(math.nan, tf.float32))

    def g2(self) -> tf.Tensor:
        """The bias-corrected average of |G|² (NaN before any update)."""
        return self._corrected(self.ema_g2)

    def trace(self) -> tf.Tensor:
        """The bias-corrected average of tr(Σ) (NaN before any update)."""
        return self._corrected(self.ema_trace)

    def b_simple(self) -> tf.Tensor:
        """B_simple = trace()/g2() (NaN before any update; may be negative early on)."""
        return self.trace() / self.g2()

    def reset(self) -> None:
        """Forgets every update (and the count of skipped ones)."""
        for variable in (self.ema_g2, self.ema_trace, self.count, self.skipped):
            variable.assign(tf.zeros_like(variable))
