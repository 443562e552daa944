"""`TrainerConfig`: how the `Trainer` runs (what it trains is the `PhasePlan`).

Pure Python (no TensorFlow import), so configs can be built and validated anywhere.
"""

from __future__ import annotations

import dataclasses
import math

from tf_largebatch._validation import (
    check_choice,
    check_momentum,
    check_non_negative,
    check_non_negative_int,
    check_positive_int,
)

LR_RULES_FOR_BATCH_GROWTH = ("keep", "linear", "sqrt")  # as noise.py

MIXED_PRECISION = (None, "mixed_float16", "mixed_bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """How the `Trainer` runs (what it trains is the `PhasePlan`).

    Attributes:
      model_dir: checkpoints, TensorBoard logs, ``plan.json``, ``history.json``,
        ``results.json`` and ``model.keras``; rerunning with the same directory resumes.
      seed: seeds model initialisation and the per-epoch permutations.
      max_per_replica_batch_size: larger per-replica batches are split into micro-batches of
        at most this many examples whose gradients are summed inside one step.
      steps_per_execution: training steps run inside one compiled call.
      checkpoint_every_steps: also checkpoint every this many steps of an epoch (0: epoch ends).
      checkpoint_interval_seconds: an epoch end writes a checkpoint only when the last one is
        at least this many seconds old (0: every epoch end), so that short epochs do not
        spend their time saving (TF Estimator's ``save_checkpoints_secs`` idea). Always
        saved whatever the interval: the run's last step, a stop by a callback, a stop
        signal (SIGTERM / Ctrl-C), a plan change, and every ``checkpoint_every_steps``
        steps. A run killed without a signal resumes from at most this long (plus one epoch)
        before the kill.
      max_checkpoints_to_keep: checkpoints kept by the `tf.train.CheckpointManager`.
      eval_batch_size: batch size of the evaluation pass.
      eval_every_epochs: evaluate on the validation data every this many epochs (and after
        the last one).
      verbose: 1 shows a `keras.utils.Progbar` per epoch on the chief, 0 is silent.
      jit_compile: XLA-compile the per-replica forward/backward pass.
      mixed_precision: ``None``, ``"mixed_float16"`` (with loss scaling) or
        ``"mixed_bfloat16"``.
      save_model: write ``model_dir/model.keras`` at the end (chief only).
      measure_noise_scale: estimate the gradient noise scale B_simple every step.
      noise_scale_beta: EMA decay of the noise-scale estimator.
      adaptive_max_global_batch_size: if set, grow the batch at epoch ends towards B_simple,
        up to this size (turns on ``measure_noise_scale``).
      adaptive_factor: the batch grows by whole powers of this factor.
      adaptive_learning_rate_rule: how the learning rate follows a grown batch
        (``"linear"``, ``"sqrt"``, ``"keep"``; see `noise.scaled_learning_rate_for_batch`).
      adaptive_min_steps: steps the estimator must have seen before a decision.
      in_graph_data_max_bytes: training arrays up to this size are copied once to every
        replica's device and each step's batch is gathered inside the compiled loop
        (`device_data.DeviceArrays`, the same batches as the `tf.data` path, without its
        per-step cost); larger ones, datasets and ``dataset_fn``s use `tf.data`. 0: always
        `tf.data`. Each replica holds a copy: lower it when device memory is short.
      async_checkpoints: write checkpoints in a background thread from a copy of the
        variables (TensorFlow's asynchronous checkpointing), so that the next steps do not
        wait for the file writes; the run waits for the last write before it returns. None
        (default): on when the replicas are GPUs or TPUs (the host is idle while they
        compute), off on CPU-only replicas, where the writer thread competes with the
        training for the same cores (measured in BUILD_NOTES.md).
    """

    model_dir: str
    seed: int = 0
    max_per_replica_batch_size: int | None = None
    steps_per_execution: int = 1
    checkpoint_every_steps: int = 0
    checkpoint_interval_seconds: float = 60.0
    max_checkpoints_to_keep: int = 2
    eval_batch_size: int = 512
    eval_every_epochs: int = 1
    verbose: int = 1
    jit_compile: bool = False
    mixed_precision: str | None = None
    save_model: bool = True
    measure_noise_scale: bool = False
    noise_scale_beta: float = 0.99
    adaptive_max_global_batch_size: int | None = None
    adaptive_factor: int = 2
    adaptive_learning_rate_rule: str = "linear"
    adaptive_min_steps: int = 20
    in_graph_data_max_bytes: int = 256 * 2**20
    async_checkpoints: bool | None = None

    def __post_init__(self) -> None:
        if not self.model_dir:
            raise ValueError(f"Argument `model_dir` must be a path. Received: {self.model_dir!r}")
        if self.max_per_replica_batch_size is not None:
            check_positive_int("max_per_replica_batch_size", self.max_per_replica_batch_size)
        check_positive_int("steps_per_execution", self.steps_per_execution)
        check_non_negative_int("checkpoint_every_steps", self.checkpoint_every_steps)
        check_non_negative("checkpoint_interval_seconds", self.checkpoint_interval_seconds)
        check_positive_int("max_checkpoints_to_keep", self.max_checkpoints_to_keep)
        check_positive_int("eval_batch_size", self.eval_batch_size)
        check_positive_int("eval_every_epochs", self.eval_every_epochs)
        check_non_negative_int("in_graph_data_max_bytes", self.in_graph_data_max_bytes)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_momentum("noise_scale_beta", self.noise_scale_beta)
        if self.adaptive_max_global_batch_size is not None:
            check_positive_int(
                "adaptive_max_global_batch_size", self.adaptive_max_global_batch_size
            )
        check_choice(
            "adaptive_learning_rate_rule",
            self.adaptive_learning_rate_rule,
            LR_RULES_FOR_BATCH_GROWTH,
        )
        if self.adaptive_factor < 2:
            raise ValueError(
                f"Argument `adaptive_factor` must be >= 2. Received: {self.adaptive_factor=}"
            )

    @property
    def adaptive(self) -> bool:
        return self.adaptive_max_global_batch_size is not None


def micro_batches(per_replica_batch_size: int, max_per_replica_batch_size: int | None) -> int:
    """Fewest micro-batches k with k | b and b/k ≤ the maximum (1 when there is no maximum)."""
    if not max_per_replica_batch_size or per_replica_batch_size <= max_per_replica_batch_size:
        return 1
    k = math.ceil(per_replica_batch_size / max_per_replica_batch_size)
    while per_replica_batch_size % k:
        k += 1
    return k
