"""Large-batch optimizers: SGD with momentum correction, LARS, and Keras's LAMB.

Both optimizers keep the momentum coefficient ``m`` in a float32 optimizer *variable*
(``optimizer.momentum``), so a training phase can change it in place with
``optimizer.set_momentum(0.98)`` (or ``optimizer.momentum.assign(0.98)``) without retracing a
compiled train step; it is saved with the other optimizer variables.

SGD with momentum correction (Goyal et al. 2017, §2.1 and Appendix). Keras's SGD keeps the
learning rate inside the velocity, ``v ← m·v − η·g; w ← w + v``, so after a change of η the
step follows the old rate for ~1/(1−m) steps. Momentum correction rescales v by η_{t+1}/η_t; the
equivalent form used here keeps a learning-rate-free buffer u (velocity ≡ −η_t·u_t)::

    u ← m·u + g
    w ← w − η_t·u                 (nesterov: w ← w − η_t·(g + m·u))

LARS (You et al. 2017) adapts the rate per variable with a trust ratio::

    local_lr = η·trust_coefficient·‖w‖ / (‖g‖ + λ‖w‖ + epsilon)    (η if ‖w‖ = 0)
    v ← m·v + local_lr·(g + λ·w)
    w ← w − v                     (nesterov: w ← w − (m·v + local_lr·(g + λ·w)))

References:
  Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", §2.1 and
  Appendix (momentum correction).
  You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks" (LARS).
  You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes"
  (LAMB; re-exported from Keras).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from tf_largebatch._validation import check_momentum, check_non_negative, check_positive

__all__ = ["LARS", "SGD", "Lamb"]

LearningRate = float | keras.optimizers.schedules.LearningRateSchedule | Callable[[], Any]
_register = keras.saving.register_keras_serializable(package="tf_largebatch")

#: Keras 3's own LAMB optimizer (You et al. 2020), re-exported unchanged.
Lamb = keras.optimizers.Lamb


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Argument `{name}` must be a bool. Received: {name}={value!r}")


class _MomentumVariable:
    """Mixin: the momentum coefficient as a non-trainable float32 scalar optimizer variable.

    The variable is created in ``__init__`` (like Keras's own ``learning_rate`` variable), so it
    exists before ``build()``, is mirrored when the optimizer is created under a
    ``tf.distribute`` scope, and is saved and restored with the optimizer's variables.
    """

    momentum: Any

    def _create_momentum(self, momentum: float) -> None:
        check_momentum("momentum", momentum)
        self.momentum = self.add_variable(  # type: ignore[attr-defined]
            shape=(),
            initializer=keras.initializers.Constant(float(momentum)),
            dtype="float32",
            aggregation="only_first_replica",
            name="momentum",
        )

    def set_momentum(self, value: float) -> None:
        """Sets the momentum coefficient in place (no retrace of compiled steps).

        Args:
            value: New momentum coefficient in [0, 1).

        Raises:
            ValueError: If ``value`` is not in [0, 1). (``optimizer.momentum.assign`` does
                not validate.)
        """
        check_momentum("momentum", value)
        self.momentum.assign(float(value))

    def _momentum_value(self) -> float:
        # Shortest decimal that maps back to the same float32 (0.9, not 0.8999999761581421).
        return float(str(np.float32(ops.convert_to_numpy(self.momentum))))


@_register
class SGD(_MomentumVariable, keras.optimizers.Optimizer):
    """SGD with momentum, optional momentum correction and an in-place changeable momentum.

    With ``momentum_correction=True`` (default) the learning rate is kept out of the
    velocity (Goyal et al. §2.1/Appendix), so a change of η takes effect on the very next step::

        u ← m·u + g;   w ← w − η_t·u              (nesterov: w ← w − η_t·(g + m·u))

    With ``momentum_correction=False`` it is exactly Keras's ``keras.optimizers.SGD``::

        v ← m·v − η_t·g;   w ← w + v              (nesterov: w ← w + m·v − η_t·g)

    Both forms coincide while η is constant. ``weight_decay`` is Keras's decoupled weight
    decay, applied by the base optimizer *before* the update above: ``w ← w − λ·η_t·w``.

    Args:
        learning_rate: Float, ``LearningRateSchedule`` or zero-argument callable. η.
        momentum: Initial momentum coefficient m in [0, 1). Lives in the float32 variable
            ``self.momentum``; change it with ``set_momentum``.
        nesterov: Whether to use Nesterov momentum.
        momentum_correction: Whether to keep η out of the velocity (see above).
        weight_decay: Optional decoupled weight decay λ (Keras semantics, see above).
        name: Optimizer name (variable-name scope).
        **kwargs: Other ``keras.optimizers.Optimizer`` arguments (``clipnorm``, ``use_ema``,
            ``gradient_accumulation_steps``, ...).

    Raises:
        ValueError: If ``momentum`` is not in [0, 1) or a flag is not a bool.

    Example:
        >>> opt = SGD(learning_rate=0.1, momentum=0.9)
        >>> opt.set_momentum(0.98)  # e.g. when a later training phase starts

    References:
        Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour",
        §2.1 and Appendix (momentum correction).
    """

    def __init__(
        self,
        learning_rate: LearningRate = 0.01,
        momentum: float = 0.9,
        nesterov: bool = False,
        momentum_correction: bool = True,
        weight_decay: float | None = None,
        name: str = "SGD",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            learning_rate=learning_rate, weight_decay=weight_decay, name=name, **kwargs
        )
        _check_bool("nesterov", nesterov)
        _check_bool("momentum_correction", momentum_correction)
        self._create_momentum(momentum)
        self.nesterov = nesterov
        self.momentum_correction = momentum_correction

    def build(self, variables: Sequence[Any]) -> None:
        """Creates one momentum buffer per variable (always: m may become > 0 later)."""
        if self.built:
            return
        super().build(variables)
        self.velocities = self.add_optimizer_variables(variables, "velocity")

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """Applies one update to ``variable`` (formulas in the class docstring)."""
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        g = ops.cast(gradient, dtype)
        m = ops.cast(self.momentum, dtype)
        buf = self.velocities[self._get_variable_index(variable)]
        if self.momentum_correction:
            self.assign(buf, ops.add(ops.multiply(m, buf), g))  # u ← m·u + g
            step = ops.add(g, ops.multiply(m, buf)) if self.nesterov else buf
            self.assign_sub(variable, ops.multiply(lr, step))
        else:
            self.assign(buf, ops.subtract(ops.multiply(m, buf), ops.multiply(lr, g)))
            if self.nesterov:
                step = ops.subtract(ops.multiply(m, buf), ops.multiply(lr, g))
                self.assign_add(variable, step)
            else:
                self.assign_add(variable, buf)

    def get_config(self) -> dict[str, Any]:
        """Constructor kwargs; ``momentum`` is the variable's *current* value."""
        config = super().get_config()
        config.update(
            {
                "momentum": self._momentum_value(),
                "nesterov": self.nesterov,
                "momentum_correction": self.momentum_correction,
            }
        )
        return config


@_register
class LARS(_MomentumVariable, keras.optimizers.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017), momentum in a variable.

    For each variable w with gradient g (already all-reduced across replicas)::

        local_lr = η·trust_coefficient·‖w‖ / (‖g‖ + λ‖w‖ + epsilon)
                   (= η only when ‖w‖ = 0, as in the TF Model Garden and optax)

    The formula holds whenever ‖w‖ > 0, a zero gradient included: with g = 0 and λ > 0 the
    step is local_lr·λw = η·trust_coefficient·w·λ‖w‖/(λ‖w‖ + epsilon), ≈ η·trust_coefficient·w
    (continuous as ‖g‖ → 0). When the denominator is 0 (g = 0, λ = 0, epsilon = 0) the step
    g + λw is 0 and the ratio is taken as 1.
        v ← m·v + local_lr·(g + λ·w)
        w ← w − v                 (nesterov: w ← w − (m·v + local_lr·(g + λ·w)))

    Variables excluded from layer adaptation get neither the trust ratio nor weight decay:
    ``v ← m·v + η·g``. ``weight_decay`` λ is this L2 term inside the update, *not* Keras's
    decoupled weight decay (the base optimizer's decay is disabled, and its
    ``exclude_from_weight_decay()`` has no effect here).

    The relative change of an adapted variable per step is about
    η·trust_coefficient/(1 − m), so η is much larger than for SGD (e.g. ~1–10).

    Args:
        learning_rate: Float, ``LearningRateSchedule`` or zero-argument callable. Global η.
            Defaults to 1.0 (relative step ≈ 1e-2 with the other defaults).
        momentum: Initial momentum coefficient m in [0, 1), a variable as in ``SGD``.
        weight_decay: λ >= 0, or None for 0. Defaults to 1e-4 (the ImageNet ResNet-50 value
            of Goyal et al. 2017).
        trust_coefficient: η_LARS in the trust ratio, > 0. Defaults to 0.001 (You et al.).
        epsilon: >= 0, added to the trust-ratio denominator.
        exclude_from_layer_adaptation: Regex patterns; a variable whose ``path`` (or ``name``)
            matches any is excluded. None (default) excludes variables of rank <= 1
            (biases, BatchNorm γ/β). ``[]`` adapts every variable.
        nesterov: Whether to use Nesterov momentum.
        name: Optimizer name (variable-name scope).
        **kwargs: Other ``keras.optimizers.Optimizer`` arguments except ``weight_decay``.

    Raises:
        ValueError: On a momentum outside [0, 1), ``trust_coefficient <= 0``, negative
            ``epsilon``/``weight_decay``, or patterns that are not valid regex strings.

    Example:
        >>> opt = LARS(learning_rate=2.0, momentum=0.9, weight_decay=5e-4)

    References:
        You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks".
    """

    def __init__(
        self,
        learning_rate: LearningRate = 1.0,
        momentum: float = 0.9,
        weight_decay: float | None = 1e-4,
        trust_coefficient: float = 0.001,
        epsilon: float = 0.0,
        exclude_from_layer_adaptation: Sequence[str] | None = None,
        nesterov: bool = False,
        name: str = "LARS",
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, weight_decay=None, name=name, **kwargs)
        if weight_decay is not None:
            check_non_negative("weight_decay", weight_decay)
        check_positive("trust_coefficient", trust_coefficient)
        check_non_negative("epsilon", epsilon)
        _check_bool("nesterov", nesterov)
        patterns = exclude_from_layer_adaptation
        if patterns is not None:
            if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
                raise ValueError(
                    "Argument `exclude_from_layer_adaptation` must be None or a list of regex "
                    f"strings. Received: exclude_from_layer_adaptation={patterns!r}"
                )
            for p in patterns:
                try:
                    re.compile(p)
                except re.error as err:
                    raise ValueError(
                        "Argument `exclude_from_layer_adaptation` contains an invalid regex "
                        f"({err}). Received: exclude_from_layer_adaptation={patterns!r}"
                    ) from err
            patterns = tuple(patterns)
        self._create_momentum(momentum)
        # Same name as the kwarg; the base's decoupled decay is switched off by
        # `_apply_weight_decay` below (it would otherwise read this attribute).
        self.weight_decay = weight_decay
        self.trust_coefficient = trust_coefficient
        self.epsilon = epsilon
        self.exclude_from_layer_adaptation = patterns
        self.nesterov = nesterov

    def _apply_weight_decay(self, variables: Any) -> None:
        """No decoupled decay: λ enters the LARS update itself."""
        return None

    def _adapts(self, variable: Any) -> bool:
        """Whether ``variable`` gets the trust ratio and weight decay."""
        if self.exclude_from_layer_adaptation is None:
            return len(variable.shape) > 1
        path = getattr(variable, "path", None) or variable.name
        return not any(re.search(p, path) for p in self.exclude_from_layer_adaptation)

    def build(self, variables: Sequence[Any]) -> None:
        """Creates one velocity per variable and records which variables are adapted."""
        if self.built:
            return
        super().build(variables)
        self.velocities = self.add_optimizer_variables(variables, "velocity")
        self._adapted = tuple(self._adapts(v) for v in variables)

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """Applies one update to ``variable`` (formulas in the class docstring)."""
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        g = ops.cast(gradient, dtype)
        m = ops.cast(self.momentum, dtype)
        index = self._get_variable_index(variable)
        v = self.velocities[index]
        if self._adapted[index]:
            lam = ops.cast(self.weight_decay or 0.0, dtype)
            w_norm = ops.sqrt(ops.sum(ops.square(variable)))
            g_norm = ops.sqrt(ops.sum(ops.square(g)))
            denominator = ops.add(ops.add(g_norm, ops.multiply(lam, w_norm)), self.epsilon)
            one = ops.ones_like(w_norm)
            defined = ops.logical_and(ops.greater(w_norm, 0), ops.greater(denominator, 0))
            ratio = ops.divide(
                ops.multiply(self.trust_coefficient, w_norm), ops.where(defined, denominator, one)
            )
            ratio = ops.where(defined, ratio, one)
            local_lr = ops.multiply(lr, ratio)
            g = ops.add(g, ops.multiply(lam, variable))
        else:
            local_lr = lr
        scaled_g = ops.multiply(local_lr, g)
        self.assign(v, ops.add(ops.multiply(m, v), scaled_g))
        if self.nesterov:
            self.assign_sub(variable, ops.add(ops.multiply(m, v), scaled_g))
        else:
            self.assign_sub(variable, v)

    def get_config(self) -> dict[str, Any]:
        """Constructor kwargs; ``momentum`` is the variable's *current* value."""
        config = super().get_config()
        patterns = self.exclude_from_layer_adaptation
        config.update(
            {
                "momentum": self._momentum_value(),
                "weight_decay": self.weight_decay,
                "trust_coefficient": self.trust_coefficient,
                "epsilon": self.epsilon,
                "exclude_from_layer_adaptation": None if patterns is None else list(patterns),
                "nesterov": self.nesterov,
            }
        )
        return config
