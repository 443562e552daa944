"""Warmup schedules, Goyal et al.'s ImageNet recipe and Transformer/LLM schedules as Keras
`LearningRateSchedule`s.

Warmup *wraps* any schedule (or a float). By default it replaces the wrapped schedule's first
``warmup_steps`` steps, which is then followed at the same step, not shifted: Goyal et al.
§2.2, "after the warmup phase, go back to the original learning rate schedule". With
``LinearWarmup(..., shift=True)`` the wrapped schedule instead starts from its own step 0 when
the warmup ends (Keras's ``CosineDecay(warmup_target=...)``, optax's ``join_schedules``).
Recipes are compositions of these wrappers and Keras's built-in schedules, optax-style.

Every schedule computes with `keras.ops` only (float32), so it runs on any Keras backend
(TensorFlow, JAX, torch).

References:
  Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", §2.1–2.2.
  Vaswani et al. 2017, "Attention Is All You Need", §5.3 (inverse square root).
  Hu et al. 2024, "MiniCPM: Unveiling the Potential of Small Language Models", §4
  (warmup-stable-decay); Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
  Beyond Fixed Training Durations" (the 1 − sqrt cooldown).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

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
WSD_DECAYS = ("linear", "cosine", "sqrt")
_DTYPE = "float32"
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
        return ops.cast(after_warmup(step), dtype)
    return ops.convert_to_tensor(after_warmup, dtype)


def _const(value: float, dtype: Any) -> Any:
    return ops.convert_to_tensor(value, dtype)


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
    """Goyal's *gradual* warmup in front of any schedule, replacing or shifting it.

    With W = ``warmup_steps``, η₀ = ``initial_learning_rate``; ``shift=False`` (default,
    Goyal's "warmup replaces"), target η̂ = after_warmup(W):

        lr(s) = η₀ + (η̂ − η₀)·s/W   for s < W
        lr(s) = after_warmup(s)       for s ≥ W

    ``shift=True`` (Keras / optax: the wrapped schedule starts when the warmup ends),
    η̂ = after_warmup(0):

        lr(s) = η₀ + (η̂ − η₀)·s/W   for s < W
        lr(s) = after_warmup(s − W)   for s ≥ W

    Args:
      after_warmup: a float or any Keras `LearningRateSchedule`.
      warmup_steps: W ≥ 0 (0 disables the warmup).
      initial_learning_rate: η₀ ≥ 0, the rate at step 0.
      shift: whether the wrapped schedule runs from its own step 0 after the warmup.
      name: name scope of the ops.

    Raises:
      ValueError: naming the argument and value, for negative steps or rates, and when
        ``shift=False`` and the wrapped schedule is already 0 at step W (it has decayed
        away during the warmup: a silent zero learning rate; use ``shift=True``).

    Example:
      >>> s = LinearWarmup(3.2, warmup_steps=100, initial_learning_rate=0.1)
      >>> round(float(s(50)), 4)  # halfway: 0.1 + (3.2 − 0.1)/2
      1.65
      >>> cosine = keras.optimizers.schedules.CosineDecay(10.0, 1000)
      >>> round(float(LinearWarmup(cosine, 2000, shift=True)(2000)), 4)  # cosine(0)
      10.0

    References:
      Goyal et al. 2017 §2.2, "Gradual warmup".
    """

    def __init__(
        self,
        after_warmup: float | Schedule,
        warmup_steps: int,
        initial_learning_rate: float = 0.0,
        shift: bool = False,
        name: str = "LinearWarmup",
    ) -> None:
        super().__init__(after_warmup, warmup_steps, name)
        check_non_negative("initial_learning_rate", initial_learning_rate)
        if not isinstance(shift, bool):
            raise ValueError(f"Argument `shift` must be a bool. Received: shift={shift!r}")
        self.initial_learning_rate = initial_learning_rate
        self.shift = shift
        if not shift and warmup_steps > 0 and isinstance(after_warmup, Schedule):
            target = float(ops.convert_to_numpy(after_warmup(warmup_steps)))
            if not target > 0:
                raise ValueError(
                    f"Argument `after_warmup` is {target:g} at the end of the warmup (step "
                    f"{warmup_steps}): the warmup replaces its first steps (shift=False), so it "
                    "would train at a rate of 0 from there. Pass shift=True to start it after "
                    f"the warmup, or a shorter warmup. Received: after_warmup={after_warmup!r}, "
                    f"warmup_steps={warmup_steps}"
                )

    def __call__(self, step: Any) -> Any:
        with keras.name_scope(self.name):
            dtype = _DTYPE
            step = ops.cast(step, dtype)
            if self.warmup_steps == 0:
                return _value(self.after_warmup, step, dtype)
            w = _const(self.warmup_steps, dtype)
            init = _const(self.initial_learning_rate, dtype)
            if self.shift:
                target = _value(self.after_warmup, _const(0, dtype), dtype)
                after = _value(self.after_warmup, ops.maximum(step - w, 0.0), dtype)
            else:
                target = _value(self.after_warmup, w, dtype)
                after = _value(self.after_warmup, step, dtype)
            ramp = init + (target - init) * step / w
            return ops.where(step < w, ramp, after)

    def get_config(self) -> dict[str, Any]:
        return {
            "after_warmup": _serialize(self.after_warmup),
            "warmup_steps": self.warmup_steps,
            "initial_learning_rate": self.initial_learning_rate,
            "shift": self.shift,
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
      >>> round(float(ConstantWarmup(3.2, warmup_steps=100, warmup_learning_rate=0.1)(99)), 4)
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
        with keras.name_scope(self.name):
            dtype = _DTYPE
            step = ops.cast(step, dtype)
            after = _value(self.after_warmup, step, dtype)
            warm = _const(self.warmup_learning_rate, dtype)
            return ops.where(step < _const(self.warmup_steps, dtype), warm, after)

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


@_register
class InverseSqrtDecay(Schedule):
    """The Transformer's schedule: linear warmup to a peak, then decay as 1/√step.

    With η̂ = ``peak_learning_rate`` and W = ``warmup_steps``:

        lr(s) = η̂·s/W         for s < W   (0 at step 0)
        lr(s) = η̂·√(W/s)      for s ≥ W   (η̂ at W, η̂/2 at 4W)

    Vaswani et al. write it as d_model^−0.5·min(s^−0.5, s·W^−1.5), i.e. η̂ = (d_model·W)^−0.5.

    Args:
      peak_learning_rate: η̂ > 0, the rate at step W.
      warmup_steps: W > 0.
      name: name scope of the ops.

    Raises:
      ValueError: naming the argument and value, for η̂ ≤ 0 or W not an integer > 0.

    Example:
      >>> s = InverseSqrtDecay(1e-3, warmup_steps=4000)
      >>> [round(float(s(i)), 6) for i in (2000, 4000, 16000)]
      [0.0005, 0.001, 0.0005]

    References:
      Vaswani et al. 2017, "Attention Is All You Need", §5.3.
    """

    def __init__(
        self, peak_learning_rate: float, warmup_steps: int, name: str = "InverseSqrtDecay"
    ) -> None:
        super().__init__()
        check_positive("peak_learning_rate", peak_learning_rate)
        check_positive_int("warmup_steps", warmup_steps)
        self.peak_learning_rate = peak_learning_rate
        self.warmup_steps = warmup_steps
        self.name = name

    def __call__(self, step: Any) -> Any:
        with keras.name_scope(self.name):
            dtype = _DTYPE
            step = ops.cast(step, dtype)
            peak = _const(self.peak_learning_rate, dtype)
            w = _const(self.warmup_steps, dtype)
            decay = peak * ops.sqrt(w / ops.maximum(step, w))
            return ops.where(step < w, peak * step / w, decay)

    def get_config(self) -> dict[str, Any]:
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "warmup_steps": self.warmup_steps,
            "name": self.name,
        }


@_register
class WarmupStableDecay(Schedule):
    """Warmup-stable-decay (WSD): linear warmup, a long constant stage, a short decay.

    With η̂ = ``peak_learning_rate``, η_f = ``final_learning_rate``, W, S, D the warmup,
    stable and decay steps, and t = (s − W − S)/D:

        lr(s) = η̂·s/W                  for s < W
        lr(s) = η̂                      for W ≤ s < W + S
        lr(s) = η_f + (η̂ − η_f)·f(t)   for W + S ≤ s < W + S + D
        lr(s) = η_f                    for s ≥ W + S + D

    f(t) = 1 − t (``"linear"``), ½(1 + cos πt) (``"cosine"``) or 1 − √t (``"sqrt"``, the
    cooldown of Hägele et al. 2024). The stable stage can be resumed from or extended, and a
    decay branched off at any step, without retraining the warmup.

    Args:
      peak_learning_rate: η̂ > 0.
      warmup_steps: W ≥ 0.
      stable_steps: S ≥ 0.
      decay_steps: D ≥ 0.
      final_learning_rate: η_f in [0, η̂].
      decay: ``"linear"``, ``"cosine"`` or ``"sqrt"``.
      name: name scope of the ops.

    Raises:
      ValueError: naming the argument and value.

    Example:
      >>> s = WarmupStableDecay(1.0, warmup_steps=10, stable_steps=80, decay_steps=10)
      >>> [round(float(s(i)), 4) for i in (5, 10, 89, 95, 100)]
      [0.5, 1.0, 1.0, 0.5, 0.0]

    References:
      Hu et al. 2024, "MiniCPM: Unveiling the Potential of Small Language Models", §4.
    """

    def __init__(
        self,
        peak_learning_rate: float,
        warmup_steps: int,
        stable_steps: int,
        decay_steps: int,
        final_learning_rate: float = 0.0,
        decay: str = "linear",
        name: str = "WarmupStableDecay",
    ) -> None:
        super().__init__()
        check_positive("peak_learning_rate", peak_learning_rate)
        check_non_negative_int("warmup_steps", warmup_steps)
        check_non_negative_int("stable_steps", stable_steps)
        check_non_negative_int("decay_steps", decay_steps)
        check_non_negative("final_learning_rate", final_learning_rate)
        if final_learning_rate > peak_learning_rate:
            raise ValueError(
                f"Argument `final_learning_rate` must be <= peak_learning_rate "
                f"({peak_learning_rate}). Received: final_learning_rate={final_learning_rate}"
            )
        check_choice("decay", decay, WSD_DECAYS)
        self.peak_learning_rate = peak_learning_rate
        self.warmup_steps = warmup_steps
        self.stable_steps = stable_steps
        self.decay_steps = decay_steps
        self.final_learning_rate = final_learning_rate
        self.decay = decay
        self.name = name

    def __call__(self, step: Any) -> Any:
        with keras.name_scope(self.name):
            dtype = _DTYPE
            step = ops.cast(step, dtype)
            peak = _const(self.peak_learning_rate, dtype)
            final = _const(self.final_learning_rate, dtype)
            w = _const(self.warmup_steps, dtype)
            decay_start = _const(self.warmup_steps + self.stable_steps, dtype)
            d = _const(max(self.decay_steps, 1), dtype)
            t = ops.clip((step - decay_start) / d, 0.0, 1.0)
            if self.decay == "linear":
                f = 1.0 - t
            elif self.decay == "cosine":
                f = 0.5 * (1.0 + ops.cos(_const(math.pi, dtype) * t))
            else:
                f = 1.0 - ops.sqrt(t)
            decayed = final + (peak - final) * f
            if self.decay_steps == 0:
                decayed = ops.where(step < decay_start, peak, final)
            warm = peak * step / ops.maximum(w, 1.0)
            return ops.where(step < w, warm, ops.where(step < decay_start, peak, decayed))

    def get_config(self) -> dict[str, Any]:
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "warmup_steps": self.warmup_steps,
            "stable_steps": self.stable_steps,
            "decay_steps": self.decay_steps,
            "final_learning_rate": self.final_learning_rate,
            "decay": self.decay,
            "name": self.name,
        }
