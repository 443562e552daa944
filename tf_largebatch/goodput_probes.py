"""The in-process measurements of the goodput model: step times t(b) and the noise scale.

Two measurements feed `tf_largebatch.goodput`, each run inside one process:

- `time_train_step`: seconds per synchronous SGD step of a model at several per-replica
  batches, under a strategy (one device, N logical CPU devices, or N workers). The timed step is
  one compiled ``tf.function`` running ``steps_per_call`` steps of ``strategy.run`` (forward,
  loss over the global batch, gradients, Keras's all-reduce inside ``apply_gradients``, SGD
  update) on batches gathered from tensors in memory, so no input pipeline is timed.
- `measure_noise_scale`: B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, App. A.1) after a short
  training run, from the mean squared norm of small-batch gradients and the squared norm of their
  average (`tf_largebatch.noise.gradient_noise_components`).

Logical CPU devices and ``MultiWorkerMirroredStrategy`` must be configured before TensorFlow
starts, so callers run these in a fresh process (`tf_largebatch.goodput_measure`). TensorFlow is
imported inside the functions, so importing this module starts no TensorFlow runtime.

References:
  McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training", App. A.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

from tf_largebatch._validation import check_positive_int


def _load(model: str, dataset: str, seed: int, strategy: Any = None) -> tuple[Any, Any, Any, Any]:
    import tensorflow as tf

    from tf_largebatch import data, models

    arrays = data.load_data(dataset)
    name = models.resolve_model_name(model, arrays.input_shape)
    scope = strategy.scope() if strategy is not None else _NullScope()
    with scope:
        net = models.build_model(name, arrays.input_shape, arrays.num_classes, seed=seed)
    x = tf.constant(arrays.x_train)
    y = tf.constant(arrays.y_train)
    return net, x, y, arrays


class _NullScope:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def time_train_step(
    per_replica_batch_sizes: Sequence[int],
    *,
    model: str = "mlp",
    dataset: str = "digits",
    strategy: str = "one_device",
    num_cpu_devices: int | None = None,
    intra_op_threads: int | None = 1,
    inter_op_threads: int | None = None,
    steps_per_call: int = 10,
    repeats: int = 30,
    learning_rate: float = 0.01,
    seed: int = 0,
) -> dict[str, Any]:
    """Times synchronous SGD steps at several per-replica batches under one strategy.

    For each per-replica batch b the compiled call runs ``steps_per_call`` steps; it is called
    once to trace and warm up, then ``repeats`` rounds call every batch size in turn, and the
    fastest call's time per step is
    kept: on a shared machine the minimum is the least disturbed estimate (as `timeit` advises),
    and fit and validation use the same statistic.

    Args:
      per_replica_batch_sizes: the per-replica batches b to time.
      model: a `tf_largebatch.models` name (``"mlp"``, ``"cnn"``, ...; ``"auto"``).
      dataset: a `tf_largebatch.data.load_data` name.
      strategy: ``"one_device"``, ``"mirrored"`` or ``"multi_worker"``.
      num_cpu_devices: split the CPU into this many logical devices first (None: as is).
      intra_op_threads: TensorFlow's threads inside one op (None: TensorFlow's default). 1 by
        default: the small ops of a small model gain nothing from splitting, and every
        configuration then uses the same threads, so on a machine shared with other jobs a
        configuration with more replicas does not win more CPU time just by having more threads.
      inter_op_threads: ops run concurrently, e.g. the replicas' (None: ``os.cpu_count()``).
      steps_per_call: steps per compiled call.
      repeats: timed calls per batch size.
      learning_rate: SGD learning rate (the value does not change the timing).
      seed: initialisation seed.

    Returns:
      ``{"num_replicas", "num_parameters", "gradient_bytes", "strategy", "measurements":
      [{"per_replica_batch_size", "seconds_per_step", "examples_per_second"}, ...]}`` where
      examples per second count the global batch (b × replicas).

    Raises:
      ValueError: a batch size, ``steps_per_call`` or ``repeats`` is not a positive integer.
    """
    for b in per_replica_batch_sizes:
        check_positive_int("per_replica_batch_sizes", b)
    check_positive_int("steps_per_call", steps_per_call)
    check_positive_int("repeats", repeats)
    import tensorflow as tf

    from tf_largebatch import distribute

    if intra_op_threads is not None:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
    tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads or os.cpu_count() or 1)
    if num_cpu_devices is not None:
        distribute.configure_cpu_devices(num_cpu_devices)
    strat = distribute.make_strategy(strategy)  # before any other TensorFlow op
    import keras

    net, x, y, arrays = _load(model, dataset, seed, strat)
    replicas = strat.num_replicas_in_sync
    with strat.scope():
        optimizer = keras.optimizers.SGD(learning_rate)
        optimizer.build(net.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    n = int(x.shape[0])

    def make_call(per_replica: int) -> Any:
        global_batch = per_replica * replicas

        def replica_step() -> tf.Tensor:
            idx = tf.random.uniform([per_replica], 0, n, dtype=tf.int32)
            xb, yb = tf.gather(x, idx), tf.gather(y, idx)
            with tf.GradientTape() as tape:
                loss = tf.nn.compute_average_loss(
                    loss_fn(yb, net(xb, training=True)), global_batch_size=global_batch
                )
            grads = tape.gradient(loss, net.trainable_variables)
            optimizer.apply_gradients(zip(grads, net.trainable_variables))
            return loss

        @tf.function
        def call() -> tf.Tensor:
            total = tf.constant(0.0)
            for _ in tf.range(steps_per_call):
                per = strat.run(replica_step)
                total += strat.reduce(tf.distribute.ReduceOp.SUM, per, axis=None)
            return total

        return call

    calls = [make_call(int(b)) for b in per_replica_batch_sizes]
    for call in calls:
        call().numpy()  # trace and warm up
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):  # round robin: a burst of load hits every batch size alike
        for call, row in zip(calls, times):
            start = time.perf_counter()
            call().numpy()
            row.append((time.perf_counter() - start) / steps_per_call)
    measurements = []
    for b, row in zip(per_replica_batch_sizes, times):
        seconds = min(row)
        measurements.append(
            {
                "per_replica_batch_size": int(b),
                "seconds_per_step": seconds,
                "examples_per_second": b * replicas / seconds,
            }
        )
    num_parameters = int(sum(v.numpy().size for v in net.trainable_variables))
    return {
        "strategy": strategy,
        "num_cpu_devices": num_cpu_devices,
        "num_replicas": replicas,
        "num_parameters": num_parameters,
        "gradient_bytes": 4 * num_parameters,
        "measurements": measurements,
    }


def measure_noise_scale(
    *,
    model: str = "mlp",
    dataset: str = "digits",
    train_steps: int = 200,
    train_batch_size: int = 32,
    learning_rate: float = 0.05,
    small_batch_size: int = 32,
    num_small_batches: int = 16,
    rounds: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Estimates B_simple = tr(Σ)/|G|² on one device after a short SGD run.

    After ``train_steps`` SGD steps (batch ``train_batch_size``), each round draws
    ``num_small_batches`` batches of b = ``small_batch_size`` examples, computes their mean
    gradients g_i, and takes |G_small|² = mean_i |g_i|² and |G_big|² = |mean_i g_i|² (a batch of
    B = b × ``num_small_batches``). The unbiased estimates of |G|² and tr(Σ) (McCandlish et al.
    App. A.1) are averaged over ``rounds`` before taking their ratio, as the paper advises.

    Args:
      model: a `tf_largebatch.models` name.
      dataset: a `tf_largebatch.data.load_data` name.
      train_steps: SGD steps before measuring (the noise scale grows as training proceeds).
      train_batch_size: batch of those steps.
      learning_rate: SGD learning rate of those steps.
      small_batch_size: b.
      num_small_batches: B/b, at least 2.
      rounds: independent estimates averaged.
      seed: initialisation and sampling seed.

    Returns:
      ``{"noise_scale": B_simple, "gradient_sq_norm": |G|², "trace": tr(Σ),
      "train_steps", "small_batch_size", "big_batch_size"}``.

    Raises:
      ValueError: a count is not a positive integer, or ``num_small_batches`` < 2.
    """
    for name, value in (
        ("train_steps", train_steps),
        ("train_batch_size", train_batch_size),
        ("small_batch_size", small_batch_size),
        ("num_small_batches", num_small_batches),
        ("rounds", rounds),
    ):
        check_positive_int(name, value)
    if num_small_batches < 2:
        raise ValueError(
            "Argument `num_small_batches` must be >= 2. "
            f"Received: num_small_batches={num_small_batches}"
        )
    import keras
    import tensorflow as tf

    from tf_largebatch.noise import gradient_noise_components

    tf.random.set_seed(seed)
    net, x, y, _ = _load(model, dataset, seed)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.SGD(learning_rate)
    n = int(x.shape[0])
    variables = net.trainable_variables

    def batch_grads(size: int) -> list[tf.Tensor]:
        idx = tf.random.uniform([size], 0, n, dtype=tf.int32)
        with tf.GradientTape() as tape:
            loss = loss_fn(tf.gather(y, idx), net(tf.gather(x, idx), training=True))
        return tape.gradient(loss, variables)

    @tf.function
    def train() -> None:
        for _ in tf.range(train_steps):
            optimizer.apply_gradients(zip(batch_grads(train_batch_size), variables))

    @tf.function
    def components() -> tuple[tf.Tensor, tf.Tensor]:
        sums = [tf.zeros_like(v) for v in variables]
        small_sq = tf.constant(0.0)
        for _ in range(num_small_batches):
            g = batch_grads(small_batch_size)
            small_sq += tf.add_n([tf.reduce_sum(t * t) for t in g])
            sums = [s + t for s, t in zip(sums, g)]
        big_sq = tf.add_n([tf.reduce_sum((s / num_small_batches) ** 2) for s in sums])
        return small_sq / num_small_batches, big_sq

    train()
    big_batch = small_batch_size * num_small_batches
    g2s, traces = [], []
    for _ in range(rounds):
        small_sq, big_sq = (float(t) for t in components())
        g2, trace = gradient_noise_components(small_sq, big_sq, small_batch_size, big_batch)
        g2s.append(g2)
        traces.append(trace)
    g2, trace = statistics.fmean(g2s), statistics.fmean(traces)
    return {
        "dataset_size": n,
        "noise_scale": trace / g2,
        "gradient_sq_norm": g2,
        "trace": trace,
        "train_steps": train_steps,
        "small_batch_size": small_batch_size,
        "big_batch_size": big_batch,
    }
