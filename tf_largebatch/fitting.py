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
    optimizer.momentum = float(momentum)
    return True


def fit_phases(
    model: keras.Model,
    make_dataset: Callable[[int], Any],
    plan: PhasePlan,
    *,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    initial_epoch: int = 0,
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

    Args:
      model: a compiled Keras model.
      make_dataset: builds the training pipeline for a global batch size.
      plan: the `PhasePlan` to follow.
      callbacks: Keras callbacks, shared by all phases as one run.
      initial_epoch: epoch to resume from (phases ending before it are skipped).
      **fit_kwargs: passed to every `model.fit` call (e.g. ``validation_data``, ``verbose``).

    Returns:
      One `History` whose ``history`` has one entry per epoch across all phases, including
      ``learning_rate``, ``global_batch_size`` and ``momentum``.

    Raises:
      ValueError: the model is not compiled, or `fit_kwargs` holds arguments the plan owns.

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
