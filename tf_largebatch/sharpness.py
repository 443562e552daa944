"""Sharpness of a trained model: the top Hessian eigenvalue and the loss rise under perturbation.

Large batches, Keskar et al. argue, drive SGD to *sharp* minima of the training loss, which
generalise worse. This module measures two sharpness figures of the mean training loss

    L(w) = (1/N) Σᵢ ℓ(f(xᵢ; w), yᵢ)

over the trainable weights w, on the whole training set (or its first `max_examples`):

* the largest Hessian eigenvalue λ_max(∇²L(w)), by power iteration on Hessian-vector
  products (HVPs) computed exactly by double backprop (Pearlmutter's R-operator):
  Hv = ∇_w (∇_w L(w) · v), summed over batches;
* the mean loss rise E_δ[L(w + δ) − L(w)] under random perturbations δ of fixed *relative*
  size per variable (layer-wise): δ_v = ρ‖w_v‖ · g_v/‖g_v‖ with g_v ~ N(0, I), so
  ‖δ_v‖ = ρ‖w_v‖ for every trainable variable v. To second order the rise is
  ∇L·δ + ½δᵀHδ, whose expectation is ½ Σ_v (ρ‖w_v‖)²/n_v · tr(H_vv) (n_v entries in v):
  a trace-weighted, scale-invariant companion to λ_max.

Distributed like evaluation: each global batch is split across the replicas of `strategy`
(`experimental_distribute_dataset`, data sharding; the last batch of a pass is padded with
zero-weight examples), every replica returns weighted sums over its examples (of losses, of
HVPs), the sums are reduced across replicas with SUM and divided by the total number of
examples N, so the figures do not depend on the number of replicas (nor on the batch size).

References:
  Keskar et al. 2017, "On Large-Batch Training for Deep Learning: Generalization Gap and Sharp
    Minima", ICLR, §2.1 and §3 (sharpness, large batches converge to sharp minimisers).
  Pearlmutter 1994, "Fast Exact Multiplication by the Hessian", Neural Computation 6(1).
  Golub & Van Loan, "Matrix Computations", §8.2 (the power method, Rayleigh quotient).
  Yao et al. 2020, "PyHessian: Neural Networks Through the Lens of the Hessian" (the same
    power iteration on the training set).
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_largebatch._validation import (
    _fail,
    check_non_negative,
    check_positive,
    check_positive_int,
)

__all__ = ["sharpness"]


def sharpness(
    model: keras.Model,
    x: Any,
    y: Any = None,
    *,
    loss: Any = None,
    global_batch_size: int = 1024,
    strategy: tf.distribute.Strategy | None = None,
    num_power_iterations: int = 20,
    tolerance: float = 1e-4,
    num_perturbations: int = 5,
    perturbation_size: float = 1e-3,
    seed: int = 0,
    max_examples: int | None = None,
) -> dict[str, Any]:
    """Measures the sharpness of `model` at its current weights on a training set.

    Power iteration (Golub & Van Loan §8.2): from a random unit v₀, repeat
    vₖ₊₁ = Hvₖ/‖Hvₖ‖ with the Rayleigh quotient λₖ = vₖᵀHvₖ as the estimate, where

        Hv = (1/N) Σ_batches ∇_w ( Σ_{i in batch} ∇_w ℓᵢ(w) · v )

    is the exact Hessian-vector product (Pearlmutter 1994) by double backprop. It stops after
    `num_power_iterations`, or earlier once |λₖ − λₖ₋₁| ≤ `tolerance`·|λₖ|. Power iteration
    finds the eigenvalue largest in *magnitude*: at a minimum (H ⪰ 0) that is λ_max; far from
    one a large negative eigenvalue can win (the sign of the result shows it).

    The perturbation figure is (1/K) Σₖ [L(w + δₖ) − L(w)] over K = `num_perturbations`
    layer-wise random directions, ‖δ_v‖ = ρ‖w_v‖ per trainable variable (ρ =
    `perturbation_size`; a variable that is all zero is not perturbed). The weights are
    restored bit-exactly afterwards.

    The loss is the data loss only, with the model in inference mode (``training=False``:
    BatchNorm moving statistics, no dropout); ``model.losses`` (weight decay) are not added.

    Args:
      model: A built Keras model (its variables may be mirrored by `strategy`).
      x: Inputs: an array, a dict (or list) of arrays for a multi-input model, or a
        `tf.data.Dataset` of ``(x, y)`` batches (then `y` must be None; finite, or cut by
        `max_examples`: it is counted once, then re-read every pass).
      y: Labels, same number of examples as `x`.
      loss: A Keras loss (object, name or ``fn(y_true, y_pred)`` returning per-example
        values). None: the model's compiled loss if it is compiled, else sparse categorical
        cross-entropy from logits.
      global_batch_size: Examples per step over all replicas, at most N (memory only: the
        result does not depend on it).
      strategy: The `tf.distribute.Strategy` to split batches over; None: the current one
        (`tf.distribute.get_strategy()`).
      num_power_iterations: Maximum number of HVPs (each one pass over the data, costing
        about two gradient passes).
      tolerance: Relative change of the eigenvalue estimate that stops the iteration early;
        0 runs all `num_power_iterations`.
      num_perturbations: K, random directions averaged.
      perturbation_size: ρ, the relative size ‖δ_v‖/‖w_v‖ of every variable's perturbation.
      seed: Seeds the power iteration's start vector and the perturbations.
      max_examples: Use only the first `max_examples` examples; None: all.

    Returns:
      A dict of plain Python numbers and lists (JSON-ready):
      ``hessian_top_eigenvalue`` (the last Rayleigh quotient λₖ),
      ``hessian_eigenvalue_estimates`` (λ₁ … λₖ, to judge convergence),
      ``hessian_power_iterations`` (k), ``hessian_relative_change`` (|λₖ − λₖ₋₁|/|λₖ|, None
      after one iteration), ``hessian_residual`` (‖Hv − λv‖/|λ| at the last v; small when
      v is an eigenvector, None if λ = 0),
      ``loss`` (L(w)), ``perturbed_loss_increase`` (the mean rise),
      ``perturbed_loss_increases`` (one per direction), ``perturbation_size``,
      ``num_examples`` (N) and ``num_parameters``.

    Raises:
      ValueError: a bad argument (named, with its value), mismatched or empty data, or a
        model without trainable weights.

    Note:
      Called outside a ``strategy.scope()`` with ``strategy=None`` it runs on one device, even
      for a model whose variables a strategy mirrors; pass that strategy to split the work.

    Example:
      >>> model = build_model("mlp", (40, 1), 10, seed=0)
      >>> result = sharpness(model, x_train, y_train, max_examples=2000)
      >>> result["hessian_top_eigenvalue"], result["perturbed_loss_increase"]

    References:
      Keskar et al. 2017, §2.1 (sharpness), §3 (large-batch minimisers are sharp).
      Pearlmutter 1994 (exact Hessian-vector products).
    """
    check_positive_int("global_batch_size", global_batch_size)
    check_positive_int("num_power_iterations", num_power_iterations)
    check_non_negative("tolerance", tolerance)
    check_positive_int("num_perturbations", num_perturbations)
    check_positive("perturbation_size", perturbation_size)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        _fail("seed", "an integer >= 0", seed)
    if max_examples is not None:
        check_positive_int("max_examples", max_examples)
    if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
        _fail("strategy", "a tf.distribute.Strategy or None", strategy)
    if not isinstance(model, keras.Model):
        _fail("model", "a keras.Model", model)
    variables = list(model.trainable_variables)
    if not variables:
        _fail("model", "a built model with trainable weights", model.name)
    per_example_loss = _per_example_loss(model, loss)
    examples, num_examples = _examples(x, y, max_examples)
    strategy = strategy or tf.distribute.get_strategy()
    evaluator = _Evaluator(
        model, variables, per_example_loss, strategy, examples, num_examples, global_batch_size
    )
    loss_sum, counted = evaluator.loss()
    if counted != num_examples:  # every example once per pass, on any number of replicas
        raise RuntimeError(f"Counted {counted} examples in a pass over {num_examples}.")
    base_loss = loss_sum / num_examples
    rng = np.random.default_rng(seed)

    estimates, relative_change, residual = _power_iteration(
        evaluator, variables, num_examples, num_power_iterations, tolerance, rng
    )
    increases = _perturbed_increases(
        evaluator, variables, base_loss, num_perturbations, perturbation_size, rng
    )
    return {
        "hessian_top_eigenvalue": estimates[-1],
        "hessian_eigenvalue_estimates": estimates,
        "hessian_power_iterations": len(estimates),
        "hessian_relative_change": relative_change,
        "hessian_residual": residual,
        "loss": base_loss,
        "perturbed_loss_increase": float(np.mean(increases)),
        "perturbed_loss_increases": increases,
        "perturbation_size": float(perturbation_size),
        "num_examples": num_examples,
        "num_parameters": int(sum(np.prod(v.shape) for v in variables)),
    }


def _per_example_loss(model: keras.Model, loss: Any) -> Callable[[Any, Any], tf.Tensor]:
    """ℓ(y, ŷ) per example: a Loss's unreduced ``call``, or a loss function."""
    if loss is None:
        if getattr(model, "compiled", False) and model.loss is not None:
            loss = model.loss
        else:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if isinstance(loss, (Mapping, list, tuple)):
        _fail("loss", "a single loss (one model output)", loss)
    if isinstance(loss, str):
        try:
            loss = keras.losses.get(loss)
        except ValueError:
            _fail("loss", "a Keras loss name, a keras.losses.Loss or a function", loss)
    if isinstance(loss, keras.losses.Loss):
        return loss.call
    if not callable(loss):
        _fail("loss", "a Keras loss name, a keras.losses.Loss or a function", loss)
    return loss


