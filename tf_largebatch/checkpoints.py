"""What a training run keeps in ``model_dir`` so that rerunning the same command resumes it.

``model_dir`` holds:

- ``ckpt/``: `tf.train.CheckpointManager` checkpoints of the model, the optimizer (slots,
  iterations, momentum), the noise estimator and four counters: completed epochs, phase,
  steps done in the current epoch (for checkpoints taken inside an epoch) and steps run;
- ``plan.json``: the plan the run started from and the plan it follows now (they differ once
  the adaptive policy has grown the batch);
- ``history.json``: one record per epoch, written with each checkpoint; ``results.json`` at
  the end.

In multi-worker training every worker saves (the variables may need collectives), but only
the chief writes into ``model_dir``: the others write to ``model_dir/.tmp_<type>_<id>``, removed
at the end, as the TensorFlow multi-worker guide prescribes. Every worker restores from the
chief's checkpoints, so ``model_dir`` must be on storage all workers share.

A restore checks the newest checkpoint before using it (its index parses and every tensor reads
back with its stored CRC32C): a truncated or corrupt one is skipped with a warning and the
previous one is used; when none is readable the restore raises.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import tensorflow as tf

from tf_largebatch.phases import PhasePlan

_log = logging.getLogger(__name__)
# What reading a damaged checkpoint raises: OpError (bad magic, checksum mismatch, missing
# file), IndexError ("Read less bytes than requested": a truncated data file).
_READ_ERRORS = (tf.errors.OpError, IndexError, ValueError, OSError, RuntimeError)


def write_json(path: str, value: Any) -> None:
    """Writes JSON atomically: to ``path.tmp``, then renamed over ``path``.

    A run killed or failing mid-write leaves the previous ``path`` whole (a failure that
    raises also removes ``path.tmp``).
    """
    tmp = f"{path}.tmp"
    try:
        text = json.dumps(value, indent=1)  # one write: GFile pays per write call
        with tf.io.gfile.GFile(tmp, "w") as f:
            f.write(text)
        tf.io.gfile.rename(tmp, path, overwrite=True)
    except BaseException:  # e.g. a value JSON cannot encode, a full disk, Ctrl-C
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)
        raise


def read_json(path: str) -> Any:
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def checkpoint_paths(directory: str) -> list[str]:
    """The checkpoint prefixes ``directory/ckpt-N`` that have an index file, newest (largest N)
    first. Found by listing, not through the ``checkpoint`` state file, which may be damaged."""
    if not tf.io.gfile.isdir(directory):
        return []
    numbers = []
    for name in tf.io.gfile.listdir(directory):
        match = re.fullmatch(r"ckpt-(\d+)\.index", name)
        if match:
            numbers.append(int(match.group(1)))
    return [os.path.join(directory, f"ckpt-{n}") for n in sorted(numbers, reverse=True)]


def checkpoint_error(path: str) -> str | None:
    """None if the checkpoint at prefix ``path`` reads back whole, else what is wrong.

    Reads every tensor: TensorFlow checks each one against the CRC32C stored in the index, so
    a truncated or bit-flipped data file or index is found before anything is restored.
    """
    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except _READ_ERRORS as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        return f"{type(error).__name__}: {first_line}"
    return None


class RunState:
    """Checkpoints, plan and history of one run in ``model_dir``.

    Args:
      model_dir: the run's directory.
      is_chief: whether this worker writes into ``model_dir``.
      worker: ``(task_type, task_id)`` of this worker (names its temporary directory).
      trackables: objects to checkpoint (model, optimizer, ...).
      max_to_keep: checkpoints kept.
      async_writes: write checkpoints in the background (`tf.train.CheckpointOptions`'s
        asynchronous checkpointing): ``save`` snapshots the variables and returns; `sync`
        waits for the writes.

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
        async_writes: bool = False,
    ) -> None:
        self.model_dir, self.is_chief = model_dir, is_chief
        self._options = tf.train.CheckpointOptions(
            experimental_enable_async_checkpoint=async_writes
        )
        self._async_used = async_writes
        if async_writes:
            _allow_async_copies_of_keras_variables()
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

        The newest checkpoint that reads back whole is restored: a truncated or corrupt
        newer one is skipped with a logged warning naming it (`checkpoint_error`).

        Raises:
          ValueError: ``model_dir`` holds a run that started from a different plan, or
            checkpoints of which none is readable.
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
        latest = self._readable_checkpoint()
        history: list[dict[str, Any]] = []
        if latest:
            self.checkpoint.restore(latest).expect_partial()
            if tf.io.gfile.exists(self._path("history.json")):
                done = int(self.epoch.numpy())
                history = [h for h in read_json(self._path("history.json")) if h["epoch"] < done]
        return plan, history

    def _readable_checkpoint(self) -> str | None:
        """The newest readable checkpoint prefix (None: there is no checkpoint)."""
        paths = checkpoint_paths(self._path("ckpt"))
        problems = []
        for path in paths:
            error = checkpoint_error(path)
            if error is None:
                if problems:
                    _log.warning(
                        "Skipping unreadable checkpoint(s) %s; restoring the previous one, %s.",
                        "; ".join(f"{p} ({e})" for p, e in problems),
                        path,
                    )
                return path
            problems.append((path, error))
        if problems:
            listed = "; ".join(f"{os.path.basename(p)} ({e})" for p, e in problems)
            raise ValueError(
                f"Argument `model_dir` holds checkpoints none of which is readable: {listed}. "
                f"Remove {self._path('ckpt')} to start the run over, or use a new model_dir. "
                f"Received: model_dir={self.model_dir!r}"
            )
        return None

    def save(self, step: int) -> None:
        """A checkpoint numbered by the global step (every worker calls this).

        With ``async_writes`` the variables are copied now and written by a background
        thread (the next save, `sync` or `finish` waits for it).
        """
        if self._manager is None:
            self._manager = tf.train.CheckpointManager(
                self.checkpoint, os.path.join(self._write_dir, "ckpt"), self._max_to_keep
            )
        if not self._options.experimental_enable_async_checkpoint:
            self._manager.save(checkpoint_number=step)
            return
        try:
            self._manager.save(checkpoint_number=step, options=self._options)
        except (ValueError, TypeError, NotImplementedError, tf.errors.OpError) as error:
            # TensorFlow's asynchronous checkpointing is experimental: if it cannot copy some
            # variable, the run goes on with synchronous writes rather than stopping.
            _log.warning(
                "Asynchronous checkpointing failed (%s: %s); writing checkpoints synchronously.",
                type(error).__name__, str(error).strip().splitlines()[0] if str(error) else "",
            )  # fmt: skip
            self._options = tf.train.CheckpointOptions()
            self._manager.save(checkpoint_number=step)

    def sync(self) -> None:
        """Waits until every checkpoint write started so far is on disk."""
        if self._async_used:
            self.checkpoint.sync()

    def write(self, name: str, value: Any) -> None:
        """Writes ``model_dir/name`` as JSON on the chief (a no-op on other workers)."""
        if self.is_chief:
            tf.io.gfile.makedirs(self.model_dir)
            write_json(self._path(name), value)

    def write_plan(self, initial: PhasePlan, current: PhasePlan) -> None:
        self.write("plan.json", {"initial": initial.to_dict(), "current": current.to_dict()})

    def finish(self) -> None:
        """Waits for checkpoint writes; removes this worker's temporary checkpoint directory
        (non-chief workers)."""
        self.sync()
        if not self.is_chief and tf.io.gfile.exists(self._write_dir):
            tf.io.gfile.rmtree(self._write_dir)


