r"""Plan a cluster before paying for it: goodput = examples/s × statistical efficiency.

  python examples/plan_cluster.py                                  # digits MLP, 2-4 min
  python examples/plan_cluster.py --measurements=/tmp/plan/measurements.json  # no measuring
  python examples/plan_cluster.py --budget_devices=8 --network=25gbe --plot=/tmp/plan.png
  python examples/plan_cluster.py --plan_output=/tmp/plan/plan.json  # then: train.py --plan=...
  python examples/plan_cluster.py --goyal_only                     # Goyal et al.'s 8 -> 256 GPUs

Measures (each local configuration in its own process) the step time t(b) = α + β·b of the model
and its gradient noise scale B_simple, fits the local interconnect on part of the measurements
and checks the predictions on the rest (1, 2, 4 logical CPU devices and 2 localhost workers),
then predicts examples/s, scaling efficiency and time to target over a grid of (workers, global
batch, accumulation) for hosts like this one on ``--network``, recommends the fastest that fits
the budget and prints the ``examples/train.py`` command that trains it: with ``--plan_output``
the recommended `PhasePlan` is written as JSON and the command is ``examples/train.py
--plan=PATH`` with the planned model and data set. See docs/GOODPUT.md.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses
import json
import shlex
import sys

from absl import app, flags

from tf_largebatch import goodput, goodput_measure

flags.DEFINE_string(
    "model", None, "Model name (tf_largebatch.models); default: the measurements', else mlp."
)
flags.DEFINE_string(
    "dataset", None, "Data set (digits, a TFDS name, npz:PATH); default: the measurements', else "
    "digits.",
)  # fmt: skip
flags.DEFINE_string("measurements", None, "Read measurements from this JSON instead of timing.")
flags.DEFINE_list("per_replica_batch_sizes", ["16", "64", "256"], "Per-replica batches timed.")
flags.DEFINE_integer("steps_per_call", 10, "Timed steps per compiled call.")
flags.DEFINE_integer("repeats", 30, "Timed calls per batch (fastest kept).")
flags.DEFINE_integer("rounds", 1, "Measure every configuration this many times (fastest kept).")
flags.DEFINE_list("workers", ["1", "2", "4", "8", "16", "32"], "Grid: hosts.")
flags.DEFINE_integer("devices_per_worker", 1, "Grid: replicas per host.")
flags.DEFINE_list("global_batch_sizes", ["32", "64", "128", "256", "512", "1024"], "Grid: B.")
flags.DEFINE_list("accumulation_steps", ["1", "2", "4"], "Grid: accumulation steps k.")
flags.DEFINE_enum("network", "10gbe", list(goodput.INTERCONNECTS), "Link between hosts.")
flags.DEFINE_enum("intra", "pcie3_x16", list(goodput.INTERCONNECTS), "Link inside a host.")
flags.DEFINE_enum("topology", "hierarchical", list(goodput.TOPOLOGIES), "All-reduce topology.")
flags.DEFINE_float("overlappable", 0.0, "Share of communication that may overlap backprop.")
flags.DEFINE_integer("max_per_replica_batch_size", None, "Largest batch one replica holds.")
flags.DEFINE_integer("budget_devices", None, "Most devices.")
flags.DEFINE_float("budget_device_hours", None, "Most device-hours to the target.")
flags.DEFINE_float("noise_scale", None, "B_noise to use instead of the measured B_simple.")
flags.DEFINE_float("target_epochs", 30, "Epochs that reach the target at reference_batch_size.")
flags.DEFINE_integer("reference_batch_size", 64, "Batch of target_epochs.")
flags.DEFINE_float("base_learning_rate", 0.1, "Learning rate per base_batch_size (the plan).")
flags.DEFINE_integer("base_batch_size", 32, "Reference batch of the base learning rate.")
flags.DEFINE_bool("goyal_only", False, "Only print the Goyal et al. setup prediction.")
flags.DEFINE_string("plot", None, "Write a PNG of the grid here.")
flags.DEFINE_string("output", None, "Write the JSON report here.")
flags.DEFINE_string(
    "plan_output", None, "Write the recommended PhasePlan here (JSON for train.py --plan)."
)
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """What to measure and what to plan.

    Attributes:
      model, dataset: what to measure (None: ``"mlp"``, ``"digits"``); with ``measurements``,
        None or the model and data set they were taken of.
      measurements: JSON from a previous run (its ``measurements`` field) or None to measure.
      per_replica_batch_sizes: batches timed in every local configuration.
      steps_per_call, repeats, rounds: timing (`goodput_measure.measure_local`).
      cluster: the hardware template of the grid (``workers`` is varied).
      workers, global_batch_sizes, accumulation_steps: the grid.
      max_per_replica_batch_size, budget_devices, budget_device_hours: constraints.
      noise_scale: B_noise override.
      target_epochs, reference_batch_size: a run known to reach the target.
      base_learning_rate, base_batch_size: learning rate of the recommended plan.
      plan_output: where the recommended plan is written (the train.py command reads it).
    """

    model: str | None
    dataset: str | None
    measurements: str | None
    per_replica_batch_sizes: tuple[int, ...]
    steps_per_call: int
    repeats: int
    rounds: int
    cluster: goodput.Cluster
    workers: tuple[int, ...]
    global_batch_sizes: tuple[int, ...]
    accumulation_steps: tuple[int, ...]
    max_per_replica_batch_size: int | None
    budget_devices: int | None
    budget_device_hours: float | None
    noise_scale: float | None
    target_epochs: float
    reference_batch_size: int
    base_learning_rate: float
    base_batch_size: int
    plan_output: str | None = None


def config_from_flags() -> PlanConfig:
    ints = lambda values: tuple(int(v) for v in values)  # noqa: E731
    return PlanConfig(
        model=FLAGS.model,
        dataset=FLAGS.dataset,
        measurements=FLAGS.measurements,
        per_replica_batch_sizes=ints(FLAGS.per_replica_batch_sizes),
        steps_per_call=FLAGS.steps_per_call,
        repeats=FLAGS.repeats,
        rounds=FLAGS.rounds,
        cluster=goodput.Cluster(
            1,
            FLAGS.devices_per_worker,
            network=goodput.INTERCONNECTS[FLAGS.network],
            intra=goodput.INTERCONNECTS[FLAGS.intra],
            topology=FLAGS.topology,
            overlappable=FLAGS.overlappable,
        ),
        workers=ints(FLAGS.workers),
        global_batch_sizes=ints(FLAGS.global_batch_sizes),
        accumulation_steps=ints(FLAGS.accumulation_steps),
        max_per_replica_batch_size=FLAGS.max_per_replica_batch_size,
        budget_devices=FLAGS.budget_devices,
        budget_device_hours=FLAGS.budget_device_hours,
        noise_scale=FLAGS.noise_scale,
        target_epochs=FLAGS.target_epochs,
        reference_batch_size=FLAGS.reference_batch_size,
        base_learning_rate=FLAGS.base_learning_rate,
        base_batch_size=FLAGS.base_batch_size,
        plan_output=FLAGS.plan_output,
    )


def goyal_report() -> dict:
    """Goyal et al.'s 8 → 256 GPU scaling efficiency under every topology and overlap bound."""
    rows = {
        f"{topology}, overlap {o:g}": goodput.goyal_scaling_efficiency(topology, o)
        for topology in goodput.TOPOLOGIES
        for o in (0.0, 1.0)
    }
    print("Goyal et al. 2017 setup: ResNet-50 (25.5M float32 = 102 MB), 8 P100/server on NVLink,")
    print(
        "50 GbE, t(32 images) = 0.18 s (120 ms backprop, §4.3). Scaling efficiency 8 -> 256 GPUs:"
    )
    for name, value in rows.items():
        print(f"  {name:<32} {value:6.1%}")
    t8, t352 = goodput.goyal_iteration_seconds(1), goodput.goyal_iteration_seconds(44)
    print(
        f"Iteration: {t8:.3f} s on 8 GPUs, {t352:.3f} s on 352 ({t352 / t8 - 1:+.0%}; paper +12%);"
        f" epoch {1_281_167 / 256 * t8 / 60:.1f} min (paper: over 16) and"
        f" {1_281_167 / 11264 * t352:.0f} s (paper: 30)."
    )
    print("Paper: ~90% (abstract, §5.5, Fig. 8) with NCCL inside a server and recursive")
    print("halving/doubling across servers. Model: 85.6% (no overlap) to 100% (pipelined), so a")
    print("bandwidth-optimal all-reduce (ring or halving/doubling) was needed; one parameter")
    print(f"server would give {rows['parameter_server, overlap 0']:.1%}.")
    return rows