def _examples(x: Any, y: Any, max_examples: int | None) -> tuple[tf.data.Dataset, int]:
    """The (x, y) examples (the first `max_examples`) and their number N."""
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            _fail("y", "None when `x` is a tf.data.Dataset of (x, y) batches", type(y).__name__)
        spec = x.element_spec
        if not isinstance(spec, tuple) or len(spec) != 2:
            _fail("x", "a tf.data.Dataset of (x, y) batches", spec)
        examples = x.unbatch()
        if max_examples is not None:
            examples = examples.take(max_examples)
        count = int(examples.reduce(np.int64(0), lambda n, _: n + 1))
    else:
        if y is None:
            _fail("y", "labels for the arrays `x`", None)
        x = tf.nest.map_structure(np.asarray, x)
        y = np.asarray(y)
        sizes = {len(a) for a in tf.nest.flatten(x)} | {len(y)}
        if len(sizes) != 1:
            _fail("y", f"as many examples as `x` (sizes {sorted(sizes)})", y.shape)
        count = len(y) if max_examples is None else min(len(y), max_examples)
        examples = tf.data.Dataset.from_tensor_slices((x, y)).take(count)
    if count == 0:
        _fail("x", "at least one example", 0)
    return examples, count


def _padded_batches(examples: tf.data.Dataset, global_batch_size: int) -> tf.data.Dataset:
    """Endless full global batches of (x, y, weight): one epoch is ⌈N/B⌉ batches.

    The last batch of an epoch is padded with zeros (examples of weight 0), so every global
    batch splits across the replicas the same way, epoch after epoch, and one iterator serves
    every pass (creating an iterator per pass costs ~30 ms).
    """

    def pad(tensor: tf.Tensor) -> tf.Tensor:
        rows = global_batch_size - tf.shape(tensor)[0]
        padded = tf.pad(tensor, [[0, rows]] + [[0, 0]] * (tensor.shape.rank - 1))
        return tf.ensure_shape(padded, [global_batch_size, *tensor.shape[1:]])

    weighted = examples.map(lambda x, y: (x, y, tf.constant(1.0, tf.float32)))
    batches = weighted.batch(global_batch_size).map(lambda *b: tf.nest.map_structure(pad, b))
    dataset = batches.repeat()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


