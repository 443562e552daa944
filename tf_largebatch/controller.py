"""The `Trainer`'s controller: steps through a plan's segments with callbacks and checkpoints.

Like Orbit's `Controller` beside its runners, this owns *when* things happen — phases (a new
input pipeline at each change of global batch, also inside an epoch), epochs and their Keras
callbacks, the evaluation cadence, checkpoints, resuming, preemption — and leaves *what* one
step computes to `steps.TrainStep` / `steps.EvalStep`.

Position: the run is at global step S (``RunState.steps_run``); `PhasePlan.position_at_step`
says which epoch and which example of that epoch's permutation step S reads, so a run resumes
at any step, on any number of replicas or workers (the data order does not depend on them).

Preemption: SIGTERM or SIGINT (Ctrl-C) sets a flag; every compiled call carries each worker's
flag in its cross-replica reduction, so all workers learn of it after the same call, save a
checkpoint at the same step and raise `Preempted` (the binaries exit with status 143, or 130
for Ctrl-C). Rerunning the same command resumes from that step.

Checkpoints: at an epoch end when the last one is at least
``TrainerConfig.checkpoint_interval_seconds`` old (0: every epoch end), and always after the
last step, when a callback stops training, on a stop signal, when the plan changes (adaptive
batch growth), and every ``checkpoint_every_steps`` steps. Whether an epoch end saves must be
the same on every worker: each worker's clock votes through the epoch's last compiled call,
in the same reduction as the stop flag, and all save if any voted.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_largebatch import callbacks as callbacks_lib
from tf_largebatch.device_data import DeviceFeed
from tf_largebatch.fitting import set_momentum
from tf_largebatch.phases import Phase

_log = logging.getLogger(__name__)
PREEMPTED_EXIT_STATUS = 128 + signal.SIGTERM  # 143
INTERRUPTED_EXIT_STATUS = 128 + signal.SIGINT  # 130
SUMMARY_SECONDS = 5.0  # TensorBoard's summaries are written at most this often (and at the end)
_BOOKKEEPING = ("epoch", "phase", "steps", "examples_per_second", "partial", "adaptive_decision")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; nothing was saved after the last good state."""


class Preempted(RuntimeError):  # noqa: N818 (a signal, not an error of the caller's)
    """Training stopped on SIGTERM / SIGINT after saving a checkpoint; rerun to resume.

    Attributes:
      step: the step the checkpoint was saved at.
      signum: the signal received (``signal.SIGTERM`` or ``signal.SIGINT``).
      exit_status: the status a binary should exit with (143 or 130).
    """

    def __init__(self, message: str, step: int, signum: int) -> None:
        super().__init__(message)
        self.step, self.signum = step, signum
        self.exit_status = 128 + signum


def keras_logs(record: dict[str, Any]) -> dict[str, Any]:
    """The ``model.fit``-style logs kept in a history record (aliases and bookkeeping dropped)."""
    return {
        k: v
        for k, v in record.items()
        if k not in _BOOKKEEPING and not k.startswith(("train_", "test_"))
    }


def fill_history(history: keras.callbacks.History, records: list[dict[str, Any]]) -> None:
    """Puts the restored epochs into a `History`, so that it covers the whole run."""
    history.epoch = [*getattr(history, "epoch", []), *(r["epoch"] for r in records)]
    for record in records:
        for key, value in keras_logs(record).items():
            history.history.setdefault(key, []).append(value)


