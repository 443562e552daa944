r"""ResNet-50 on ImageNet with Goyal et al.'s recipe (or Smith et al.'s batch growth).

Defaults are the paper's: per-replica batch 32, 0.1 per 256 examples (linear scaling), 5-epoch
gradual warmup, ÷10 at epochs 30/60/80, 90 epochs, momentum 0.9, weight decay 1e-4 (not on
BatchNorm γ/β), zero-γ, random-resized crop + flip for training, resize + centre crop for
evaluation. ``--mode=grow_batch`` (or ``hybrid`` with ``--max_global_batch_size``) grows the batch
×10 where the recipe would decay the learning rate.

Getting ImageNet into TFDS (one time; it cannot be downloaded automatically):

  1. Register at https://image-net.org/download-images and download
     ``ILSVRC2012_img_train.tar`` (~138 GB) and ``ILSVRC2012_img_val.tar`` (~6.3 GB).
  2. Put both in a manual directory, by default ``DATA_DIR/downloads/manual/``.
  3. Prepare: ``tfds build imagenet2012 --data_dir=DATA_DIR --manual_dir=MANUAL_DIR``
     (or ``tfds.builder("imagenet2012", data_dir=DATA_DIR).download_and_prepare()``):
     1,281,167 training and 50,000 validation JPEGs in sharded TFRecord files (~150 GB; each
     input pipeline reads its own files). Put DATA_DIR where every worker can read it.

Run:

  python examples/imagenet_resnet50.py --data_dir=DATA_DIR --model_dir=/runs/r50   # all GPUs
  python examples/imagenet_resnet50.py --data_dir=DATA_DIR --all_reduce=nccl \
      --mixed_precision=mixed_float16 --per_replica_batch_size=64
  sbatch deploy/slurm/train.sbatch          # N nodes, --strategy=multi_worker (deploy/README.md)

Writes ``--model_dir``/results.json, model.keras, checkpoints (rerun the same command to resume)
and TensorBoard logs.
"""

import json
import sys

from absl import app, flags, logging

from tf_largebatch.imagenet_recipe import ImageNetConfig, run_imagenet

_D = ImageNetConfig()
flags.DEFINE_string("data_dir", None, "TFDS data directory with imagenet2012 prepared.")
flags.DEFINE_string("dataset", _D.dataset, "TFDS name (image and label features).")
flags.DEFINE_enum("model", _D.model, ["resnet50", "resnet20", "cnn", "mlp"], "Model.")
flags.DEFINE_integer("image_size", _D.image_size, "Crop side in pixels.")
flags.DEFINE_enum("mode", _D.mode, ["decay_lr", "grow_batch", "hybrid"], "Decay LR or grow batch.")
flags.DEFINE_integer("epochs", _D.epochs, "Total epochs.")
flags.DEFINE_list("decay_epochs", [str(e) for e in _D.decay_epochs], "Decay epochs.")
flags.DEFINE_float("decay_factor", _D.decay_factor, "LR multiplier per decay (batch x 1/it).")
flags.DEFINE_float("base_learning_rate", _D.base_learning_rate, "LR per base_batch_size.")
flags.DEFINE_integer("base_batch_size", _D.base_batch_size, "Reference batch of the base LR.")
flags.DEFINE_integer("per_replica_batch_size", _D.per_replica_batch_size, "Batch per replica.")
flags.DEFINE_integer("global_batch_size", None, "Global batch (default per-replica x replicas).")
flags.DEFINE_integer("max_global_batch_size", None, "Batch cap (mode=hybrid).")
flags.DEFINE_enum("warmup", _D.warmup, ["gradual", "constant", "none"], "Warmup kind.")
flags.DEFINE_float("warmup_epochs", _D.warmup_epochs, "Warmup length in epochs.")
flags.DEFINE_float("momentum", _D.momentum, "Momentum coefficient.")
flags.DEFINE_bool("momentum_correction", _D.momentum_correction, "Goyal momentum correction.")
flags.DEFINE_float("weight_decay", _D.weight_decay, "L2 weight decay (kernels only).")
flags.DEFINE_enum(
    "strategy", _D.strategy, ["auto", "one_device", "mirrored", "multi_worker"], "Strategy."
)
flags.DEFINE_enum("all_reduce", _D.all_reduce, ["auto", "ring", "nccl"], "All-reduce algorithm.")
flags.DEFINE_integer("num_cpu_devices", None, "Split the CPU into N logical devices.")
flags.DEFINE_enum("mixed_precision", None, ["mixed_float16", "mixed_bfloat16"], "Mixed precision.")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the forward/backward pass.")
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
flags.DEFINE_integer("eval_batch_size", _D.eval_batch_size, "Evaluation batch size.")
flags.DEFINE_integer("eval_every_epochs", _D.eval_every_epochs, "Evaluate every N epochs.")
flags.DEFINE_integer("shuffle_buffer_size", _D.shuffle_buffer_size, "Shuffle buffer (examples).")
flags.DEFINE_integer("verbose", 1, "1: progress bar, 0: quiet.")
FLAGS = flags.FLAGS


def config_from_flags() -> ImageNetConfig:
    """The flags as an `ImageNetConfig` (field names are flag names)."""
    try:
        decay_epochs = tuple(int(e) for e in FLAGS.decay_epochs)
    except ValueError:
        raise ValueError(
            "Flag --decay_epochs must be a comma list of integers. "
            f"Received: --decay_epochs={','.join(FLAGS.decay_epochs)}"
        ) from None
    fields = {f: FLAGS[f].value for f in ImageNetConfig.__dataclass_fields__}
    return ImageNetConfig(**{**fields, "decay_epochs": decay_epochs})


def print_plan(plan, strategy) -> None:
    print(f"Replicas in sync: {strategy.num_replicas_in_sync}")
    print(plan.table(), flush=True)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        results = run_imagenet(config_from_flags(), on_plan=print_plan)
    except ValueError as e:
        sys.exit(f"imagenet_resnet50.py: error: {e}")
    keys = ("test_accuracy", "test_loss", "final_train_loss", "parameter_updates")
    keys += ("epochs_completed", "examples_per_second", "wall_seconds", "num_replicas")
    print("Summary:", json.dumps({k: results[k] for k in keys}, indent=1))
    print(f"Results: {FLAGS.model_dir}/results.json")


if __name__ == "__main__":
    app.run(main)
