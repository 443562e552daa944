r"""Goyal et al. 2017 at small scale: the Linear Scaling Rule and warmup, batch n against kn.

  python examples/reproduce_goyal.py                      # digits, n = 16, k = 1..16, 5 seeds
  python examples/reproduce_goyal.py --quick              # CI size: 4 epochs, k = 1, 4, 1 seed
  python examples/reproduce_goyal.py --dataset=mnist1d:20000 --model=cnn1d --global_batch_size=32 \
      --base_learning_rate=0.05 --epochs=8 --decay_epochs=5,7 --warmup_epochs=1 --ks=1,8,32 \
      --seeds=3 --measure_noise_scale --measure_sharpness   # MNIST-1D (docs/RESULTS.md)

Trains the small-batch reference n (learning rate η) and, for every k in --ks, batch kn with
(a) linear scaling η → kη + gradual warmup, (b) linear scaling without warmup, (c) linear
scaling + constant warmup (η, then kη), (d) no scaling (η), for --seeds seeds each, all in
this process. Writes to --output_dir: goyal_table.md (final test error mean ± std per k and
variant, like Goyal's Table 1 / Figure 3), goyal_training_loss.png (training loss against
epochs for every kn over the small-batch curve, Figures 2 and 4), goyal_error_vs_batch.png
(Figure 3), goyal_metrics.md (test error, updates, the gradient noise scale B_simple after the
first epoch and the final models' sharpness, where measured), and the raw numbers as
goyal_results.json and goyal_{runs,history,summary}.csv. Variants with SGD's momentum correction
off (``gradual_warmup_uncorrected``, ``no_warmup_uncorrected``) can be added to --variants.
"""

import contextlib
import json
import os
import sys
import tempfile
import time

from absl import app, flags, logging

from tf_largebatch.experiment import ExperimentConfig
from tf_largebatch.models import MODEL_NAMES
from tf_largebatch.reproduce import (
    ALL_GOYAL_VARIANTS,
    GOYAL_VARIANTS,
    REFERENCE,
    goyal_runs,
    goyal_table,
    mean_curve,
    metrics_table,
    run_study,
    summarize,
    write_study,
)

flags.DEFINE_string(
    "dataset", "digits", "digits, mnist1d, mnist1d:N (offline), a TFDS name, or npz:PATH."
)
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_enum("model", "mlp", list(MODEL_NAMES), "Model (cnn1d: MNIST-1D's CNN).")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "lars", "adam", "adamw", "lamb"], "Optimizer.")
flags.DEFINE_integer("global_batch_size", 16, "The reference small batch n.")
flags.DEFINE_float("base_learning_rate", 0.1, "η: the learning rate of the reference batch n.")
flags.DEFINE_list("ks", ["1", "2", "4", "8", "16"], "Batch multiples k (kn); 1 = reference.")
flags.DEFINE_integer("seeds", 5, "Seeds per (variant, k): 0, 1, ..., seeds - 1.")
flags.DEFINE_list("variants", list(GOYAL_VARIANTS), "Recipe variants for k > 1.")
flags.DEFINE_integer("epochs", 20, "Total epochs.")
flags.DEFINE_list("decay_epochs", ["10", "15"], "Learning rate × decay_factor at these epochs.")
flags.DEFINE_float("decay_factor", 0.1, "Learning-rate multiplier at each decay epoch.")
flags.DEFINE_float("warmup_epochs", 2, "Warmup length (gradual and constant warmup).")
flags.DEFINE_float("momentum", 0.9, "Momentum.")
flags.DEFINE_bool("momentum_correction", True, "Goyal's momentum correction (SGD) in every run.")
flags.DEFINE_float("weight_decay", 0.0, "L2 weight decay on kernels.")
flags.DEFINE_integer("steps_per_execution", 16, "Training steps per compiled call.")
flags.DEFINE_bool("measure_noise_scale", False, "Measure B_simple (McCandlish) in every run.")
flags.DEFINE_bool("measure_sharpness", False, "Measure the final models' sharpness.")
flags.DEFINE_integer("sharpness_max_examples", 2000, "Training examples the sharpness uses.")
flags.DEFINE_enum("strategy", "one_device", ["one_device", "mirrored"], "tf.distribute strategy.")
flags.DEFINE_integer("num_cpu_devices", None, "Split the CPU into N logical devices.")
flags.DEFINE_string("output_dir", "/tmp/tf_largebatch_goyal", "Where tables, plots, JSON go.")
flags.DEFINE_string("work_dir", None, "Run directories (kept, rerun resumes); default: temp.")
flags.DEFINE_bool(
    "replot", False, "Redraw tables and figures from --output_dir/goyal_results.json; no training."
)
flags.DEFINE_bool("quick", False, "CI-sized run: 4 epochs, k = 1, 4, one seed (unless given).")
FLAGS = flags.FLAGS

