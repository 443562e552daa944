r"""Train with linear scaling, warmup and batch-size phases, on 1 device, N devices or N workers.

  python examples/train.py                      # offline default: scikit-learn digits
  python examples/train.py --num_cpu_devices=2 --strategy=mirrored
  python -m tf_largebatch.launch --num_workers=2 -- examples/train.py --strategy=multi_worker
  python examples/train.py --dataset=cifar10 --model=resnet20 --mode=hybrid ...

Prints the phase table, a progress bar per epoch and a summary; writes
``--model_dir``/results.json, model.keras, checkpoints (rerun the same command to resume) and
TensorBoard logs.

Exit status: 0 done; 1 the training loss became NaN or infinite (one line; the last good
checkpoint is kept, nothing is saved over it); 2 bad input (one line on stderr,
``train.py: error: <message>``, naming the flag or file and the value; nothing written to
``--model_dir``); 143 stopped by SIGTERM (preemption) and 130 by Ctrl-C, after saving a
checkpoint: rerun the same command to resume.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

import json
import sys

from absl import app, flags, logging

from tf_largebatch import Preempted
from tf_largebatch.experiment import (
    EXPERIMENT_MODES,
    OPTIMIZERS,
    ExperimentConfig,
    run_experiment,
)
from tf_largebatch.models import MODEL_NAMES
from tf_largebatch.phases import WARMUPS

_D = ExperimentConfig()
flags.DEFINE_string(
    "dataset",
    _D.dataset,
    "digits (offline), mnist1d or mnist1d:N (generated offline), a TFDS name prepared in "
    "--data_dir, or npz:PATH.",
)
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_enum("model", _D.model, list(MODEL_NAMES), "Model.")
flags.DEFINE_enum("mode", _D.mode, list(EXPERIMENT_MODES), "How decay epochs are applied.")
flags.DEFINE_integer("epochs", _D.epochs, "Total epochs.")
flags.DEFINE_list("decay_epochs", [str(e) for e in _D.decay_epochs], "Decay epochs, e.g. 30,60,80.")
flags.DEFINE_float("decay_factor", _D.decay_factor, "LR multiplier per decay (batch x 1/it).")
flags.DEFINE_float("base_learning_rate", _D.base_learning_rate, "LR per base_batch_size.")
flags.DEFINE_integer("base_batch_size", _D.base_batch_size, "Reference batch of the base LR.")
flags.DEFINE_integer("global_batch_size", _D.global_batch_size, "Initial global batch.")
flags.DEFINE_integer("max_global_batch_size", None, "Batch cap (mode=hybrid).")
flags.DEFINE_enum(
    "scaling_rule", _D.scaling_rule, ["linear", "sqrt", "none", "auto"],
    "LR scaling (auto: sqrt for adam/adamw/lamb, linear for sgd/lars).",
)  # fmt: skip
flags.DEFINE_list(
    "rampup_batch_size", None,
    "mode=rampup: start,increment,ramp_samples (Megatron's), e.g. 16,16,20000.",
)  # fmt: skip
flags.DEFINE_enum("warmup", _D.warmup, list(WARMUPS), "Warmup kind.")
flags.DEFINE_float("warmup_epochs", _D.warmup_epochs, "Warmup length in epochs.")
flags.DEFINE_enum("optimizer", _D.optimizer, list(OPTIMIZERS), "Optimizer.")
flags.DEFINE_float("momentum", _D.momentum, "Momentum coefficient.")
flags.DEFINE_bool("momentum_correction", _D.momentum_correction, "Goyal momentum correction.")
flags.DEFINE_float("scaled_momentum", None, "Smith momentum scaling: raise momentum to this.")
flags.DEFINE_float("weight_decay", _D.weight_decay, "L2 weight decay (kernels only).")
flags.DEFINE_enum(
    "strategy",
    _D.strategy,
    ["auto", "one_device", "mirrored", "multi_worker"],
    "tf.distribute strategy.",
)
flags.DEFINE_integer("num_cpu_devices", None, "Split the CPU into N logical devices.")
flags.DEFINE_enum("all_reduce", _D.all_reduce, ["auto", "ring", "nccl"], "All-reduce algorithm.")
flags.DEFINE_string("model_dir", _D.model_dir, "Output/checkpoint dir; rerun to resume.")
flags.DEFINE_integer("seed", _D.seed, "Random seed.")
flags.DEFINE_integer("max_per_replica_batch_size", None, "Accumulate gradients beyond this.")
flags.DEFINE_integer("steps_per_execution", _D.steps_per_execution, "Steps per compiled call.")
flags.DEFINE_integer("checkpoint_every_steps", 0, "Also checkpoint every N steps.")
flags.DEFINE_float(
    "checkpoint_interval_seconds",
    _D.checkpoint_interval_seconds,
    "Epoch ends checkpoint at most this often (0: every epoch); the end, signals always save.",
)
flags.DEFINE_bool("jit_compile", False, "XLA-compile the step.")
flags.DEFINE_enum("mixed_precision", None, ["mixed_float16", "mixed_bfloat16"], "Mixed precision.")
flags.DEFINE_bool("measure_noise_scale", False, "Estimate the gradient noise scale B_simple.")
flags.DEFINE_bool("measure_sharpness", False, "Record the final model's sharpness in results.")
flags.DEFINE_integer("sharpness_max_examples", None, "Training examples the sharpness uses.")
flags.DEFINE_float(
    "sharpness_perturbation_size", _D.sharpness_perturbation_size,
    "Sharpness: relative size |delta|/|w| of the random weight perturbations.",
)  # fmt: skip
flags.DEFINE_integer(
    "sharpness_num_perturbations", _D.sharpness_num_perturbations,
    "Sharpness: random perturbations averaged.",
)  # fmt: skip
flags.DEFINE_string(
    "plan", None,
    "Train this JSON PhasePlan instead of the recipe flags' (plan.json, or the report of "
    "examples/plan_cluster.py --output: its recommendation).",
)  # fmt: skip
flags.DEFINE_integer("adaptive_factor", 2, "mode=adaptive: batch growth factor.")
flags.DEFINE_enum(
    "adaptive_learning_rate_rule",
    "linear",
    ["linear", "sqrt", "keep"],
    "mode=adaptive: learning rate for a grown batch.",
)
flags.DEFINE_integer("eval_every_epochs", 1, "Evaluate on the test split every N epochs.")
flags.DEFINE_integer("verbose", 1, "1: progress bar, 0: quiet.")
FLAGS = flags.FLAGS


# What a --plan file fixes: giving one of these as well would be silently ignored.
RECIPE_FLAGS = (
    "mode", "epochs", "decay_epochs", "decay_factor", "base_learning_rate", "base_batch_size",
    "global_batch_size", "max_global_batch_size", "scaling_rule", "rampup_batch_size", "warmup",
    "warmup_epochs", "momentum", "scaled_momentum",
)  # fmt: skip


def config_from_flags() -> ExperimentConfig:
    """The flags as an `ExperimentConfig` (field names are flag names).

    Raises:
      ValueError: --plan given with flags of the recipe it replaces.
    """
    if FLAGS.plan is not None:
        given = [f"--{name}" for name in RECIPE_FLAGS if FLAGS[name].present]
        if given:
            raise ValueError(
                f"Flag --plan fixes the phases (batch sizes, learning rates, momentum, epochs); "
                f"drop {', '.join(given)} or drop --plan. Received: --plan={FLAGS.plan}"
            )
    try:
        decay_epochs = tuple(int(e) for e in FLAGS.decay_epochs)
    except ValueError:
        raise ValueError(
            f"Flag --decay_epochs must be a comma list of integers. "
            f"Received: --decay_epochs={','.join(FLAGS.decay_epochs)}"
        ) from None
    rampup = None
    if FLAGS.rampup_batch_size is not None:
        try:
            rampup = tuple(int(v) for v in FLAGS.rampup_batch_size)
        except ValueError:
            rampup = ()
        if len(rampup) != 3:
            raise ValueError(
                "Flag --rampup_batch_size must be three integers start,increment,ramp_samples. "
                f"Received: --rampup_batch_size={','.join(FLAGS.rampup_batch_size)}"
            )
    fields = {f: FLAGS[f].value for f in ExperimentConfig.__dataclass_fields__ if f in FLAGS}
    return ExperimentConfig(
        **{**fields, "decay_epochs": decay_epochs, "rampup_batch_size": rampup,
           "plan_path": FLAGS.plan}
    )  # fmt: skip


def check_model_dir(model_dir: str) -> None:
    """--model_dir must be a directory or creatable as one (local paths; URLs pass)."""
    if "://" in model_dir:
        return
    path = os.path.abspath(model_dir)
    while True:
        if os.path.exists(path):
            if not os.path.isdir(path):
                what = "names" if path == os.path.abspath(model_dir) else f"is inside {path!r},"
                raise ValueError(
                    f"Flag --model_dir must be a directory; it {what} an existing file. "
                    f"Received: --model_dir={model_dir}"
                )
            return
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def print_plan(plan, strategy) -> None:
    print(f"Replicas in sync: {strategy.num_replicas_in_sync}")
    print(plan.table(), flush=True)


def fail(message: str, status: int = 2) -> None:
    """One line on stderr, no traceback, and the exit status."""
    print(f"train.py: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def parse_flags(argv):
    """absl's flag parsing with its errors as one ``train.py: error:`` line, exit status 2."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        fail(f"error: {' '.join(str(e).split())}")


