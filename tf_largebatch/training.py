"""`Trainer`: the distributed training loop that follows a `PhasePlan`.

One compiled step under any `tf.distribute` strategy (one device, MirroredStrategy,
MultiWorkerMirroredStrategy), with what Goyal et al. 2017 §2–3 ask of data-parallel SGD:

- per-example losses averaged over the *global* batch (`tf.nn.compute_average_loss`) plus
  `tf.nn.scale_regularization_loss` of the model's losses (Remark 3), so that the summed
  all-reduced gradient is the gradient of the global batch whatever the replica count;
- one permutation of the training set per epoch shared by every worker (Remark 4),
  rebuilt per phase with `distribute_datasets_from_function` at the phase's batch;
- the plan's learning rate (a schedule on ``optimizer.iterations``), the phase's momentum,
  and momentum correction in our `SGD`;
- gradient accumulation inside the step when a per-replica batch exceeds
  ``max_per_replica_batch_size`` (how Goyal simulated batches beyond their hardware);
- checkpoints of model, optimizer, epoch, phase and step (chief writes, other workers write
  to temporary directories that are removed), resumed by rerunning the same command.

`model.fit` cannot do the multi-worker part under Keras 3 (keras-team/keras#20585).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_largebatch import data as data_lib
from tf_largebatch import distribute as distribute_lib
from tf_largebatch._validation import check_non_negative_int, check_positive_int
from tf_largebatch.fitting import set_momentum
from tf_largebatch.phases import PhasePlan

_log = logging.getLogger(__name__)
Schedule = keras.optimizers.schedules.LearningRateSchedule


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """How the `Trainer` runs (what it trains is the `PhasePlan`).

    Attributes:
      model_dir: checkpoints, TensorBoard logs, ``history.json``, ``results.json`` and
        ``model.keras`` go here; rerunning with the same directory resumes.
      seed: seeds model initialisation and the per-epoch permutations.
      max_per_replica_batch_size: larger per-replica batches are split into this many or fewer
        examples per micro-batch and their gradients accumulated inside one step.
      steps_per_execution: training steps run inside one compiled call (fewer host round trips).
      checkpoint_every_steps: also checkpoint every this many steps inside an epoch (0 = only at
        epoch ends).
      max_checkpoints_to_keep: checkpoints kept by the `tf.train.CheckpointManager`.
      eval_batch_size: batch size of the evaluation pass.
      verbose: 1 shows a `keras.utils.Progbar` per epoch on the chief, 0 is silent.
      jit_compile: compile the per-replica forward/backward pass with XLA.
      save_model: write ``model_dir/model.keras`` at the end (chief only).
    """

    model_dir: str
    seed: int = 0
    max_per_replica_batch_size: int | None = None
    steps_per_execution: int = 1
    checkpoint_every_steps: int = 0
    max_checkpoints_to_keep: int = 2
    eval_batch_size: int = 512
    verbose: int = 1
    jit_compile: bool = False
    save_model: bool = True

    def __post_init__(self) -> None:
        if not self.model_dir:
            raise ValueError(f"Argument `model_dir` must be a path. Received: {self.model_dir!r}")
        if self.max_per_replica_batch_size is not None:
            check_positive_int("max_per_replica_batch_size", self.max_per_replica_batch_size)
        check_positive_int("steps_per_execution", self.steps_per_execution)
        check_non_negative_int("checkpoint_every_steps", self.checkpoint_every_steps)
        check_positive_int("max_checkpoints_to_keep", self.max_checkpoints_to_keep)
        check_positive_int("eval_batch_size", self.eval_batch_size)


def micro_batches(per_replica_batch_size: int, max_per_replica_batch_size: int | None) -> int:
    """Fewest micro-batches k with k | b and b/k ≤ the maximum (1 when there is no maximum)."""
    if not max_per_replica_batch_size or per_replica_batch_size <= max_per_replica_batch_size:
        return 1
    k = math.ceil(per_replica_batch_size / max_per_replica_batch_size)
    while per_replica_batch_size % k:
        k += 1
    return k


def _per_example_loss(loss: Any) -> Callable[[Any, Any], Any]:
    """A Keras loss (name or object) recast to return one loss per example."""
    loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss.__class__.from_config({**loss.get_config(), "reduction": None})
    return loss  # a plain function (y_true, y_pred) -> per-example losses


def write_json(path: str, value: Any) -> None:
    tmp = f"{path}.tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        json.dump(value, f, indent=1)
    tf.io.gfile.rename(tmp, path, overwrite=True)


class Trainer:
    """Trains a Keras model through the phases of a `PhasePlan` under a `tf.distribute` strategy.

    Args:
      model_fn: builds the (uncompiled) model; called inside ``strategy.scope()``.
      plan: the batch-size phases to follow.
      config: a `TrainerConfig`.
      loss: a Keras loss or its name; used per example. Default: sparse categorical
        cross-entropy on logits.
      optimizer_fn: builds the optimizer from the plan's learning-rate schedule; default our
        `SGD` with momentum correction at the first phase's momentum.
      strategy: default ``tf.distribute.get_strategy()``.

    Example:
      >>> trainer = Trainer(lambda: build_model("mlp", (8, 8, 1), 10), plan,
      ...                   TrainerConfig(model_dir="/tmp/run"))
      >>> results = trainer.fit(x_train, y_train, validation_data=(x_test, y_test))
    """

    def __init__(
        self,
        model_fn: Callable[[], keras.Model],
        plan: PhasePlan,
        config: TrainerConfig,
        *,
        loss: Any = None,
        optimizer_fn: Callable[[Schedule], keras.optimizers.Optimizer] | None = None,
        strategy: tf.distribute.Strategy | None = None,
    ) -> None:
        self.plan = plan
        self.config = config
        self.strategy = strategy or tf.distribute.get_strategy()
        self.num_replicas = self.strategy.num_replicas_in_sync
        for phase in plan.phases:
            if phase.global_batch_size % self.num_replicas:
                raise ValueError(
                    f"Argument `global_batch_size` must be divisible by the number of replicas "
                    f"({self.num_replicas}). Received: global_batch_size="
                    f"{phase.global_batch_size} (phase from epoch {phase.start_epoch})"
                )
        self.is_chief = distribute_lib.is_chief(self.strategy)
        self.trace_count = 0
        self._loss_fn = _per_example_loss(
            loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        with self.strategy.scope():
            keras.utils.set_random_seed(config.seed)
            self.model = model_fn()
            if optimizer_fn is None:
                from tf_largebatch.optimizers import SGD

                def optimizer_fn(lr: Schedule) -> keras.optimizers.Optimizer:
                    return SGD(lr, momentum=plan.phases[0].momentum)

            self.optimizer = optimizer_fn(plan.learning_rate_schedule())
            self.optimizer.build(self.model.trainable_variables)
        # Host-side counters (plain variables, outside the strategy): saved with the checkpoint.
        self._epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self._phase = tf.Variable(0, dtype=tf.int64, trainable=False, name="phase")
        self._step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self._checkpoint = tf.train.Checkpoint(
            model=self.model,
            optimizer=self.optimizer,
            epoch=self._epoch,
            phase=self._phase,
            step_in_epoch=self._step_in_epoch,
        )
        self._train_steps = tf.function(self._train_steps_fn)
        self._forward_backward = (
            tf.function(self._forward_backward_fn, jit_compile=config.jit_compile)
            if config.jit_compile
            else self._forward_backward_fn
        )
        self._eval_step = tf.function(self._eval_step_fn, reduce_retracing=True)

    # ---- compiled pieces -------------------------------------------------------------------

    def _forward_backward_fn(
        self, x: tf.Tensor, y: tf.Tensor, global_batch_size: tf.Tensor, reg_weight: tf.Tensor
    ) -> tuple[Any, Any, Any]:
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True)
            per_example = self._loss_fn(y, logits)
            loss = tf.reduce_sum(per_example) / global_batch_size
            if self.model.losses:
                loss += reg_weight * tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
        grads = tape.gradient(loss, variables)
        correct = tf.reduce_sum(
            tf.cast(
                tf.equal(
                    tf.argmax(logits, -1, output_type=tf.int32),
                    tf.cast(tf.reshape(y, [-1]), tf.int32),
                ),
                tf.float32,
            )
        )
        return loss, grads, correct

    def _replica_step(
        self, x: tf.Tensor, y: tf.Tensor, global_batch_size: tf.Tensor, num_micro: int
    ) -> tuple[Any, Any]:
        if num_micro == 1:
            loss, grads, correct = self._forward_backward(x, y, global_batch_size, 1.0)
        else:
            xs = tf.reshape(x, [num_micro, -1, *x.shape[1:]])
            ys = tf.reshape(y, [num_micro, -1, *y.shape[1:]])
            loss, correct = tf.constant(0.0), tf.constant(0.0)
            grads = [tf.zeros_like(v) for v in self.model.trainable_variables]
            for i in tf.range(num_micro):
                part_loss, part_grads, part_correct = self._forward_backward(
                    xs[i], ys[i], global_batch_size, 1.0 / num_micro
                )
                loss += part_loss
                correct += part_correct
                grads = [g + p for g, p in zip(grads, part_grads)]
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        return loss, correct

    def _train_steps_fn(
        self, iterator: Any, num_steps: tf.Tensor, global_batch_size: tf.Tensor, num_micro: int
    ) -> tuple[tf.Tensor, tf.Tensor]:
        self.trace_count += 1  # Python side effect: runs once per trace
        loss_sum, correct_sum = tf.constant(0.0), tf.constant(0.0)
        for _ in tf.range(num_steps):
            x, y = next(iterator)
            loss, correct = self.strategy.run(
                self._replica_step, args=(x, y, global_batch_size, num_micro)
            )
            loss_sum += self.strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
            correct_sum += self.strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None)
        return loss_sum, correct_sum

    def _eval_step_fn(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        logits = self.model(x, training=False)
        loss = tf.reduce_sum(self._loss_fn(y, logits))
        correct = tf.reduce_sum(
            tf.cast(
                tf.equal(tf.argmax(logits, -1, output_type=tf.int32), tf.cast(y, tf.int32)),
                tf.float32,
            )
        )
        return loss, correct

    def iterations(self) -> int:
        """Parameter updates so far (``optimizer.iterations``)."""
        return int(keras.ops.convert_to_numpy(self.optimizer.iterations))

    # ---- the loop --------------------------------------------------------------------------

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Loss and accuracy over a whole evaluation set (every worker evaluates it all)."""
        loss, correct = 0.0, 0.0
        for start in range(0, len(x), self.config.eval_batch_size):
            xb = x[start : start + self.config.eval_batch_size]
            yb = y[start : start + self.config.eval_batch_size]
            batch_loss, batch_correct = self._eval_step(tf.constant(xb), tf.constant(yb))
            loss += float(batch_loss)
            correct += float(batch_correct)
        return {"loss": loss / len(x), "accuracy": correct / len(x)}

    def _write_dir(self) -> str:
        if self.is_chief:
            return self.config.model_dir
        task_type, task_id = distribute_lib.worker_info(self.strategy)
        return os.path.join(self.config.model_dir, f".tmp_{task_type}_{task_id}")

    def _check_resumable(self) -> None:
        plan_path = os.path.join(self.config.model_dir, "plan.json")
        plan_dict = self.plan.to_dict()
        if tf.io.gfile.exists(plan_path):
            with tf.io.gfile.GFile(plan_path) as f:
                saved = json.load(f)
            if saved != json.loads(json.dumps(plan_dict)):
                raise ValueError(
                    f"Argument `model_dir` holds a run with a different phase plan "
                    f"({plan_path}); use a new model_dir. Received: model_dir="
                    f"{self.config.model_dir!r}"
                )
        elif self.is_chief:
            write_json(plan_path, plan_dict)

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        validation_data: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """Trains through every phase (resuming from ``model_dir`` if it holds a checkpoint).

        Returns:
          The results dictionary also written to ``model_dir/results.json``: test accuracy and
          loss, final train loss, parameter updates, epochs completed, examples/second,
          wall seconds, replicas, phases, per-epoch history, trace count and phase-switch
          seconds.
        """
        cfg, plan = self.config, self.plan
        if len(x) != plan.dataset_size:
            raise ValueError(
                f"Argument `x` must hold the plan's dataset_size="
                f"{plan.dataset_size} examples. Received: {len(x)} examples"
            )
        tf.io.gfile.makedirs(cfg.model_dir)
        self._check_resumable()
        write_dir = self._write_dir()
        manager = tf.train.CheckpointManager(
            self._checkpoint,
            os.path.join(write_dir, "ckpt"),
            max_to_keep=cfg.max_checkpoints_to_keep,
        )
        # Every worker restores from the chief's directory.
        latest = tf.train.latest_checkpoint(os.path.join(cfg.model_dir, "ckpt"))
        if latest:
            self._checkpoint.restore(latest).expect_partial()
            _log.info("resumed from %s at epoch %d", latest, int(self._epoch))
        history_path = os.path.join(cfg.model_dir, "history.json")
        history: list[dict[str, Any]] = []
        if latest and tf.io.gfile.exists(history_path):
            with tf.io.gfile.GFile(history_path) as f:
                history = [h for h in json.load(f) if h["epoch"] < int(self._epoch)]
        start_epoch, skip = int(self._epoch), int(self._step_in_epoch)
        expected = (
            (plan.step_at_epoch(start_epoch) + skip)
            if start_epoch < plan.epochs
            else (plan.total_steps)
        )
        if self.iterations() != expected:
            raise ValueError(
                f"The checkpoint in model_dir={cfg.model_dir!r} is at step "
                f"{self.iterations()}, but the plan puts epoch {start_epoch} "
                f"step {skip} at step {expected}; the run cannot resume with this plan."
            )
        writer = (
            tf.summary.create_file_writer(os.path.join(cfg.model_dir, "tensorboard"))
            if self.is_chief
            else tf.summary.create_noop_writer()
        )
        switch_seconds: list[float] = []
        train_seconds, examples, wall_start = 0.0, 0, time.perf_counter()
        final_loss = history[-1]["train_loss"] if history else float("nan")
        for phase_index, phase in enumerate(plan.phases):
            if phase.end_epoch <= start_epoch:
                continue
            phase_setup_start = time.perf_counter()
            first = max(phase.start_epoch, start_epoch)
            skip_steps = skip if first == start_epoch else 0
            set_momentum(self.optimizer, phase.momentum)
            self._phase.assign(phase_index)
            gbs = phase.global_batch_size
            num_micro = micro_batches(gbs // self.num_replicas, cfg.max_per_replica_batch_size)
            dataset_fn = data_lib.make_dataset_fn(
                x,
                y,
                gbs,
                seed=cfg.seed,
                start_epoch=first,
                end_epoch=phase.end_epoch,
                skip_steps=skip_steps,
                drop_remainder=plan.drop_remainder,
                static_batch_size=False,
            )  # one trace serves every phase's batch size
            iterator = iter(self.strategy.distribute_datasets_from_function(dataset_fn))
            switching = phase_index > 0 and first == phase.start_epoch
            gbs_t = tf.constant(float(gbs))
            for epoch in range(first, phase.end_epoch):
                done = skip_steps if epoch == first else 0
                epoch_loss, epoch_correct, epoch_steps = 0.0, 0.0, 0
                bar = keras.utils.Progbar(
                    phase.steps_per_epoch,
                    verbose=cfg.verbose if self.is_chief else 0,
                    unit_name="step",
                )
                epoch_start = time.perf_counter()
                while done < phase.steps_per_epoch:
                    n = min(cfg.steps_per_execution, phase.steps_per_epoch - done)
                    if cfg.checkpoint_every_steps:
                        n = min(n, cfg.checkpoint_every_steps - done % cfg.checkpoint_every_steps)
                    loss_sum, correct_sum = self._train_steps(
                        iterator, tf.constant(n), gbs_t, num_micro
                    )
                    loss_sum = float(loss_sum)  # waits for the steps to finish
                    now = time.perf_counter()
                    if switching:  # pipeline rebuild + (re)trace + first step of a new phase
                        switch_seconds.append(now - phase_setup_start)
                        switching = False
                    done += n
                    epoch_loss += loss_sum
                    epoch_correct += float(correct_sum)
                    epoch_steps += n
                    self._step_in_epoch.assign(done)
                    bar.update(done, [("loss", loss_sum / n)])
                    if (
                        cfg.checkpoint_every_steps
                        and done % cfg.checkpoint_every_steps == 0
                        and done < phase.steps_per_epoch
                    ):
                        manager.save(checkpoint_number=self.iterations())
                epoch_time = time.perf_counter() - epoch_start
                train_seconds += epoch_time
                examples += epoch_steps * gbs
                self._epoch.assign(epoch + 1)
                self._step_in_epoch.assign(0)
                final_loss = epoch_loss / max(epoch_steps, 1)
                record = {
                    "epoch": epoch,
                    "train_loss": final_loss,
                    "train_accuracy": epoch_correct / max(epoch_steps * gbs, 1),
                    "learning_rate": plan.learning_rate_at_step(plan.step_at_epoch(epoch)),
                    "global_batch_size": gbs,
                    "momentum": phase.momentum,
                    "phase": phase_index,
                    "steps": self.iterations(),
                    "examples_per_second": epoch_steps * gbs / max(epoch_time, 1e-9),
                }
                if validation_data is not None:
                    metrics = self.evaluate(*validation_data)
                    record.update(test_loss=metrics["loss"], test_accuracy=metrics["accuracy"])
                history.append(record)
                self._log_epoch(writer, record)
                manager.save(checkpoint_number=self.iterations())
                if self.is_chief:
                    write_json(history_path, history)
        if not self.is_chief:
            tf.io.gfile.rmtree(write_dir) if tf.io.gfile.exists(write_dir) else None
        results = self._results(
            history,
            final_loss,
            examples,
            train_seconds,
            time.perf_counter() - wall_start,
            switch_seconds,
            validation_data,
        )
        if self.is_chief:
            write_json(os.path.join(cfg.model_dir, "results.json"), results)
            if cfg.save_model:
                self.model.save(os.path.join(cfg.model_dir, "model.keras"))
        return results

    def _log_epoch(self, writer: Any, record: dict[str, Any]) -> None:
        with writer.as_default(step=record["steps"]):
            for key in (
                "train_loss",
                "train_accuracy",
                "test_loss",
                "test_accuracy",
                "learning_rate",
                "global_batch_size",
                "momentum",
                "examples_per_second",
            ):
                if key in record:
                    tf.summary.scalar(key, record[key])
        writer.flush()
        if self.config.verbose and self.is_chief:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
            _log.info("epoch %s", shown)

    def _results(
        self,
        history: list[dict[str, Any]],
        final_loss: float,
        examples: int,
        train_seconds: float,
        wall_seconds: float,
        switch_seconds: Sequence[float],
        validation_data: Any,
    ) -> dict[str, Any]:
        results: dict[str, Any] = {
            "final_train_loss": final_loss,
            "parameter_updates": self.iterations(),
            "epochs_completed": int(self._epoch),
            "examples_per_second": examples / train_seconds if train_seconds else 0.0,
            "wall_seconds": wall_seconds,
            "num_replicas": self.num_replicas,
            "phases": [
                {
                    "start_epoch": p.start_epoch,
                    "end_epoch": p.end_epoch,
                    "global_batch_size": p.global_batch_size,
                    "learning_rate": p.learning_rate,
                    "momentum": p.momentum,
                    "steps": p.steps,
                    "steps_per_epoch": p.steps_per_epoch,
                }
                for p in self.plan.phases
            ],
            "plan": self.plan.to_dict(),
            "history": history,
            "trace_count": self.trace_count,
            "phase_switch_seconds": list(switch_seconds),
        }
        if validation_data is not None:
            metrics = self.evaluate(*validation_data)
            results.update(test_loss=metrics["loss"], test_accuracy=metrics["accuracy"])
        return results


def remove_worker_temp_dirs(model_dir: str) -> None:
    """Removes leftover non-chief checkpoint directories (e.g. after a crash)."""
    for name in tf.io.gfile.listdir(model_dir) if tf.io.gfile.exists(model_dir) else []:
        if name.startswith(".tmp_"):
            shutil.rmtree(os.path.join(model_dir, name), ignore_errors=True)
