"""`fit_phases`: plain `model.fit` driven through a `PhasePlan`.

`model.fit` cannot change the batch size inside one call (keras-team/keras issues 8432, 10143).
`fit_phases` calls it once per phase with a freshly built `tf.data` pipeline and
``initial_epoch``/``epochs`` taken from the plan, while the learning rate follows the plan's
serialisable schedule (installed on the optimizer, indexed by ``optimizer.iterations``) and the
momentum is set per phase. User callbacks see one continuous training run: their
``on_train_begin`` fires once before the first phase and ``on_train_end`` once after the last,
so TensorBoard, ModelCheckpoint and EarlyStopping work across phases.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import keras

from tf_largebatch.phases import PhasePlan

_log = logging.getLogger(__name__)


class _AcrossPhases(keras.callbacks.Callback):
    """Forwards every event to `callback`, but train begin/end only at the run's two ends."""

    def __init__(self, callback: keras.callbacks.Callback, first: bool, last: bool) -> None:
        super().__init__()
        self.callback, self.first, self.last = callback, first, last

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("on_") and name not in ("on_train_begin", "on_train_end"):
            return getattr(object.__getattribute__(self, "callback"), name)
        return object.__getattribute__(self, name)

    def set_model(self, model: keras.Model) -> None:
        self.callback.set_model(model)

    def set_params(self, params: dict[str, Any]) -> None:
        self.callback.set_params(params)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self.first:
            self.callback.on_train_begin(logs)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.last:
            self.callback.on_train_end(logs)


def _is_tf_variable(value: Any) -> bool:
    """A `tf.Variable`, without importing TensorFlow (it is loaded if one exists)."""
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(value, tf.Variable)


def _repeat_if_finite(dataset: Any) -> Any:
    """Repeats a finite `tf.data.Dataset` (Keras keeps one iterator across a phase's epochs);
    anything else (a generator, a `PyDataset`, an infinite dataset) is returned as it is."""
    tf = sys.modules.get("tensorflow")
    if tf is None or not isinstance(dataset, tf.data.Dataset):
        return dataset
    if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        return dataset
    return dataset.repeat()


def set_momentum(optimizer: keras.optimizers.Optimizer, momentum: float) -> bool:
    """Sets an optimizer's momentum; True if the compiled train function must be rebuilt.

    Our `optimizers.SGD`/`LARS` keep momentum in a variable (assigned, no retrace). Keras's own
    SGD keeps a Python float captured at trace time, so changing it needs a new train function.
    """
    current = getattr(optimizer, "momentum", None)
    if current is None:
        return False
    if isinstance(current, keras.Variable) or _is_tf_variable(current):
        current.assign(momentum)
        return False
    if float(current) == float(momentum):
        return False
    slots = getattr(optimizer, "momentums", None)  # Keras's SGD: [] when built with momentum 0
    if momentum and getattr(optimizer, "built", False) and slots == []:
        raise ValueError(
            f"Argument `momentum`: {type(optimizer).__name__} was built with momentum=0, so it "
            f"has no momentum slots, but the plan's phase uses momentum={momentum}. Compile "
            f"with SGD(momentum={momentum}) or plan with momentum=0. Received: "
            f"momentum={momentum}"
        )
    optimizer.momentum = float(momentum)
    return True


