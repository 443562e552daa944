r"""Training throughput: our `Trainer` against `model.fit` and a bare `tf.function` step.

  python benchmarks/throughput.py --output=/tmp/throughput.json
  python benchmarks/throughput.py --models=cnn --replicas=1 --rounds=5 --output=/tmp/cnn.json
  python benchmarks/throughput.py --quick --output=/tmp/quick.json      # CI-sized smoke run

Methods, each training the same model (same initial weights) on the same data with the same
global batch, the same loss (sparse categorical cross-entropy on logits, averaged over the global
batch) and the same optimizer (our `SGD`, momentum 0.9, momentum correction, constant learning
rate):

  trainer       `Trainer.fit` with ``steps_per_execution=K`` (verbose=0, no validation data).
  trainer_noise the same measuring the gradient noise scale (``measure_noise_scale=True``).
  trainer_spe1  the same with ``steps_per_execution=1``.
  fit           ``model.fit`` (compiled with ``metrics=["accuracy"]``, as the Trainer also
                counts correct predictions) on `make_dataset`, ``steps_per_execution=K``.
  fit_spe1      the same with Keras's default ``steps_per_execution=1``.
  bare_range    the ceiling: a `tf.function` that runs K steps with `tf.range` over a tensor
                holding one epoch pre-batched in memory ([steps, batch, ...], no tf.data).
  bare_loop     one `tf.function` call per step over the same tensor from a Python loop.
  bare_keras    ``bare_range`` computing what the Trainer and ``model.fit`` compute: the model's
                compiled loss and ``accuracy`` metric (Keras's ops) instead of a hand-written
                loss and hit count. trainer/bare_keras is the loop's own cost.

K is ``--steps_per_execution`` (0, the default, means one whole epoch per call). Timing unit is the
*window*: one epoch of steps. Every run trains ``--epochs`` windows, the first (which holds tracing
and pipeline start-up) is dropped; ``--rounds`` rounds run the methods interleaved (A B C A B C
...) with fresh models so that load drifts hit every method alike; the figure is the median
examples/second over all kept windows. The mlp's windows last ~3 ms, so its groups take
``--mlp_epochs`` (40) and ``--mlp_rounds`` (5) instead: 195 windows a method rather than 33, at a
few seconds' cost (``--quick`` and 0 use ``--epochs``/``--rounds``). The Trainer's windows are its
own per-epoch ``examples_per_second`` (time of the compiled calls of that epoch, host syncs
included; checkpoints and history writes between epochs excluded), model.fit's are timed by a
callback from ``on_epoch_begin`` to ``on_epoch_end`` (logs converted to floats, a host sync), the
bare step's from the first call to a host sync after the last. The *whole job* (``job s``, ratio
``job trainer/fit``) is the wall time of the ``trainer.fit(...)`` / ``model.fit(...)`` call itself:
building, tracing, every epoch, the Trainer's checkpoints and JSON files, all of it.
``noise_scale_cost`` is 1 − trainer_noise/trainer (median examples/second).

Data: ``mlp`` trains on scikit-learn's digits (1,437 training images, 8×8×1); ``cnn`` on the
same digits bilinearly upscaled to 28×28×1 (MNIST-shaped, real images, still 1,437 of them).

Replicas: each (model, replicas) group runs in a fresh subprocess that first splits the CPU into
``replicas`` logical devices (`configure_cpu_devices`); 1 replica uses the default strategy (what
a plain ``model.fit`` user has), more use `make_strategy("mirrored")`. All logical devices share
the machine's cores, so on a 2-core machine 2 replicas split the same cores.

Paired (``--paired``, the default): every window of every method is followed at once by one
window of a *reference*, ``bare_range`` on a model of its own (built and traced before the
methods, run from a Keras callback's ``on_epoch_end`` for the Trainer and ``model.fit``, its
time taken out of their job and between-epoch seconds). A method's ``paired_ratio`` is the
median over its windows of window / the reference beside it; the ``paired ...`` ratios divide
these. The host's speed drifts by tens of percent over seconds (digits-MLP windows last a few
milliseconds), which the unpaired medians of runs seconds apart carry into their ratios; a
window and its reference share the same second. ``bare_range``'s own ``paired_ratio`` is the A/A
check: the reference against itself, ~1.

Steal: the share of CPU time the VM's host gave to other guests (/proc/stat's ``steal``), per
run, per method (median) and over the whole group. Figures measured while it is high say more
about the host than about the methods.

Memory: per method, the process's peak resident set (VmHWM, reset before each method through
/proc/self/clear_refs; it includes the ~0.6 GB TensorFlow runtime), the process-wide
``resource.getrusage(...).ru_maxrss``, and ``tf.config.experimental.get_memory_info("CPU:0")``
(TensorFlow does not track CPU allocations: it reports zeros, recorded as such).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import app, flags, logging

METHODS = (
    "trainer",
    "trainer_noise",
    "trainer_spe1",
    "fit",
    "fit_spe1",
    "bare_range",
    "bare_loop",
    "bare_keras",
    "bare_pipeline",
    "bare_gather",
)
MODELS = ("mlp", "cnn")


def define_common_flags() -> None:
    """Flags shared with `phase_switch.py` (defined by the running script only)."""
    flags.DEFINE_list("models", list(MODELS), "Models: mlp (digits), cnn (digits at 28x28).")
    flags.DEFINE_list("replicas", ["1", "2"], "Replica counts (logical CPU devices).")
    flags.DEFINE_integer("global_batch_size", 128, "Global batch (all replicas).")
    flags.DEFINE_integer("steps_per_execution", 0, "K: steps per compiled call (0: one epoch).")
    flags.DEFINE_integer("rounds", 3, "Interleaved rounds of all methods (fresh models each).")
    flags.DEFINE_enum(
        "isolate",
        "group",
        ["group", "method", "none"],
        "Fresh process per (model, replicas) group; 'method': per method too (clean peak "
        "memory, no interleaving; throughput.py only); 'none': one process.",
    )
    flags.DEFINE_bool("quick", False, "CI-sized run: mlp only, few epochs, 1 round.")
    flags.DEFINE_string("output", None, "Write the results as JSON here.")
    flags.DEFINE_string("worker", None, "Internal: run one group 'model:replicas', JSON out.")


def define_flags() -> None:
    define_common_flags()
    flags.DEFINE_list("methods", list(METHODS), f"Methods, from {METHODS}.")
    flags.DEFINE_bool(
        "paired", True, "Time the reference (bare_range) right after each window of every method."
    )
    flags.DEFINE_integer("epochs", 12, "Windows (epochs) per run; the first is warmup, dropped.")
    flags.DEFINE_integer(
        "mlp_epochs", 40, "--epochs for the mlp groups (its windows last ~3 ms); 0: --epochs."
    )
    flags.DEFINE_integer("mlp_rounds", 5, "--rounds for the mlp groups; 0: --rounds.")


FLAGS = flags.FLAGS

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
DIGITS_NOTE = {
    "mlp": "sklearn digits, 1437 train images 8x8x1",
    "cnn": "sklearn digits bilinearly upscaled to 28x28x1 (MNIST shape), 1437 train images",
}


# ---- machine and memory --------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """nproc, the CPU model, load averages and library versions."""
    info: dict[str, Any] = {"nproc": os.cpu_count(), "python": platform.python_version()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        info["lscpu"] = lscpu.splitlines()[:12]
        info["cpu_model"] = next(
            (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line),
            platform.processor(),
        )
    except OSError:
        info["cpu_model"] = platform.processor()
    info["load_average"] = list(os.getloadavg())
    info["env"] = {
        key: os.environ.get(key, "(unset)")
        for key in ("TF_ENABLE_ONEDNN_OPTS", "OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS")
    }
    try:
        import importlib.metadata as metadata

        info["versions"] = {p: metadata.version(p) for p in ("tensorflow", "keras", "numpy")}
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    return info


def _status_kb(key: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def cpu_times() -> tuple[float, float]:
    """(all CPU time, stolen time) since boot in clock ticks, from /proc/stat's first line.

    Stolen time is the time this VM's virtual CPUs were ready to run but the host ran
    something else (its neighbours): a share of it during a run slows every method, unevenly.
    """
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return float("nan"), float("nan")
    return sum(fields), fields[7] if len(fields) == 8 else float("nan")


def steal_fraction(before: tuple[float, float], after: tuple[float, float]) -> float:
    """The share of CPU time stolen between two `cpu_times` readings (NaN if unknown)."""
    total = after[0] - before[0]
    return (after[1] - before[1]) / total if total > 0 else float("nan")


def reset_peak_rss() -> float:
    """Resets the process's peak RSS (Linux clear_refs 5); returns the current RSS in MB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """Peak RSS since the last `reset_peak_rss` (VmHWM) in MB."""
    return _status_kb("VmHWM") / 1024