def plan(config: PlanConfig, on_measured=None) -> dict:
    """Measure (or read), validate locally, search the grid; returns the JSON report.

    ``on_measured(measurements)`` is called as soon as the timings exist (to keep them).
    """
    if config.measurements:
        with open(config.measurements) as f:
            measured = json.load(f)
        measured = measured.get("measurements", measured)
        for name in ("model", "dataset"):
            wanted, taken = getattr(config, name), measured.get(name)
            if wanted is not None and taken is not None and wanted != taken:
                raise ValueError(
                    f"Flag --{name} must match the measurements' {name} {taken!r} (the plan is "
                    f"for what was measured). Received: --{name}={wanted} with "
                    f"--measurements={config.measurements}"
                )
    else:
        measured = goodput_measure.measure_local(
            config.per_replica_batch_sizes,
            model=config.model or "mlp",
            dataset=config.dataset or "digits",
            steps_per_call=config.steps_per_call,
            repeats=config.repeats,
            rounds=config.rounds,
        )
        if on_measured is not None:
            on_measured(measured)
    local = goodput_measure.fit_local(measured)
    step_time = goodput.StepTimeModel(**local["step_time"])
    noise = config.noise_scale or measured["noise_scale"]["noise_scale"]
    n = measured["dataset_size"]
    min_examples = goodput.min_examples_from_reference(
        config.target_epochs * n, config.reference_batch_size, noise
    )
    points = goodput.grid_search(
        step_time,
        config.cluster,
        measured["gradient_bytes"],
        noise,
        min_examples,
        config.reference_batch_size,
        config.workers,
        [b for b in config.global_batch_sizes if b <= n],
        config.accumulation_steps,
        config.max_per_replica_batch_size,
        config.budget_devices,
        config.budget_device_hours,
    )
    if not points:
        raise ValueError("No grid point fits the constraints; relax the budget or the grid.")
    best = points[0]
    phase_plan = goodput.recommendation_plan(
        best, n, noise, min_examples, config.base_learning_rate, config.base_batch_size
    )
    return {
        "measurements": measured,
        "local_fit": {k: v for k, v in local.items() if k != "validation"},
        "validation": local["validation"],
        "noise_scale": noise,
        "min_examples": min_examples,
        "grid": [p.to_dict() for p in points],
        "recommendation": {**best.to_dict(), "plan": phase_plan.to_dict()},
        "plan_output": config.plan_output,
        "train_command": train_command(best, phase_plan, config, measured),
        "goyal_scaling_efficiency": goodput.goyal_scaling_efficiency(),
    }


