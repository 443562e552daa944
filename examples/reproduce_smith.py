r"""Smith et al. 2018 at small scale: increase the batch size instead of decaying the learning rate.

  python examples/reproduce_smith.py                      # digits, B₀ = 16, 24 epochs, 5 seeds
  python examples/reproduce_smith.py --quick              # CI size: 4 epochs, one seed
  python examples/reproduce_smith.py --dataset=mnist1d:20000 --model=cnn1d --optimizer=adam \
      --global_batch_size=64 --base_learning_rate=0.005 --epochs=8 --decay_epochs=2,4,6 \
      --weight_decay=0 --seeds=3 --modes=decay_lr,hybrid,grow_batch,no_decay,adaptive

Trains one step-decay recipe (learning rate × --decay_factor at --decay_epochs) as ``decay_lr``
(fixed batch, decaying learning rate), ``hybrid`` (the batch grows by 1/decay_factor up to
--max_global_batch_size, then the learning rate decays), ``grow_batch`` (fixed learning rate,
growing batch) and ``scaled_momentum`` (``grow_batch`` with momentum raised to
--scaled_momentum and every batch scaled by (1 − m)/(1 − m')), plus the ``no_decay`` control,
for --seeds seeds each, all in this process (``adaptive``, McCandlish's batch that grows towards
the measured noise scale, on request in --modes; ``scaled_momentum`` needs a momentum optimizer,
so with --optimizer=adam the default --modes leave it out). Writes to --output_dir:
smith_table.md (final test accuracy and parameter updates per mode), smith_metrics.md (with the
noise scale and sharpness where measured), smith_accuracy.png (test accuracy against epochs and
against parameter updates, training loss against epochs: Smith's Figures 2 and 3),
smith_schedules.png (learning rate, batch and noise scale against epochs: Figure 1), and the
raw numbers as smith_results.json and smith_{runs,history,summary}.csv.
"""

import contextlib
import os
import sys
import tempfile
import time

from absl import app, flags, logging

from tf_largebatch.experiment import ExperimentConfig
from tf_largebatch.models import MODEL_NAMES
from tf_largebatch.reproduce import (
    SMITH_EXTRA_MODES,
    SMITH_MODES,
    mean_curve,
    metrics_table,
    run_study,
    smith_runs,
    smith_table,
    summarize,
    write_study,
)

flags.DEFINE_string(
    "dataset", "digits", "digits, mnist1d, mnist1d:N (offline), a TFDS name, or npz:PATH."
)
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_enum("model", "mlp", list(MODEL_NAMES), "Model (cnn1d: MNIST-1D's CNN).")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adam"], "Optimizer (sgd: momentum SGD).")
flags.DEFINE_integer("global_batch_size", 16, "The initial global batch B₀.")
flags.DEFINE_float("base_learning_rate", 0.1, "The initial learning rate (at B₀).")
flags.DEFINE_integer("max_global_batch_size", 64, "Batch cap of mode hybrid.")
flags.DEFINE_float("scaled_momentum", 0.95, "Raised momentum of mode scaled_momentum.")
flags.DEFINE_list("modes", list(SMITH_MODES), f"Modes to run; also {SMITH_EXTRA_MODES}.")
flags.DEFINE_integer(
    "adaptive_max_global_batch_size", None, "Batch cap of mode adaptive (default: grow_batch's)."
)
flags.DEFINE_integer("seeds", 5, "Seeds per mode: 0, 1, ..., seeds - 1.")
flags.DEFINE_integer("epochs", 24, "Total epochs.")
flags.DEFINE_list("decay_epochs", ["6", "12", "18"], "Decay (or batch growth) epochs.")
flags.DEFINE_float("decay_factor", 0.5, "Learning-rate multiplier (batch × its inverse).")
flags.DEFINE_float("momentum", 0.9, "Momentum.")
flags.DEFINE_float("weight_decay", 5e-4, "L2 weight decay on kernels.")
flags.DEFINE_integer("steps_per_execution", 16, "Training steps per compiled call.")
flags.DEFINE_bool("measure_noise_scale", False, "Measure B_simple (McCandlish) in every run.")
flags.DEFINE_bool("measure_sharpness", False, "Measure the final models' sharpness.")
flags.DEFINE_integer("sharpness_max_examples", 2000, "Training examples the sharpness uses.")
flags.DEFINE_enum("strategy", "one_device", ["one_device", "mirrored"], "tf.distribute strategy.")
flags.DEFINE_integer("num_cpu_devices", None, "Split the CPU into N logical devices.")
flags.DEFINE_string("output_dir", "/tmp/tf_largebatch_smith", "Where tables, plots, JSON go.")
flags.DEFINE_string("work_dir", None, "Run directories (kept, rerun resumes); default: temp.")
flags.DEFINE_bool("quick", False, "CI-sized run: 4 epochs, one seed (unless given).")
FLAGS = flags.FLAGS