def _allow_async_copies_of_keras_variables() -> None:
    """Lets TensorFlow's asynchronous checkpointing copy Keras 3 variables.

    The async checkpointer copies every variable to a CPU twin inside a `tf.function` that
    makes the twins on its first call and assigns them afterwards. Keras 3.15's
    ``Variable._copy_trackable_to_cpu`` makes a new `tf.Variable` on every call, which a
    `tf.function` refuses on its second trace ("tf.function only supports singleton
    tf.Variables created on the first call"). This gives it the make-once-then-assign form
    of TensorFlow's own ``ResourceVariable._copy_trackable_to_cpu``. Idempotent.
    """
    from keras.src.backend.tensorflow.core import Variable

    if getattr(Variable._copy_trackable_to_cpu, "_tf_largebatch", False):  # noqa: SLF001
        return

    def _copy_trackable_to_cpu(self: Any, object_map: Any) -> None:
        self.value._copy_trackable_to_cpu(object_map)  # noqa: SLF001 (the tf.Variable's)
        if self not in object_map:
            object_map[self] = tf.Variable(object_map[self.value])
        else:
            object_map[self].assign(object_map[self.value])

    _copy_trackable_to_cpu._tf_largebatch = True  # type: ignore[attr-defined]
    Variable._copy_trackable_to_cpu = _copy_trackable_to_cpu  # noqa: SLF001