def train_command(
    point: goodput.GridPoint, phase_plan, config: PlanConfig, measured: dict | None = None
) -> str:
    """The ``examples/train.py`` command that runs the recommended plan (on this machine, from
    the current directory).

    With ``config.plan_output`` it trains that file (``--plan=PATH``); otherwise the recipe
    flags that make the same plan. Model and data set are the measured ones, and the
    micro-batch m is ``--max_per_replica_batch_size`` (the Trainer accumulates B/(n·m) of them).
    """
    measured = measured or {}
    model = measured.get("model") or config.model or "mlp"
    dataset = measured.get("dataset") or config.dataset or "digits"
    args = [f"--model={model}", f"--dataset={dataset}"]
    if config.plan_output:
        args.append(f"--plan={config.plan_output}")
    else:
        args += [
            "--mode=decay_lr",
            "--decay_epochs=",
            f"--epochs={phase_plan.epochs}",
            f"--global_batch_size={point.global_batch_size}",
            f"--base_learning_rate={config.base_learning_rate}",
            f"--base_batch_size={config.base_batch_size}",
            "--warmup=none",
        ]
    args.append(f"--max_per_replica_batch_size={point.per_replica_batch_size}")
    if point.devices_per_worker > 1:
        args += ["--strategy=mirrored" if point.workers == 1 else "--strategy=multi_worker"]
        args += [f"--num_cpu_devices={point.devices_per_worker}"]
    train = shlex.quote(os.path.relpath(os.path.join(os.path.dirname(__file__), "train.py")))
    if point.workers > 1:
        launch = f"python -m tf_largebatch.launch --num_workers={point.workers} -- "
        return launch + f"{train} --strategy=multi_worker " + shlex.join(args)
    return f"python {train} " + shlex.join(args)


