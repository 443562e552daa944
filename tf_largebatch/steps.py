"""The compiled data-parallel training step used by the `Trainer`.

Per replica: forward/backward over the replica's batch (in micro-batches when it is larger
than memory allows, gradients summed), loss normalised by the *global* batch (Goyal et al.
Remark 3) so that the sum over replicas of the gradients is the global-batch gradient, then
``optimizer.apply_gradients`` (Keras all-reduces in replica context). Optionally the gradient
noise scale is measured on the way (McCandlish et al. 2018 App. A.1): the squared norm of the
small-batch gradients each replica (and micro-batch) holds, and of the all-reduced one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from tf_largebatch.noise import NoiseScaleEstimator, gradient_noise_components, squared_norm


class TrainStep:
    """``num_steps`` training steps in one `tf.function` call, under any strategy.

    Args:
      model: the Keras model (built under ``strategy.scope()``).
      optimizer: the Keras optimizer (built for the model's variables).
      loss_fn: ``(y_true, logits) -> per-example losses``.
      strategy: the `tf.distribute` strategy.
      jit_compile: XLA-compile the per-replica forward/backward pass.
      noise_estimator: if given, updated every step with the |G|² and tr(Σ) estimates.

    Calling it returns ``(loss_sum, correct_sum, b_simple)`` over the steps run: the sum of
    the global-batch mean losses, the number of correct top-1 predictions, and the estimator's
    B_simple after the last step (NaN without an estimator).
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        loss_fn: Callable[[Any, Any], Any],
        strategy: tf.distribute.Strategy,
        *,
        jit_compile: bool = False,
        noise_estimator: NoiseScaleEstimator | None = None,
    ) -> None:
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.strategy = strategy
        self.noise_estimator = noise_estimator
        self.trace_count = 0
        self._jit_compile = jit_compile
        self.retrace()

    def retrace(self) -> None:
        """A fresh `tf.function` (needed after the optimizer's schedule object is replaced)."""
        self._forward_backward = (
            tf.function(self._forward_backward_fn, jit_compile=True)
            if self._jit_compile
            else self._forward_backward_fn
        )
        self._steps = tf.function(self._steps_fn)

    def __call__(
        self, iterator: Any, num_steps: int, global_batch_size: int, num_micro: int
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        return self._steps(
            iterator, tf.constant(num_steps), tf.constant(float(global_batch_size)), num_micro
        )

    def _forward_backward_fn(
        self, x: tf.Tensor, y: tf.Tensor, global_batch_size: tf.Tensor, reg_weight: Any
    ) -> tuple[Any, Any, Any]:
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True)
            per_example = tf.cast(self.loss_fn(y, logits), tf.float32)
            loss = tf.reduce_sum(per_example) / global_batch_size
            if self.model.losses:
                reg = tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
                loss += reg_weight * tf.cast(reg, tf.float32)
            scaled = self.optimizer.scale_loss(loss)  # loss scaling under mixed float16
        grads = tape.gradient(scaled, variables)
        labels = tf.cast(tf.reshape(y, [-1]), tf.int32)
        hits = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels)
        return loss, grads, tf.reduce_sum(tf.cast(hits, tf.float32))

    def _replica_step(
        self, x: tf.Tensor, y: tf.Tensor, global_batch_size: tf.Tensor, num_micro: int
    ) -> tuple[Any, Any, Any]:
        variables = self.model.trainable_variables
        measure = self.noise_estimator is not None
        small_sq = tf.constant(0.0)
        if num_micro == 1:
            loss, grads, correct = self._forward_backward(x, y, global_batch_size, 1.0)
            if measure:
                small_sq = squared_norm(grads)
        else:
            xs = tf.reshape(x, [num_micro, -1, *x.shape[1:]])
            ys = tf.reshape(y, [num_micro, -1, *y.shape[1:]])
            loss, correct = tf.constant(0.0), tf.constant(0.0)
            grads = [tf.zeros_like(v) for v in variables]
            for i in tf.range(num_micro):
                part_loss, part_grads, part_correct = self._forward_backward(
                    xs[i], ys[i], global_batch_size, 1.0 / num_micro
                )
                loss += part_loss
                correct += part_correct
                grads = [g + p for g, p in zip(grads, part_grads)]
                if measure:
                    small_sq += squared_norm(part_grads)
        g2 = trace = tf.constant(0.0)
        if measure:
            grads, g2, trace = self._noise_components(grads, small_sq, global_batch_size, num_micro)
        if measure and self.strategy.num_replicas_in_sync > 1:
            self._apply_reduced(grads, variables)
        else:
            self.optimizer.apply_gradients(zip(grads, variables))
        return tf.stack([loss, correct]), g2, trace

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

    def _noise_components(
        self, grads: list[Any], small_sq: Any, global_batch_size: tf.Tensor, num_micro: int
    ) -> tuple[list[Any], Any, Any]:
        """Small batch b = B/(replicas·micro-batches): each part's gradient is (b/B)·G_small."""
        context = tf.distribute.get_replica_context()
        replicas = self.strategy.num_replicas_in_sync
        parts = float(replicas * num_micro)
        small_sq = small_sq * parts * parts / num_micro  # mean of |G_small|² on this replica
        if replicas > 1:  # one batched all-reduce for the gradients and the small norms
            *reduced, small_sq = context.all_reduce(
                tf.distribute.ReduceOp.SUM, [*grads, small_sq / replicas]
            )
            big_sq = squared_norm(reduced)
            grads = reduced
        else:
            big_sq = squared_norm(grads)
        g2, trace = gradient_noise_components(
            small_sq, big_sq, global_batch_size / parts, global_batch_size
        )
        return grads, g2, trace

    def _steps_fn(
        self, iterator: Any, num_steps: tf.Tensor, global_batch_size: tf.Tensor, num_micro: int
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        self.trace_count += 1  # Python side effect: runs once per trace
        loss_sum, correct_sum = tf.constant(0.0), tf.constant(0.0)
        sum_op = tf.distribute.ReduceOp.SUM
        for _ in tf.range(num_steps):
            x, y = next(iterator)
            both, g2, trace = self.strategy.run(
                self._replica_step, args=(x, y, global_batch_size, num_micro)
            )
            both = self.strategy.reduce(sum_op, both, axis=None)  # [loss, correct]: one reduction
            loss_sum += both[0]
            correct_sum += both[1]
            if self.noise_estimator is not None:  # identical on every replica: take the first
                local = self.strategy.experimental_local_results
                self.noise_estimator.update(local(g2)[0], local(trace)[0])
        b_simple = (
            self.noise_estimator.b_simple()
            if self.noise_estimator is not None
            else tf.constant(float("nan"))
        )
        return loss_sum, correct_sum, b_simple
