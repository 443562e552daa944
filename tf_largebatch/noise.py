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

import dataclasses
import math
import numbers
from collections.abc import Iterable
from typing import Any

import tensorflow as tf

from tf_largebatch._validation import check_choice, check_positive, check_positive_int
from tf_largebatch.phases import PhasePlan, steps_per_epoch
from tf_largebatch.scaling import scale_learning_rate

LR_RULES_FOR_BATCH_GROWTH = ("keep", "linear", "sqrt")


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
    total = tf.constant(0.0, tf.float32)
    for tensor in (t for t in tensors if t is not None):
        total += tf.reduce_sum(tf.square(tf.cast(tf.convert_to_tensor(tensor), tf.float32)))
    return total


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
        beta = tf.constant(self.beta, tf.float32)
        g2, trace = tf.cast(g2, tf.float32), tf.cast(trace, tf.float32)
        finite = tf.logical_and(tf.math.is_finite(g2), tf.math.is_finite(trace))
        for ema, value in ((self.ema_g2, g2), (self.ema_trace, trace)):
            # Select the value first: inf·0 would still be NaN in an arithmetic mask.
            ema.assign(tf.where(finite, beta * ema + (1.0 - beta) * value, ema))
        self.count.assign_add(tf.cast(finite, tf.int64))
        self.skipped.assign_add(1 - tf.cast(finite, tf.int64))
        return self.b_simple()

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


def suggest_global_batch_size(
    b_simple: float,
    current: int,
    *,
    max_global_batch_size: int,
    factor: int = 2,
    multiple_of: int = 1,
    dataset_size: int | None = None,
) -> int:
    """The largest current·factorᵏ (k ≥ 0) that is ≤ b_simple and within the caps.

    The batch never shrinks; a non-finite or non-positive ``b_simple`` (no estimate yet, or a
    noisy negative one) returns ``current``. The result is a multiple of ``multiple_of`` (e.g.
    the replica count) because ``current`` must be.

    Args:
      b_simple: the measured noise scale B_simple.
      current: the current global batch size.
      max_global_batch_size: never suggest more.
      factor: growth factor, an integer >= 2.
      multiple_of: ``current`` (hence the result) must be divisible by it.
      dataset_size: if given, never suggest more than this many examples.

    Returns:
      The suggested global batch size.

    Raises:
      ValueError: non-positive integers, ``factor`` < 2, ``current`` not a multiple of
        ``multiple_of`` or above a cap, or a non-numeric ``b_simple``.

    Example:
      >>> suggest_global_batch_size(1000.0, 128, max_global_batch_size=4096)
      512
    """
    check_positive_int("current", current)
    check_positive_int("max_global_batch_size", max_global_batch_size)
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise ValueError(f"Argument `factor` must be an integer >= 2. Received: factor={factor}")
    check_positive_int("multiple_of", multiple_of)
    cap = max_global_batch_size
    if dataset_size is not None:
        check_positive_int("dataset_size", dataset_size)
        cap = min(cap, dataset_size)
    if current % multiple_of or current > cap:
        raise ValueError(
            f"Argument `current` must be a multiple of {multiple_of} and <= {cap} "
            f"(max_global_batch_size, dataset_size). Received: current={current}"
        )
    try:
        limit = float(b_simple)
    except (TypeError, ValueError):
        raise ValueError(f"Argument `b_simple` must be a number. Received: {b_simple=}") from None
    if not math.isfinite(limit):  # NaN (no estimate yet) or inf; ≤ 0 never passes the loop test
        return current
    suggestion = current
    while suggestion * factor <= min(limit, cap):
        suggestion *= factor
    return suggestion