def main(argv):
    if len(argv) > 1:
        fail(f"error: unexpected arguments {argv[1:]} (every option is a --flag=value)")
    logging.set_verbosity(logging.WARNING)
    try:
        check_model_dir(FLAGS.model_dir)
        results = run_experiment(config_from_flags(), on_plan=print_plan)
    except ValueError as e:
        fail(f"error: {' '.join(str(e).split())}")
    except Preempted as e:  # SIGTERM / Ctrl-C: a checkpoint was saved; exit 143 / 130
        fail(" ".join(str(e).split()), status=e.exit_status)
    except FloatingPointError as e:  # NonFiniteLossError: the last good checkpoint is kept
        fail(f"error: {' '.join(str(e).split())}", status=1)
    except KeyboardInterrupt:
        fail(
            f"interrupted; rerun the same command to resume from the last checkpoint in "
            f"--model_dir={FLAGS.model_dir}",
            status=130,
        )
    summary = {
        k: results[k]
        for k in (
            "test_accuracy",
            "test_loss",
            "final_train_loss",
            "parameter_updates",
            "epochs_completed",
            "examples_per_second",
            "wall_seconds",
            "num_replicas",
            "trace_count",
            "weights_sha256",
        )
    }
    summary["phase_switch_seconds"] = [round(s, 3) for s in results["phase_switch_seconds"]]
    print("Summary:", json.dumps(summary, indent=1))
    for decision in results.get("adaptive_decisions", []):
        print("Adaptive batch:", json.dumps(decision))
    if results.get("adaptive_decisions"):
        print("Phases as trained:")
        for p in results["phases"]:
            print(" ", json.dumps(p))
    print(f"Results: {FLAGS.model_dir}/results.json")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
