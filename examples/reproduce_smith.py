r"""Smith et al. 2018 at small scale: increase the batch size instead of decaying the learning rate.

  python examples/reproduce_smith.py                      # MNIST-1D, SGD, B₀ = 64, 3 seeds
  python examples/reproduce_smith.py --quick              # CI size: digits, 4 epochs, one seed
  python examples/reproduce_smith.py --dataset=text       # the byte-level language model, Adam
  python examples/reproduce_smith.py --dataset=text --quick   # CI size of the language model
  python examples/reproduce_smith.py --dataset=mnist1d:20000 --model=cnn1d --optimizer=adam \
      --base_learning_rate=0.005 --weight_decay=0 --modes=decay_lr,hybrid,grow_batch,no_decay
  python examples/reproduce_smith.py --dataset=digits --model=mlp --global_batch_size=16 \
      --base_learning_rate=0.1 --epochs=24 --decay_epochs=6,12,18 --max_global_batch_size=64 \
      --seeds=5 --modes=decay_lr,hybrid,grow_batch,scaled_momentum,no_decay   # digits demo

Trains one step-decay recipe (learning rate × --decay_factor at --decay_epochs) as ``decay_lr``
(fixed batch, decaying learning rate), ``hybrid`` (the batch grows by 1/decay_factor up to
--max_global_batch_size, then the learning rate decays), ``grow_batch`` (fixed learning rate,
growing batch) and ``scaled_momentum`` (``grow_batch`` with momentum raised to
--scaled_momentum and every batch scaled by (1 − m)/(1 − m')), plus the ``no_decay`` control
and ``adaptive`` (McCandlish's batch that grows towards the measured noise scale), for --seeds
seeds each, all in this process. ``scaled_momentum`` needs a momentum optimizer, so with
--optimizer=adam(w) the default --modes leave it out.

The flag defaults are the MNIST-1D SGD study of docs/RESULTS.md (``--dataset=mnist1d:20000
--model=cnn1d``, 18 runs, about 6 minutes on 2 shared CPU cores). ``--dataset=text`` (or
``text:MAX_BYTES``) trains the text example's byte-level Transformer language model with Adam
(AdamW without weight decay) and ranks by validation bits per byte (lower is better); the flags
it does not get then default to the language-model study of docs/RESULTS.md (`TEXT` below).
``--quick`` is the CI size of either (`QUICK`, `TEXT_QUICK`). A flag given always wins.

Writes to --output_dir: smith_table.md (final test accuracy or bits per byte, and parameter
updates per mode), smith_metrics.md (with the noise scale and sharpness where measured),
smith_accuracy.png (test accuracy or bits per byte against epochs and against parameter
updates, training loss against epochs: Smith's Figures 2 and 3), smith_schedules.png (learning
rate, batch and noise scale against epochs: Figure 1), and the raw numbers as
smith_results.json and smith_{runs,history,summary}.csv.
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
    METRICS,
    SMITH_EXTRA_MODES,
    SMITH_MODES,
    FlagProfile,
    mean_curve,
    metrics_table,
    run_study,
    smith_runs,
    smith_table,
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
flags.DEFINE_enum(
    "optimizer", "sgd", ["sgd", "adam", "adamw"], "Optimizer (sgd: momentum SGD; text: adamw)."
)
flags.DEFINE_integer("global_batch_size", 64, "The initial global batch B₀.")
flags.DEFINE_float("base_learning_rate", 0.1, "The initial learning rate (at B₀).")
flags.DEFINE_integer("max_global_batch_size", 256, "Batch cap of mode hybrid.")
flags.DEFINE_float("scaled_momentum", 0.95, "Raised momentum of mode scaled_momentum.")
flags.DEFINE_list(
    "modes",
    [*SMITH_MODES, *SMITH_EXTRA_MODES],
    f"Modes, from {[*SMITH_MODES, *SMITH_EXTRA_MODES]}.",
)
flags.DEFINE_integer(
    "adaptive_max_global_batch_size", None, "Batch cap of mode adaptive (default: grow_batch's)."
)
flags.DEFINE_integer("seeds", 3, "Seeds per mode: 0, 1, ..., seeds - 1.")
flags.DEFINE_integer("epochs", 8, "Total epochs.")
flags.DEFINE_list("decay_epochs", ["2", "4", "6"], "Decay (or batch growth) epochs.")
flags.DEFINE_float("decay_factor", 0.5, "Learning-rate multiplier (batch × its inverse).")
flags.DEFINE_float("momentum", 0.9, "Momentum.")
flags.DEFINE_float("weight_decay", 5e-4, "L2 weight decay on kernels (AdamW: decoupled).")
flags.DEFINE_integer("steps_per_execution", 16, "Training steps per compiled call.")
flags.DEFINE_bool("measure_noise_scale", False, "Measure B_simple (McCandlish) in every run.")
flags.DEFINE_bool("measure_sharpness", False, "Measure the final models' sharpness.")
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
flags.DEFINE_string("output_dir", "/tmp/tf_largebatch_smith", "Where tables, plots, JSON go.")
flags.DEFINE_string("work_dir", None, "Run directories (kept, rerun resumes); default: temp.")
flags.DEFINE_bool(
    "quick", False, "CI-sized run (digits, or the language model with --dataset=text)."
)
FLAGS = flags.FLAGS

# --quick: the digits demo's recipe (B₀ = 16, ε = 0.1, cap 64), 4 epochs, one seed.
QUICK = {
    **{"dataset": "digits", "model": "mlp", "global_batch_size": 16, "max_global_batch_size": 64},
    **{"epochs": 4, "decay_epochs": ["1", "2", "3"], "seeds": 1, "modes": list(SMITH_MODES)},
}
# --dataset=text: the language-model study of docs/RESULTS.md (Adam = AdamW without decay).
TEXT = {
    **{"optimizer": "adamw", "weight_decay": 0.0, "global_batch_size": 8},
    **{"base_learning_rate": 3e-3, "max_global_batch_size": 32, "epochs": 8},
    **{"decay_epochs": ["2", "4", "6"], "decay_factor": 0.5, "seeds": 3},
    "modes": ["decay_lr", "hybrid", "grow_batch", "no_decay"],
}
TEXT_MAX_BYTES = 100_000  # --dataset=text without :MAX_BYTES
# --dataset=text --quick: 2 epochs of 40 kB, one seed.
TEXT_QUICK = {**TEXT, "epochs": 2, "decay_epochs": ["1"], "seeds": 1}
TEXT_QUICK_MAX_BYTES = 40_000
STYLES = {
    "decay_lr": {"color": "tab:blue", "ls": "-"},
    "hybrid": {"color": "tab:orange", "ls": "--"},
    "grow_batch": {"color": "tab:green", "ls": "-."},
    "scaled_momentum": {"color": "tab:red", "ls": ":"},
    "no_decay": {"color": "grey", "ls": "-"},
    "adaptive": {"color": "tab:purple", "ls": "--"},
}
MEASURED = ("parameter_updates", "noise_scale_epoch1", "hessian_top_eigenvalue")
MEASURED += ("perturbed_loss_increase",)


flag = FlagProfile(FLAGS, QUICK, TEXT, TEXT_QUICK)  # flag(name): its value under the profile
dataset = flag.dataset


def study_config():
    """The decay_lr recipe: an `ExperimentConfig`, or a `TextExperimentConfig` for text."""
    common = {
        "optimizer": flag("optimizer"),
        "mode": "decay_lr",
        "epochs": flag("epochs"),
        "decay_epochs": decay_epochs(),
        "decay_factor": flag("decay_factor"),
        "base_learning_rate": flag("base_learning_rate"),
        "base_batch_size": flag("global_batch_size"),
        "global_batch_size": flag("global_batch_size"),
        "warmup_epochs": 0,
        "weight_decay": flag("weight_decay"),
        "strategy": FLAGS.strategy,
        "num_cpu_devices": FLAGS.num_cpu_devices,
        "steps_per_execution": FLAGS.steps_per_execution,
        "measure_noise_scale": FLAGS.measure_noise_scale,
        "measure_sharpness": FLAGS.measure_sharpness,
        "sharpness_max_examples": FLAGS.sharpness_max_examples,
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
            warmup="none",
            momentum=FLAGS.momentum,
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
        warmup="none",
        **common,
    )


def decay_epochs():
    try:
        return tuple(int(e) for e in flag("decay_epochs"))
    except ValueError:
        raise ValueError(
            "Flag --decay_epochs must be a comma list of integers. "
            f"Received: --decay_epochs={','.join(flag('decay_epochs'))}"
        ) from None


def plot_accuracy(records, modes, metric, path):
    """Smith Figures 2 and 3: test accuracy (or bits per byte) against epochs and updates,
    training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, scale, _ = METRICS[metric]
    bits = metric == "validation_bits_per_byte"
    fig, (ax_e, ax_l, ax_u) = plt.subplots(1, 3, figsize=(16, 4.3))
    worst = []
    for mode in modes:
        style = STYLES[mode]
        epochs, value, lo, hi = mean_curve(records, mode, metric)
        end = [e + 1 for e in epochs]  # measured at the epoch's end
        value, lo, hi = ([scale * v for v in c] for c in (value, lo, hi))
        ax_e.plot(end, value, label=mode, **style)
        ax_e.fill_between(end, lo, hi, color=style["color"], alpha=0.07, lw=0)
        steps, value_u, _, _ = mean_curve(records, mode, metric, x="steps")
        ax_u.plot(steps, [scale * v for v in value_u], label=mode, **style)
        _, loss, _, _ = mean_curve(records, mode, "train_loss")
        ax_l.plot([e + 0.5 for e in epochs], loss, label=mode, **style)  # epoch mean
        worst.append((max if bits else min)(value[len(value) // 4 :]))
    for ax in (ax_e, ax_u):
        ax.set(ylabel=label)
        if bits:
            ax.set_ylim(top=max(worst) * 1.02)
        else:
            ax.set_ylim(min(worst) - 0.5, 100)
        ax.legend(fontsize=8, loc="upper right" if bits else "lower right")
    ax_e.set(xlabel="epoch", title=f"{label.capitalize()} vs epochs (mean; band: min–max)")
    ax_u.set(xlabel="parameter updates", title=f"{label.capitalize()} vs parameter updates")
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
    bits = record.get("validation_bits_per_byte")
    result = f"test accuracy {100 * record['test_accuracy']:.2f}%"
    if bits is not None:
        result = f"validation {bits:.3f} bits/byte"
    print(
        f"[{index + 1}/{total}] {record['name']}: {result}, "
        f"{record['parameter_updates']} updates, "
        f"{record['wall_seconds']:.1f} s",
        flush=True,
    )


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    start, load_start = time.time(), os.getloadavg()
    modes = tuple(flag("modes"))
    if flag("optimizer") != "sgd" and not FLAGS["modes"].present:
        modes = tuple(m for m in modes if m != "scaled_momentum")
    try:
        if flag("optimizer") != "sgd" and "scaled_momentum" in modes:
            raise ValueError(
                "Mode `scaled_momentum` needs --optimizer=sgd (it raises the momentum). "
                f"Received: optimizer={flag('optimizer')!r}"
            )
        config = study_config()
        runs = smith_runs(
            config,
            range(flag("seeds")),
            max_global_batch_size=flag("max_global_batch_size"),
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
    bits = records[0].get("validation_bits_per_byte") is not None  # the language model
    metric = "validation_bits_per_byte" if bits else "test_accuracy"
    summary = summarize(records, metric)
    table = smith_table(summary, records)
    out = FLAGS.output_dir
    paths = write_study(
        out,
        "smith",
        records,
        summary,
        command=" ".join(["python", "examples/reproduce_smith.py", *sys.argv[1:]]),
        recipe_config=records[0]["config"],
        dataset=dataset(),
        metric=metric,
        modes=list(modes),
        seeds=list(range(flag("seeds"))),
        wall_seconds=time.time() - start,
        cpu_count=os.cpu_count(),
        load_average_start=load_start,
        load_average_end=os.getloadavg(),
    )
    with open(os.path.join(out, "smith_table.md"), "w") as f:
        f.write(table + "\n")
    metrics = metrics_table(records, (metric, *MEASURED), scale={"test_accuracy": 100})
    with open(os.path.join(out, "smith_metrics.md"), "w") as f:
        f.write(metrics + "\n")
    plot_accuracy(records, modes, metric, os.path.join(out, "smith_accuracy.png"))
    plot_schedules(records, modes, os.path.join(out, "smith_schedules.png"))
    print(f"\nFinal {METRICS[metric][0]}, mean ± std over seeds, and updates:\n" + table)
    print("\nMeasurements, mean ± std over seeds:\n" + metrics)
    print(f"\n{len(records)} runs in {time.time() - start:.0f} s. Wrote:")
    figures = ["smith_accuracy.png", "smith_schedules.png"]
    for name in [*paths, "smith_table.md", "smith_metrics.md", *figures]:
        print(" ", os.path.join(out, os.path.basename(name)))


if __name__ == "__main__":
    app.run(main)