def print_report(report: dict) -> None:
    fit = report["local_fit"]
    alpha, beta = (v * 1e6 for v in fit["step_time"].values())
    print(
        f"Step time t(b) = {alpha:.1f} us + {beta:.3f} us/example; "
        f"compute slots c = {fit['compute_slots']:.2f}; latency shared memory "
        f"{fit['shared_memory_latency_seconds'] * 1e6:.0f} us, loopback "
        f"{fit['loopback_latency_seconds'] * 1e6:.0f} us; B_noise = {report['noise_scale']:.0f}"
    )
    print(f"\n{'config':<10} {'b':>5} {'predicted ex/s':>15} {'measured ex/s':>14} {'error':>7}")
    for row in report["validation"]:
        role = "fit" if row["used_for_fit"] else "held out"
        print(
            f"{row['config']:<10} {row['per_replica_batch_size']:>5} "
            f"{row['predicted_examples_per_second']:>15,.0f} "
            f"{row['measured_examples_per_second']:>14,.0f} {row['relative_error']:>+7.1%} {role}"
        )
    print(
        f"\n{'workers':>7} {'B':>6} {'k':>3} {'m':>5} {'ex/s':>12} {'scaling':>8} "
        f"{'stat eff':>8} {'goodput':>12} {'time (s)':>9} {'dev-h':>8}"
    )
    for p in report["grid"][:15]:
        print(
            f"{p['workers']:>7} {p['global_batch_size']:>6} {p['accumulation_steps']:>3} "
            f"{p['per_replica_batch_size']:>5} {p['examples_per_second']:>12,.0f} "
            f"{p['scaling_efficiency']:>8.1%} {p['statistical_efficiency']:>8.2f} "
            f"{p['goodput']:>12,.0f} {p['time_to_target_seconds']:>9.3g} {p['device_hours']:>8.2g}"
        )
    r = report["recommendation"]
    print(
        f"\nRecommendation: {r['workers']} worker(s) x {r['devices_per_worker']} device(s), "
        f"global batch {r['global_batch_size']}, accumulation {r['accumulation_steps']}: "
        f"{r['examples_per_second']:,.0f} ex/s, {r['time_to_target_seconds']:.3g} s to target"
    )
    if report.get("plan_output"):
        print(f"Plan: {report['plan_output']}")
    print("Train it:", report["train_command"])
    print(f"Goyal et al. 8 -> 256 GPUs (model): {report['goyal_scaling_efficiency']:.1%}")


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    keys = ("examples_per_second", "scaling_efficiency", "time_to_target_seconds")
    for ax, key in zip(axes, keys):
        for batch in sorted({p["global_batch_size"] for p in report["grid"]}):
            best = {}
            for p in report["grid"]:  # fastest accumulation per (batch, workers)
                if p["global_batch_size"] == batch and p["workers"] not in best:
                    best[p["workers"]] = p[key]
            workers = sorted(best)
            ax.plot(workers, [best[w] for w in workers], marker="o", label=f"B={batch}")
        ax.set(xlabel="workers", ylabel=key.replace("_", " "), xscale="log")
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv):
    del argv
    if FLAGS.goyal_only:
        report = {"goyal_scaling_efficiency": goodput.goyal_scaling_efficiency()}
        report["goyal_topologies"] = goyal_report()
    else:
        try:
            report = plan(config_from_flags(), on_measured=write_json)
        except ValueError as e:
            sys.exit(f"plan_cluster.py: error: {e}")
        if FLAGS.plan_output:
            with open(FLAGS.plan_output, "w") as f:
                json.dump(report["recommendation"]["plan"], f, indent=1)
        print_report(report)
        if FLAGS.plot:
            plot(report, FLAGS.plot)
            print(f"Plot: {FLAGS.plot}")
    write_json(report)
    if FLAGS.output:
        print(f"Report: {FLAGS.output}")


def write_json(report: dict) -> None:
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    app.run(main)
