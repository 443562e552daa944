"""`Trainer`: the distributed training loop that follows a `PhasePlan`.

Under any `tf.distribute` strategy (one device, MirroredStrategy, MultiWorkerMirroredStrategy)
it does what Goyal et al. 2017 §2–3 ask of data-parallel SGD:

- loss averaged over the *global* batch (Remark 3; see `steps.TrainStep`), so the result does
  not depend on the number of replicas;
- one permutation of the training set per epoch shared by every worker (Remark 4), the input
  pipeline rebuilt with `distribute_datasets_from_function` at every phase's batch size;
- the plan's learning rate (a schedule on ``optimizer.iterations``) and momentum, with
  momentum correction in our `SGD`;
- gradient accumulation when a per-replica batch exceeds ``max_per_replica_batch_size``;
- checkpoints of model, optimizer, epoch, phase and step (chief writes, other workers write to
  temporary directories that are removed); rerunning with the same ``model_dir`` resumes;
- optionally the gradient noise scale, and an adaptive policy that grows the batch towards it.

Keras 3's `model.fit` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_largebatch import data as data_lib
from tf_largebatch import distribute as distribute_lib
from tf_largebatch import noise as noise_lib
from tf_largebatch._validation import (
    check_choice,
    check_momentum,
    check_non_negative_int,
    check_positive_int,
)
from tf_largebatch.checkpoints import RunState
from tf_largebatch.fitting import set_momentum
from tf_largebatch.phases import PhasePlan
from tf_largebatch.steps import TrainStep

_log = logging.getLogger(__name__)
Schedule = keras.optimizers.schedules.LearningRateSchedule
MIXED_PRECISION = (None, "mixed_float16", "mixed_bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """How the `Trainer` runs (what it trains is the `PhasePlan`).

    Attributes:
      model_dir: checkpoints, TensorBoard logs, ``plan.json``, ``history.json``,
        ``results.json`` and ``model.keras``; rerunning with the same directory resumes.
      seed: seeds model initialisation and the per-epoch permutations.
      max_per_replica_batch_size: larger per-replica batches are split into micro-batches of
        at most this many examples whose gradients are summed inside one step.
      steps_per_execution: training steps run inside one compiled call.
      checkpoint_every_steps: also checkpoint every this many steps of an epoch (0: epoch ends).
      max_checkpoints_to_keep: checkpoints kept by the `tf.train.CheckpointManager`.
      eval_batch_size: batch size of the evaluation pass.
      eval_every_epochs: evaluate on the validation data every this many epochs (and after
        the last one).
      verbose: 1 shows a `keras.utils.Progbar` per epoch on the chief, 0 is silent.
      jit_compile: XLA-compile the per-replica forward/backward pass.
      mixed_precision: ``None``, ``"mixed_float16"`` (with loss scaling) or
        ``"mixed_bfloat16"``.
      save_model: write ``model_dir/model.keras`` at the end (chief only).
      measure_noise_scale: estimate the gradient noise scale B_simple every step.
      noise_scale_beta: EMA decay of the noise-scale estimator.
      adaptive_max_global_batch_size: if set, grow the batch at epoch ends towards B_simple,
        up to this size (turns on ``measure_noise_scale``).
      adaptive_factor: the batch grows by whole powers of this factor.
      adaptive_learning_rate_rule: how the learning rate follows a grown batch
        (``"linear"``, ``"sqrt"``, ``"keep"``; see `noise.scaled_learning_rate_for_batch`).
      adaptive_min_steps: steps the estimator must have seen before a decision.
    """

    model_dir: str
    seed: int = 0
    max_per_replica_batch_size: int | None = None
    steps_per_execution: int = 1
    checkpoint_every_steps: int = 0
    max_checkpoints_to_keep: int = 2
    eval_batch_size: int = 512
    eval_every_epochs: int = 1
    verbose: int = 1
    jit_compile: bool = False
    mixed_precision: str | None = None
    save_model: bool = True
    measure_noise_scale: bool = False
    noise_scale_beta: float = 0.99
    adaptive_max_global_batch_size: int | None = None
    adaptive_factor: int = 2
    adaptive_learning_rate_rule: str = "linear"
    adaptive_min_steps: int = 20

    def __post_init__(self) -> None:
        if not self.model_dir:
            raise ValueError(f"Argument `model_dir` must be a path. Received: {self.model_dir!r}")
        if self.max_per_replica_batch_size is not None:
            check_positive_int("max_per_replica_batch_size", self.max_per_replica_batch_size)
        check_positive_int("steps_per_execution", self.steps_per_execution)
        check_non_negative_int("checkpoint_every_steps", self.checkpoint_every_steps)
        check_positive_int("max_checkpoints_to_keep", self.max_checkpoints_to_keep)
        check_positive_int("eval_batch_size", self.eval_batch_size)
        check_positive_int("eval_every_epochs", self.eval_every_epochs)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_momentum("noise_scale_beta", self.noise_scale_beta)
        if self.adaptive_max_global_batch_size is not None:
            check_positive_int(
                "adaptive_max_global_batch_size", self.adaptive_max_global_batch_size
            )
        check_choice(
            "adaptive_learning_rate_rule",
            self.adaptive_learning_rate_rule,
            noise_lib.LR_RULES_FOR_BATCH_GROWTH,
        )
        if self.adaptive_factor < 2:
            raise ValueError(
                f"Argument `adaptive_factor` must be >= 2. Received: {self.adaptive_factor=}"
            )

    @property
    def adaptive(self) -> bool:
        return self.adaptive_max_global_batch_size is not None


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


class Trainer:
    """Trains a Keras model through the phases of a `PhasePlan` under a `tf.distribute` strategy.

    Args:
      model_fn: builds the (uncompiled) model; called inside ``strategy.scope()``.
      plan: the batch-size phases to follow.
      config: a `TrainerConfig`.
      metrics: extra Keras metrics computed on the validation data (e.g.
        ``keras.metrics.SparseTopKCategoricalAccuracy(5)``), reported as ``test_<name>``;
        loss and top-1 accuracy are always reported, for training and validation.
      loss: a Keras loss or its name, applied per example; default sparse categorical
        cross-entropy on logits.
      optimizer_fn: builds the optimizer from the plan's learning-rate schedule; default our
        `SGD` with momentum correction.
      strategy: default ``tf.distribute.get_strategy()``.

    Raises:
      ValueError: a phase's global batch not divisible by the number of replicas.

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
        metrics: Sequence[keras.metrics.Metric] = (),
        optimizer_fn: Callable[[Schedule], keras.optimizers.Optimizer] | None = None,
        strategy: tf.distribute.Strategy | None = None,
    ) -> None:
        self.plan = self.initial_plan = plan
        self.config = config
        self.strategy = strategy or tf.distribute.get_strategy()
        self.num_replicas = self.strategy.num_replicas_in_sync
        self._check_divisible(plan)
        self.is_chief = distribute_lib.is_chief(self.strategy)
        loss = loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self._loss_fn = _per_example_loss(loss)
        previous_policy = keras.mixed_precision.global_policy()
        if config.mixed_precision:  # the policy the model's layers are built with
            keras.mixed_precision.set_global_policy(config.mixed_precision)
        with self.strategy.scope():
            keras.utils.set_random_seed(config.seed)
            self.model = model_fn()
            if optimizer_fn is None:
                from tf_largebatch.optimizers import SGD

                def optimizer_fn(lr: Schedule) -> keras.optimizers.Optimizer:
                    return SGD(lr, momentum=plan.phases[0].momentum)

            self.optimizer = optimizer_fn(plan.learning_rate_schedule())
            if config.mixed_precision == "mixed_float16":
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
            self.optimizer.build(self.model.trainable_variables)
        keras.mixed_precision.set_global_policy(previous_policy)
        measure = config.measure_noise_scale or config.adaptive
        self.noise_estimator = (
            noise_lib.NoiseScaleEstimator(config.noise_scale_beta) if measure else None
        )
        trackables: dict[str, Any] = {"model": self.model, "optimizer": self.optimizer}
        if measure:
            trackables["noise"] = self.noise_estimator
        # Host-side counters are plain variables (outside the strategy) inside RunState.
        self.state = RunState(
            config.model_dir,
            is_chief=self.is_chief,
            worker=distribute_lib.worker_info(self.strategy),
            trackables=trackables,
            max_to_keep=config.max_checkpoints_to_keep,
        )
        self._step = TrainStep(
            self.model,
            self.optimizer,
            self._loss_fn,
            self.strategy,
            jit_compile=config.jit_compile,
            noise_estimator=self.noise_estimator,
        )
        self._eval_step: Any = None  # traced once, for any batch size, on first use
        self.metrics = list(metrics)

    @property
    def trace_count(self) -> int:
        """Traces of the compiled training step so far."""
        return self._step.trace_count

    def iterations(self) -> int:
        """Parameter updates so far (``optimizer.iterations``)."""
        return int(keras.ops.convert_to_numpy(self.optimizer.iterations))

    def _check_divisible(self, plan: PhasePlan) -> None:
        for phase in plan.phases:
            if phase.global_batch_size % self.num_replicas:
                raise ValueError(
                    f"Argument `global_batch_size` must be divisible by the number of replicas "
                    f"({self.num_replicas}). Received: global_batch_size="
                    f"{phase.global_batch_size} (phase from epoch {phase.start_epoch})"
                )

    def _micro_batches(self, global_batch_size: int) -> int:
        per_replica = global_batch_size // self.num_replicas
        k = micro_batches(per_replica, self.config.max_per_replica_batch_size)
        if self.noise_estimator is not None and self.num_replicas == 1 and k == 1:
            k = 2 if per_replica % 2 == 0 else micro_batches(per_replica, per_replica - 1)
        return k

    def _eval_step_fn(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        logits = tf.cast(self.model(x, training=False), tf.float32)
        loss = tf.reduce_sum(tf.cast(self._loss_fn(y, logits), tf.float32))
        hits = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), tf.cast(y, tf.int32))
        for metric in self.metrics:
            metric.update_state(y, logits)
        return loss, tf.reduce_sum(tf.cast(hits, tf.float32))

    def evaluate(self, x: Any, y: np.ndarray | None = None) -> dict[str, float]:
        """Loss and accuracy over a whole evaluation set (every worker evaluates it all).

        Args:
          x: inputs (with labels `y`), or a `tf.data.Dataset` of ``(x, y)`` batches.
          y: labels, when `x` is an array.
        """
        if y is not None:  # slices of two tensors: cheaper than a tf.data pipeline per call
            x, y = tf.convert_to_tensor(x), tf.convert_to_tensor(y)
            size = self.config.eval_batch_size
            batches = [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]
        else:
            batches = x
        if self._eval_step is None:
            xs, ys = next(iter(batches))
            self._eval_step = tf.function(
                self._eval_step_fn,
                input_signature=[
                    tf.TensorSpec([None, *xs.shape[1:]], xs.dtype),
                    tf.TensorSpec([None, *ys.shape[1:]], ys.dtype),
                ],
            )
        loss, correct, count = 0.0, 0.0, 0
        for metric in self.metrics:
            metric.reset_state()
        for xb, yb in batches:
            batch_loss, batch_correct = self._eval_step(xb, yb)
            loss += float(batch_loss)
            correct += float(batch_correct)
            count += int(xb.shape[0])
        extra = {m.name: float(keras.ops.convert_to_numpy(m.result())) for m in self.metrics}
        return {"loss": loss / count, "accuracy": correct / count, **extra}

    # ---- resuming ---------------------------------------------------------------------------

    def _restore(self) -> list[dict[str, Any]]:
        """Restores plan, checkpoint and history from ``model_dir`` and checks they agree."""
        plan, history = self.state.restore(self.initial_plan)
        if plan is not None:
            self._set_plan(plan)
        epoch = int(self.state.epoch.numpy())
        skip = int(self.state.step_in_epoch.numpy())
        expected = self.plan.step_at_epoch(epoch) + skip
        steps_run = int(self.state.steps_run.numpy())
        if steps_run != expected:
            raise ValueError(
                f"The checkpoint in model_dir={self.config.model_dir!r} is at step "
                f"{steps_run}, but the plan puts epoch {epoch} step {skip} at step "
                f"{expected}; the run cannot resume with this plan."
            )
        return history

    def _set_plan(self, plan: PhasePlan) -> None:
        """Adopts a (grown) plan: new schedule, so the step is traced again."""
        self._check_divisible(plan)
        self.plan = plan
        inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        inner.learning_rate = plan.learning_rate_schedule()
        self._step.retrace()

    # ---- the loop --------------------------------------------------------------------------

    def fit(
        self,
        x: Any,
        y: np.ndarray | None = None,
        validation_data: Any = None,
    ) -> dict[str, Any]:
        """Trains through every phase, resuming from ``model_dir`` if it holds a checkpoint.

        Args:
          x: training inputs (with labels `y`, the data set held in memory and permuted once
            per epoch), or a data source (`y` None) with ``num_examples`` and
            ``make_dataset_fn(global_batch_size, *, seed, start_epoch, end_epoch, skip_steps,
            static_batch_size)`` returning the per-replica ``dataset_fn`` (e.g. a streaming
            TFDS source for data sets too large for memory).
          y: labels.
          validation_data: ``(x, y)`` arrays or a `tf.data.Dataset` of ``(x, y)`` batches.

        Returns:
          The results, also written to ``model_dir/results.json``: ``test_accuracy``,
          ``test_loss``, ``final_train_loss``, ``parameter_updates``, ``epochs_completed``,
          ``examples_per_second``, ``wall_seconds``, ``num_replicas``, ``phases``,
          ``history``, ``trace_count``, ``phase_switch_seconds`` (and the noise scale when
          measured, ``adaptive_decisions`` when adaptive).
        """
        cfg = self.config
        source = data_lib.ArraySource(x, y) if y is not None else x
        if source.num_examples != self.plan.dataset_size:
            raise ValueError(
                f"Argument `x` must hold the plan's dataset_size={self.plan.dataset_size} "
                f"examples. Received: {source.num_examples} examples"
            )
        if isinstance(validation_data, (tuple, list)):  # to tensors once, not every epoch
            validation_data = tuple(tf.convert_to_tensor(v) for v in validation_data)
            evaluate = lambda: self.evaluate(*validation_data)  # noqa: E731
        else:
            evaluate = lambda: self.evaluate(validation_data)  # noqa: E731
        if not self.plan.drop_remainder:
            raise ValueError("The Trainer needs a plan with drop_remainder=True.")
        tf.io.gfile.makedirs(cfg.model_dir)
        history = self._restore()
        self.state.write_plan(self.initial_plan, self.plan)
        writer = (
            tf.summary.create_file_writer(os.path.join(cfg.model_dir, "tensorboard"))
            if self.is_chief
            else tf.summary.create_noop_writer()
        )
        stats = {"switch": [], "train_seconds": 0.0, "examples": 0, "noise_steps": []}
        decisions = [h["adaptive_decision"] for h in history if "adaptive_decision" in h]
        wall_start = time.perf_counter()
        epoch = int(self.state.epoch.numpy())
        iterator, built_phase = None, None
        while epoch < self.plan.epochs:
            phase_index = self.plan.phase_index(epoch)
            phase = self.plan.phases[phase_index]
            skip = int(self.state.step_in_epoch.numpy())
            switching = False
            if (phase_index, phase) != built_phase:
                setup_start = time.perf_counter()
                switching = built_phase is not None  # a phase change inside this run
                inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)
                set_momentum(inner, phase.momentum)
                self.state.phase.assign(phase_index)
                dataset_fn = source.make_dataset_fn(
                    phase.global_batch_size,
                    seed=cfg.seed,
                    start_epoch=epoch,
                    end_epoch=phase.end_epoch,
                    skip_steps=skip,
                    static_batch_size=False,
                )  # no static batch dimension: one trace serves every phase
                iterator = iter(self.strategy.distribute_datasets_from_function(dataset_fn))
                built_phase = (phase_index, phase)
            record = self._train_epoch(
                iterator, epoch, phase, skip, stats, setup_start if switching else None
            )
            record["phase"] = phase_index
            last = epoch + 1 == self.plan.epochs
            if validation_data is not None and (last or (epoch + 1) % cfg.eval_every_epochs == 0):
                record.update({f"test_{k}": v for k, v in evaluate().items()})
            epoch += 1
            self.state.epoch.assign(epoch)
            self.state.step_in_epoch.assign(0)
            decision = self._adapt(epoch, record)
            if decision:
                record["adaptive_decision"] = decision
                decisions.append(decision)
            history.append(record)
            self._log_epoch(writer, record)
            self.state.write("history.json", history)  # before the checkpoint that needs it
            self.state.save(self.iterations())
        self.state.finish()
        results = self._results(history, stats, time.perf_counter() - wall_start)
        if decisions:
            results["adaptive_decisions"] = decisions
        if history and "test_loss" in history[-1] and history[-1]["epoch"] == self.plan.epochs - 1:
            results.update({k: v for k, v in history[-1].items() if k.startswith("test_")})
        elif validation_data is not None:
            results.update({f"test_{k}": v for k, v in evaluate().items()})
        self.state.write("results.json", results)
        if self.is_chief and cfg.save_model:
            self.model.save(os.path.join(cfg.model_dir, "model.keras"))
        return results

    def _train_epoch(
        self,
        iterator: Any,
        epoch: int,
        phase: Any,
        skip: int,
        stats: dict[str, Any],
        setup_start: float | None,
    ) -> dict[str, Any]:
        cfg, spe, gbs = self.config, phase.steps_per_epoch, phase.global_batch_size
        num_micro = self._micro_batches(gbs)
        done, loss_total, correct_total = skip, 0.0, 0.0
        show = bool(cfg.verbose) and self.is_chief
        if show:  # like model.fit's header (the Progbar is our one use of stdout)
            lr = self.plan.learning_rate_at_step(self.plan.step_at_epoch(epoch) + skip)
            print(f"Epoch {epoch + 1}/{self.plan.epochs} - global batch {gbs}, lr {lr:.4g}")
        bar = keras.utils.Progbar(spe, verbose=1 if show else 0)
        start = time.perf_counter()
        b_simple = float("nan")
        while done < spe:
            n = min(cfg.steps_per_execution, spe - done)
            if cfg.checkpoint_every_steps:
                n = min(n, cfg.checkpoint_every_steps - done % cfg.checkpoint_every_steps)
            loss_sum, correct_sum, b_simple_t = self._step(iterator, n, gbs, num_micro)
            loss_sum = float(loss_sum)  # waits for the steps to finish
            if setup_start is not None:  # pipeline rebuild + (re)trace + first steps
                stats["switch"].append(time.perf_counter() - setup_start)
                setup_start = None
            done += n
            self.state.steps_run.assign_add(n)
            loss_total += loss_sum
            correct_total += float(correct_sum)
            self.state.step_in_epoch.assign(done)
            values = [("loss", loss_sum / n)]
            if self.noise_estimator is not None:
                b_simple = float(b_simple_t)
                stats["noise_steps"].append([self.iterations(), b_simple])
                values.append(("noise_scale", b_simple))
            bar.update(done, values)
            if cfg.checkpoint_every_steps and done % cfg.checkpoint_every_steps == 0 < spe - done:
                self.state.save(self.iterations())
        seconds = time.perf_counter() - start
        steps = spe - skip
        stats["train_seconds"] += seconds
        stats["examples"] += steps * gbs
        record = {
            "epoch": epoch,
            "train_loss": loss_total / max(steps, 1),
            "train_accuracy": correct_total / max(steps * gbs, 1),
            "learning_rate": self.plan.learning_rate_at_step(self.plan.step_at_epoch(epoch)),
            "global_batch_size": gbs,
            "momentum": phase.momentum,
            "steps": self.iterations(),
            "examples_per_second": steps * gbs / max(seconds, 1e-9),
        }
        if self.noise_estimator is not None:
            record["noise_scale"] = b_simple
        return record

    def _adapt(self, next_epoch: int, record: dict[str, Any]) -> dict[str, Any] | None:
        """At an epoch end: grow the batch towards the measured B_simple (adaptive mode)."""
        cfg = self.config
        if not cfg.adaptive or int(self.noise_estimator.count.numpy()) < cfg.adaptive_min_steps:
            return None
        adapted = noise_lib.adapt_plan(
            self.plan, next_epoch, record["noise_scale"],
            max_global_batch_size=cfg.adaptive_max_global_batch_size,
            factor=cfg.adaptive_factor, multiple_of=self.num_replicas,
            rule=cfg.adaptive_learning_rate_rule,
        )  # fmt: skip
        if adapted is None:
            return None
        plan, decision = adapted
        self._set_plan(plan)
        self.state.write_plan(self.initial_plan, self.plan)
        _log.warning("adaptive batch: %s", decision)
        return decision

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
                "noise_scale",
            ):
                if key in record and math.isfinite(record[key]):
                    tf.summary.scalar(key, record[key])
        writer.flush()
        if self.is_chief and self.config.verbose:
            shown = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "noise_scale")
            print("  " + ", ".join(f"{k}: {record[k]:.4f}" for k in shown if k in record))

    def _results(
        self, history: list[dict[str, Any]], stats: dict[str, Any], wall_seconds: float
    ) -> dict[str, Any]:
        plan = self.plan.to_dict()
        results: dict[str, Any] = {
            "final_train_loss": history[-1]["train_loss"] if history else float("nan"),
            "parameter_updates": self.iterations(),
            # steps a float16 loss scaler skipped on overflow (no update was applied)
            "skipped_steps": int(self.state.steps_run.numpy()) - self.iterations(),
            "epochs_completed": int(self.state.epoch.numpy()),
            "examples_per_second": (
                stats["examples"] / stats["train_seconds"] if stats["train_seconds"] else 0.0
            ),
            "wall_seconds": wall_seconds,
            "num_replicas": self.num_replicas,
            "phases": plan["phases"],  # start/end epoch, batch, lr, momentum, steps, ...
            "plan": plan,
            "history": history,
            "trace_count": self.trace_count,
            "phase_switch_seconds": stats["switch"],
        }
        if self.noise_estimator is not None:
            results["noise_scale_steps"] = stats["noise_steps"]
        weights = [np.asarray(w, np.float32).tobytes() for w in self.model.get_weights()]
        results["weights_sha256"] = hashlib.sha256(b"".join(weights)).hexdigest()
        return results
