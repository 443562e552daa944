r"""Goyal et al. 2017 at small scale: the Linear Scaling Rule and warmup, batch n against kn.

  python examples/reproduce_goyal.py                      # MNIST-1D, n = 8, k = 1..32, 3 seeds
  python examples/reproduce_goyal.py --quick              # CI size: digits, 4 epochs, k = 1, 4
  python examples/reproduce_goyal.py --dataset=text       # the byte-level language model, AdamW
  python examples/reproduce_goyal.py --dataset=text --quick   # CI size of the language model
  python examples/reproduce_goyal.py --dataset=digits --model=mlp --global_batch_size=16 \
      --base_learning_rate=0.1 --epochs=20 --decay_epochs=10,15 --warmup_epochs=2 \
      --ks=1,2,4,8,16 --seeds=5 --variants=gradual_warmup,no_warmup,constant_warmup,no_scaling \
      --steps_per_execution=16 --nomeasure_noise_scale --nomeasure_sharpness   # digits demo

Trains the small-batch reference n (learning rate η) and, for every k in --ks, batch kn with
(a) linear scaling η → kη + gradual warmup, (b) linear scaling without warmup, (c) linear
scaling + constant warmup (η, then kη), (d) no scaling (η), (e) the square-root rule η → √k·η
(Adam's) with or without gradual warmup, for --seeds seeds each, all in this process.

The flag defaults are the MNIST-1D study of docs/RESULTS.md (``--dataset=mnist1d:20000
--model=cnn1d``, 39 runs, about 20 minutes on 2 shared CPU cores). ``--dataset=text`` (or
``text:MAX_BYTES``) trains the text example's byte-level Transformer language model
(`tf_largebatch.text`) with AdamW and ranks by validation bits per byte (lower is better); the
flags it does not get then default to the language-model study of docs/RESULTS.md (`TEXT`
below). ``--quick`` is the CI size of either (`QUICK`, `TEXT_QUICK`). A flag given on the
command line always wins.

Writes to --output_dir: goyal_table.md (final test error or bits per byte, mean ± std per k and
variant, like Goyal's Table 1 / Figure 3), goyal_training_loss.png (training loss against
epochs for every kn over the small-batch curve, Figures 2 and 4), goyal_error_vs_batch.png
(Figure 3), goyal_metrics.md (the metric, updates, the gradient noise scale B_simple after the
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
    METRICS,
    REFERENCE,
    FlagProfile,
    goyal_runs,
    goyal_table,
    mean_curve,
    metrics_table,
    run_study,
    summarize,
    text_max_bytes,
    write_study,
)

flags.DEFINE_string(
    "dataset",
    "mnist1d:20000",
    "mnist1d, mnist1d:N, digits (offline), text or text:MAX_BYTES (the language model), a TFDS "
    "name, or npz:PATH.",
)
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_enum("model", "cnn1d", list(MODEL_NAMES), "Model (cnn1d: MNIST-1D's CNN).")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "lars", "adam", "adamw", "lamb"], "Optimizer.")
flags.DEFINE_integer("global_batch_size", 8, "The reference small batch n.")
flags.DEFINE_float("base_learning_rate", 0.0125, "η: the learning rate of the reference batch n.")
flags.DEFINE_list("ks", ["1", "8", "16", "32"], "Batch multiples k (kn); 1 = reference.")
flags.DEFINE_integer("seeds", 3, "Seeds per (variant, k): 0, 1, ..., seeds - 1.")
flags.DEFINE_list(
    "variants",
    ["gradual_warmup", "no_warmup", "no_scaling", "gradual_warmup_uncorrected"],
    f"Recipe variants for k > 1, from {list(ALL_GOYAL_VARIANTS)}.",
)
flags.DEFINE_integer("epochs", 8, "Total epochs.")
flags.DEFINE_list("decay_epochs", ["5", "7"], "Learning rate × decay_factor at these epochs.")
flags.DEFINE_float("decay_factor", 0.1, "Learning-rate multiplier at each decay epoch.")
flags.DEFINE_float("warmup_epochs", 1, "Warmup length (gradual and constant warmup).")
flags.DEFINE_float("momentum", 0.9, "Momentum.")
flags.DEFINE_bool("momentum_correction", True, "Goyal's momentum correction (SGD) in every run.")
flags.DEFINE_float("weight_decay", 0.0, "L2 weight decay on kernels (AdamW: decoupled).")
flags.DEFINE_integer("steps_per_execution", 32, "Training steps per compiled call.")
flags.DEFINE_bool("measure_noise_scale", True, "Measure B_simple (McCandlish) in every run.")
flags.DEFINE_bool("measure_sharpness", True, "Measure the final models' sharpness.")
flags.DEFINE_integer("sharpness_max_examples", 2000, "Training examples the sharpness uses.")
flags.DEFINE_float(
    "sharpness_perturbation_size",
    0.05,
    "Relative size ‖δ‖/‖w‖ of the sharpness perturbations (≥ 0.05 to be measurable).",
)
flags.DEFINE_integer("sharpness_num_perturbations", 5, "Random perturbations averaged.")
flags.DEFINE_string(
    "text_files", None,
    "--dataset=text: a glob of text files (default: the Python standard library's source).",
)  # fmt: skip
flags.DEFINE_integer("sequence_length", 32, "--dataset=text: context length in bytes.")
flags.DEFINE_integer("d_model", 32, "--dataset=text: Transformer width.")
flags.DEFINE_integer("num_heads", 2, "--dataset=text: attention heads.")
flags.DEFINE_integer("num_layers", 1, "--dataset=text: Transformer blocks.")
flags.DEFINE_enum("strategy", "one_device", ["one_device", "mirrored"], "tf.distribute strategy.")
flags.DEFINE_integer("num_cpu_devices", None, "Split the CPU into N logical devices.")
flags.DEFINE_string("output_dir", "/tmp/tf_largebatch_goyal", "Where tables, plots, JSON go.")
flags.DEFINE_string("work_dir", None, "Run directories (kept, rerun resumes); default: temp.")
flags.DEFINE_bool(
    "replot", False, "Redraw tables and figures from --output_dir/goyal_results.json; no training."
)
flags.DEFINE_bool(
    "quick", False, "CI-sized run (digits, or the language model with --dataset=text)."
)
FLAGS = flags.FLAGS

# --quick: the digits demo's recipe (n = 16, η = 0.1), 4 epochs, k = 1, 4, one seed.
QUICK = {
    **{"dataset": "digits", "model": "mlp", "global_batch_size": 16, "base_learning_rate": 0.1},
    **{"epochs": 4, "decay_epochs": ["2", "3"], "warmup_epochs": 1, "ks": ["1", "4"], "seeds": 1},
    **{"variants": list(GOYAL_VARIANTS), "steps_per_execution": 16},
    **{"measure_noise_scale": False, "measure_sharpness": False},
}
# --dataset=text: the language-model study of docs/RESULTS.md (AdamW, n = 8, η = 3e-3).
TEXT = {
    **{"optimizer": "adamw", "global_batch_size": 8, "base_learning_rate": 3e-3},
    **{"epochs": 4, "decay_epochs": ["3"], "decay_factor": 0.1, "warmup_epochs": 0.5},
    **{"ks": ["1", "2", "4", "16"], "seeds": 3, "steps_per_execution": 16, "weight_decay": 0.0},
    "variants": ["sqrt_gradual_warmup", "gradual_warmup", "sqrt_no_warmup", "no_scaling"],
    **{"measure_noise_scale": True, "measure_sharpness": False, "sharpness_max_examples": 256},
}
TEXT_MAX_BYTES = 100_000  # --dataset=text without :MAX_BYTES
# --dataset=text --quick: 2 epochs of 40 kB, k = 1, 4, one seed.
TEXT_QUICK = {
    **TEXT,
    **{"epochs": 2, "decay_epochs": ["1"], "ks": ["1", "4"], "seeds": 1},
    **{"variants": ["sqrt_gradual_warmup", "no_scaling"], "measure_noise_scale": False},
}
TEXT_QUICK_MAX_BYTES = 40_000
COLORS = {
    "gradual_warmup": "tab:blue",
    "no_warmup": "tab:red",
    "constant_warmup": "tab:orange",
    "no_scaling": "tab:green",
    "gradual_warmup_uncorrected": "tab:purple",
    "no_warmup_uncorrected": "tab:brown",
    "sqrt_gradual_warmup": "tab:cyan",
    "sqrt_no_warmup": "tab:pink",
}
# Legend and panel names: which rule each variant scales η by.
LABELS = {
    "gradual_warmup": "linear, gradual warmup",
    "no_warmup": "linear, no warmup",
    "constant_warmup": "linear, constant warmup",
    "no_scaling": "no scaling",
    "gradual_warmup_uncorrected": "linear, gradual warmup, uncorrected",
    "no_warmup_uncorrected": "linear, no warmup, uncorrected",
    "sqrt_gradual_warmup": "sqrt, gradual warmup",
    "sqrt_no_warmup": "sqrt, no warmup",
}
MEASURED = ("parameter_updates", "noise_scale_epoch1", "hessian_top_eigenvalue")
MEASURED += ("perturbed_loss_increase",)


flag = FlagProfile(FLAGS, QUICK, TEXT, TEXT_QUICK)  # flag(name): its value under the profile
dataset = flag.dataset


def study_config():
    """The reference recipe: an `ExperimentConfig`, or a `TextExperimentConfig` for text."""
    common = {
        "optimizer": flag("optimizer"),
        "mode": "decay_lr",
        "epochs": flag("epochs"),
        "decay_epochs": int_list("decay_epochs"),
        "decay_factor": flag("decay_factor"),
        "base_learning_rate": flag("base_learning_rate"),
        "base_batch_size": flag("global_batch_size"),
        "global_batch_size": flag("global_batch_size"),
        "warmup_epochs": flag("warmup_epochs"),
        "weight_decay": flag("weight_decay"),
        "strategy": FLAGS.strategy,
        "num_cpu_devices": FLAGS.num_cpu_devices,
        "steps_per_execution": flag("steps_per_execution"),
        "measure_noise_scale": flag("measure_noise_scale"),
        "measure_sharpness": flag("measure_sharpness"),
        "sharpness_max_examples": flag("sharpness_max_examples"),
        "sharpness_perturbation_size": FLAGS.sharpness_perturbation_size,
        "sharpness_num_perturbations": FLAGS.sharpness_num_perturbations,
        "verbose": 0,
    }
    max_bytes = text_max_bytes(dataset())
    if max_bytes is None:
        return ExperimentConfig(
            dataset=dataset(),
            data_dir=FLAGS.data_dir,
            model=flag("model"),
            momentum=FLAGS.momentum,
            momentum_correction=FLAGS.momentum_correction,
            save_model=False,
            **common,
        )
    from tf_largebatch.text import TextExperimentConfig  # imports TensorFlow

    default_bytes = TEXT_QUICK_MAX_BYTES if FLAGS.quick else TEXT_MAX_BYTES
    return TextExperimentConfig(
        max_bytes=max_bytes or default_bytes,
        text_files=FLAGS.text_files,
        sequence_length=FLAGS.sequence_length,
        d_model=FLAGS.d_model,
        num_heads=FLAGS.num_heads,
        num_layers=FLAGS.num_layers,
        schedule="goyal",
        **common,
    )


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
                ax.set_title(f"{LABELS[variant]}, kn = {k * n}", fontsize=9)
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
    """Goyal Figure 3: final test error (or bits per byte) against the minibatch size kn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = next(r for r in summary if r["group"] == REFERENCE)
    label = METRICS[ref["metric"]][0]
    bits = ref["metric"] == "validation_bits_per_byte"
    # Diverged runs would flatten the rest: drawn at the top edge.
    top = 1.5 * ref["mean"] if bits else 4 * ref["mean"] + 1
    bottom = 0.95 * min(r["mean"] for r in summary) if bits else 0
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
            label=LABELS[variant],
            **style,
        )
        for xi, r in zip(x, rows):
            if r["mean"] >= top:
                ax.annotate(
                    f"{r['mean']:.3g}",
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
    ax.set(xscale="log", xlabel="global batch kn", ylabel=f"final {label}", ylim=(bottom, top))
    ax.set_xticks(sorted({r["global_batch_size"] for r in summary}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.minorticks_off()
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"Final {label} vs batch (mean ± std; clipped at {top:.3g})", fontsize=10)
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
    bits = record.get("validation_bits_per_byte")
    result = f"test error {record['test_error']:.2f}%"
    if bits is not None:
        result = f"validation {bits:.3f} bits/byte"
    print(
        f"[{index + 1}/{total}] {record['name']}: {result}, "
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
        config = study_config()
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
        "dataset": dataset(),
        "variants": list(variants),
        "wall_seconds": time.time() - start,
        "cpu_count": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
    }
    write_outputs(records, ks, variants, extra, out, start)


def write_outputs(records, ks, variants, extra, out, start):
    """Tables, figures and raw numbers of a study (also from a saved goyal_results.json)."""
    bits = records[0].get("validation_bits_per_byte") is not None  # the language model
    metric = "validation_bits_per_byte" if bits else "test_error"
    summary = summarize(records, metric)
    delta = "sqrt_gradual_warmup" if bits and "sqrt_gradual_warmup" in variants else None
    table = goyal_table(
        summary, variants, delta_variant=delta or "gradual_warmup", digits=3 if bits else 2
    )
    keys = ("command", "reference_config", "ks", "seeds", "variants", "wall_seconds")
    keys += ("cpu_count", "load_average_start", "load_average_end")
    kept = {k: extra[k] for k in keys}
    kept["dataset"] = extra.get("dataset", "")
    kept["metric"] = metric
    paths = write_study(out, "goyal", records, summary, **kept)
    with open(os.path.join(out, "goyal_table.md"), "w") as f:
        f.write(table + "\n")
    metrics = metrics_table(records, (metric, *MEASURED))
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
    print(f"\nFinal {METRICS[metric][0]}, mean ± std over seeds:\n" + table)
    print("\nMeasurements, mean ± std over seeds:\n" + metrics)
    print(f"\n{len(records)} runs in {time.time() - start:.0f} s. Wrote:")
    for name in [*paths, "goyal_table.md", "goyal_metrics.md", *figures]:
        print(" ", os.path.join(out, os.path.basename(name)))


if __name__ == "__main__":
    app.run(main)