class _Evaluator:
    """Compiled passes over the distributed data: loss sums and Hessian-vector products."""

    def __init__(
        self,
        model: keras.Model,
        variables: list,
        per_example_loss: Callable[[Any, Any], tf.Tensor],
        strategy: tf.distribute.Strategy,
        examples: tf.data.Dataset,
        num_examples: int,
        global_batch_size: int,
    ) -> None:
        global_batch_size = min(global_batch_size, num_examples)  # pad no more than needed
        dataset = _padded_batches(examples, global_batch_size)
        self._iterator = iter(strategy.experimental_distribute_dataset(dataset))
        num_batches = -(-num_examples // global_batch_size)

        def batch_losses(x: Any, y: Any, weight: Any) -> tuple[tf.Tensor, tf.Tensor]:
            """(Σ wᵢℓᵢ, Σ wᵢ) over a replica's batch; a loss with extra axes is averaged."""
            y_pred = tf.cast(model(x, training=False), tf.float32)
            values = tf.cast(per_example_loss(y, y_pred), tf.float32)
            per_example = tf.reduce_mean(tf.reshape(values, [tf.shape(weight)[0], -1]), axis=1)
            return tf.reduce_sum(per_example * weight), tf.reduce_sum(weight)

        def replica_loss(x: Any, y: Any, weight: Any) -> tuple[tf.Tensor, tf.Tensor]:
            total, count = batch_losses(x, y, weight)
            return tf.cast(total, tf.float64), tf.cast(count, tf.float64)

        def replica_hvp(x: Any, y: Any, weight: Any, vector: tuple) -> list:
            with tf.GradientTape() as outer:
                with tf.GradientTape() as inner:
                    loss_sum, _ = batch_losses(x, y, weight)
                grads = inner.gradient(
                    loss_sum, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO
                )
                dot = tf.add_n(
                    [tf.reduce_sum(tf.cast(g, v.dtype) * v) for g, v in zip(grads, vector)]
                )
            hvp = outer.gradient(dot, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return [tf.cast(h, tf.float64) for h in hvp]

        def reduce(per_replica: Any) -> Any:
            return tf.nest.map_structure(
                lambda t: strategy.reduce(tf.distribute.ReduceOp.SUM, t, axis=None), per_replica
            )

        @tf.function
        def loss_pass(iterator: Any) -> tuple[tf.Tensor, tf.Tensor]:
            total = tf.zeros([], tf.float64)
            count = tf.zeros([], tf.float64)
            for _ in tf.range(num_batches):
                batch_total, batch_count = reduce(strategy.run(replica_loss, next(iterator)))
                total += batch_total
                count += batch_count
            return total, count

        @tf.function
        def hvp_pass(iterator: Any, vector: tuple) -> tuple:
            total = tuple(tf.zeros(v.shape, tf.float64) for v in variables)
            for _ in tf.range(num_batches):
                x, y, weight = next(iterator)
                hvp = reduce(strategy.run(replica_hvp, args=(x, y, weight, vector)))
                total = tuple(t + h for t, h in zip(total, hvp))
            return total

        self._loss_pass = loss_pass
        self._hvp_pass = hvp_pass
        self._dtypes = [tf.as_dtype(v.dtype) for v in variables]

    def loss(self) -> tuple[float, int]:
        """(Σᵢ ℓᵢ, N) over one epoch of the data, summed across replicas."""
        total, count = self._loss_pass(self._iterator)
        return float(total), int(round(float(count)))

    def hvp_sum(self, vector: list[np.ndarray]) -> list[np.ndarray]:
        """Σᵢ ∇²ℓᵢ v over one epoch, per variable, in float64."""
        tensors = tuple(tf.constant(v, dtype) for v, dtype in zip(vector, self._dtypes))
        return [h.numpy() for h in self._hvp_pass(self._iterator, tensors)]


def _dot(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(sum(np.vdot(u, v) for u, v in zip(a, b)))


def _power_iteration(
    evaluator: _Evaluator,
    variables: list,
    num_examples: int,
    num_iterations: int,
    tolerance: float,
    rng: np.random.Generator,
) -> tuple[list[float], float | None, float | None]:
    """Rayleigh quotients λ₁…λₖ, the last relative change and residual ‖Hv − λv‖/|λ|."""
    vector = [rng.standard_normal(tuple(v.shape)) for v in variables]
    norm = np.sqrt(_dot(vector, vector))
    vector = [v / norm for v in vector]
    estimates: list[float] = []
    relative_change: float | None = None
    residual: float | None = None
    for _ in range(num_iterations):
        hv = [h / num_examples for h in evaluator.hvp_sum(vector)]
        estimate = _dot(vector, hv)  # v is unit: the Rayleigh quotient
        diff = [h - estimate * v for h, v in zip(hv, vector)]
        residual = float(np.sqrt(_dot(diff, diff)) / abs(estimate)) if estimate else None
        if estimates:
            change = abs(estimate - estimates[-1])
            if estimate:
                relative_change = change / abs(estimate)
            else:  # H v = 0 along v: exact if the last estimate was 0 too
                relative_change = 0.0 if change == 0 else float("inf")
        estimates.append(estimate)
        hv_norm = np.sqrt(_dot(hv, hv))
        converged = relative_change is not None and relative_change <= tolerance
        if hv_norm == 0.0 or (tolerance > 0 and converged):
            break
        vector = [h / hv_norm for h in hv]
    return estimates, relative_change, residual


def _perturbed_increases(
    evaluator: _Evaluator,
    variables: list,
    base_loss: float,
    num_perturbations: int,
    perturbation_size: float,
    rng: np.random.Generator,
) -> list[float]:
    """L(w + δₖ) − L(w) for K layer-wise directions, ‖δ_v‖ = ρ‖w_v‖; weights restored."""
    saved = [np.array(keras.ops.convert_to_numpy(v), copy=True) for v in variables]
    increases = []
    try:
        for _ in range(num_perturbations):
            for variable, value in zip(variables, saved):
                direction = rng.standard_normal(value.shape)
                weight_norm = np.linalg.norm(value.astype(np.float64))
                direction *= perturbation_size * weight_norm / np.linalg.norm(direction)
                variable.assign((value + direction).astype(value.dtype))
            loss_sum, count = evaluator.loss()
            increases.append(loss_sum / count - base_loss)
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)
    return increases


class _CallableModule(types.ModuleType):
    """Lets ``tf_largebatch.sharpness(...)`` call the function even when it finds this module.

    The public name and the module share a name: once ``tf_largebatch.sharpness`` (the module)
    has been imported, Python binds the package attribute ``sharpness`` to the module, which
    hides the lazily exported function. Calling the module therefore calls the function.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return sharpness(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__signature__ = inspect.signature(sharpness)