def history_record(epoch: int, logs: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """One ``history.json`` record: the epoch's logs plus ``train_``/``test_`` aliases."""
    aliases = {}
    for key, value in logs.items():
        if key.startswith("val_"):
            aliases[f"test_{key[4:]}"] = value
        elif key not in ("learning_rate", "global_batch_size", "momentum", "noise_scale"):
            aliases[f"train_{key}"] = value
    return {"epoch": epoch, **extra, **logs, **aliases}


@contextlib.contextmanager
def stop_signals() -> Iterator[dict[str, int]]:
    """While active, SIGTERM and the first SIGINT set ``flag["signum"]`` instead of stopping.

    A second Ctrl-C raises `KeyboardInterrupt` at once. Outside the main thread (where Python
    cannot install handlers) nothing is installed.
    """
    flag: dict[str, int] = {"signum": 0}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def on_signal(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and flag["signum"]:
            raise KeyboardInterrupt
        flag["signum"] = flag["signum"] or signum
        _log.warning(
            "Received %s: saving a checkpoint after the current steps, then stopping.",
            signal.Signals(signum).name,
        )

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Controller:
    """One ``Trainer.fit`` run: segments, epochs, callbacks, evaluation, checkpoints.

    Args:
      trainer: the `Trainer` (model, optimizer, plan, state, steps, strategy, config).
      source: the training data source (`inputs.as_source`).
      validation: `inputs.EvalDataset` or None.
      validation_freq: evaluate every this many epochs (and after the last).
      callbacks: the run's `keras.callbacks.CallbackList` (a `History` last).
      records: the restored history (completed epochs).
    """

    def __init__(
        self,
        trainer: Any,
        source: Any,
        validation: Any,
        validation_freq: int,
        callbacks: keras.callbacks.CallbackList,
        records: list[dict[str, Any]],
    ) -> None:
        self.t, self.source, self.validation = trainer, source, validation
        self.validation_freq, self.callbacks, self.records = validation_freq, callbacks, records
        self.switch_seconds: list[float] = []
        self.train_seconds, self.examples = 0.0, 0
        self.noise_steps: list[list[float]] = []
        self.stopped_early = False
        self.writer = (
            tf.summary.create_file_writer(os.path.join(trainer.config.model_dir, "tensorboard"))
            if trainer.is_chief
            else tf.summary.create_noop_writer()
        )
        self.wall_start = time.perf_counter()
        self._iterator: Any = None
        self._built: tuple[int, Phase] | None = None
        self._signal = {"signum": 0}
        self._setup_start: float | None = None
        self._segments_of: Any = None
        self._step: int | None = None
        self._last_save = time.monotonic()
        self._iterations: int | None = None  # optimizer updates, as the last call returned
        self._epochs_done = int(trainer.state.epoch.numpy())  # assigned to the state at saves
        self._epoch_learning_rate: float | None = None  # at the epoch's first step
        # TensorBoard summaries are written by one background thread, in order, off the
        # training loop's path (joined at the end of the run), in batches: the epochs of the
        # last `SUMMARY_SECONDS` at once. Writing them after every epoch made a short epoch
        # (a few ms) share the CPU with a summary write every time.
        self._bookkeeping = concurrent.futures.ThreadPoolExecutor(1, "tf_largebatch_summaries")
        self._pending: list[concurrent.futures.Future[None]] = []
        self._unwritten: list[dict[str, Any]] = []
        self._last_summaries = time.monotonic()

    # ---- position ---------------------------------------------------------------------------

    def step(self) -> int:
        """The global step (``RunState.steps_run``, mirrored on the host: no device read)."""
        if self._step is None:
            self._step = int(self.t.state.steps_run.numpy())
        return self._step

    def iterations(self) -> int:
        """The optimizer's updates so far (returned by each call: no device read)."""
        if self._iterations is None:
            self._iterations = self.t.iterations()
        return self._iterations

    def _segment(self, step: int) -> Any:
        """The plan's segment holding `step` (a bisection over the cached segment starts)."""
        plan = self.t.plan
        if self._segments_of is not plan:
            self._segments = plan.segments()
            self._starts = [seg.start_step for seg in self._segments]
            self._segments_of = plan
        seg = self._segments[bisect.bisect_right(self._starts, step) - 1]
        if not seg.start_step <= step < seg.start_step + seg.num_steps:
            raise ValueError(f"step {step} is outside the plan ({plan.total_steps} steps)")
        return seg

    def _ensure_pipeline(self, step: int) -> tuple[Any, Phase, int]:
        """What the compiled call from `step` reads, the phase and the segment's end step.

        On a change of phase: the phase hooks, the phase's momentum, and (for the `tf.data`
        path) a new input pipeline from `step`'s position. With the training set on the devices
        (`Trainer.device_data`), a `DeviceFeed` for `step`'s position instead.
        """
        t = self.t
        seg = self._segment(step)
        phase = t.plan.phases[seg.phase_index]
        device_data = t.device_data
        if self._built != (seg.phase_index, phase):
            first = self._built is None
            if not first:
                callbacks_lib.call_phase_hook(self.callbacks, "on_phase_end", *self._built)
            self._setup_start = time.perf_counter() if not first else None
            epoch, offset = t.plan.position_at_step(step)
            inner = getattr(t.optimizer, "inner_optimizer", t.optimizer)
            if set_momentum(inner, phase.momentum):
                t.train_step.retrace()  # Keras's SGD bakes its momentum into the trace
            t.state.phase.assign(seg.phase_index)
            if device_data is None:
                last_epoch = max(
                    s.epoch for s in t.plan.segments() if s.phase_index == seg.phase_index
                )
                dataset_fn = make_dataset_fn(
                    self.source, phase.global_batch_size, seed=t.config.seed,
                    start_epoch=epoch, end_epoch=last_epoch + 1, example_offset=offset,
                )  # fmt: skip
                self._iterator = iter(t.strategy.distribute_datasets_from_function(dataset_fn))
            self._built = (seg.phase_index, phase)
            callbacks_lib.call_phase_hook(self.callbacks, "on_phase_begin", *self._built)
            _log.info(
                "phase %d from step %d (epoch %d, example %d): global batch %d, "
                "learning rate %.4g, momentum %g", seg.phase_index, step, epoch + 1, offset,
                phase.global_batch_size, phase.learning_rate, phase.momentum,
            )  # fmt: skip
        feed = self._iterator
        if device_data is not None:  # the step loads π_epoch itself when the epoch changes
            start = seg.example_offset + (step - seg.start_step) * phase.global_batch_size
            feed = DeviceFeed(device_data, seg.epoch, start, phase.global_batch_size)
        return feed, phase, seg.start_step + seg.num_steps

    # ---- the run ----------------------------------------------------------------------------

    def run(self) -> None:
        t, callbacks = self.t, self.callbacks
        t.model.stop_training = False
        callbacks.on_train_begin()
        fill_history(callbacks.callbacks[-1], self.records)  # the resumed epochs too
        logs: dict[str, Any] = {}
        with stop_signals() as self._signal:
            try:
                while self.step() < t.plan.total_steps and not t.model.stop_training:
                    logs = self._epoch(self._epochs_done)
            finally:  # also on Preempted or an error: the last checkpoint reaches the disk
                t.state.sync()
                self._join_bookkeeping()
        if self._built is not None:
            callbacks_lib.call_phase_hook(callbacks, "on_phase_end", *self._built)
        self.stopped_early = self.step() < t.plan.total_steps
        if self.stopped_early:
            epoch, _ = t.plan.position_at_step(self.step())
            _log.warning(
                "Training stopped early by a callback at step %d (epoch %d of %d).",
                self.step(), epoch + 1, t.plan.epochs,
            )  # fmt: skip
        callbacks.on_train_end(logs)
        t.state.finish()

    def _epoch(self, epoch: int) -> dict[str, Any]:
        t, cfg, callbacks, plan = self.t, self.t.config, self.callbacks, self.t.plan
        first_step, end_step = plan.step_at_epoch(epoch), plan.step_at_epoch(epoch + 1)
        self.callbacks.set_params(
            {"verbose": int(bool(cfg.verbose) and t.is_chief), "epochs": plan.epochs,
             "steps": end_step - first_step}
        )  # fmt: skip
        in_graph = t.train_step.resets_metrics_in_graph  # else eagerly, here (as model.fit)
        if not in_graph:
            t.model.reset_metrics()
        t.epoch_notes = {}
        callbacks.on_epoch_begin(epoch)
        start_step = step = self.step()
        loss_total, logs, examples = 0.0, {}, 0
        b_simple, save_at_end = float("nan"), False
        self._epoch_learning_rate = None
        start = time.perf_counter()
        while step < end_step and not t.model.stop_training:
            iterator, phase, segment_end = self._ensure_pipeline(step)
            gbs = phase.global_batch_size
            n = min(cfg.steps_per_execution, segment_end - step)
            if cfg.checkpoint_every_steps:
                n = min(n, cfg.checkpoint_every_steps - step % cfg.checkpoint_every_steps)
            callbacks.on_train_batch_begin(step - first_step)
            vote = float(bool(self._signal["signum"]))
            save = float(step + n == end_step and self._checkpoint_due())
            reset = in_graph and step == start_step  # the epoch's first call resets first
            out = t.train_step(iterator, n, t._micro_batches(gbs), vote, save, reset)
            loss_sum = float(out.loss_sum)  # waits for the steps to finish
            if not math.isfinite(loss_sum):
                raise NonFiniteLossError(
                    f"The training loss is {loss_sum} at epoch {epoch + 1}, steps "
                    f"{step - first_step + 1}-{step - first_step + n} of {end_step - first_step}"
                    f"; stopped without saving (the last good checkpoint in "
                    f"model_dir={cfg.model_dir!r} is kept)."
                )
            if self._setup_start is not None:  # pipeline rebuild + (re)trace + first steps
                self.switch_seconds.append(time.perf_counter() - self._setup_start)
                self._setup_start = None
            step += n
            examples += n * gbs
            loss_total += loss_sum
            self._step = step  # the state's counters are assigned when a checkpoint is saved
            self._iterations = int(out.iterations)
            if step - n == first_step:
                self._epoch_learning_rate = float(out.learning_rate)
            logs = {"loss": loss_total / (step - start_step)}
            logs.update({k: float(v) for k, v in out.metrics.items()})
            if t.noise_estimator is not None:
                b_simple = float(out.b_simple)
                self.noise_steps.append([self.iterations(), b_simple])
            callbacks.on_train_batch_end(step - first_step - 1, logs)
            stop_votes, save_votes = (float(v) for v in out.votes.numpy())
            if stop_votes > 0:  # some worker was told to stop: all stop after this call
                self._preempt(epoch, logs, start_step, step, examples, start)
            save_at_end = save_votes > 0
            if (
                cfg.checkpoint_every_steps
                and step % cfg.checkpoint_every_steps == 0 < end_step - step
            ):
                self._save(step, step - first_step)
        return self._end_epoch(epoch, logs, start_step, step, examples, start, save=save_at_end)

    def _checkpoint_due(self) -> bool:
        """Whether this worker's clock says the epoch end should save (its vote)."""
        interval = self.t.config.checkpoint_interval_seconds
        return time.monotonic() - self._last_save >= interval

    def _end_epoch(
        self, epoch: int, logs: dict[str, Any], start_step: int, step: int, examples: int,
        start: float, evaluate: bool = True, save: bool = True,
    ) -> dict[str, Any]:  # fmt: skip
        """Evaluation, callbacks, history; a checkpoint if `save` (the workers' vote) or one is
        always due: the last step, a partial epoch (stop signal), a callback's stop, a new
        plan. Every condition is the same on every worker."""
        t, cfg, plan = self.t, self.t.config, self.t.plan
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        self.examples += examples
        first_step = plan.step_at_epoch(epoch)
        complete = step == plan.step_at_epoch(epoch + 1)
        logs.update(
            learning_rate=(
                self._learning_rate_at(first_step)
                if self._epoch_learning_rate is None
                else self._epoch_learning_rate
            ),
            global_batch_size=plan.batch_size_at_step(first_step),
            momentum=plan.phases[plan.phase_index(epoch)].momentum,
        )
        if t.noise_estimator is not None and self.noise_steps:
            logs["noise_scale"] = self.noise_steps[-1][1]
        last = epoch + 1 == plan.epochs
        every = (epoch + 1) % self.validation_freq == 0 and (epoch + 1) % cfg.eval_every_epochs == 0
        if evaluate and self.validation is not None and complete and (
            last or every or t.model.stop_training
        ):  # fmt: skip
            val = t.evaluate(self.validation, callbacks=self.callbacks)
            logs.update({f"val_{k}": v for k, v in val.items()})
        if complete:
            self._epochs_done = epoch + 1
        self.callbacks.on_epoch_end(epoch, logs)
        extra = {
            "phase": plan.phase_index(epoch),
            "steps": self.iterations(),
            "examples_per_second": examples / max(seconds, 1e-9),
            **({} if complete else {"partial": True}),
            **t.epoch_notes,
        }
        record = history_record(epoch, logs, extra)
        self.records.append(record)
        self._unwritten.append(record)
        if time.monotonic() - self._last_summaries >= SUMMARY_SECONDS:
            self._write_summaries()
        if save or not complete or step >= t.plan.total_steps or t.model.stop_training or (
            t.plan is not plan  # adopted at this epoch end: plan.json and checkpoint agree
        ):  # fmt: skip
            self._save(step, 0 if complete else step - first_step)
        return logs

    def _save(self, step: int, step_in_epoch: int) -> None:
        """A checkpoint at `step` (the state's position counters are set first)."""
        state = self.t.state
        state.write("history.json", self.records)  # before the checkpoint that needs it
        state.epoch.assign(self._epochs_done)
        state.steps_run.assign(step)
        state.step_in_epoch.assign(step_in_epoch)
        state.save(self.iterations())
        self._last_save = time.monotonic()

    def _learning_rate_at(self, step: int) -> float:
        """The optimizer's learning rate at `step` (its schedule: the plan's or the user's)."""
        inner = getattr(self.t.optimizer, "inner_optimizer", self.t.optimizer)
        rate = inner._learning_rate  # noqa: SLF001 (the schedule object, not its value now)
        return float(rate(step)) if callable(rate) else float(keras.ops.convert_to_numpy(rate))

    def _preempt(
        self, epoch: int, logs: dict[str, Any], start_step: int, step: int, examples: int,
        start: float,
    ) -> None:  # fmt: skip
        """Every worker saves at this same step, then `Preempted` is raised."""
        self._end_epoch(epoch, logs, start_step, step, examples, start, evaluate=False)
        signum = self._signal["signum"] or signal.SIGTERM  # a peer's signal: as SIGTERM
        epoch_now, _ = self.t.plan.position_at_step(step)
        raise Preempted(
            f"Stopped by {signal.Signals(signum).name} at step {step} (epoch {epoch_now + 1}); "
            f"checkpoint saved in model_dir={self.t.config.model_dir!r}. Rerun the same "
            "command to resume.",
            step,
            signum,
        )

    def _write_summaries(self) -> None:
        """Hands the records not yet written (if any) to the background thread."""
        if not self._unwritten:
            return
        records, self._unwritten = self._unwritten, []
        self._last_summaries = time.monotonic()
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._bookkeeping.submit(self._summaries, records))

    def _join_bookkeeping(self) -> None:
        """Writes the last summaries and waits for them (raising what failed there)."""
        self._write_summaries()
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()
        self._bookkeeping.shutdown(wait=True)
        self.writer.flush()  # the writer also flushes by itself every two minutes

    def _summaries(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            with self.writer.as_default(step=record["steps"]):
                for key, value in record.items():
                    if key in _BOOKKEEPING[:3] or not isinstance(value, (int, float)):
                        continue
                    if math.isfinite(value):
                        tf.summary.scalar(key, value)

    def results(self) -> dict[str, Any]:
        """The run's results (``results.json``)."""
        import hashlib

        t, records = self.t, [r for r in self.records if not r.get("partial")]
        plan = t.plan.to_dict()
        results: dict[str, Any] = {
            "final_train_loss": records[-1]["train_loss"] if records else float("nan"),
            "parameter_updates": self.iterations(),
            # steps a float16 loss scaler skipped on overflow (no update was applied)
            "skipped_steps": self.step() - self.iterations(),
            "epochs_completed": self._epochs_done,
            "stopped_early": self.stopped_early,
            "examples_per_second": (
                self.examples / self.train_seconds if self.train_seconds else 0.0
            ),
            "wall_seconds": time.perf_counter() - self.wall_start,
            "num_replicas": t.num_replicas,
            "phases": plan["phases"],  # start/end epoch, batch, lr, momentum, steps, ...
            "plan": plan,
            "history": self.records,
            "trace_count": t.trace_count,
            "phase_switch_seconds": self.switch_seconds,
        }
        decisions = [r["adaptive_decision"] for r in self.records if "adaptive_decision" in r]
        if decisions:
            results["adaptive_decisions"] = decisions
        if t.noise_estimator is not None:
            results["noise_scale_steps"] = self.noise_steps
            # steps whose gradients were not finite (float16 overflow): not in the estimate
            results["noise_scale_skipped_steps"] = int(t.noise_estimator.skipped.numpy())
        last = self.records[-1] if self.records else {}
        if "val_loss" in last:
            results.update({k: v for k, v in last.items() if k.startswith("test_")})
        elif self.validation is not None:
            results.update({f"test_{k}": v for k, v in t.evaluate(self.validation).items()})
        weights = [np.asarray(w, np.float32).tobytes() for w in t.model.get_weights()]
        results["weights_sha256"] = hashlib.sha256(b"".join(weights)).hexdigest()
        return results


def make_dataset_fn(
    source: Any, global_batch_size: int, *, seed: int, start_epoch: int, end_epoch: int,
    example_offset: int,
) -> Any:  # fmt: skip
    """``source.make_dataset_fn`` from an example offset (or whole steps, for sources that
    only skip steps).

    Raises:
      ValueError: a source that cannot start `example_offset` examples into an epoch.
    """
    kwargs = {"seed": seed, "start_epoch": start_epoch, "end_epoch": end_epoch,
              "static_batch_size": False}  # fmt: skip
    try:
        return source.make_dataset_fn(global_batch_size, example_offset=example_offset, **kwargs)
    except TypeError as error:
        if "example_offset" not in str(error):
            raise
    if example_offset % global_batch_size:
        raise ValueError(
            f"Argument `x`: a {type(source).__name__} can only start an epoch at a whole batch; "
            f"the plan starts a phase of global batch {global_batch_size} at example "
            f"{example_offset} of epoch {start_epoch} (pass arrays or an unbatched "
            "tf.data.Dataset for phases inside an epoch)"
        )
    return source.make_dataset_fn(
        global_batch_size, skip_steps=example_offset // global_batch_size, **kwargs
    )