def scaled_learning_rate_for_batch(
    learning_rate: float, old_batch: int, new_batch: int, rule: str = "keep"
) -> float:
    """The learning rate to use after the global batch grows from ``old_batch`` to ``new_batch``.

    - ``"keep"`` (default): ε. Smith's noise scale g ≈ εN/(B(1 − m)) falls by new/old as under a
      learning-rate decay by that factor: the batch grows *instead of* the rate decaying (Smith
      et al. 2018 §3), the point of an adaptive batch policy.
    - ``"linear"``: ε·new/old (Goyal et al. §2.1): keeps g, fewer and larger steps per epoch.
    - ``"sqrt"``: ε·√(new/old) (keeps the variance of the update).

    Args:
      learning_rate: ε at ``old_batch``.
      old_batch: the global batch size before the change.
      new_batch: the global batch size after it.
      rule: one of ``"keep"``, ``"linear"``, ``"sqrt"``.

    Returns:
      The learning rate for ``new_batch``.

    Raises:
      ValueError: non-positive numbers or an unknown rule.

    Example:
      >>> scaled_learning_rate_for_batch(0.1, 128, 512, rule="linear")
      0.4
    """
    check_positive("learning_rate", learning_rate)
    check_positive("old_batch", old_batch)
    check_positive("new_batch", new_batch)
    check_choice("rule", rule, LR_RULES_FOR_BATCH_GROWTH)
    scaling_rule = "none" if rule == "keep" else rule
    return scale_learning_rate(learning_rate, new_batch, old_batch, scaling_rule)


def grow_plan(
    plan: PhasePlan, epoch: int, global_batch_size: int, rule: str = "linear"
) -> PhasePlan:
    """The plan with the batch grown from `epoch` on (the adaptive policy's decision).

    The phase holding `epoch` is split there; from `epoch` on every phase's batch is multiplied
    by f = global_batch_size / (the batch at `epoch`) and its learning rate rescaled by
    `scaled_learning_rate_for_batch` with `rule` (``"linear"`` keeps Smith's noise scale, so
    the per-epoch path of the recipe is kept with 1/f of the updates). Pure Python.

    Raises:
      ValueError: `epoch` outside (0, plan.epochs), or a batch that does not grow.
    """
    if not 0 < epoch < plan.epochs:
        raise ValueError(f"Argument `epoch` must be in (0, {plan.epochs}). Received: {epoch=}")
    current = plan.phases[plan.phase_index(epoch)].global_batch_size
    if global_batch_size <= current:
        raise ValueError(
            f"Argument `global_batch_size` must be > the current batch ({current}). "
            f"Received: global_batch_size={global_batch_size}"
        )
    factor = global_batch_size / current
    phases = []
    for p in plan.phases:
        if p.end_epoch <= epoch:
            phases.append(p)
            continue
        if p.start_epoch < epoch:
            phases.append(dataclasses.replace(p, end_epoch=epoch))
            p = dataclasses.replace(p, start_epoch=epoch)
        batch = round(p.global_batch_size * factor)
        phases.append(
            dataclasses.replace(
                p,
                global_batch_size=batch,
                learning_rate=scaled_learning_rate_for_batch(
                    p.learning_rate, p.global_batch_size, batch, rule
                ),
                steps_per_epoch=steps_per_epoch(plan.dataset_size, batch, plan.drop_remainder),
            )
        )
    return dataclasses.replace(plan, phases=tuple(phases), mode="adaptive")


def adapt_plan(
    plan: PhasePlan,
    next_epoch: int,
    b_simple: float,
    *,
    max_global_batch_size: int,
    factor: int = 2,
    multiple_of: int = 1,
    rule: str = "linear",
) -> tuple[PhasePlan, dict[str, Any]] | None:
    """The adaptive policy's decision at an epoch end (pure Python).

    Grows the batch of `next_epoch` on towards `b_simple` (`suggest_global_batch_size`) and
    returns the grown plan (`grow_plan`) with a record of the decision, or None when the batch
    stays (no growth suggested, or `next_epoch` is inside the warmup or past the end).
    """
    if next_epoch >= plan.epochs or next_epoch < plan.warmup_epochs:
        return None
    current = plan.phases[plan.phase_index(next_epoch)].global_batch_size
    target = suggest_global_batch_size(
        b_simple,
        current,
        max_global_batch_size=max_global_batch_size,
        factor=factor,
        multiple_of=multiple_of,
        dataset_size=plan.dataset_size,
    )
    if target == current:
        return None
    grown = grow_plan(plan, next_epoch, target, rule)
    decision = {
        "epoch": next_epoch,
        "noise_scale": b_simple,
        "from_global_batch_size": current,
        "to_global_batch_size": target,
        "learning_rate": grown.phases[grown.phase_index(next_epoch)].learning_rate,
    }
    return grown, decision
