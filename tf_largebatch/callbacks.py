"""Callbacks and controller actions of the `Trainer`'s loop.

The `Trainer` drives a `keras.callbacks.CallbackList` with the hook order of ``model.fit``;
callbacks that also define ``on_phase_begin(phase_index, phase)`` / ``on_phase_end(phase_index,
phase)`` hear about batch-size phases. Callbacks that need the `Trainer` itself (to change its
plan) define ``set_trainer(trainer)``: the adaptive batch policy is one of them.
"""

from __future__ import annotations

import logging
from typing import Any

import keras

from tf_largebatch import noise as noise_lib

_log = logging.getLogger(__name__)


def call_phase_hook(callbacks: Any, hook: str, phase_index: int, phase: Any) -> None:
    """Calls ``hook`` (``on_phase_begin``/``on_phase_end``) on the callbacks that define it."""
    for callback in getattr(callbacks, "callbacks", callbacks):
        method = getattr(callback, hook, None)
        if callable(method):
            method(phase_index, phase)


class AdaptiveBatchSize(keras.callbacks.Callback):
    """Grows the global batch at epoch ends towards the measured gradient noise scale.

    At the end of each epoch after the warmup, once the `Trainer`'s noise estimator has seen
    `min_steps` steps, the batch of the next epoch on becomes the largest power of `factor`
    times the current batch that does not exceed B_simple (and `max_global_batch_size`), the
    learning rate following by `rule` (`noise.adapt_plan`); the grown plan is adopted by the
    `Trainer` (saved in ``plan.json``, so a resumed run follows it).

    Args:
      max_global_batch_size: the largest batch allowed.
      factor: growth factor (whole powers of it).
      rule: ``"linear"``, ``"sqrt"`` or ``"keep"``: how the learning rate follows the batch.
      min_steps: steps the estimator must have seen before a decision.

    References:
      McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"; Smith et al. 2018.
    """

    def __init__(
        self, max_global_batch_size: int, *, factor: int = 2, rule: str = "linear",
        min_steps: int = 20,
    ) -> None:  # fmt: skip
        super().__init__()
        self.max_global_batch_size, self.factor = max_global_batch_size, factor
        self.rule, self.min_steps = rule, min_steps
        self.trainer: Any = None
        self.decisions: list[dict[str, Any]] = []

    def set_trainer(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        trainer = self.trainer
        estimator = trainer.noise_estimator
        if estimator is None or int(estimator.count.numpy()) < self.min_steps:
            return
        adapted = noise_lib.adapt_plan(
            trainer.plan, epoch + 1, float((logs or {}).get("noise_scale", float("nan"))),
            max_global_batch_size=self.max_global_batch_size, factor=self.factor,
            multiple_of=trainer.num_replicas, rule=self.rule,
        )  # fmt: skip
        if adapted is None:
            return
        plan, decision = adapted
        trainer.adopt_plan(plan)
        self.decisions.append(decision)
        trainer.epoch_notes["adaptive_decision"] = decision
        _log.warning("adaptive batch: %s", decision)
