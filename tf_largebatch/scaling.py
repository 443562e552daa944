"""Learning-rate scaling rules and the SGD noise scale (pure Python, no TensorFlow).

Which rule: ``"linear"`` for SGD with momentum and LARS (Goyal et al.), ``"sqrt"`` as the
default suggestion for Adam, AdamW and LAMB (Malladi et al. 2022); see `suggested_scaling_rule`
and ``docs/ADAM.md``.

References:
  Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", §2.1.
  Smith, Kindermans, Ying & Le 2018, "Don't Decay the Learning Rate, Increase the Batch Size", §3.
  Malladi, Lyu, Panigrahi & Arora 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
  Algorithms" (NeurIPS), the square-root scaling rule for Adam and RMSprop.
  You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes"
  (LAMB, trained with square-root learning-rate scaling).
"""

from __future__ import annotations

import math

from tf_largebatch._validation import check_choice, check_momentum, check_positive

SCALING_RULES = ("linear", "sqrt", "none")
#: Optimizers whose step is normalised by a second-moment estimate: square-root rule.
ADAPTIVE_OPTIMIZERS = ("adam", "adamw", "lamb")
#: SGD-family optimizers: linear rule.
SGD_OPTIMIZERS = ("sgd", "lars")


def scale_learning_rate(
    base_learning_rate: float,
    global_batch_size: int,
    base_batch_size: int = 256,
    rule: str = "linear",
) -> float:
    """Scales a reference learning rate to a global batch size.

    With k = global_batch_size / base_batch_size:

    - ``"linear"``: η·k (Goyal et al. §2.1, the Linear Scaling Rule) — for SGD with
      momentum and LARS;
    - ``"sqrt"``: η·√k (Malladi et al. 2022's square-root rule) — the default suggestion for
      Adam, AdamW and LAMB when the batch grows (`suggested_scaling_rule`);
    - ``"none"``: η.

    Malladi et al.'s full rule for Adam also moves the moment decays and ε
    (1 − β₁ → k(1 − β₁), 1 − β₂ → k(1 − β₂), ε → ε/√k); only the learning rate is scaled
    here (the common practice): to follow the rule fully, change β₁, β₂ and ε yourself.

    Args:
      base_learning_rate: η, the learning rate tuned for ``base_batch_size`` examples.
      global_batch_size: the batch summed over all replicas, kn.
      base_batch_size: the reference batch n that η was tuned for.
      rule: one of ``"linear"``, ``"sqrt"``, ``"none"``.

    Returns:
      The scaled learning rate.

    Raises:
      ValueError: a non-positive rate or batch size, or an unknown rule.

    Example:
      >>> scale_learning_rate(0.1, 8192)
      3.2
    """
    check_positive("base_learning_rate", base_learning_rate)
    check_positive("global_batch_size", global_batch_size)
    check_positive("base_batch_size", base_batch_size)
    check_choice("rule", rule, SCALING_RULES)
    k = global_batch_size / base_batch_size
    if rule == "linear":
        return base_learning_rate * k
    if rule == "sqrt":
        return base_learning_rate * math.sqrt(k)
    return float(base_learning_rate)


def noise_scale(
    learning_rate: float, dataset_size: int, global_batch_size: int, momentum: float = 0.0
) -> float:
    """The SGD noise scale g = ε·(N/B − 1)/(1 − m) (Smith et al. 2018, eq. 7 and §5.4).

    For B ≪ N it is ≈ εN/(B(1 − m)): dividing ε by a factor or multiplying B by the same factor
    changes g alike, which is why batch growth can replace learning-rate decay.

    Args:
      learning_rate: ε.
      dataset_size: N, training examples.
      global_batch_size: B.
      momentum: m in [0, 1).

    Returns:
      The noise scale g.

    Raises:
      ValueError: non-positive numbers, B > N, or m outside [0, 1).

    Example:
      >>> round(noise_scale(0.1, 50_000, 128, momentum=0.9), 3)
      389.625
    """
    check_positive("learning_rate", learning_rate)
    check_positive("dataset_size", dataset_size)
    check_positive("global_batch_size", global_batch_size)
    check_momentum("momentum", momentum)
    if global_batch_size > dataset_size:
        raise ValueError(
            "Argument `global_batch_size` must be <= dataset_size "
            f"({dataset_size}). Received: global_batch_size={global_batch_size}"
        )
    return learning_rate * (dataset_size / global_batch_size - 1.0) / (1.0 - momentum)


def suggested_scaling_rule(optimizer: str) -> str:
    """The learning-rate scaling rule to start from for an optimizer when the batch grows.

    - ``"adam"``, ``"adamw"``, ``"lamb"`` → ``"sqrt"``: an adaptive optimizer divides the step
      by the root of the gradients' second moment, so its SDE matches across batch sizes when
      η grows as √k (Malladi et al. 2022); You et al. 2020 train BERT with LAMB up to 64k this
      way. Prefer ``"linear"`` only where a short run at both batch sizes shows it trains as
      well (small k, or after a warmup long enough that the moment estimates have settled).
    - ``"sgd"``, ``"lars"`` → ``"linear"`` (Goyal et al. §2.1; Smith et al. §3: the noise scale
      εN/B stays fixed when ε grows with B).

    Either rule holds while the batch is below the critical batch size (McCandlish et al.
    2018); beyond it, larger batches stop saving steps and no rule keeps the loss curve.

    Args:
      optimizer: the optimizer's name, any case.

    Returns:
      ``"sqrt"`` or ``"linear"``.

    Raises:
      ValueError: an optimizer name not listed above.

    Example:
      >>> suggested_scaling_rule("AdamW"), suggested_scaling_rule("sgd")
      ('sqrt', 'linear')
    """
    name = optimizer.lower() if isinstance(optimizer, str) else optimizer
    check_choice("optimizer", name, ADAPTIVE_OPTIMIZERS + SGD_OPTIMIZERS)
    return "sqrt" if name in ADAPTIVE_OPTIMIZERS else "linear"