QUICK = {"epochs": 4, "decay_epochs": ["1", "2", "3"], "seeds": 1}
STYLES = {
    "decay_lr": {"color": "tab:blue", "ls": "-"},
    "hybrid": {"color": "tab:orange", "ls": "--"},
    "grow_batch": {"color": "tab:green", "ls": "-."},
    "scaled_momentum": {"color": "tab:red", "ls": ":"},
    "no_decay": {"color": "grey", "ls": "-"},
    "adaptive": {"color": "tab:purple", "ls": "--"},
}
METRICS = ("test_accuracy", "parameter_updates", "noise_scale_epoch1", "hessian_top_eigenvalue")
METRICS += ("perturbed_loss_increase",)


def flag(name):
    """A flag's value; under --quick the QUICK value unless the flag was given."""
    if FLAGS.quick and name in QUICK and not FLAGS[name].present:
        return QUICK[name]
    return FLAGS[name].value


def decay_epochs():
    try:
        return tuple(int(e) for e in flag("decay_epochs"))
    except ValueError:
        raise ValueError(
            "Flag --decay_epochs must be a comma list of integers. "
            f"Received: --decay_epochs={','.join(flag('decay_epochs'))}"
        ) from None


def plot_accuracy(records, modes, path):
    """Smith Figures 2 and 3: test accuracy against epochs and updates, training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_e, ax_l, ax_u) = plt.subplots(1, 3, figsize=(16, 4.3))
    lowest = 100.0
    for mode in modes:
        style = STYLES[mode]
        epochs, acc, lo, hi = mean_curve(records, mode, "test_accuracy")
        end = [e + 1 for e in epochs]  # test accuracy is measured at the epoch's end
        acc, lo, hi = ([100 * v for v in c] for c in (acc, lo, hi))
        ax_e.plot(end, acc, label=mode, **style)
        ax_e.fill_between(end, lo, hi, color=style["color"], alpha=0.07, lw=0)
        steps, acc_u, _, _ = mean_curve(records, mode, "test_accuracy", x="steps")
        ax_u.plot(steps, [100 * v for v in acc_u], label=mode, **style)
        _, loss, _, _ = mean_curve(records, mode, "train_loss")
        ax_l.plot([e + 0.5 for e in epochs], loss, label=mode, **style)  # epoch mean
        lowest = min(lowest, min(acc[len(acc) // 4 :]))
    for ax in (ax_e, ax_u):
        ax.set(ylabel="test accuracy (%)", ylim=(lowest - 0.5, 100))
        ax.legend(fontsize=8, loc="lower right")
    ax_e.set(xlabel="epoch", title="Test accuracy vs epochs (mean; band: min–max)")
    ax_u.set(xlabel="parameter updates", title="Test accuracy vs parameter updates")
    ax_l.set(xlabel="epoch", ylabel="training loss", yscale="log", title="Training loss")
    ax_l.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_schedules(records, modes, path):
    """Smith Figure 1 (learning rate and batch against epochs) plus the noise scale g."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plans = {r["group"]: r["plan"] for r in records}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for i, mode in enumerate(modes):
        phases = plans[mode]["phases"]
        edges = [p["start_epoch"] for p in phases] + [phases[-1]["end_epoch"]]
        nudge = 1 + 0.012 * (i - len(modes) / 2)  # keeps overlapping stairs visible
        for ax, key in zip(axes, ("learning_rate", "global_batch_size", "noise_scale")):
            values = [p[key] * nudge for p in phases]
            ax.stairs(values, edges, baseline=None, label=mode, lw=2, **STYLES[mode])
    titles = ("Learning rate", "Global batch size", "Noise scale g = ε(N/B − 1)/(1 − m)")
    for ax, title in zip(axes, titles):
        ax.set(xlabel="epoch", yscale="log", title=title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def print_run(index, total, record):
    print(
        f"[{index + 1}/{total}] {record['name']}: test accuracy "
        f"{100 * record['test_accuracy']:.2f}%, {record['parameter_updates']} updates, "
        f"{record['wall_seconds']:.1f} s",
        flush=True,
    )


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    start, load_start = time.time(), os.getloadavg()
    modes = tuple(flag("modes"))
    if FLAGS.optimizer != "sgd" and not FLAGS["modes"].present:
        modes = tuple(m for m in modes if m != "scaled_momentum")
    try:
        if FLAGS.optimizer != "sgd" and "scaled_momentum" in modes:
            raise ValueError(
                "Mode `scaled_momentum` needs --optimizer=sgd (it raises the momentum). "
                f"Received: optimizer={FLAGS.optimizer!r}"
            )
        config = ExperimentConfig(
            dataset=FLAGS.dataset,
            data_dir=FLAGS.data_dir,
            model=FLAGS.model,
            optimizer=FLAGS.optimizer,
            mode="decay_lr",
            epochs=flag("epochs"),
            decay_epochs=decay_epochs(),
            decay_factor=FLAGS.decay_factor,
            base_learning_rate=FLAGS.base_learning_rate,
            base_batch_size=FLAGS.global_batch_size,
            global_batch_size=FLAGS.global_batch_size,
            warmup="none",
            warmup_epochs=0,
            momentum=FLAGS.momentum,
            weight_decay=FLAGS.weight_decay,
            strategy=FLAGS.strategy,
            num_cpu_devices=FLAGS.num_cpu_devices,
            steps_per_execution=FLAGS.steps_per_execution,
            measure_noise_scale=FLAGS.measure_noise_scale,
            measure_sharpness=FLAGS.measure_sharpness,
            sharpness_max_examples=FLAGS.sharpness_max_examples,
            save_model=False,
            verbose=0,
        )
        runs = smith_runs(
            config,
            range(flag("seeds")),
            max_global_batch_size=FLAGS.max_global_batch_size,
            scaled_momentum=FLAGS.scaled_momentum,
            modes=modes,
            adaptive_max_global_batch_size=FLAGS.adaptive_max_global_batch_size,
        )
        with (
            contextlib.nullcontext(FLAGS.work_dir)
            if FLAGS.work_dir
            else tempfile.TemporaryDirectory(prefix="smith_")
        ) as work_dir:
            records = run_study(runs, work_dir, on_run=print_run)
    except ValueError as e:
        sys.exit(f"reproduce_smith.py: error: {e}")
    summary = summarize(records, "test_accuracy")
    table = smith_table(summary, records)
    out = FLAGS.output_dir
    paths = write_study(
        out,
        "smith",
        records,
        summary,
        command=" ".join(["python", "examples/reproduce_smith.py", *sys.argv[1:]]),
        recipe_config=records[0]["config"],
        modes=list(modes),
        seeds=list(range(flag("seeds"))),
        wall_seconds=time.time() - start,
        cpu_count=os.cpu_count(),
        load_average_start=load_start,
        load_average_end=os.getloadavg(),
    )
    with open(os.path.join(out, "smith_table.md"), "w") as f:
        f.write(table + "\n")
    metrics = metrics_table(records, METRICS, scale={"test_accuracy": 100})
    with open(os.path.join(out, "smith_metrics.md"), "w") as f:
        f.write(metrics + "\n")
    plot_accuracy(records, modes, os.path.join(out, "smith_accuracy.png"))
    plot_schedules(records, modes, os.path.join(out, "smith_schedules.png"))
    print("\nFinal test accuracy (%), mean ± std over seeds, and parameter updates:\n" + table)
    print("\nMeasurements, mean ± std over seeds:\n" + metrics)
    print(f"\n{len(records)} runs in {time.time() - start:.0f} s. Wrote:")
    figures = ["smith_accuracy.png", "smith_schedules.png"]
    for name in [*paths, "smith_table.md", "smith_metrics.md", *figures]:
        print(" ", os.path.join(out, os.path.basename(name)))


if __name__ == "__main__":
    app.run(main)