def maxrss_mb() -> float:
    """Process lifetime peak RSS from getrusage (kB on Linux) in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tf_memory_info() -> dict[str, Any]:
    import tensorflow as tf

    try:
        return dict(tf.config.experimental.get_memory_info("CPU:0"))
    except (ValueError, RuntimeError) as error:  # not supported on this device
        return {"error": str(error)}


# ---- data, models, strategies --------------------------------------------------------------


def load_arrays(model: str) -> tuple[Any, Any]:
    """Training images and labels for a benchmark model (see `DIGITS_NOTE`)."""
    import numpy as np
    import tensorflow as tf

    from tf_largebatch.data import load_data

    data = load_data("digits")
    x = data.x_train
    if model == "cnn":
        x = tf.image.resize(x, (28, 28), method="bilinear").numpy().astype(np.float32)
    return x, data.y_train


def model_fn(model: str, input_shape: tuple[int, ...]) -> Any:
    from tf_largebatch.models import build_model

    return lambda: build_model(model, input_shape, 10, seed=0)


def make_plan(num_examples: int, global_batch_size: int, epochs: int, **kw: Any) -> Any:
    """A one-phase, constant learning-rate plan (no warmup), or phases via ``decay_epochs``."""
    from tf_largebatch.phases import plan_phases

    kw = {"mode": "decay_lr", **kw}
    return plan_phases(
        dataset_size=num_examples,
        epochs=epochs,
        global_batch_size=global_batch_size,
        base_learning_rate=0.05,
        base_batch_size=global_batch_size,
        momentum=0.9,
        **kw,
    )


_STRATEGIES: dict[int, Any] = {}


def make_strategy(replicas: int) -> Any:
    """Default strategy for 1 replica, else `make_strategy("mirrored")` over /cpu:0.. (cached:
    one MirroredStrategy per replica count and process)."""
    import tensorflow as tf

    from tf_largebatch.distribute import make_strategy as lib_make_strategy

    if replicas == 1:
        return tf.distribute.get_strategy()
    if replicas not in _STRATEGIES:
        devices = [f"/cpu:{i}" for i in range(replicas)]
        _STRATEGIES[replicas] = lib_make_strategy("mirrored", devices=devices)
    return _STRATEGIES[replicas]


def configure_devices(num_devices: int) -> None:
    """Splits the CPU into logical devices once, before any other TensorFlow work."""
    if num_devices > 1:
        from tf_largebatch.distribute import configure_cpu_devices

        configure_cpu_devices(num_devices)


# ---- the methods ---------------------------------------------------------------------------


def run_trainer(
    ctx: dict[str, Any], steps_per_execution: int, measure_noise_scale: bool = False
) -> dict[str, Any]:
    from tf_largebatch.training import Trainer, TrainerConfig

    with tempfile.TemporaryDirectory() as model_dir:
        trainer = Trainer(
            ctx["model_fn"],
            ctx["plan"],
            TrainerConfig(
                model_dir=model_dir,
                verbose=0,
                steps_per_execution=steps_per_execution,
                save_model=False,
                measure_noise_scale=measure_noise_scale,
            ),
            strategy=ctx["strategy"],
        )
        paired = Paired(ctx)
        start = time.perf_counter()
        trainer.fit(ctx["x"], ctx["y"], callbacks=paired.callback())
        job_seconds = time.perf_counter() - start - paired.seconds
        results = trainer.results
    history = results["history"]
    timed = sum(
        h["global_batch_size"] * ctx["steps_per_epoch"] / h["examples_per_second"] for h in history
    )
    wall = results["wall_seconds"] - paired.seconds
    return {
        "windows": [h["examples_per_second"] for h in history[1:]],
        **paired.results(),
        "reported_examples_per_second": results["examples_per_second"],
        "wall_seconds": wall,
        "job_seconds": job_seconds,
        "outside_epoch_seconds": (wall - timed) / len(history),
        "trace_count": results["trace_count"],
        "final_train_loss": results["final_train_loss"],
    }


def run_fit(ctx: dict[str, Any], steps_per_execution: int) -> dict[str, Any]:
    import keras

    from tf_largebatch.data import make_dataset
    from tf_largebatch.optimizers import SGD

    plan, strategy = ctx["plan"], ctx["strategy"]
    epoch_seconds: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            _ = [float(v) for v in (logs or {}).values()]  # host sync
            epoch_seconds.append(time.perf_counter() - self.start)

    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = ctx["model_fn"]()
        model.compile(
            optimizer=SGD(plan.learning_rate_schedule(), momentum=plan.phases[0].momentum),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            steps_per_execution=steps_per_execution,
        )
    dataset = make_dataset(ctx["x"], ctx["y"], ctx["global_batch_size"], seed=0, epochs=plan.epochs)
    paired = Paired(ctx)
    start = time.perf_counter()
    history = model.fit(
        dataset,
        epochs=plan.epochs,
        steps_per_epoch=ctx["steps_per_epoch"],
        callbacks=[EpochTimer(), *paired.callback()],
        verbose=0,
        shuffle=False,
    )
    wall = time.perf_counter() - start - paired.seconds
    examples = ctx["steps_per_epoch"] * ctx["global_batch_size"]
    return {
        "windows": [examples / s for s in epoch_seconds[1:]],
        **paired.results(),
        "wall_seconds": wall,
        "job_seconds": wall,
        "outside_epoch_seconds": (wall - sum(epoch_seconds)) / len(epoch_seconds),
        "final_train_loss": float(history.history["loss"][-1]),
    }


def run_bare(
    ctx: dict[str, Any], steps_per_execution: int, inputs: str, keras_ops: bool = False
) -> dict[str, Any]:
    """Every window of a bare step (`build_bare`), each followed by a reference window."""
    window = build_bare(ctx, steps_per_execution, inputs, keras_ops)
    paired = Paired(ctx)
    seconds = []
    for epoch in range(ctx["plan"].epochs):
        seconds.append(window(epoch))
        paired.after_window()
    examples = ctx["steps_per_epoch"] * ctx["global_batch_size"]
    return {"windows": [examples / s for s in seconds[1:]], **paired.results()}


def build_bare(
    ctx: dict[str, Any], steps_per_execution: int, inputs: str, keras_ops: bool = False
) -> Any:
    """A bare `tf.function` step (loss / global batch, gradients, our SGD; no Keras loop):
    returns ``window(epoch)``, which trains one epoch and returns its seconds.

    ``inputs``: ``"tensor"``, one epoch pre-batched in memory as [steps, batch, ...] (the
    ceiling); ``"pipeline"``, the Trainer's `make_dataset_fn` pipeline through
    `distribute_datasets_from_function`; ``"gather"``, no tf.data: each window draws the
    permutation in-graph (stateless, as `make_dataset_fn`) and every step gathers its batch from
    the arrays held as constants (a prototype of an in-memory input path for the Trainer).
    ``keras_ops``: the loss is the model's compiled loss and the metric its compiled
    ``accuracy`` (Keras's ops, as the Trainer and ``model.fit`` run them).
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from tf_largebatch.data import make_dataset_fn
    from tf_largebatch.optimizers import SGD

    plan, strategy = ctx["plan"], ctx["strategy"]
    batch, steps = ctx["global_batch_size"], ctx["steps_per_epoch"]
    x, y = ctx["x"], ctx["y"]
    replicas = strategy.num_replicas_in_sync
    per_replica = batch // replicas
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = ctx["model_fn"]()
        optimizer = SGD(plan.learning_rate_schedule(), momentum=plan.phases[0].momentum)
        optimizer.build(model.trainable_variables)
        if keras_ops:  # the compiled loss and metric, built before the trace
            model.compile(
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"],
            )
            model._compile_loss.build(y[:per_replica], model(x[:per_replica]))
            model._compile_metrics.build(y[:per_replica], model(x[:per_replica]))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    global_batch = tf.constant(float(batch))

    def train_on(xb: tf.Tensor, yb: tf.Tensor) -> tuple[Any, Any]:
        with tf.GradientTape() as tape:
            logits = model(xb, training=True)
            if keras_ops:  # mean over the replica's batch / replicas: the global-batch loss
                loss = model._compile_loss(yb, logits)
            else:
                loss = tf.reduce_sum(loss_fn(yb, logits)) / global_batch
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        if keras_ops:
            model._compile_metrics.update_state(yb, logits)
            return loss, tf.constant(0.0)
        hits = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), tf.cast(yb, tf.int32))
        return loss, tf.reduce_sum(tf.cast(hits, tf.float32))

    if inputs == "tensor":
        perm = np.random.default_rng(0).permutation(len(x))[: steps * batch]
        xs = x[perm].reshape(steps, batch, *x.shape[1:])
        ys = y[perm].reshape(steps, batch)

        def shard(array: np.ndarray) -> Any:
            def value_fn(context: tf.distribute.ValueContext) -> tf.Tensor:
                r = context.replica_id_in_sync_group
                return tf.constant(array[:, r * per_replica : (r + 1) * per_replica])

            if replicas == 1:
                return tf.constant(array)
            return strategy.experimental_distribute_values_from_function(value_fn)

        xs_t, ys_t = shard(xs), shard(ys)

        def run_step(i: tf.Tensor, state: Any) -> Any:
            return strategy.run(lambda a, b, j: train_on(a[j], b[j]), args=(xs_t, ys_t, i))

    elif inputs == "gather":
        x_t, y_t = tf.constant(x), tf.constant(y)

        def replica_gather(perm: tf.Tensor, i: tf.Tensor) -> tuple[Any, Any]:
            r = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int32)
            begin = i * batch + r * per_replica
            idx = perm[begin : begin + per_replica]
            return train_on(tf.gather(x_t, idx), tf.gather(y_t, idx))

        def run_step(i: tf.Tensor, state: Any) -> Any:
            return strategy.run(replica_gather, args=(state, i))

    else:
        dataset_fn = make_dataset_fn(
            x, y, batch, seed=0, start_epoch=0, end_epoch=plan.epochs, static_batch_size=False
        )
        iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))

        def run_step(i: tf.Tensor, state: Any) -> Any:
            return strategy.run(train_on, args=next(state))

    def one_step(i: tf.Tensor, state: Any) -> tf.Tensor:
        loss, correct = run_step(i, state)
        loss = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
        correct = strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None)
        return loss + 0.0 * correct

    @tf.function
    def range_steps(start: tf.Tensor, n: tf.Tensor, state: Any) -> tf.Tensor:
        total = tf.constant(0.0)
        for i in tf.range(start, start + n):
            total += one_step(i, state)
        return total

    @tf.function
    def permutation(epoch: tf.Tensor) -> tf.Tensor:  # as data._permutation
        key = tf.stack([tf.constant(0, tf.int64), epoch])
        draws = tf.random.stateless_uniform([len(x)], key, None, None, dtype=tf.int64)
        return tf.cast(tf.argsort(draws, direction="DESCENDING", stable=True), tf.int32)

    step_fn = tf.function(one_step)

    def window(epoch: int) -> float:
        begin = time.perf_counter()
        if inputs == "gather":
            state = permutation(tf.constant(epoch, tf.int64))
        else:
            state = iterator if inputs == "pipeline" else None
        if steps_per_execution == 1:
            results = [step_fn(tf.constant(i), state) for i in range(steps)]
        else:
            results = [
                range_steps(tf.constant(s), tf.constant(min(steps_per_execution, steps - s)), state)
                for s in range(0, steps, steps_per_execution)
            ]
        float(tf.add_n(results))  # host sync
        return time.perf_counter() - begin

    return window


