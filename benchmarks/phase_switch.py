r"""The cost of a batch-size phase change: pipeline rebuild + (re)trace + first steps.

  python benchmarks/phase_switch.py --output=/tmp/phase_switch.json
  python benchmarks/phase_switch.py --quick --output=/tmp/quick.json      # CI-sized smoke run

A `grow_batch` plan of ``--num_phases`` phases of ``--epochs_per_phase`` epochs each, the global
batch doubling at every change (128 → 256 → 512 by default), trained ``--rounds`` times with a
fresh `Trainer` per round (``steps_per_execution=K``; K = 0 means the first phase's steps per
epoch). For every change the Trainer reports ``phase_switch_seconds``: from the start of the new
phase's setup (momentum, pipeline rebuild, ``iter``) to the end of its first compiled call of
min(K, steps per epoch) steps. Subtracting what that call costs in steady state (the same steps
at the phase's median per-epoch speed, from the history) leaves the *overhead* of the change.
``trace_count`` shows whether the step was retraced (1 = one trace served every batch size).

For the breakdown the script also times, in the same process, building the new pipeline
(`make_dataset_fn` + `distribute_datasets_from_function` + ``iter``) and pulling its first
element; and, as a reference, the same plan through `fit_phases` (``model.fit`` once per phase,
``steps_per_execution=1`` since Keras 3.15's ``model.fit`` fails with K > 1 under
MirroredStrategy, keras-team/keras#19246): from the call that builds the phase's dataset to the
end of its first step, minus one steady step.

Data and models as in `throughput.py` (mlp on digits 8×8, cnn on digits upscaled to 28×28);
each (model, replicas) group runs in a fresh process with ``replicas`` logical CPU devices.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from typing import Any

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput as common  # noqa: E402 - the shared benchmark helpers next to this script

FLAGS = flags.FLAGS
TARGET_SECONDS = 2.0


def define_flags() -> None:
    common.define_common_flags()
    flags.DEFINE_integer("num_phases", 3, "Phases (the batch doubles at each change).")
    flags.DEFINE_integer("epochs_per_phase", 2, "Epochs per phase (>= 2: one steady epoch).")
    flags.DEFINE_bool("fit_phases", True, "Also time the phase changes of fit_phases.")


def plan_for(num_examples: int, settings: dict[str, Any]) -> Any:
    e, n = settings["epochs_per_phase"], settings["num_phases"]
    return common.make_plan(
        num_examples,
        settings["global_batch_size"],
        e * n,
        mode="grow_batch",
        decay_epochs=tuple(e * i for i in range(1, n)),
        decay_factor=0.5,
    )


def trainer_round(ctx: dict[str, Any], plan: Any, k: int) -> dict[str, Any]:
    """One Trainer run: each change's switch seconds, its steady first-call time, overhead."""
    from tf_largebatch.training import Trainer, TrainerConfig

    with tempfile.TemporaryDirectory() as model_dir:
        config = TrainerConfig(
            model_dir=model_dir, verbose=0, steps_per_execution=k, save_model=False
        )
        trainer = Trainer(ctx["model_fn"], plan, config, strategy=ctx["strategy"])
        trainer.fit(ctx["x"], ctx["y"])
        results = trainer.results
    changes = []
    for phase, seconds in zip(plan.phases[1:], results["phase_switch_seconds"]):
        speeds = [
            h["examples_per_second"]
            for h in results["history"]
            if phase.start_epoch < h["epoch"] < phase.end_epoch  # epochs after the first
        ]
        first_steps = min(k, phase.steps_per_epoch)
        steady = first_steps * phase.global_batch_size / statistics.median(speeds)
        changes.append(
            {
                "global_batch_size": phase.global_batch_size,
                "first_call_steps": first_steps,
                "switch_seconds": seconds,
                "steady_first_call_seconds": steady,
                "overhead_seconds": seconds - steady,
            }
        )
    return {"changes": changes, "trace_count": results["trace_count"]}


