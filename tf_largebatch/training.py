"""`Trainer`: a drop-in for ``model.fit`` that follows a `PhasePlan` under any strategy.

It takes what ``model.fit`` takes — a compiled model (or loss/metrics/optimizer arguments for an
uncompiled one), arrays, dicts of arrays, an unbatched `tf.data.Dataset` or a ``dataset_fn``,
sample weights, validation data and Keras callbacks — and returns a `keras.callbacks.History`,
on one device, `MirroredStrategy` or `MultiWorkerMirroredStrategy` (where Keras 3's
``model.fit`` fails, keras-team/keras#20585). It does what Goyal et al. 2017 §2–3 ask of
data-parallel SGD:

- loss averaged over the *global* batch (Remark 3; `steps.TrainStep`), so results do not depend
  on the replica count;
- one permutation of the training set per epoch shared by every worker (Remark 4), the input
  pipeline rebuilt with `distribute_datasets_from_function` at every phase's batch size
  (`inputs`);
- the plan's learning rate (a schedule on ``optimizer.iterations``, put in place of the
  optimizer's learning rate) and momentum (where the optimizer has one);
- gradient accumulation when a per-replica batch exceeds ``max_per_replica_batch_size``;
- checkpoints of model, optimizer, epoch, phase and step; rerunning with the same
  ``model_dir`` resumes; a non-finite loss stops the run before anything is saved over the
  last good checkpoint;
- optionally the gradient noise scale, and an adaptive policy (`callbacks.AdaptiveBatchSize`)
  that grows the batch towards it.

The loop (this module) owns phases, evaluation cadence, checkpoints and callbacks; the compiled
computation is `steps.TrainStep` / `steps.EvalStep`, whose hooks a subclass can override.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

from tf_largebatch import callbacks as callbacks_lib
from tf_largebatch import device_data as device_data_lib
from tf_largebatch import distribute as distribute_lib
from tf_largebatch import inputs as inputs_lib
from tf_largebatch import noise as noise_lib
from tf_largebatch._validation import (
    check_positive_int,
)
from tf_largebatch.checkpoints import RunState, read_json
from tf_largebatch.controller import (
    Controller,
    NonFiniteLossError,  # noqa: F401 (re-exported)
    Preempted,  # noqa: F401 (re-exported)
    fill_history,
)
from tf_largebatch.device_data import DeviceArrays
from tf_largebatch.phases import PhasePlan
from tf_largebatch.steps import EvalStep, TrainStep
from tf_largebatch.trainer_config import (  # noqa: F401 (re-exported)
    MIXED_PRECISION,
    TrainerConfig,
    micro_batches,
)

_log = logging.getLogger(__name__)

Schedule = keras.optimizers.schedules.LearningRateSchedule


def batch_sizes(plan: PhasePlan) -> tuple[int, ...]:
    """The plan's distinct global batch sizes, in phase order (each traced with static
    shapes when the data are on the devices: `steps.TrainStep`)."""
    return tuple(dict.fromkeys(phase.global_batch_size for phase in plan.phases))


class Trainer:
    """Trains a Keras model through the phases of a `PhasePlan` under a `tf.distribute` strategy.

    ``model_fn`` is called inside ``strategy.scope()``. If it returns a *compiled* model, the
    Trainer trains with its compiled loss (any Keras loss, several outputs, ``loss_weights``),
    its compiled metrics and its optimizer, the plan's learning-rate schedule put in place of the
    optimizer's learning rate and the plan's momentum set on optimizers that have one. An
    uncompiled model is compiled with `loss`, `metrics` and ``optimizer_fn(schedule)``.
    ``compile``'s ``steps_per_execution`` and ``jit_compile`` give way to the `TrainerConfig`'s
    (``steps_per_execution``, ``jit_compile``); a model that overrides ``compute_loss`` is
    called as ``model.fit`` calls it.

    Args:
      model_fn: builds the model (compiled or not); called inside ``strategy.scope()``.
      plan: the batch-size phases to follow.
      config: a `TrainerConfig`.
      loss: for an uncompiled model: a Keras loss or its name; default sparse categorical
        cross-entropy on logits (then `metrics` defaults to ``["accuracy"]``).
      metrics: for an uncompiled model: Keras metrics (objects or names).
      optimizer_fn: for an uncompiled model: builds the optimizer from the plan's schedule;
        default our `SGD` with momentum correction.
      strategy: default ``tf.distribute.get_strategy()``.
      learning_rate_fn: the schedule put into the optimizer for a plan (also for a plan
        adopted later); default ``plan.learning_rate_schedule()`` (warmup, then each phase's
        learning rate). E.g. ``lambda plan: InverseSqrtDecay(1e-3, plan.warmup_steps)``.

    Raises:
      ValueError: a phase's global batch not divisible by the number of replicas.

    Example:
      >>> def model_fn():
      ...     model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
      ...     model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
      ...     return model
      >>> trainer = Trainer(model_fn, plan, TrainerConfig(model_dir="/tmp/run"))
      >>> history = trainer.fit(x, y, validation_data=(x_val, y_val), callbacks=[...])
      >>> history.history["val_mae"], trainer.results["parameter_updates"]
    """

    def __init__(
        self,
        model_fn: Callable[[], keras.Model],
        plan: PhasePlan,
        config: TrainerConfig,
        *,
        loss: Any = None,
        metrics: Sequence[Any] | None = None,
        optimizer_fn: Callable[[Schedule], keras.optimizers.Optimizer] | None = None,
        strategy: tf.distribute.Strategy | None = None,
        learning_rate_fn: Callable[[PhasePlan], Schedule] | None = None,
    ) -> None:
        self.plan = self.initial_plan = plan
        self.learning_rate_fn = learning_rate_fn or PhasePlan.learning_rate_schedule
        self.config = config
        self.strategy = strategy or tf.distribute.get_strategy()
        self.num_replicas = self.strategy.num_replicas_in_sync
        self._check_divisible(plan)
        self.is_chief = distribute_lib.is_chief(self.strategy)
        previous_policy = keras.mixed_precision.global_policy()
        if config.mixed_precision:  # the policy the model's layers are built with
            keras.mixed_precision.set_global_policy(config.mixed_precision)
        try:
            with self.strategy.scope():
                keras.utils.set_random_seed(config.seed)
                self.model = model_fn()
                self._compile(loss, metrics, optimizer_fn)
                self._eval_loss = keras.metrics.Mean(name="loss")
        finally:
            keras.mixed_precision.set_global_policy(previous_policy)
        self.optimizer = self.model.optimizer
        measure = config.measure_noise_scale or config.adaptive
        self.noise_estimator = (
            noise_lib.NoiseScaleEstimator(config.noise_scale_beta) if measure else None
        )
        trackables: dict[str, Any] = {"model": self.model, "optimizer": self.optimizer}
        if measure:
            trackables["noise"] = self.noise_estimator
        self.state = RunState(
            config.model_dir,
            is_chief=self.is_chief,
            worker=distribute_lib.worker_info(self.strategy),
            trackables=trackables,
            max_to_keep=config.max_checkpoints_to_keep,
            async_writes=self._async_checkpoints(),
        )
        self.train_step = TrainStep(
            self.model, self.optimizer, self.strategy,
            jit_compile=config.jit_compile, noise_estimator=self.noise_estimator,
        )  # fmt: skip
        self.train_step.batch_sizes = batch_sizes(self.plan)  # adopt_plan sets a new plan's
        self.eval_step = EvalStep(self.model, self.strategy, self._eval_loss)
        self.results: dict[str, Any] = {}
        self.device_data: DeviceArrays | None = None  # the training set on the devices
        self._built = False
        self.epoch_notes: dict[str, Any] = {}  # what controller actions record for the epoch

    def _compile(self, loss: Any, metrics: Any, optimizer_fn: Any) -> None:
        """Compiles an uncompiled model; puts the plan's schedule into the optimizer."""
        schedule = self.learning_rate_fn(self.plan)
        if not getattr(self.model, "compiled", False):
            if optimizer_fn is None:
                from tf_largebatch.optimizers import SGD

                def optimizer_fn(lr: Schedule) -> keras.optimizers.Optimizer:
                    return SGD(lr, momentum=self.plan.phases[0].momentum)

            if loss is None:
                loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
                metrics = ["accuracy"] if metrics is None else ["accuracy", *metrics]
            self.model.compile(optimizer=optimizer_fn(schedule), loss=loss, metrics=metrics)
        elif loss is not None or metrics is not None or optimizer_fn is not None:
            raise ValueError(
                "Arguments `loss`, `metrics` and `optimizer_fn` are for an uncompiled model; "
                "model_fn returned a compiled one (its compile arguments are used)."
            )
        optimizer = self.model.optimizer
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        if not isinstance(inner._learning_rate, Schedule):  # noqa: SLF001 (no public test)
            # Replacing a float learning rate would untrack its variable, which makes the
            # optimizer's variable list impossible to checkpoint: clone it with the schedule.
            inner = type(inner).from_config({**inner.get_config(), "learning_rate": schedule})
        else:
            inner.learning_rate = schedule
        mixed16 = self.config.mixed_precision == "mixed_float16"
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) or mixed16:
            scale = getattr(optimizer, "initial_scale", 2.0**15)
            optimizer = keras.optimizers.LossScaleOptimizer(inner, initial_scale=scale)
        else:
            optimizer = inner
        self.model.optimizer = optimizer

    @property
    def trace_count(self) -> int:
        """Traces of the compiled training step so far."""
        return self.train_step.trace_count

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

    def _build(self, data: inputs_lib.DatasetFn | DeviceArrays) -> None:
        """Builds model, compiled loss/metrics and optimizer eagerly under the scope.

        Keras builds them on the first batch; inside a traced distributed step that fails
        (keras-team/keras#23085), so they are built here from the element spec (of the
        `DeviceArrays`, or of a pipeline `data` makes).
        """
        if self._built:
            return
        if isinstance(data, DeviceArrays):
            spec = data.element_spec
        else:
            spec = data(tf.distribute.InputContext(1, 0, self.num_replicas)).element_spec
        with self.strategy.scope():
            self.model._symbolic_build(data_batch=spec)  # noqa: SLF001 (model.fit does this)
            if not self.optimizer.built:
                self.optimizer.build(self.model.trainable_variables)
        self._built = True

    # ---- evaluation -------------------------------------------------------------------------

    def evaluate(
        self,
        x: Any = None,
        y: Any = None,
        *,
        sample_weight: Any = None,
        batch_size: int | None = None,
        callbacks: Any = None,
        return_dict: bool = True,
    ) -> dict[str, float]:
        """Loss and compiled metrics over a whole data set, distributed over the replicas.

        Every example is evaluated exactly once (each batch cut into one piece per replica);
        per-replica sums are added across replicas. Returns what
        ``model.evaluate(..., return_dict=True)`` returns.

        Args:
          x: inputs (arrays, tuples or dicts of arrays) with `y`, or a `tf.data.Dataset` of
            ``(x, y)`` / ``(x, y, sample_weight)`` *batches* (as ``model.evaluate`` takes).
          y: targets, when `x` holds arrays.
          sample_weight: per-example weights, when `x` holds arrays.
          batch_size: global evaluation batch (default ``config.eval_batch_size``).
          callbacks: a `keras.callbacks.CallbackList` or a list of callbacks
            (``on_test_begin``, ``on_test_batch_begin/end``, ``on_test_end``).
          return_dict: must be True (the only form returned).
        """
        if not return_dict:
            raise ValueError("Argument `return_dict` must be True. Received: return_dict=False")
        data = x
        if not isinstance(x, inputs_lib.EvalDataset):
            data = inputs_lib.EvalDataset(
                x, y, sample_weight, batch_size=batch_size or self.config.eval_batch_size
            )
        if not isinstance(callbacks, keras.callbacks.CallbackList):
            callbacks = keras.callbacks.CallbackList(callbacks or [], model=self.model)
        dataset_fn = data.dataset_fn()
        self._build(dataset_fn)
        iterator = iter(self.strategy.distribute_datasets_from_function(dataset_fn))
        self.model.reset_metrics()
        self._eval_loss.reset_state()
        callbacks.on_test_begin()
        logs: dict[str, float] = {}
        done, per_call = 0, self.config.steps_per_execution
        while done < data.steps:
            n = min(per_call, data.steps - done)
            callbacks.on_test_batch_begin(done)
            logs = {k: float(v) for k, v in self.eval_step(iterator, n).items()}
            done += n
            callbacks.on_test_batch_end(done - 1, logs)
        callbacks.on_test_end(logs)
        return logs

    # ---- resuming ---------------------------------------------------------------------------

    def _restore(self) -> list[dict[str, Any]]:
        """Restores plan, checkpoint and history from ``model_dir`` and checks they agree."""
        plan, history = self.state.restore(self.initial_plan)
        if plan is not None:
            self.adopt_plan(plan)
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

    def adopt_plan(self, plan: PhasePlan) -> None:
        """Follows a new plan from now on (new schedule, so the step is traced again).

        Raises:
          ValueError: a phase's global batch not divisible by the number of replicas.
        """
        self._check_divisible(plan)
        if plan is self.plan:
            return
        self.plan = plan
        inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        inner.learning_rate = self.learning_rate_fn(plan)
        self.train_step.batch_sizes = batch_sizes(plan)
        self.train_step.retrace()
        self.state.write_plan(self.initial_plan, plan)

    # ---- the loop --------------------------------------------------------------------------

    def fit(
        self,
        x: Any = None,
        y: Any = None,
        *,
        sample_weight: Any = None,
        validation_data: Any = None,
        callbacks: Sequence[keras.callbacks.Callback] | None = None,
        validation_freq: int = 1,
    ) -> keras.callbacks.History:
        """Trains through every phase, resuming from ``model_dir`` if it holds a checkpoint.

        Args:
          x: training inputs as ``model.fit`` takes them: arrays or tuples / dicts of arrays
            (with `y` and `sample_weight`), a `tf.data.Dataset` of *unbatched* examples
            ``(x, y[, sample_weight])`` (shuffled, batched and split per phase here), a
            ``dataset_fn(global_batch_size, input_context)`` of per-replica batches, or a
            source (``num_examples`` and ``make_dataset_fn``, e.g. `TFDSImageSource`).
          y: targets (arrays).
          sample_weight: per-example weights (arrays).
          validation_data: ``(x, y)`` or ``(x, y, sample_weight)`` arrays, or a
            `tf.data.Dataset` of batches.
          callbacks: Keras callbacks (``EarlyStopping``, ``CSVLogger``, ``ModelCheckpoint``,
            ``TensorBoard``, ...); ``model.stop_training`` is honoured after each compiled
            call, and callbacks may define ``on_phase_begin`` / ``on_phase_end``.
          validation_freq: evaluate every this many epochs (and after the last; also every
            ``config.eval_every_epochs``).

        Returns:
          A `keras.callbacks.History` of the whole run (resumed epochs included) with
          ``loss``, each compiled metric, ``val_…``, ``learning_rate``,
          ``global_batch_size`` and ``momentum``. The run's results (also
          ``model_dir/results.json``) are in `Trainer.results`.

        Raises:
          ValueError: bad inputs (sizes, batch sizes, a model_dir of another plan).
          NonFiniteLossError: the training loss became NaN or infinite (the last good
            checkpoint is kept; no model is saved).
          Preempted: SIGTERM or Ctrl-C (on any worker): every worker saved a checkpoint at
            the same step; rerun to resume.
        """
        cfg, plan = self.config, self.plan
        check_positive_int("validation_freq", validation_freq)
        source = inputs_lib.as_source(x, y, sample_weight, num_examples=plan.dataset_size)
        if source.num_examples != plan.dataset_size:
            hint = " (pass the dataset unbatched)" if isinstance(x, tf.data.Dataset) else ""
            raise ValueError(
                f"Argument `x` must hold the plan's dataset_size={plan.dataset_size} examples. "
                f"Received: {source.num_examples} examples{hint}"
            )
        if not plan.drop_remainder:
            raise ValueError("The Trainer needs a plan with drop_remainder=True.")
        validation = None
        if validation_data is not None:
            parts = validation_data
            if not isinstance(validation_data, (tuple, list)):
                parts = (validation_data,)
            validation = inputs_lib.EvalDataset(*parts, batch_size=cfg.eval_batch_size)
        self.device_data = self._device_data(source)
        self._build(self.device_data or self._first_dataset_fn(source))
        tf.io.gfile.makedirs(cfg.model_dir)
        records = self._restore()
        self.state.write_plan(self.initial_plan, self.plan)
        callback_list, history = self._callbacks(callbacks)
        step = int(self.state.steps_run.numpy())
        results_path = os.path.join(cfg.model_dir, "results.json")
        if step == self.plan.total_steps and tf.io.gfile.exists(results_path):
            _log.warning(
                "The run in model_dir=%r is already complete (%d steps); its results are kept.",
                cfg.model_dir, step,
            )  # fmt: skip
            self.results = read_json(results_path)
            fill_history(history, records)
            self.state.finish()
            return history
        if step:
            epoch, _ = self.plan.position_at_step(step)
            _log.warning(
                "resuming at epoch %d, step %d of %d (model_dir=%r, %d replicas)",
                epoch + 1, step, self.plan.total_steps, cfg.model_dir, self.num_replicas,
            )  # fmt: skip
        controller = Controller(self, source, validation, validation_freq, callback_list, records)
        controller.run()
        self.results = controller.results()
        self.state.write("results.json", self.results)
        if self.is_chief and cfg.save_model:
            self.model.save(os.path.join(cfg.model_dir, "model.keras"))
        return history

    def _async_checkpoints(self) -> bool:
        """``config.async_checkpoints``, None resolved: on for GPU/TPU replicas."""
        if self.config.async_checkpoints is not None:
            return self.config.async_checkpoints
        return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))

    def _device_data(self, source: Any) -> DeviceArrays | None:
        """The training arrays on the devices, when they qualify (`device_data.eligible`)."""
        element = getattr(source, "element", None)
        if element is None or getattr(source, "shuffle", True) is not True:
            return None
        if not device_data_lib.eligible(element, self.config.in_graph_data_max_bytes):
            return None
        return DeviceArrays(element, self.strategy, seed=self.config.seed)

    def _first_dataset_fn(self, source: Any) -> inputs_lib.DatasetFn:
        """A pipeline of the first phase (its element spec builds the model)."""
        return source.make_dataset_fn(
            self.plan.phases[0].global_batch_size, seed=self.config.seed, start_epoch=0,
            end_epoch=1, static_batch_size=False,
        )  # fmt: skip

    def _callbacks(
        self, callbacks: Any
    ) -> tuple[keras.callbacks.CallbackList, keras.callbacks.History]:
        cfg = self.config
        user = list(callbacks or [])
        if cfg.adaptive:
            user.append(
                callbacks_lib.AdaptiveBatchSize(
                    cfg.adaptive_max_global_batch_size, factor=cfg.adaptive_factor,
                    rule=cfg.adaptive_learning_rate_rule, min_steps=cfg.adaptive_min_steps,
                )
            )  # fmt: skip
        for callback in user:
            if hasattr(callback, "set_trainer"):
                callback.set_trainer(self)
        history = keras.callbacks.History()
        show = int(bool(cfg.verbose) and self.is_chief)
        callback_list = keras.callbacks.CallbackList(
            [*user, history], add_progbar=bool(show), verbose=show, model=self.model,
            epochs=self.plan.epochs, steps=self.plan.phases[0].steps_per_epoch,
        )  # fmt: skip
        return callback_list, history