QUICK = {"epochs": 4, "decay_epochs": ["2", "3"], "warmup_epochs": 1, "ks": ["1", "4"], "seeds": 1}
COLORS = {
    "gradual_warmup": "tab:blue",
    "no_warmup": "tab:red",
    "constant_warmup": "tab:orange",
    "no_scaling": "tab:green",
    "gradual_warmup_uncorrected": "tab:purple",
    "no_warmup_uncorrected": "tab:brown",
}
METRICS = ("test_error", "parameter_updates", "noise_scale_epoch1", "hessian_top_eigenvalue")
METRICS += ("perturbed_loss_increase",)


def flag(name):
    """A flag's value; under --quick the QUICK value unless the flag was given."""
    if FLAGS.quick and name in QUICK and not FLAGS[name].present:
        return QUICK[name]
    return FLAGS[name].value


def int_list(name):
    values = flag(name)
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(
            f"Flag --{name} must be a comma list of integers. Received: --{name}={','.join(values)}"
        ) from None


def plot_training_loss(records, ks, variants, warmup_epochs, path):
    """Goyal Figures 2 and 4: each kn's training loss over the small-batch curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [k for k in ks if k > 1]
    n = records[0]["global_batch_size"]
    grid = [[(v, k) for k in ks] for v in variants] if ks else [[(None, 1)]]  # None: only n
    fig, axes = plt.subplots(
        len(grid),
        len(grid[0]),
        figsize=(3.2 * len(grid[0]) + 1, 2.6 * len(grid) + 0.6),
        sharex=True,
        sharey=True,
        squeeze=False,
    )

    def curve(group, k=1):  # an epoch's mean training loss, drawn at the epoch's middle
        epochs, mean, lo, hi = mean_curve(records, group, "train_loss", k=k)
        return [e + 0.5 for e in epochs], mean, lo, hi

    ref = curve(REFERENCE)
    for row, cells in enumerate(grid):
        for col, (variant, k) in enumerate(cells):
            ax = axes[row][col]
            ax.plot(ref[0], ref[1], color="black", label=f"n = {n}")
            ax.fill_between(ref[0], ref[2], ref[3], color="black", alpha=0.15, lw=0)
            ax.set(yscale="log", title=f"reference, n = {n}")
            if variant is not None:
                x, mean, lo, hi = curve(variant, k)
                ax.plot(x, mean, color=COLORS[variant], label=f"kn = {k * n}")
                ax.fill_between(x, lo, hi, color=COLORS[variant], alpha=0.2, lw=0)
                if ALL_GOYAL_VARIANTS[variant]["warmup"] != "none":
                    ax.axvline(warmup_epochs, color="grey", ls=":", lw=1)
                ax.set_title(f"{variant.replace('_', ' ')}, kn = {k * n}")
            ax.legend(fontsize=7, loc="upper right")
            if row == len(grid) - 1:
                ax.set_xlabel("epoch")
            if col == 0:
                ax.set_ylabel("training loss")
    fig.suptitle("Training loss, epoch means (line: mean over seeds, band: min–max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_error_vs_batch(summary, variants, path):
    """Goyal Figure 3: final test error against the minibatch size kn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = next(r for r in summary if r["group"] == REFERENCE)
    top = 4 * ref["mean"] + 1  # diverged runs would flatten the rest: drawn at the top edge
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, variant in enumerate(variants):
        rows = [ref, *(r for r in summary if r["group"] == variant)]
        shift = 1 + 0.03 * (i - (len(variants) - 1) / 2)  # side by side, not on top
        x = [r["global_batch_size"] * shift for r in rows]
        style = {"color": COLORS[variant], "capsize": 3}
        ax.errorbar(
            x,
            [min(r["mean"], top) for r in rows],
            yerr=[r["std"] if r["mean"] < top else 0 for r in rows],
            marker="o",
            label=variant.replace("_", " "),
            **style,
        )
        for xi, r in zip(x, rows):
            if r["mean"] >= top:
                ax.annotate(
                    f"{r['mean']:.1f}",
                    (xi, top),
                    xytext=(-20, -10 - 11 * i),
                    textcoords="offset points",
                    ha="right",
                    fontsize=7,
                    color=COLORS[variant],
                    bbox={"fc": "white", "ec": "none", "pad": 0.5},
                )
    n = ref["global_batch_size"]
    ax.axhline(ref["mean"], color="black", ls=":", lw=1, label=f"reference n = {n}")
    ax.set(xscale="log", xlabel="global batch kn", ylabel="final test error (%)", ylim=(0, top))
    ax.set_xticks(sorted({r["global_batch_size"] for r in summary}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.minorticks_off()
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"Final test error vs batch (mean ± std over seeds; clipped at {top:.1f}%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_noise_scale(records, ks, variants, path):
    """McCandlish's B_simple over training: the reference and each kn, over the batches run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    variant = "gradual_warmup" if "gradual_warmup" in variants else variants[0]
    cmap = plt.get_cmap("viridis")
    shown = [(REFERENCE, 1)] + [(variant, k) for k in ks if k > 1]
    for i, (group, k) in enumerate(shown):
        members = [r for r in records if (r["group"], r["k"]) == (group, k)]
        if not members or not members[0].get("noise_scale_steps"):
            continue
        color = cmap(i / max(len(shown) - 1, 1))
        for j, r in enumerate(members):
            per_epoch = r["history"][0]["steps"]
            steps, b = zip(*r["noise_scale_steps"])
            label = f"kn = {r['global_batch_size']}" if j == 0 else None
            ax.plot([s / per_epoch for s in steps], b, color=color, lw=1, alpha=0.8, label=label)
        ax.axhline(members[0]["global_batch_size"], color=color, ls=":", lw=1)
    ax.set(xlabel="epoch", ylabel="B_simple (EMA estimate)", yscale="log")
    ax.set_title(f"Gradient noise scale during training ({variant.replace('_', ' ')}; dotted: kn)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def print_run(index, total, record):
    print(
        f"[{index + 1}/{total}] {record['name']}: test error {record['test_error']:.2f}%, "
        f"{record['parameter_updates']} updates, {record['wall_seconds']:.1f} s",
        flush=True,
    )


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    start, load_start = time.time(), os.getloadavg()
    out = FLAGS.output_dir
    if FLAGS.replot:
        with open(os.path.join(out, "goyal_results.json")) as f:
            saved = json.load(f)
        write_outputs(saved["runs"], saved["ks"], saved["variants"], saved, out, start)
        return
    try:
        ks, variants = int_list("ks"), tuple(flag("variants"))
        config = ExperimentConfig(
            dataset=FLAGS.dataset,
            data_dir=FLAGS.data_dir,
            model=FLAGS.model,
            optimizer=FLAGS.optimizer,
            mode="decay_lr",
            epochs=flag("epochs"),
            decay_epochs=int_list("decay_epochs"),
            decay_factor=FLAGS.decay_factor,
            base_learning_rate=FLAGS.base_learning_rate,
            base_batch_size=FLAGS.global_batch_size,
            global_batch_size=FLAGS.global_batch_size,
            warmup_epochs=flag("warmup_epochs"),
            momentum=FLAGS.momentum,
            momentum_correction=FLAGS.momentum_correction,
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
        runs = goyal_runs(config, ks, range(flag("seeds")), variants)
        with (
            contextlib.nullcontext(FLAGS.work_dir)
            if FLAGS.work_dir
            else tempfile.TemporaryDirectory(prefix="goyal_")
        ) as work_dir:
            records = run_study(runs, work_dir, on_run=print_run)
    except ValueError as e:
        sys.exit(f"reproduce_goyal.py: error: {e}")
    extra = {
        "command": " ".join(["python", "examples/reproduce_goyal.py", *sys.argv[1:]]),
        "reference_config": records[0]["config"],
        "ks": list(ks),
        "seeds": list(range(flag("seeds"))),
        "variants": list(variants),
        "wall_seconds": time.time() - start,
        "cpu_count": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
    }
    write_outputs(records, ks, variants, extra, out, start)


def write_outputs(records, ks, variants, extra, out, start):
    """Tables, figures and raw numbers of a study (also from a saved goyal_results.json)."""
    summary = summarize(records, "test_error")
    table = goyal_table(summary, variants)
    keys = ("command", "reference_config", "ks", "seeds", "variants", "wall_seconds")
    keys += ("cpu_count", "load_average_start", "load_average_end")
    paths = write_study(out, "goyal", records, summary, **{k: extra[k] for k in keys})
    with open(os.path.join(out, "goyal_table.md"), "w") as f:
        f.write(table + "\n")
    metrics = metrics_table(records, METRICS)
    with open(os.path.join(out, "goyal_metrics.md"), "w") as f:
        f.write(metrics + "\n")
    warmup_epochs = max(r["config"]["warmup_epochs"] for r in records)
    plot_training_loss(
        records, ks, variants, warmup_epochs, os.path.join(out, "goyal_training_loss.png")
    )
    plot_error_vs_batch(summary, variants, os.path.join(out, "goyal_error_vs_batch.png"))
    figures = ["goyal_training_loss.png", "goyal_error_vs_batch.png"]
    if any(r.get("noise_scale_steps") for r in records):
        plot_noise_scale(records, ks, variants, os.path.join(out, "goyal_noise_scale.png"))
        figures.append("goyal_noise_scale.png")
    print("\nFinal test error (%), mean ± std over seeds:\n" + table)
    print("\nMeasurements, mean ± std over seeds:\n" + metrics)
    print(f"\n{len(records)} runs in {time.time() - start:.0f} s. Wrote:")
    for name in [*paths, "goyal_table.md", "goyal_metrics.md", *figures]:
        print(" ", os.path.join(out, os.path.basename(name)))


if __name__ == "__main__":
    app.run(main)
