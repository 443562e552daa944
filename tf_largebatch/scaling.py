"""Learning-rate scaling rules and the SGD noise scale (pure Python, no TensorFlow).

References:
  Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", §2.1.
  Smith, Kindermans, Ying & Le 2018, "Don't Decay the Learning Rate, Increase the Batch Size", §3.
"""

from __future__ import annotations

import math

from tf_largebatch._validation import check_choice, check_momentum, check_positive

SCALING_RULES = ("linear", "sqrt", "none")


def scale_learning_rate(
    base_learning_rate: float,
    global_batch_size: int,
    base_batch_size: int = 256,
    rule: str = "linear",
) -> float:
    """Scales a reference learning rate to a global batch size.

    With k = global_batch_size / base_batch_size:

    - ``"linear"``: η·k (Goyal et al. §2.1, the Linear Scaling Rule);
    - ``"sqrt"``: η·√k (keeps the variance of the update; often better for Adam);
    - ``"none"``: η.

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
