r"""Statistical efficiency from the gradient noise scale, goodput and time to a target.

Pure Python (no TensorFlow); part of the goodput model (`tf_largebatch.goodput`). With B_noise
≈ the measured B_simple (McCandlish et al. 2018): examples to a target E(B) = E_min·(1 +
B/B_noise), steps S(B) = S_min·(1 + B_noise/B); efficiency relative to a batch B₀ is
E(B₀)/E(B); goodput = examples/s × efficiency (Pollux's definition, Qiao et al. 2021); time to
target = E(B)/(examples/s).

References:
  McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training", §2.2–2.3
    (B_simple, E = E_min(1 + B/B_noise), S = S_min(1 + B_noise/B)).
  Qiao et al. 2021, "Pollux: Co-adaptive Cluster Scheduling for Goodput-Optimized Deep
    Learning", §3 (goodput = throughput × statistical efficiency).
"""

from __future__ import annotations

from tf_largebatch._validation import check_non_negative, check_positive


def examples_to_target(global_batch_size: float, noise_scale: float, min_examples: float) -> float:
    """E(B) = E_min·(1 + B/B_noise) (McCandlish et al. 2018, §2.3: the fit
    (S/S_min − 1)(E/E_min − 1) = 1 with B_crit = E_min/S_min ≈ B_noise).

    Example:
      >>> examples_to_target(200, 100, 1e6)
      3000000.0
    """
    check_positive("global_batch_size", global_batch_size)
    check_positive("noise_scale", noise_scale)
    check_positive("min_examples", min_examples)
    return min_examples * (1.0 + global_batch_size / noise_scale)


def steps_to_target(global_batch_size: float, noise_scale: float, min_steps: float) -> float:
    """S(B) = S_min·(1 + B_noise/B) (McCandlish et al. 2018, §2.3: the fit
    (S/S_min − 1)(E/E_min − 1) = 1 with B_crit = E_min/S_min ≈ B_noise).

    Example:
      >>> steps_to_target(50, 100, 1000)
      3000.0
    """
    check_positive("global_batch_size", global_batch_size)
    check_positive("noise_scale", noise_scale)
    check_positive("min_steps", min_steps)
    return min_steps * (1.0 + noise_scale / global_batch_size)


def min_examples_from_reference(
    reference_examples: float, reference_batch_size: float, noise_scale: float
) -> float:
    """E_min = E(B_ref)/(1 + B_ref/B_noise) from a run known to reach the target at B_ref.

    Example:
      >>> min_examples_from_reference(3e6, 200, 100)
      1000000.0
    """
    check_positive("reference_examples", reference_examples)
    check_positive("reference_batch_size", reference_batch_size)
    check_positive("noise_scale", noise_scale)
    return reference_examples / (1.0 + reference_batch_size / noise_scale)


def statistical_efficiency(
    global_batch_size: float, noise_scale: float, base_batch_size: float
) -> float:
    """Examples needed at B₀ over examples needed at B: E(B₀)/E(B) = (B_noise + B₀)/(B_noise + B).

    1 at B = B₀, ½ at B = B_noise + 2B₀; Pollux's EFFICIENCY (Qiao et al. 2021, §3).

    Example:
      >>> statistical_efficiency(300, 100, 100)
      0.5
    """
    check_positive("global_batch_size", global_batch_size)
    check_positive("noise_scale", noise_scale)
    check_positive("base_batch_size", base_batch_size)
    return (noise_scale + base_batch_size) / (noise_scale + global_batch_size)


def goodput(
    examples_per_second: float, global_batch_size: float, noise_scale: float, base_batch_size: float
) -> float:
    """Goodput = examples/s × statistical efficiency: useful examples/s measured at B₀."""
    check_non_negative("examples_per_second", examples_per_second)
    return examples_per_second * statistical_efficiency(
        global_batch_size, noise_scale, base_batch_size
    )


def time_to_target_seconds(
    examples_per_second: float, global_batch_size: float, noise_scale: float, min_examples: float
) -> float:
    """E(B)/(examples/s) = E_min·(1 + B/B_noise)/X."""
    check_positive("examples_per_second", examples_per_second)
    return examples_to_target(global_batch_size, noise_scale, min_examples) / examples_per_second