def pipeline_round(ctx: dict[str, Any], plan: Any) -> list[dict[str, float]]:
    """Building each later phase's pipeline and pulling its first element, timed apart."""
    from tf_largebatch.data import make_dataset_fn

    out = []
    for phase in plan.phases[1:]:
        start = time.perf_counter()
        dataset_fn = make_dataset_fn(
            ctx["x"],
            ctx["y"],
            phase.global_batch_size,
            seed=0,
            start_epoch=phase.start_epoch,
            end_epoch=phase.end_epoch,
            static_batch_size=False,
        )
        iterator = iter(ctx["strategy"].distribute_datasets_from_function(dataset_fn))
        built = time.perf_counter()
        element = next(iterator)
        ctx["strategy"].experimental_local_results(element[0])[0].numpy()
        out.append(
            {
                "global_batch_size": phase.global_batch_size,
                "build_seconds": built - start,
                "first_element_seconds": time.perf_counter() - built,
            }
        )
    return out


def fit_phases_round(ctx: dict[str, Any], plan: Any) -> list[dict[str, float]]:
    """The same plan through `fit_phases`: dataset call → end of the phase's first step."""
    import keras

    from tf_largebatch.data import make_dataset
    from tf_largebatch.fitting import fit_phases
    from tf_largebatch.optimizers import SGD

    marks: dict[str, Any] = {"built": None, "first": {}, "epochs": {}}

    def make(global_batch_size: int) -> Any:
        marks["built"] = (global_batch_size, time.perf_counter())
        return make_dataset(ctx["x"], ctx["y"], global_batch_size, seed=0, epochs=plan.epochs)

    class Timer(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if marks["built"] is not None:
                _ = [float(v) for v in (logs or {}).values()]  # host sync
                size, start = marks["built"]
                marks["first"][size] = time.perf_counter() - start
                marks["built"] = None

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            _ = [float(v) for v in (logs or {}).values()]
            marks["epochs"][epoch] = time.perf_counter() - self.start

    with ctx["strategy"].scope():
        keras.utils.set_random_seed(0)
        model = ctx["model_fn"]()
        model.compile(
            optimizer=SGD(plan.learning_rate_schedule(), momentum=plan.phases[0].momentum),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    fit_phases(model, make, plan, callbacks=[Timer()], verbose=0)
    out = []
    for phase in plan.phases[1:]:
        later = [marks["epochs"][e] for e in range(phase.start_epoch + 1, phase.end_epoch)]
        step = statistics.median(later) / phase.steps_per_epoch
        seconds = marks["first"][phase.global_batch_size]
        out.append(
            {
                "global_batch_size": phase.global_batch_size,
                "switch_seconds": seconds,
                "steady_step_seconds": step,
                "overhead_seconds": seconds - step,
            }
        )
    return out


def median_by_change(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per phase change, the median of every numeric field over rounds."""
    merged = []
    for values in zip(*rounds):
        entry = {"global_batch_size": values[0]["global_batch_size"]}
        for key in values[0]:
            if key != "global_batch_size":
                entry[key] = statistics.median(v[key] for v in values)
        merged.append(entry)
    return merged


def run_group(model: str, replicas: int, settings: dict[str, Any]) -> dict[str, Any]:
    ctx = common.make_context(model, replicas, {**settings, "epochs": 2})
    plan = plan_for(len(ctx["x"]), settings)
    k = settings["steps_per_execution"] or plan.phases[0].steps_per_epoch
    trainer_rounds, pipeline_rounds, fit_rounds, traces = [], [], [], []
    common.reset_peak_rss()
    for _ in range(settings["rounds"]):
        run = trainer_round(ctx, plan, k)
        trainer_rounds.append(run["changes"])
        traces.append(run["trace_count"])
        pipeline_rounds.append(pipeline_round(ctx, plan))
        if settings["fit_phases"]:
            fit_rounds.append(fit_phases_round(ctx, plan))
    result = {
        "model": model,
        "replicas": replicas,
        "data": common.DIGITS_NOTE[model],
        "num_examples": len(ctx["x"]),
        "steps_per_execution": k,
        "phases": [
            {"global_batch_size": p.global_batch_size, "steps_per_epoch": p.steps_per_epoch}
            for p in plan.phases
        ],
        "trainer": median_by_change(trainer_rounds),
        "trainer_rounds": trainer_rounds,
        "trace_counts": traces,
        "pipeline": median_by_change(pipeline_rounds),
        "peak_rss_mb": common.peak_rss_mb(),
        "process_maxrss_mb": common.maxrss_mb(),
        "tf_memory_info": common.tf_memory_info(),
    }
    if fit_rounds:
        result["fit_phases"] = median_by_change(fit_rounds)
    worst = max((c["switch_seconds"] for c in result["trainer"]), default=float("nan"))
    result["max_switch_seconds"] = worst
    result["target_met"] = worst < TARGET_SECONDS
    return result


def table(groups: list[dict[str, Any]]) -> str:
    lines = [
        f"{'model':5} {'rep':>3} {'batch':>5} {'K':>3} {'switch s':>9} {'steady s':>9} "
        f"{'overhead s':>10} {'build s':>8} {'1st elem s':>10} {'fit_phases ovh s':>16}"
    ]
    for g in groups:
        fit = g.get("fit_phases") or [{}] * len(g["trainer"])
        for change, pipe, ref in zip(g["trainer"], g["pipeline"], fit):
            lines.append(
                f"{g['model']:5} {g['replicas']:>3} {change['global_batch_size']:>5} "
                f"{change['first_call_steps']:>3.0f} {change['switch_seconds']:>9.3f} "
                f"{change['steady_first_call_seconds']:>9.3f} {change['overhead_seconds']:>10.3f} "
                f"{pipe['build_seconds']:>8.3f} {pipe['first_element_seconds']:>10.3f} "
                f"{ref.get('overhead_seconds', float('nan')):>16.3f}"
            )
        lines.append(
            f"{'':9} traces per run: {g['trace_counts']}; worst switch "
            f"{g['max_switch_seconds']:.3f} s (target < {TARGET_SECONDS} s: "
            f"{'met' if g['target_met'] else 'MISSED'}); peak RSS {g['peak_rss_mb']:.0f} MB"
        )
    return "\n".join(lines)


def settings_from_flags() -> dict[str, Any]:
    settings = {
        "models": list(FLAGS.models),
        "replicas": [int(r) for r in FLAGS.replicas],
        "global_batch_size": FLAGS.global_batch_size,
        "steps_per_execution": FLAGS.steps_per_execution,
        "rounds": FLAGS.rounds,
        "isolate": FLAGS.isolate,
        "num_phases": FLAGS.num_phases,
        "epochs_per_phase": FLAGS.epochs_per_phase,
        "fit_phases": FLAGS.fit_phases,
    }
    if FLAGS.quick:
        settings.update(models=["mlp"], rounds=1, num_phases=2)
    if settings["num_phases"] < 2:
        raise ValueError(f"Flag --num_phases must be >= 2. Received: {settings['num_phases']}")
    if settings["epochs_per_phase"] < 2:
        raise ValueError(
            f"Flag --epochs_per_phase must be >= 2. Received: {settings['epochs_per_phase']}"
        )
    return settings


def worker_argv(settings: dict[str, Any]) -> list[str]:
    return [
        f"--global_batch_size={settings['global_batch_size']}",
        f"--steps_per_execution={settings['steps_per_execution']}",
        f"--rounds={settings['rounds']}",
        f"--num_phases={settings['num_phases']}",
        f"--epochs_per_phase={settings['epochs_per_phase']}",
        f"--fit_phases={settings['fit_phases']}",
    ]


def main(argv: list[str]) -> None:
    del argv
    settings = settings_from_flags()
    if FLAGS.worker:
        common.worker_main(run_group, settings)
        return
    machine = common.machine_info()
    start = time.perf_counter()
    groups = common.run_groups(
        os.path.abspath(__file__), settings, run_group, worker_argv(settings)
    )
    machine["load_average_after"] = list(os.getloadavg())
    result = {
        "benchmark": "phase_switch",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": machine,
        "settings": settings,
        "seconds": time.perf_counter() - start,
        "target_seconds": TARGET_SECONDS,
        "groups": groups,
    }
    print(table(groups))
    common.write_output(FLAGS.output, result)


if __name__ == "__main__":
    define_flags()
    app.run(main)