class Paired:
    """The reference (``bare_range`` on a model of its own) timed right after each window of a
    method: in the same second, so the ratio window / reference cancels the host's drift.

    A no-op unless ``ctx["reference"]`` holds a reference's ``window`` (``--paired``). Its
    `callback` does the same from a Keras callback's ``on_epoch_end`` (the Trainer and
    ``model.fit``); `seconds` is the time the references took (not the method's)."""

    def __init__(self, ctx: dict[str, Any]) -> None:
        self.window = ctx.get("reference")
        self.examples = ctx["steps_per_epoch"] * ctx["global_batch_size"]
        self.reference_windows: list[float] = []
        self.seconds = 0.0

    def after_window(self) -> None:
        if self.window is not None:
            start = time.perf_counter()
            self.reference_windows.append(self.examples / self.window(0))
            self.seconds += time.perf_counter() - start

    def callback(self) -> list[Any]:
        """``[callback]`` for ``callbacks=`` (nothing when not paired)."""
        if self.window is None:
            return []
        import keras

        paired = self

        class AfterEpoch(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                paired.after_window()

        return [AfterEpoch()]

    def results(self) -> dict[str, Any]:
        """``reference_windows`` (the first, after the dropped window, dropped too)."""
        if self.window is None:
            return {}
        return {"reference_windows": self.reference_windows[1:]}


def make_reference(ctx: dict[str, Any]) -> Any:
    """``bare_range``'s ``window`` on a model of its own, traced and warmed up."""
    window = build_bare(ctx, ctx["steps_per_execution"], "tensor")
    window(0)
    return window


def run_method(ctx: dict[str, Any], method: str) -> dict[str, Any]:
    """One run of a method; a failure is recorded (with its message), not raised."""
    try:
        return _run_method(ctx, method)
    except Exception as error:  # noqa: BLE001 - e.g. Keras bugs under MirroredStrategy
        message = str(error).strip().splitlines()
        return {"windows": [], "error": f"{type(error).__name__}: {' '.join(message[:3])}"[:400]}


def _run_method(ctx: dict[str, Any], method: str) -> dict[str, Any]:
    k = ctx["steps_per_execution"]
    if method == "trainer":
        return run_trainer(ctx, k)
    if method == "trainer_noise":
        return run_trainer(ctx, k, measure_noise_scale=True)
    if method == "trainer_spe1":
        return run_trainer(ctx, 1)
    if method == "fit":
        return run_fit(ctx, k)
    if method == "fit_spe1":
        return run_fit(ctx, 1)
    if method == "bare_range":
        return run_bare(ctx, k, "tensor")
    if method == "bare_loop":
        return run_bare(ctx, 1, "tensor")
    if method == "bare_keras":
        return run_bare(ctx, k, "tensor", keras_ops=True)
    if method == "bare_pipeline":
        return run_bare(ctx, k, "pipeline")
    if method == "bare_gather":
        return run_bare(ctx, k, "gather")
    raise ValueError(f"Argument `methods` must hold names from {METHODS}. Received: {method!r}")


def steps_per_execution_of(method: str, k: int) -> int:
    return 1 if method.endswith(("_spe1", "_loop")) else k


# ---- one group -----------------------------------------------------------------------------


def make_context(model: str, replicas: int, settings: dict[str, Any]) -> dict[str, Any]:
    """Data, plan and strategy shared by every method of a (model, replicas) group."""
    from tf_largebatch.phases import steps_per_epoch

    x, y = load_arrays(model)
    batch = settings["global_batch_size"]
    steps = steps_per_epoch(len(x), batch)
    k = settings["steps_per_execution"] or steps
    ctx = {
        "x": x,
        "y": y,
        "model_fn": model_fn(model, x.shape[1:]),
        "plan": make_plan(len(x), batch, settings["epochs"]),
        "strategy": make_strategy(replicas),
        "global_batch_size": batch,
        "steps_per_epoch": steps,
        "steps_per_execution": min(k, steps),
    }
    if settings.get("paired", False):
        ctx["reference"] = make_reference(ctx)
    return ctx


def summarize(windows: list[float]) -> dict[str, Any]:
    """Median, min and max examples/second over the kept windows (None when there are none)."""
    return {
        "examples_per_second": statistics.median(windows) if windows else None,
        "min": min(windows, default=None),
        "max": max(windows, default=None),
        "num_windows": len(windows),
    }


def group_settings(model: str, settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` with the mlp's own epochs and rounds (``mlp_epochs``, ``mlp_rounds``)."""
    if model != "mlp":
        return settings
    return {
        **settings,
        "epochs": settings.get("mlp_epochs") or settings["epochs"],
        "rounds": settings.get("mlp_rounds") or settings["rounds"],
    }


def run_group(model: str, replicas: int, settings: dict[str, Any]) -> dict[str, Any]:
    """All methods of one (model, replicas) group, interleaved over rounds."""
    settings = group_settings(model, settings)
    ctx = make_context(model, replicas, settings)
    methods = settings["methods"]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    memory: dict[str, dict[str, float]] = {}
    group_start = cpu_times()
    for _ in range(settings["rounds"]):
        for method in methods:
            rss_before = reset_peak_rss()
            start = cpu_times()
            runs[method].append(run_method(ctx, method))
            runs[method][-1]["steal_fraction"] = steal_fraction(start, cpu_times())
            if method not in memory:  # first run of the method: what it adds to the process
                memory[method] = {"rss_before_mb": rss_before, "peak_rss_mb": peak_rss_mb()}
    results: dict[str, Any] = {}
    for method in methods:
        windows = [w for run in runs[method] for w in run["windows"]]
        entry = summarize(windows)
        pairs = [
            w / r
            for run in runs[method]
            for w, r in zip(run["windows"], run.get("reference_windows", []))
        ]
        if pairs:  # the method's speed relative to the reference beside it
            entry["paired_ratio"] = statistics.median(pairs)
            entry["num_pairs"] = len(pairs)
        entry.update(memory[method])
        entry["steps_per_execution"] = steps_per_execution_of(method, ctx["steps_per_execution"])
        outside = [r["outside_epoch_seconds"] for r in runs[method] if "outside_epoch_seconds" in r]
        if (
            outside and windows
        ):  # per epoch, between the timed windows: setup amortised, checkpoints, ...
            entry["outside_epoch_seconds"] = statistics.median(outside)
            window_examples = ctx["steps_per_epoch"] * ctx["global_batch_size"]
            window_seconds = window_examples / entry["examples_per_second"]
            entry["wall_examples_per_second"] = window_examples / (
                window_seconds + entry["outside_epoch_seconds"]
            )
        jobs = [r["job_seconds"] for r in runs[method] if "job_seconds" in r]
        if jobs:  # the whole call (trainer.fit / model.fit): setup, tracing, checkpoints
            entry["job_seconds"] = statistics.median(jobs)
        entry["steal_fraction"] = statistics.median(r["steal_fraction"] for r in runs[method])
        entry["runs"] = runs[method]
        errors = [run["error"] for run in runs[method] if "error" in run]
        if errors:
            entry["error"] = errors[0]
        results[method] = entry
    return {
        "model": model,
        "replicas": replicas,
        "data": DIGITS_NOTE[model],
        "input_shape": list(ctx["x"].shape[1:]),
        "num_examples": len(ctx["x"]),
        "global_batch_size": ctx["global_batch_size"],
        "steps_per_epoch": ctx["steps_per_epoch"],
        "steps_per_execution": ctx["steps_per_execution"],
        "epochs": settings["epochs"],
        "rounds": settings["rounds"],
        "methods": results,
        "ratios": ratios(results),
        "steal_fraction": steal_fraction(group_start, cpu_times()),
        "process_maxrss_mb": maxrss_mb(),
        "tf_memory_info": tf_memory_info(),
    }


RATIO_PAIRS = (
    ("trainer", "fit"),
    ("trainer", "fit_spe1"),
    ("trainer", "bare_best"),
    ("trainer", "bare_keras"),
    ("bare_keras", "bare_best"),
    ("trainer_spe1", "fit_spe1"),
    ("trainer", "bare_pipeline"),
    ("bare_pipeline", "bare_best"),
    ("bare_gather", "bare_best"),
)


def speed_ratios(speeds: dict[str, float], pairs: Any, prefix: str = "") -> dict[str, float]:
    """``a/b`` of `speeds` for each pair present (``bare_best``: the faster of ``bare_range``
    and ``bare_loop``) and ``noise_scale_cost`` = 1 − trainer_noise/trainer."""
    speeds = dict(speeds)
    bare = [speeds[m] for m in ("bare_range", "bare_loop") if m in speeds]
    if bare:
        speeds["bare_best"] = max(bare)
    out = {
        f"{prefix}{a}/{b}": speeds[a] / speeds[b] for a, b in pairs if a in speeds and b in speeds
    }
    if "trainer" in speeds and "trainer_noise" in speeds:  # the share of speed the estimator costs
        out[f"{prefix}noise_scale_cost"] = 1.0 - speeds["trainer_noise"] / speeds["trainer"]
    return out


def ratios(methods: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Ratios of median examples/second (the issue's targets first), same process and run; then
    the whole job's and, with ``--paired``, the same ratios of the ``paired_ratio`` figures
    (speed / the reference beside it: host drift between the methods' runs cancels;
    ``bare_range``'s own is the A/A check, ~1)."""
    eps = {m: v["examples_per_second"] for m, v in methods.items() if v["num_windows"]}
    out = speed_ratios(eps, RATIO_PAIRS)
    wall = {
        m: v["wall_examples_per_second"]
        for m, v in methods.items()
        if "wall_examples_per_second" in v
    }
    for a, b in (("trainer", "fit"), ("trainer", "fit_spe1")):
        if a in wall and b in wall:
            out[f"wall {a}/{b}"] = wall[a] / wall[b]
    job = {m: v["job_seconds"] for m, v in methods.items() if "job_seconds" in v}
    for a, b in (("trainer", "fit"), ("trainer", "fit_spe1")):
        if a in job and b in job:  # speed of the whole job: b's seconds over a's
            out[f"job {a}/{b}"] = job[b] / job[a]
    paired = {m: v["paired_ratio"] for m, v in methods.items() if "paired_ratio" in v}
    out.update(speed_ratios(paired, RATIO_PAIRS[:5], prefix="paired "))
    return out


# ---- orchestration -------------------------------------------------------------------------


def run_in_subprocess(script: str, group: str, argv: list[str]) -> dict[str, Any]:
    """Runs one group in a fresh Python process (devices are set up once per process)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "group.json")
        command = [sys.executable, script, f"--worker={group}", f"--output={out}", *argv]
        subprocess.run(command, check=True)
        with open(out) as f:
            return json.load(f)


def settings_from_flags() -> dict[str, Any]:
    methods = list(FLAGS.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Flag --methods must name {METHODS}. Received: {unknown}")
    models = list(FLAGS.models)
    if [m for m in models if m not in MODELS]:
        raise ValueError(f"Flag --models must name {MODELS}. Received: {models}")
    settings = {
        "models": models,
        "replicas": [int(r) for r in FLAGS.replicas],
        "methods": methods,
        "global_batch_size": FLAGS.global_batch_size,
        "steps_per_execution": FLAGS.steps_per_execution,
        "epochs": FLAGS.epochs,
        "rounds": FLAGS.rounds,
        "mlp_epochs": FLAGS.mlp_epochs,
        "mlp_rounds": FLAGS.mlp_rounds,
        "isolate": FLAGS.isolate,
        "paired": FLAGS.paired,
    }
    if FLAGS.quick:
        settings.update(models=["mlp"], epochs=3, rounds=1, mlp_epochs=0, mlp_rounds=0)
    if settings["epochs"] < 2 or settings["mlp_epochs"] < 0 or settings["mlp_epochs"] == 1:
        raise ValueError(
            "Flags --epochs and --mlp_epochs (0: --epochs) must be >= 2. Received: "
            f"{settings['epochs']}, {settings['mlp_epochs']}"
        )
    if settings["rounds"] < 1 or settings["mlp_rounds"] < 0:
        raise ValueError(
            "Flags --rounds and --mlp_rounds (0: --rounds) must be >= 1. Received: "
            f"{settings['rounds']}, {settings['mlp_rounds']}"
        )
    return settings


def worker_argv(settings: dict[str, Any]) -> list[str]:
    """Flags that pass the settings on to a worker process."""
    return [
        f"--methods={','.join(settings['methods'])}",
        f"--global_batch_size={settings['global_batch_size']}",
        f"--steps_per_execution={settings['steps_per_execution']}",
        f"--epochs={settings['epochs']}",
        f"--rounds={settings['rounds']}",
        f"--mlp_epochs={settings['mlp_epochs']}",
        f"--mlp_rounds={settings['mlp_rounds']}",
        f"--paired={settings['paired']}",
    ]


def run_groups(
    script: str, settings: dict[str, Any], run_one: Any, argv: list[str]
) -> list[dict[str, Any]]:
    """Every (model, replicas) group, each in a fresh process unless ``isolate == "none"``."""
    groups = [(m, r) for m in settings["models"] for r in settings["replicas"]]
    if settings["isolate"] == "none":
        configure_devices(max(settings["replicas"]))
        return [run_one(m, r, settings) for m, r in groups]
    if settings["isolate"] == "method" and "methods" in settings:
        return [merge_methods(script, f"{m}:{r}", settings, argv) for m, r in groups]
    return [run_in_subprocess(script, f"{m}:{r}", argv) for m, r in groups]


def merge_methods(
    script: str, group: str, settings: dict[str, Any], argv: list[str]
) -> dict[str, Any]:
    """One fresh process per method of a group, merged into one group result."""
    merged: dict[str, Any] = {}
    for method in settings["methods"]:
        method_argv = [a for a in argv if not a.startswith("--methods=")]
        part = run_in_subprocess(script, group, [*method_argv, f"--methods={method}"])
        part["methods"][method]["process_maxrss_mb"] = part["process_maxrss_mb"]
        part["methods"][method]["tf_memory_info"] = part["tf_memory_info"]
        if not merged:
            merged = {**part, "methods": {}}
        merged["methods"][method] = part["methods"][method]
    merged["ratios"] = ratios(merged["methods"])
    merged["process_maxrss_mb"] = max(v["process_maxrss_mb"] for v in merged["methods"].values())
    return merged


def worker_main(run_one: Any, settings: dict[str, Any]) -> None:
    """Worker process: devices first, then the one group; JSON to --output."""
    model, replicas = FLAGS.worker.split(":")
    logging.set_verbosity(logging.WARNING)
    configure_devices(int(replicas))
    result = run_one(model, int(replicas), settings)
    with open(FLAGS.output, "w") as f:
        json.dump(result, f)


def table(groups: list[dict[str, Any]]) -> str:
    """One row per (model, replicas, method); ratios under each group."""
    lines = [
        f"{'model':5} {'rep':>3} {'method':13} {'K':>3} {'ex/s median':>12} {'min':>9} "
        f"{'max':>9} {'n':>3} {'/ref':>5} {'between ms':>10} {'wall ex/s':>10} {'job s':>6} "
        f"{'peak RSS MB':>11}"
    ]
    nan = float("nan")
    for g in groups:
        for method, v in g["methods"].items():
            eps, low, high = (
                nan if v[k] is None else v[k] for k in ("examples_per_second", "min", "max")
            )
            outside = v.get("outside_epoch_seconds", nan) * 1e3
            lines.append(
                f"{g['model']:5} {g['replicas']:>3} {method:13} {v['steps_per_execution']:>3} "
                f"{eps:>12,.0f} {low:>9,.0f} {high:>9,.0f} {v['num_windows']:>3} "
                f"{v.get('paired_ratio', nan):>5.2f} {outside:>10.1f} "
                f"{v.get('wall_examples_per_second', nan):>10,.0f} "
                f"{v.get('job_seconds', nan):>6.2f} {v['peak_rss_mb']:>11,.0f}"
            )
        for method, v in g["methods"].items():
            if "error" in v:
                lines.append(f"{'':9} {method} failed: {v['error'][:150]}")
        shown = ", ".join(f"{k} = {v:.2f}" for k, v in g["ratios"].items())
        lines.append(f"{'':9} ratios: {shown}")
        lines.append(f"{'':9} CPU time stolen by the VM's host: {g.get('steal_fraction', nan):.1%}")
    return "\n".join(lines)


def write_output(path: str | None, value: dict[str, Any]) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(value, f, indent=1)
        print(f"Wrote {path}")


def main(argv: list[str]) -> None:
    del argv
    settings = settings_from_flags()
    if FLAGS.worker:
        worker_main(run_group, settings)
        return
    machine = machine_info()
    start = time.perf_counter()
    groups = run_groups(os.path.abspath(__file__), settings, run_group, worker_argv(settings))
    machine["load_average_after"] = list(os.getloadavg())
    result = {
        "benchmark": "throughput",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": machine,
        "settings": settings,
        "seconds": time.perf_counter() - start,
        "groups": groups,
    }
    print(table(groups))
    write_output(FLAGS.output, result)


if __name__ == "__main__":
    define_flags()
    app.run(main)
