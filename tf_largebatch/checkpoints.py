"""What a training run keeps in ``model_dir`` so that rerunning the same command resumes it.

``model_dir`` holds:

- ``ckpt/``: `tf.train.CheckpointManager` checkpoints of the model, the optimizer (slots,
  iterations, momentum), the noise estimator and four counters: completed epochs, phase,
  steps done in the current epoch (for checkpoints taken inside an epoch) and steps run;
- ``plan.json``: the plan the run started from and the plan it follows now (they differ once
  the adaptive policy has grown the batch);
- ``history.json``: one record per completed epoch; ``results.json`` at the end.

In multi-worker training every worker saves (the variables may need collectives), but only
the chief writes into ``model_dir``: the others write to ``model_dir/.tmp_<type>_<id>``, removed
at the end, as the TensorFlow multi-worker guide prescribes. Every worker restores from the
chief's checkpoints, so ``model_dir`` must be on storage all workers share.
"""

from __future__ import annotations

import json
import os
from typing import Any

import tensorflow as tf

from tf_largebatch.phases import PhasePlan


def write_json(path: str, value: Any) -> None:
    """Writes JSON atomically (a killed run never leaves half a file)."""
    tmp = f"{path}.tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        json.dump(value, f, indent=1)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def read_json(path: str) -> Any:
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


class RunState:
    """Checkpoints, plan and history of one run in ``model_dir``.

    Args:
      model_dir: the run's directory.
      is_chief: whether this worker writes into ``model_dir``.
      worker: ``(task_type, task_id)`` of this worker (names its temporary directory).
      trackables: objects to checkpoint (model, optimizer, ...).
      max_to_keep: checkpoints kept.

    Attributes:
      epoch, phase, step_in_epoch, steps_run: int64 counters saved with every checkpoint.
    """

    def __init__(
        self,
        model_dir: str,
        *,
        is_chief: bool,
        worker: tuple[str, int],
        trackables: dict[str, Any],
        max_to_keep: int,
    ) -> None:
        self.model_dir, self.is_chief = model_dir, is_chief
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.phase = tf.Variable(0, dtype=tf.int64, trainable=False, name="phase")
        self.step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        # Steps run, counting those a float16 loss scaler skipped (they do not advance
        # optimizer.iterations): what positions a resumed run in its plan.
        self.steps_run = tf.Variable(0, dtype=tf.int64, trainable=False, name="steps_run")
        self.checkpoint = tf.train.Checkpoint(
            epoch=self.epoch,
            phase=self.phase,
            step_in_epoch=self.step_in_epoch,
            steps_run=self.steps_run,
            **trackables,
        )
        self._write_dir = (
            model_dir if is_chief else os.path.join(model_dir, f".tmp_{worker[0]}_{worker[1]}")
        )
        self._max_to_keep = max_to_keep
        self._manager: tf.train.CheckpointManager | None = None

    def _path(self, name: str) -> str:
        return os.path.join(self.model_dir, name)

    def restore(self, initial_plan: PhasePlan) -> tuple[PhasePlan | None, list[dict[str, Any]]]:
        """Restores the latest checkpoint; returns the saved current plan and the history.

        Raises:
          ValueError: ``model_dir`` holds a run that started from a different plan.
        """
        plan = None
        if tf.io.gfile.exists(self._path("plan.json")):
            saved = read_json(self._path("plan.json"))
            if saved["initial"] != json.loads(json.dumps(initial_plan.to_dict())):
                raise ValueError(
                    f"Argument `model_dir` holds a run with a different phase plan "
                    f"({self._path('plan.json')}); use a new model_dir. "
                    f"Received: model_dir={self.model_dir!r}"
                )
            plan = PhasePlan.from_dict(saved["current"])
        latest = tf.train.latest_checkpoint(self._path("ckpt"))
        history: list[dict[str, Any]] = []
        if latest:
            self.checkpoint.restore(latest).expect_partial()
            if tf.io.gfile.exists(self._path("history.json")):
                done = int(self.epoch.numpy())
                history = [h for h in read_json(self._path("history.json")) if h["epoch"] < done]
        return plan, history

    def save(self, step: int) -> None:
        """A checkpoint numbered by the global step (every worker calls this)."""
        if self._manager is None:
            self._manager = tf.train.CheckpointManager(
                self.checkpoint, os.path.join(self._write_dir, "ckpt"), self._max_to_keep
            )
        self._manager.save(checkpoint_number=step)

    def write(self, name: str, value: Any) -> None:
        """Writes ``model_dir/name`` as JSON on the chief (a no-op on other workers)."""
        if self.is_chief:
            tf.io.gfile.makedirs(self.model_dir)
            write_json(self._path(name), value)

    def write_plan(self, initial: PhasePlan, current: PhasePlan) -> None:
        self.write("plan.json", {"initial": initial.to_dict(), "current": current.to_dict()})

    def finish(self) -> None:
        """Removes this worker's temporary checkpoint directory (non-chief workers)."""
        if not self.is_chief and tf.io.gfile.exists(self._write_dir):
            tf.io.gfile.rmtree(self._write_dir)
