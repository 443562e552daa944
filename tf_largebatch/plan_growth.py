"""Plan surgery for the adaptive batch policy: grow a `PhasePlan` towards a noise scale.

Pure Python (no TensorFlow), next to the phases it changes. `suggest_global_batch_size` grows
the global batch by whole factors towards the measured B_simple; at a fixed learning rate that
lowers Smith's noise scale g ≈ εN/(B(1 − m)) like a learning-rate decay, so
`scaled_learning_rate_for_batch` keeps ε by default ("grow instead of decay"); `grow_plan`
rewrites the phases from an epoch on and `adapt_plan` is the policy's decision at an epoch end.
The measurement itself is `noise.NoiseScaleEstimator`; the policy's callback is
`callbacks.AdaptiveBatchSize`.

References:
  McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training".
  Smith, Kindermans, Ying & Le 2018, "Don't Decay the Learning Rate, Increase the Batch Size", §3.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from tf_largebatch._validation import check_choice, check_positive, check_positive_int
from tf_largebatch.phases import PhasePlan, steps_per_epoch
from tf_largebatch.scaling import scale_learning_rate

LR_RULES_FOR_BATCH_GROWTH = ("keep", "linear", "sqrt")


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
      ValueError: `epoch` outside (0, plan.epochs), a batch that does not grow, or a plan with
        phases inside an epoch (`Phase.num_steps`), which this surgery does not split.
    """
    if any(p.num_steps is not None for p in plan.phases):
        raise ValueError(
            "Argument `plan` must have epoch-aligned phases to grow (no `num_steps`). "
            f"Received: a {plan.mode!r} plan with phases inside an epoch"
        )
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