def fit_phases(
    model: keras.Model,
    make_dataset: Callable[[int], Any],
    plan: PhasePlan,
    *,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    initial_epoch: int = 0,
    initial_step: int | None = None,
    **fit_kwargs: Any,
) -> keras.callbacks.History:
    """Trains a compiled model through the phases of `plan` with `model.fit`.

    For each phase: ``dataset = make_dataset(phase.global_batch_size)`` (one epoch or more;
    a finite dataset is repeated, and ``steps_per_epoch`` comes from the plan), the phase's
    momentum is set, and ``model.fit(dataset,
    initial_epoch=phase.start_epoch, epochs=phase.end_epoch, steps_per_epoch=...)`` runs.
    The optimizer's learning rate is replaced by ``plan.learning_rate_schedule()`` before the
    first phase, so the rate follows the plan through ``optimizer.iterations`` even though
    steps per epoch change between phases.

    A plan whose phases start inside an epoch (`Phase.num_steps`, e.g. ``mode="rampup"``) is
    followed segment by segment (`PhasePlan.segments`): for each segment,
    ``make_dataset(global_batch_size, epoch=seg.epoch, example_offset=seg.example_offset)``
    must return the batches of that epoch's example order from that offset on (skip
    ``example_offset`` examples, then batch), and one ``model.fit`` call runs the segment's
    steps as one Keras epoch; so no example is repeated or skipped when the batch changes.

    Args:
      model: a compiled Keras model.
      make_dataset: builds the training pipeline for a global batch size (and, for plans with
        phases inside an epoch, for an epoch and example offset, as keywords).
      plan: the `PhasePlan` to follow.
      callbacks: Keras callbacks, shared by all phases as one run.
      initial_epoch: epoch to resume from (phases ending before it are skipped).
      initial_step: for plans with phases inside an epoch only: the global step to resume
        from (the restored ``optimizer.iterations``); overrides ``initial_epoch``.
      **fit_kwargs: passed to every `model.fit` call (e.g. ``validation_data``, ``verbose``).

    Returns:
      One `History` whose ``history`` has one entry per epoch across all phases (per segment
      for plans with phases inside an epoch, with ``epoch`` and ``step`` too), including
      ``learning_rate``, ``global_batch_size`` and ``momentum``.

    Raises:
      ValueError: the model is not compiled, `fit_kwargs` holds arguments the plan owns, or
        ``initial_step`` is given for a plan of whole-epoch phases or is out of range.

    Example:
      >>> history = fit_phases(model, lambda b: make_dataset(x, y, b, seed=0, epochs=1), plan)
    """
    if getattr(model, "optimizer", None) is None or not model.compiled:
        raise ValueError("Argument `model` must be compiled before fit_phases.")
    owned = {"epochs", "initial_epoch", "steps_per_epoch", "batch_size", "x", "y"} & set(fit_kwargs)
    if owned:
        raise ValueError(
            f"fit_phases sets {sorted(owned)} from the plan. Received: {sorted(owned)}"
        )
    fit_kwargs.setdefault("shuffle", False)  # the pipeline shuffles; Keras would only warn
    optimizer = model.optimizer
    optimizer.learning_rate = plan.learning_rate_schedule()
    merged = keras.callbacks.History()
    merged.set_model(model)
    merged.epoch, merged.history = [], {}
    if any(p.num_steps is not None for p in plan.phases):
        start = plan.step_at_epoch(initial_epoch) if initial_step is None else initial_step
        if not (isinstance(start, int) and 0 <= start <= plan.total_steps):
            raise ValueError(
                f"Argument `initial_step` must be an integer in [0, {plan.total_steps}]. "
                f"Received: initial_step={initial_step}"
            )
        return _fit_segments(model, make_dataset, plan, callbacks, start, merged, fit_kwargs)
    if initial_step is not None:
        raise ValueError(
            "Argument `initial_step` applies only to plans with phases inside an epoch; use "
            f"`initial_epoch`. Received: initial_step={initial_step}"
        )
    phases = [p for p in plan.phases if p.end_epoch > initial_epoch]
    for i, phase in enumerate(phases):
        if set_momentum(optimizer, phase.momentum):
            model.make_train_function(force=True)
        wrapped = [_AcrossPhases(c, first=i == 0, last=i == len(phases) - 1) for c in callbacks]
        _log.info(
            "phase %d: epochs %d-%d, global batch %d",
            i,
            phase.start_epoch,
            phase.end_epoch,
            phase.global_batch_size,
        )
        dataset = _repeat_if_finite(make_dataset(phase.global_batch_size))
        history = model.fit(
            dataset,
            initial_epoch=max(phase.start_epoch, initial_epoch),
            epochs=phase.end_epoch,
            steps_per_epoch=phase.steps_per_epoch,
            callbacks=wrapped,
            **fit_kwargs,
        )
        for epoch in history.epoch:
            merged.epoch.append(epoch)
            step = plan.step_at_epoch(epoch)
            extra = {
                "learning_rate": plan.learning_rate_at_step(step),
                "global_batch_size": phase.global_batch_size,
                "momentum": phase.momentum,
            }
            logs = {k: v[history.epoch.index(epoch)] for k, v in history.history.items()}
            for key, value in {**logs, **extra}.items():
                merged.history.setdefault(key, []).append(value)
        if model.stop_training:
            break
    return merged


def _fit_segments(
    model: keras.Model,
    make_dataset: Callable[..., Any],
    plan: PhasePlan,
    callbacks: Sequence[keras.callbacks.Callback],
    initial_step: int,
    merged: keras.callbacks.History,
    fit_kwargs: dict[str, Any],
) -> keras.callbacks.History:
    """`fit_phases` for plans with phases inside an epoch: one `model.fit` per segment."""
    optimizer = model.optimizer
    todo = []
    for seg in plan.segments():
        end = seg.start_step + seg.num_steps
        if end <= initial_step:
            continue
        batch = plan.phases[seg.phase_index].global_batch_size
        skip = max(initial_step - seg.start_step, 0)  # resuming inside this segment
        todo.append(
            (seg, seg.start_step + skip, seg.num_steps - skip, seg.example_offset + skip * batch)
        )
    for k, (seg, step, num_steps, offset) in enumerate(todo):
        phase = plan.phases[seg.phase_index]
        if set_momentum(optimizer, phase.momentum):
            model.make_train_function(force=True)
        wrapped = [_AcrossPhases(c, first=k == 0, last=k == len(todo) - 1) for c in callbacks]
        _log.info(
            "phase %d, epoch %d: steps %d-%d, global batch %d from example %d",
            seg.phase_index,
            seg.epoch,
            step,
            step + num_steps,
            phase.global_batch_size,
            offset,
        )
        dataset = make_dataset(phase.global_batch_size, epoch=seg.epoch, example_offset=offset)
        history = model.fit(
            dataset,
            initial_epoch=k,
            epochs=k + 1,
            steps_per_epoch=num_steps,
            callbacks=wrapped,
            **fit_kwargs,
        )
        extra = {
            "epoch": seg.epoch,
            "step": step,
            "learning_rate": plan.learning_rate_at_step(step),
            "global_batch_size": phase.global_batch_size,
            "momentum": phase.momentum,
        }
        for i, index in enumerate(history.epoch):
            merged.epoch.append(index)
            logs = {key: values[i] for key, values in history.history.items()}
            for key, value in {**logs, **extra}.items():
                merged.history.setdefault(key, []).append(value)
        if model.stop_training:
            break
    return merged
