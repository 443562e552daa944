r"""Measure the gradient noise scale B_simple over a short run and suggest a global batch size.

  python examples/measure_noise_scale.py                       # digits, 1 device
  python examples/measure_noise_scale.py --num_cpu_devices=4 --strategy=mirrored
  python examples/measure_noise_scale.py --dataset=cifar10 --model=resnet20 --epochs=2

B_simple = tr(Σ)/|G|² (McCandlish et al. 2018) is measured every step from the per-replica and
all-reduced gradient norms (two half-batches on one replica). It predicts the critical batch:
batches well below it waste updates, batches well above it waste examples. Writes
``--output_dir``/noise_scale.png (B_simple against steps) and noise_scale.json.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

import json
import sys

from absl import app, flags, logging

from tf_largebatch import ExperimentConfig, run_experiment, suggest_global_batch_size
from tf_largebatch.models import MODEL_NAMES

flags.DEFINE_string(
    "dataset", "digits", "digits or mnist1d[:N] (offline), a prepared TFDS name, or npz:PATH."
)
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_enum("model", "auto", list(MODEL_NAMES), "Model.")
flags.DEFINE_integer("global_batch_size", 32, "Global batch of the measuring run.")
flags.DEFINE_float("base_learning_rate", 0.1, "Learning rate per base_batch_size.")
flags.DEFINE_integer("base_batch_size", 32, "Reference batch of the base learning rate.")
flags.DEFINE_integer("epochs", 3, "Epochs of the measuring run.")
flags.DEFINE_float("noise_scale_beta", 0.99, "EMA decay of the estimator.")
flags.DEFINE_integer("max_global_batch_size", 4096, "Largest batch to suggest.")
flags.DEFINE_enum(
    "strategy",
    "auto",
    ["auto", "one_device", "mirrored", "multi_worker"],
    "tf.distribute strategy.",
)
flags.DEFINE_integer("num_cpu_devices", None, "Split the CPU into N logical devices.")
flags.DEFINE_string("output_dir", "/tmp/tf_largebatch_noise", "Where plots and JSON go.")
flags.DEFINE_integer("seed", 0, "Random seed.")
FLAGS = flags.FLAGS


def plot(steps, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in steps], [b for _, b in steps])
    ax.set(
        xlabel="parameter updates",
        ylabel="B_simple (EMA)",
        yscale="log",
        title="gradient noise scale",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = ExperimentConfig(
        dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir,
        model=FLAGS.model,
        mode="decay_lr",
        epochs=FLAGS.epochs,
        decay_epochs=(),
        global_batch_size=FLAGS.global_batch_size,
        base_learning_rate=FLAGS.base_learning_rate,
        base_batch_size=FLAGS.base_batch_size,
        warmup="none",
        warmup_epochs=0,
        strategy=FLAGS.strategy,
        num_cpu_devices=FLAGS.num_cpu_devices,
        seed=FLAGS.seed,
        measure_noise_scale=True,
        steps_per_execution=1,  # one point per step for the plot
        model_dir=os.path.join(FLAGS.output_dir, "run"),
        verbose=0,
    )
    try:
        results = run_experiment(config)
    except ValueError as e:  # one line, exit status 2, as train.py
        print(f"measure_noise_scale.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    steps = results["noise_scale_steps"]
    b_simple = results["history"][-1]["noise_scale"]
    suggested = suggest_global_batch_size(
        b_simple,
        FLAGS.global_batch_size,
        max_global_batch_size=FLAGS.max_global_batch_size,
        multiple_of=results["num_replicas"],
        dataset_size=results["plan"]["dataset_size"],
    )
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    plot(steps, os.path.join(FLAGS.output_dir, "noise_scale.png"))
    summary = {
        "b_simple": b_simple,
        "per_epoch": [h["noise_scale"] for h in results["history"]],
        "measured_at_global_batch_size": FLAGS.global_batch_size,
        "suggested_global_batch_size": suggested,
        "steps": steps,
    }
    with open(os.path.join(FLAGS.output_dir, "noise_scale.json"), "w") as f:
        json.dump(summary, f)
    print(
        f"B_simple after {len(steps)} steps: {b_simple:.1f} "
        f"(per epoch: {', '.join(f'{b:.1f}' for b in summary['per_epoch'])})"
    )
    print(
        f"Suggested global batch size: {suggested} (measured at {FLAGS.global_batch_size}; "
        f"powers of 2 up to B_simple, at most {FLAGS.max_global_batch_size})"
    )
    print(f"Plot: {FLAGS.output_dir}/noise_scale.png")


if __name__ == "__main__":
    app.run(main)
