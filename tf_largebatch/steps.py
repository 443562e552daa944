"""The compiled data-parallel steps used by the `Trainer`: training and evaluation.

Training, per replica: unpack the batch (``(x, y)`` or ``(x, y, sample_weight)``, nested
structures allowed), forward/backward in micro-batches when the replica's batch is larger than
memory allows (gradients summed), the loss normalised so that the sum over replicas and
micro-batches is the *global*-batch loss (Goyal et al. Remark 3; Keras's compiled losses are a
mean over the replica's batch scaled by 1/replicas, regularisation is scaled the same way once
per step), then ``optimizer.apply_gradients`` (Keras all-reduces in replica context) and the
compiled metrics. Optionally the gradient noise scale is measured on the way (McCandlish et al.
2018 App. A.1): the squared norm of the small-batch gradients each replica (and micro-batch)
holds, and of the all-reduced one.

Subclass and override `TrainStep.unpack`, `TrainStep.compute_loss` or
`TrainStep.update_metrics` to change one part, as Keras's `train_step` / `compute_loss` allow.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from tf_largebatch.device_data import DeviceArrays, DeviceFeed
from tf_largebatch.noise import NoiseScaleEstimator, gradient_noise_components, squared_norm


def metric_results(model: keras.Model, skip: Sequence[Any] = ()) -> dict[str, Any]:
    """The model's compiled metrics as ``{name: value}`` (Keras's ``get_metrics_result``)."""
    results: dict[str, Any] = {}
    for metric in model.metrics:
        if any(metric is s for s in skip):
            continue
        value = metric.result()
        results.update(value if isinstance(value, dict) else {metric.name: value})
    return results


def resets_in_graph(metrics: Sequence[Any]) -> bool:
    """Whether every metric (containers' too) resets with Keras's own ``reset_state``
    (variable assignments, which trace): then the compiled call can reset them itself. A
    metric overriding it may keep Python state, so it is reset eagerly, as ``model.fit``
    does."""
    for metric in metrics:
        if not type(metric).reset_state.__module__.startswith("keras."):
            return False
        if not resets_in_graph(getattr(metric, "metrics", ())):
            return False
    return True


def _overrides_compute_loss(model: keras.Model) -> bool:
    return type(model).compute_loss is not keras.Model.compute_loss


class StepOutputs(NamedTuple):
    """What one compiled training call returns (tensors; the controller reads them once)."""

    loss_sum: tf.Tensor  # the sum over the call's steps of the global-batch losses
    metrics: dict[str, tf.Tensor]  # the compiled metrics over the epoch so far
    b_simple: tf.Tensor  # the noise-scale estimate after the last step (NaN: not measured)
    votes: tf.Tensor  # [stop, save]: the workers' flags summed over replicas
    learning_rate: tf.Tensor  # the optimizer's learning rate at the call's first step
    iterations: tf.Tensor  # the optimizer's updates after the call


class TrainStep:
    """``num_steps`` training steps in one `tf.function` call, under any strategy.

    Args:
      model: a compiled Keras model built under ``strategy.scope()``.
      optimizer: the optimizer (built for the model's variables; a `LossScaleOptimizer` under
        mixed float16).
      strategy: the `tf.distribute` strategy.
      jit_compile: XLA-compile the per-replica forward/backward pass.
      noise_estimator: if given, updated every step with the |G|² and tr(Σ) estimates.

    Calling it returns `StepOutputs`: the sum over the steps run of the global-batch losses,
    the compiled metrics over the epoch so far (``{name: value}``), the estimator's B_simple
    after the last step (NaN without an estimator), ``votes``, the sums over replicas of the
    controller's two flags ``[stop, save]`` (> 0 on every worker as soon as one worker voted),
    and the learning rate and update count the controller logs (read in the call, not by
    eager ops between calls). Losses and votes are summed on each replica during the call
    and across replicas once at its end, not at every step (one reduction per call).

    A call passes one small integer tensor (steps, position, votes, whether to reset the
    metrics first) and, for data on the devices, nothing else: the `DeviceArrays` are bound
    into their own `tf.function` (one per data set) whose concrete function is called
    directly, so a call costs little more than the steps themselves.

    For data on the devices the batch shape is static: the trace holds one loop per global
    batch size in `batch_sizes` (the plan's, set by the `Trainer`) and ``tf.switch_case``
    runs the call's, so every phase of the plan runs in the one trace with shapes known to
    the compiler (with an unknown batch dimension, the shape arithmetic of the loss, metrics
    and gradients runs as ops every step: ~10 % of a small MLP's step on CPU). A size not in
    `batch_sizes` is added to it and the step traced again.
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        strategy: tf.distribute.Strategy,
        *,
        jit_compile: bool = False,
        noise_estimator: NoiseScaleEstimator | None = None,
    ) -> None:
        self.model, self.optimizer, self.strategy = model, optimizer, strategy
        self.noise_estimator = noise_estimator
        self.trace_count = 0
        self.batch_sizes: tuple[int, ...] = ()  # global batches traced with static shapes
        self._jit_compile = jit_compile
        # Per-replica sums kept on each replica during a call and added across replicas once,
        # at its end (SUM on read): the training loss, and the stop votes.
        on_read, total = tf.VariableSynchronization.ON_READ, tf.VariableAggregation.SUM
        with strategy.scope():
            self._loss_total, self._votes = (
                tf.Variable(value, trainable=False, synchronization=on_read, aggregation=total,
                            name=name)
                for value, name in ((0.0, "loss_total"), ([0.0, 0.0], "votes"))
            )  # fmt: skip
        self.retrace()

    def retrace(self) -> None:
        """A fresh `tf.function` (needed after the optimizer's schedule object is replaced)."""
        self._forward_backward = (
            tf.function(self._forward_backward_fn, jit_compile=True)
            if self._jit_compile
            else self._forward_backward_fn
        )
        self._steps = tf.function(self._steps_fn)
        # The bound data, its tf.function and that function's concrete function per
        # micro-batch count (called directly: no signature matching per call).
        self._bound: tuple[DeviceArrays, Any, dict[int, Any]] | None = None

    @functools.cached_property
    def resets_metrics_in_graph(self) -> bool:
        """Whether a call resets the model's metrics when asked (`resets_in_graph`; read
        after the metrics are built)."""
        return resets_in_graph(self.model.metrics)

    def __call__(
        self, feed: Any, num_steps: int, num_micro: int, vote: float = 0.0, save: float = 0.0,
        reset_metrics: bool = False,
    ) -> StepOutputs:  # fmt: skip
        """Runs `num_steps` steps on batches from `feed`: a distributed iterator, or a
        `device_data.DeviceFeed` (batches gathered in-graph from arrays on the devices).
        `vote` and `save` are this worker's stop and save flags (0 or 1); `reset_metrics`
        resets the model's metrics before the steps (only if `resets_metrics_in_graph`)."""
        flags = [int(vote), int(save), int(reset_metrics)]
        if reset_metrics and not self.resets_metrics_in_graph:
            raise ValueError("These metrics reset eagerly: call model.reset_metrics().")
        if not isinstance(feed, DeviceFeed):
            control = tf.constant([num_steps, 0, 0, 0, *flags], tf.int64)
            return self._steps(feed, control, num_micro)
        if (feed.global_batch_size // self.strategy.num_replicas_in_sync) % num_micro:
            raise ValueError(
                f"The per-replica batch must split into num_micro={num_micro} micro-batches. "
                f"Received: global_batch_size={feed.global_batch_size}"
            )
        if feed.global_batch_size not in self.batch_sizes:  # one more static loop: retrace
            self.batch_sizes = (*self.batch_sizes, feed.global_batch_size)
            self._bound = None
        if self._bound is None or self._bound[0] is not feed.data:
            data = feed.data
            function = tf.function(lambda control, micro: self._steps_fn(data, control, micro))
            self._bound = data, function, {}
        control = [num_steps, feed.epoch, feed.start, feed.global_batch_size, *flags]
        control_t = tf.constant(control, tf.int64)
        concrete = self._bound[2].get(num_micro)
        if concrete is None:  # traced once per micro-batch count; later calls skip dispatch
            concrete = self._bound[2][num_micro] = self._bound[1].get_concrete_function(
                control_t, num_micro
            )
        return concrete(control_t, num_micro)

    # ---- hooks ------------------------------------------------------------------------------

    def unpack(self, data: Any) -> tuple[Any, Any, Any]:
        """``(x, y, sample_weight)`` from one batch (Keras's convention)."""
        return keras.utils.unpack_x_y_sample_weight(data)

    def compute_loss(self, x: Any, y: Any, y_pred: Any, sample_weight: Any) -> tf.Tensor:
        """This replica's share of the global-batch loss (summed over replicas: the loss).

        The compiled loss (any Keras loss, several outputs, ``loss_weights``) is a mean over
        this replica's batch divided by the replica count, as in ``model.fit``; regularisation
        losses are divided by the replica count too (``model.fit`` adds them on every
        replica). A model that overrides ``compute_loss`` is called as ``model.fit`` calls it.
        """
        if _overrides_compute_loss(self.model):
            return self.model.compute_loss(x, y, y_pred, sample_weight, training=True)
        loss = self.model._compile_loss(y, y_pred, sample_weight)  # noqa: SLF001 (Keras's)
        loss = tf.cast(loss, tf.float32) if loss is not None else tf.constant(0.0)
        if self.model.losses:
            reg = tf.add_n([tf.cast(v, tf.float32) for v in self.model.losses])
            loss += tf.nn.scale_regularization_loss(reg)
        return loss

    def update_metrics(self, x: Any, y: Any, y_pred: Any, sample_weight: Any) -> None:
        """Updates the compiled metrics with one (micro-)batch."""
        compiled = getattr(self.model, "_compile_metrics", None)
        if compiled is not None:
            compiled.update_state(y, y_pred, sample_weight)

    # ---- the computation --------------------------------------------------------------------

    def _forward_backward_fn(self, data: Any, weight: float) -> tuple[Any, Any]:
        x, y, sample_weight = self.unpack(data)
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            y_pred = self.model(x, training=True)
            loss = tf.cast(self.compute_loss(x, y, y_pred, sample_weight), tf.float32)
            loss = loss * weight if weight != 1.0 else loss  # micro-batches: their share
            scaled = self.optimizer.scale_loss(loss)  # loss scaling under mixed float16
        grads = tape.gradient(scaled, variables)
        self.update_metrics(x, y, y_pred, sample_weight)
        return loss, grads

    def _replica_step(self, data: Any, num_micro: int) -> tf.Tensor:
        variables = self.model.trainable_variables
        measure = self.noise_estimator is not None
        small_sq = tf.constant(0.0)
        if num_micro == 1:
            loss, grads = self._forward_backward(data, 1.0)
            if measure:
                small_sq = squared_norm(grads)
        else:
            parts = tf.nest.map_structure(
                lambda t: tf.reshape(t, [num_micro, -1, *t.shape[1:]]), data
            )
            loss = tf.constant(0.0)
            grads = [tf.zeros_like(v) for v in variables]
            for i in tf.range(num_micro):
                part = tf.nest.map_structure(lambda t: t[i], parts)  # noqa: B023
                part_loss, part_grads = self._forward_backward(part, 1.0 / num_micro)
                loss += part_loss
                grads = [g + p for g, p in zip(grads, part_grads)]
                if measure:
                    small_sq += squared_norm(part_grads)
        norms = tf.zeros([3])
        if measure:
            grads, norms = self._reduce_with_norms(grads, small_sq, data, num_micro)
        if measure and self.strategy.num_replicas_in_sync > 1:
            self._apply_reduced(grads, variables)
        else:
            self.optimizer.apply_gradients(zip(grads, variables))
        self._loss_total.assign_add(loss)
        return norms

    def _reset_metrics(self) -> tf.Tensor:
        self.model.reset_metrics()
        return tf.constant(True)

    def _start_totals(self, votes: Any) -> None:
        self._loss_total.assign(0.0)
        self._votes.assign(votes)

    def _gathered_replica_step(
        self, data: DeviceArrays, indices: Any, step: Any, num_micro: int
    ) -> tf.Tensor:
        """`_replica_step` on this replica's piece of the batch gathered from the devices."""
        return self._replica_step(data.gather(tf.gather(indices, step)), num_micro)

    @tf.autograph.experimental.do_not_convert
    def _apply_reduced(self, grads: list[Any], variables: list[Any]) -> None:
        """Applies gradients that are all-reduced already.

        Keras all-reduces inside ``apply_gradients`` in replica context (its TensorFlow
        optimizer's ``_all_reduce_sum_gradients``). While this step is traced, that hook is
        made the identity, so the all-reduce the noise measurement needed anyway is the only
        one. If a Keras version lacks the hook, the gradients are divided by the replica count
        instead and Keras's sum restores them (one more all-reduce, same result).
        """
        optimizers = [self.optimizer, getattr(self.optimizer, "inner_optimizer", None)]
        optimizers = [o for o in optimizers if o is not None]
        if not all(hasattr(o, "_all_reduce_sum_gradients") for o in optimizers):
            replicas = self.strategy.num_replicas_in_sync
            self.optimizer.apply_gradients(zip([g / replicas for g in grads], variables))
            return
        for o in optimizers:  # instance attributes shadow the class's method while tracing
            vars(o)["_all_reduce_sum_gradients"] = lambda grads_and_vars: grads_and_vars
        try:
            self.optimizer.apply_gradients(zip(grads, variables))
        finally:
            for o in optimizers:
                vars(o).pop("_all_reduce_sum_gradients", None)

    def _reduce_with_norms(
        self, grads: list[Any], small_sq: Any, data: Any, num_micro: int
    ) -> tuple[list[Any], tf.Tensor]:
        """All-reduces the gradients together with the small-batch squared norms.

        Returns the summed gradients and ``[|G_small|², |G_big|², replica batch]``: the mean
        over the replicas' parts (b = B/(replicas·micro-batches) examples each; a part's
        gradient is (b/B)·G_small) of the small-batch gradients' squared norms, and the squared
        norm of the all-reduced gradient. The estimator's arithmetic on them runs once per step
        outside the replicas and once per call (`_fold_noise`).
        """
        context = tf.distribute.get_replica_context()
        replicas = self.strategy.num_replicas_in_sync
        parts = float(replicas * num_micro)
        small_sq = small_sq * (parts * parts / num_micro / replicas)  # this replica's share
        if replicas > 1:  # one batched all-reduce for the gradients and the small norms
            *grads, small_sq = context.all_reduce(tf.distribute.ReduceOp.SUM, [*grads, small_sq])
        size = tf.cast(tf.shape(tf.nest.flatten(data)[0])[0], tf.float32)
        norms = tf.stack([small_sq, squared_norm(grads)])
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            scale = tf.cast(self.optimizer.dynamic_scale, tf.float32)  # grads are scaled
            norms = norms / tf.square(scale)
        return grads, tf.concat([norms, [size]], 0)

    def _fold_noise(
        self, sums: tf.Tensor, folded: tf.Tensor, num_steps: tf.Tensor, norms: tf.Tensor,
        num_micro: int,
    ) -> None:  # fmt: skip
        """Folds a call's steps into the estimator (McCandlish et al. 2018, App. A.1).

        `sums` holds Σ_j β^(m−1−j)·[|G_small|², |G_big|²]_j over the m = `folded` steps whose
        norms were finite (a step with a non-finite one, e.g. a float16 overflow, is skipped).
        The estimates g2 and trace are linear in the two norms with coefficients fixed by the
        call's batch sizes, so the m per-step EMA updates equal one update with these sums.
        """
        replicas = self.strategy.num_replicas_in_sync
        big_batch = norms[2] * replicas
        small_batch = big_batch / float(replicas * num_micro)
        g2_sum, trace_sum = gradient_noise_components(sums[0], sums[1], small_batch, big_batch)
        self.noise_estimator.fold_sums(g2_sum, trace_sum, folded, tf.cast(num_steps, tf.int64))

    def _loop(self, replica_step: Any, num_steps: tf.Tensor) -> tuple[Any, Any, Any]:
        """Runs ``replica_step(i)`` (per-replica noise norms) for i < `num_steps`; returns the
        estimator's sums over the steps, how many were folded, and the last step's norms."""
        estimator = self.noise_estimator
        beta = estimator.beta if estimator is not None else 0.0
        sums, folded, norms = tf.zeros([2]), tf.constant(0, tf.int64), tf.ones([3])
        for i in tf.range(num_steps):
            replica_norms = replica_step(i)
            if estimator is not None:  # identical on every replica: take the first
                norms = self.strategy.experimental_local_results(replica_norms)[0]
                finite = tf.reduce_all(tf.math.is_finite(norms))
                sums = tf.where(finite, beta * sums + norms[:2], sums)
                folded += tf.cast(finite, tf.int64)
        return sums, folded, norms

    def _device_loops(
        self, data: DeviceArrays, control: tf.Tensor, num_micro: int
    ) -> tuple[Any, Any, Any]:
        """`_loop` over batches gathered from the devices, one loop per global batch size in
        `batch_sizes` that splits into `num_micro` micro-batches (a Python int: static shapes),
        the call's picked by ``tf.switch_case``."""

        def loop(batch: int) -> tuple[Any, Any, Any]:
            indices = self.strategy.run(data.replica_indices, args=(control[2], batch, control[0]))
            data.load_next_epoch(control[1], control[2], batch, control[0])  # beside the steps
            return self._loop(
                lambda i: self.strategy.run(
                    self._gathered_replica_step, args=(data, indices, i, num_micro)
                ),
                control[0],
            )

        replicas = self.strategy.num_replicas_in_sync
        sizes = [b for b in self.batch_sizes if (b // replicas) % num_micro == 0]  # this trace's
        if len(sizes) == 1:
            return loop(sizes[0])
        index = tf.argmax(tf.equal(control[3], sizes), output_type=tf.int32)
        return tf.switch_case(index, [functools.partial(loop, b) for b in sizes])

    def _steps_fn(self, source: Any, control: tf.Tensor, num_micro: int) -> StepOutputs:
        """`control`: [steps, epoch, first example, global batch, stop vote, save vote, reset
        metrics]; the position (epoch, first example of π_epoch, global batch) is read for
        `DeviceArrays`."""
        self.trace_count += 1  # Python side effect: runs once per trace
        num_steps = control[0]
        if self.resets_metrics_in_graph:
            tf.cond(control[6] > 0, self._reset_metrics, lambda: tf.constant(False))
        learning_rate = tf.cast(self.optimizer.learning_rate, tf.float32)  # before the steps
        self.strategy.run(self._start_totals, args=(tf.cast(control[4:6], tf.float32),))
        if isinstance(source, DeviceArrays):
            source.load_epoch(control[1])
            sums, folded, norms = self._device_loops(source, control, num_micro)
        else:
            sums, folded, norms = self._loop(
                lambda i: self.strategy.run(self._replica_step, args=(next(source), num_micro)),
                num_steps,
            )
        estimator = self.noise_estimator
        b_simple = tf.constant(float("nan"))
        if estimator is not None:  # the call's steps folded into the averages at once
            self._fold_noise(sums, folded, num_steps, norms, num_micro)
            b_simple = estimator.b_simple()
        metrics = metric_results(self.model, [self.model._loss_tracker])
        return StepOutputs(
            self._loss_total.read_value(), metrics, b_simple, self._votes.read_value(),
            learning_rate, tf.cast(self.optimizer.iterations, tf.int64),
        )  # fmt: skip


class EvalStep:
    """Distributed evaluation: each replica evaluates its piece (possibly empty) of a batch.

    The loss is tracked as ``model.evaluate`` tracks it (the compiled loss plus regularisation,
    weighted by the number of examples), with a `keras.metrics.Mean` whose per-replica sums are
    added across replicas, so every example counts once whatever the replica count.

    Args:
      model: the compiled model.
      strategy: the `tf.distribute` strategy.
      loss_tracker: a `keras.metrics.Mean` created under ``strategy.scope()``.
    """

    def __init__(
        self, model: keras.Model, strategy: tf.distribute.Strategy, loss_tracker: Any
    ) -> None:
        self.model, self.strategy, self.loss_tracker = model, strategy, loss_tracker
        self.unpack = keras.utils.unpack_x_y_sample_weight
        self._steps = tf.function(self._steps_fn)

    def __call__(self, iterator: Any, num_steps: int) -> dict[str, tf.Tensor]:
        return self._steps(iterator, tf.constant(num_steps))

    def _replica_step(self, data: Any) -> None:
        x, y, sample_weight = self.unpack(data)
        y_pred = self.model(x, training=False)
        size = tf.shape(tf.nest.flatten(x)[0])[0]
        if _overrides_compute_loss(self.model):
            loss = self.model.compute_loss(x, y, y_pred, sample_weight, training=False)
        else:
            loss = self.model._compile_loss(y, y_pred, sample_weight)  # noqa: SLF001
            loss = tf.cast(loss, tf.float32) * self.strategy.num_replicas_in_sync  # unscale
            if self.model.losses:
                loss += tf.add_n([tf.cast(v, tf.float32) for v in self.model.losses])
        self.loss_tracker.update_state(tf.cast(loss, tf.float32), sample_weight=size)
        compiled = getattr(self.model, "_compile_metrics", None)
        if compiled is not None:
            compiled.update_state(y, y_pred, sample_weight)

    def _steps_fn(self, iterator: Any, num_steps: tf.Tensor) -> dict[str, tf.Tensor]:
        for _ in tf.range(num_steps):
            self.strategy.run(self._replica_step, args=(next(iterator),))
        return {
            "loss": self.loss_tracker.result(),
            **metric_results(self.model, [self.model._loss_tracker]),
        }
