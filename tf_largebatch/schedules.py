"""Warmup schedules and Goyal et al.'s ImageNet recipe as Keras `LearningRateSchedule`s.

Warmup *wraps* any schedule (or a float) and replaces its first ``warmup_steps`` steps; from
there on the wrapped schedule is followed at the same step, not shifted: Goyal et al. §2.2,
"after the warmup phase, go back to the original learning rate schedule". Recipes are
compositions of these wrappers and Keras's built-in schedules, optax-style.

References:
  Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", §2.1–2.2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from tf_largebatch._validation import (
    check_choice,
    check_increasing,
    check_non_negative,
    check_non_negative_int,
    check_positive,
    check_positive_int,
)
from tf_largebatch.scaling import scale_learning_rate

Schedule = keras.optimizers.schedules.LearningRateSchedule
WARMUPS = ("gradual", "constant", "none")
_register = keras.saving.register_keras_serializable(package="tf_largebatch")


def _check_after_warmup(after_warmup: Any) -> None:
    if not isinstance(after_warmup, Schedule):
        check_positive("after_warmup", after_warmup)


def _serialize(after_warmup: float | Schedule) -> Any:
    if isinstance(after_warmup, Schedule):
        return keras.saving.serialize_keras_object(after_warmup)
    return float(after_warmup)


def _deserialize(config: dict[str, Any]) -> dict[str, Any]:
    config = dict(config)
    if isinstance(config["after_warmup"], dict):
        config["after_warmup"] = keras.saving.deserialize_keras_object(config["after_warmup"])
    return config


def _value(after_warmup: float | Schedule, step: Any, dtype: Any) -> Any:
    if isinstance(after_warmup, Schedule):
        return tf.cast(after_warmup(step), dtype)
    return tf.constant(after_warmup, dtype)


class _Warmup(Schedule):
    """Shared plumbing: argument checks, serialisation of the wrapped schedule."""

    def __init__(self, after_warmup: float | Schedule, warmup_steps: int, name: str) -> None:
        super().__init__()
        _check_after_warmup(after_warmup)
        check_non_negative_int("warmup_steps", warmup_steps)
        self.after_warmup = after_warmup
        self.warmup_steps = warmup_steps
        self.name = name

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> _Warmup:
        return cls(**_deserialize(config))


@_register
class LinearWarmup(_Warmup):
    """Goyal's *gradual* warmup in front of any schedule.

    With W = ``warmup_steps``, η₀ = ``initial_learning_rate`` and target η̂ = after_warmup(W):

        lr(s) = η₀ + (η̂ − η₀)·s/W   for s < W
        lr(s) = after_warmup(s)       for s ≥ W

    Args:
      after_warmup: a float or any Keras `LearningRateSchedule`.
      warmup_steps: W ≥ 0 (0 disables the warmup).
      initial_learning_rate: η₀ ≥ 0, the rate at step 0.
      name: name scope of the ops.

    Example:
      >>> s = LinearWarmup(3.2, warmup_steps=100, initial_learning_rate=0.1)
      >>> float(s(50))  # halfway: 0.1 + (3.2 − 0.1)/2
      1.65

    References:
      Goyal et al. 2017 §2.2, "Gradual warmup".
    """

    def __init__(
        self,
        after_warmup: float | Schedule,
        warmup_steps: int,
        initial_learning_rate: float = 0.0,
        name: str = "LinearWarmup",
    ) -> None:
        super().__init__(after_warmup, warmup_steps, name)
        check_non_negative("initial_learning_rate", initial_learning_rate)
        self.initial_learning_rate = initial_learning_rate

    def __call__(self, step: Any) -> Any:
        with tf.name_scope(self.name):
            dtype = tf.float32
            step = tf.cast(step, dtype)
            after = _value(self.after_warmup, step, dtype)
            if self.warmup_steps == 0:
                return after
            w = tf.constant(self.warmup_steps, dtype)
            init = tf.constant(self.initial_learning_rate, dtype)
            target = _value(self.after_warmup, w, dtype)
            ramp = init + (target - init) * step / w
            return tf.where(step < w, ramp, after)

    def get_config(self) -> dict[str, Any]:
        return {
            "after_warmup": _serialize(self.after_warmup),
            "warmup_steps": self.warmup_steps,
            "initial_learning_rate": self.initial_learning_rate,
            "name": self.name,
        }


@_register
class ConstantWarmup(_Warmup):
    """Goyal's *constant* warmup: a fixed low rate for the first ``warmup_steps`` steps.

        lr(s) = warmup_learning_rate   for s < W
        lr(s) = after_warmup(s)        for s ≥ W

    Args:
      after_warmup: a float or any Keras `LearningRateSchedule`.
      warmup_steps: W ≥ 0.
      warmup_learning_rate: the rate during warmup (> 0).
      name: name scope of the ops.

    Example:
      >>> float(ConstantWarmup(3.2, warmup_steps=100, warmup_learning_rate=0.1)(99))
      0.1

    References:
      Goyal et al. 2017 §2.2, "Constant warmup" (weaker than gradual at large k, Table 1).
    """

    def __init__(
        self,
        after_warmup: float | Schedule,
        warmup_steps: int,
        warmup_learning_rate: float,
        name: str = "ConstantWarmup",
    ) -> None:
        super().__init__(after_warmup, warmup_steps, name)
        check_positive("warmup_learning_rate", warmup_learning_rate)
        self.warmup_learning_rate = warmup_learning_rate

    def __call__(self, step: Any) -> Any:
        with tf.name_scope(self.name):
            dtype = tf.float32
            step = tf.cast(step, dtype)
            after = _value(self.after_warmup, step, dtype)
            warm = tf.constant(self.warmup_learning_rate, dtype)
            return tf.where(step < tf.constant(self.warmup_steps, dtype), warm, after)

    def get_config(self) -> dict[str, Any]:
        return {
            "after_warmup": _serialize(self.after_warmup),
            "warmup_steps": self.warmup_steps,
            "warmup_learning_rate": self.warmup_learning_rate,
            "name": self.name,
        }


def with_warmup(
    after_warmup: float | Schedule,
    kind: str,
    warmup_steps: int,
    initial_learning_rate: float,
) -> float | Schedule:
    """Wraps `after_warmup` in the warmup named by `kind` (``"gradual"``, ``"constant"``,
    ``"none"``); ``"none"`` or 0 steps returns `after_warmup` unchanged."""
    check_choice("warmup", kind, WARMUPS)
    if kind == "none" or warmup_steps == 0:
        return after_warmup
    if kind == "gradual":
        return LinearWarmup(after_warmup, warmup_steps, initial_learning_rate)
    return ConstantWarmup(after_warmup, warmup_steps, initial_learning_rate)


def piecewise_constant(boundary_steps: Sequence[int], values: Sequence[float]) -> Schedule:
    """Keras's `PiecewiseConstantDecay` with ``values[i+1]`` from step ``boundary_steps[i]`` *on*.

    Keras switches value strictly after a boundary (``step > boundary``); a new epoch's first
    update runs at ``optimizer.iterations == boundary``, so the Keras boundaries are ours − 1.
    """
    boundary_steps = [int(b) for b in boundary_steps]
    check_increasing("boundary_steps", boundary_steps)
    if not boundary_steps:  # Keras needs one boundary; a constant schedule with a dummy one.
        return keras.optimizers.schedules.PiecewiseConstantDecay([0], [values[0], values[0]])
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        [b - 1 for b in boundary_steps], [float(v) for v in values]
    )


def goyal_schedule(
    base_learning_rate: float,
    global_batch_size: int,
    steps_per_epoch: int,
    base_batch_size: int = 256,
    warmup_epochs: float = 5,
    warmup: str = "gradual",
    decay_epochs: Sequence[int] = (30, 60, 80),
    decay_factor: float = 0.1,
    scaling_rule: str = "linear",
    warmup_initial_learning_rate: float | None = None,
) -> Schedule:
    """Goyal et al.'s ImageNet recipe: scaled rate, warmup, step decay — as one composition.

    η̂ = scale_learning_rate(η, kn, n, rule); the decay part is Keras's
    `PiecewiseConstantDecay` with η̂·decay_factorⁱ after the i-th of ``decay_epochs``; gradual
    warmup ramps linearly from η (``warmup_initial_learning_rate``, the unscaled base rate by
    default; 0 is allowed) to η̂ over ``warmup_epochs``, then rejoins the decay schedule.

    Args:
      base_learning_rate: η per ``base_batch_size`` examples (0.1 per 256 in the paper).
      global_batch_size: kn.
      steps_per_epoch: updates per epoch at kn.
      base_batch_size: n.
      warmup_epochs: warmup length in epochs (5 in the paper).
      warmup: ``"gradual"``, ``"constant"`` or ``"none"``.
      decay_epochs: epochs where the rate is multiplied by ``decay_factor`` (30, 60, 80).
      decay_factor: the multiplier, in (0, 1).
      scaling_rule: ``"linear"``, ``"sqrt"`` or ``"none"``.
      warmup_initial_learning_rate: start of the warmup; defaults to ``base_learning_rate``
        (or η̂ when that is lower, k < 1).

    Returns:
      A serialisable Keras `LearningRateSchedule`.

    Raises:
      ValueError: non-positive rates or sizes, unsorted decay epochs, a warmup longer than the
        first decay epoch, unknown rule or warmup names.

    Example:
      >>> s = goyal_schedule(0.1, 8192, steps_per_epoch=100)
      >>> [round(float(s(e * 100)), 4) for e in (0, 5, 30, 60, 80)]
      [0.1, 3.2, 0.32, 0.032, 0.0032]
    """
    check_positive_int("steps_per_epoch", steps_per_epoch)
    check_non_negative("warmup_epochs", warmup_epochs)
    check_choice("warmup", warmup, WARMUPS)
    decay_epochs = tuple(decay_epochs)
    for e in decay_epochs:
        check_positive("decay_epochs", e)
    check_increasing("decay_epochs", decay_epochs)
    check_positive("decay_factor", decay_factor)
    if decay_factor >= 1:
        raise ValueError(
            f"Argument `decay_factor` must be < 1. Received: decay_factor={decay_factor}"
        )
    if warmup != "none" and decay_epochs and warmup_epochs > decay_epochs[0]:
        raise ValueError(
            f"Argument `warmup_epochs` must be <= the first decay epoch ({decay_epochs[0]}). "
            f"Received: warmup_epochs={warmup_epochs}"
        )
    peak = scale_learning_rate(base_learning_rate, global_batch_size, base_batch_size, scaling_rule)
    decay = piecewise_constant(
        [round(e * steps_per_epoch) for e in decay_epochs],
        [peak * decay_factor**i for i in range(len(decay_epochs) + 1)],
    )
    if warmup_initial_learning_rate is None:  # from η up to kη (never down, for k < 1)
        warmup_initial_learning_rate = min(base_learning_rate, peak)
    return with_warmup(
        decay, warmup, round(warmup_epochs * steps_per_epoch), warmup_initial_learning_rate
    )


def phase_schedule(
    phase_start_steps: Sequence[int],
    learning_rates: Sequence[float],
    warmup: str = "none",
    warmup_steps: int = 0,
    warmup_initial_learning_rate: float = 0.0,
) -> Schedule:
    """The schedule of a `PhasePlan`: each phase's rate from the global step it starts at,
    behind a warmup (see `PhasePlan.learning_rate_schedule`)."""
    decay = piecewise_constant(list(phase_start_steps)[1:], learning_rates)
    return with_warmup(decay, warmup, warmup_steps, warmup_initial_learning_rate)
