"""Goyal et al.'s ImageNet ResNet-50 recipe: `ImageNetConfig` defaults and `run_imagenet`.

ResNet-50 v1 with zero-γ, He init and FC N(0, 0.01²); weight decay 1e-4 on kernels only;
momentum 0.9; 0.1 per 256 examples scaled linearly; 5-epoch gradual warmup; ÷10 at 30, 60 and
80 of 90 epochs; 32 images per replica — streamed from TFDS by `imagenet.TFDSImageSource`.
``mode`` switches to Smith et al.'s batch growth.

References:
  Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", §2–§5.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from tf_largebatch._validation import (
    check_choice,
    check_non_negative,
    check_positive,
    check_positive_int,
)
from tf_largebatch.imagenet import TFDSImageSource
from tf_largebatch.phases import MODES, WARMUPS


@dataclasses.dataclass(frozen=True)
class ImageNetConfig:
    """Goyal et al.'s ImageNet ResNet-50 recipe; field names are the binary's flag names.

    Attributes:
      data_dir: TFDS data directory with ``imagenet2012`` prepared.
      dataset: TFDS name.
      model: a `models.build_model` name (``resnet50``: zero-γ, He init, FC N(0, 0.01²)).
      image_size: crop side (224).
      mode: ``decay_lr`` (Goyal), ``grow_batch`` or ``hybrid`` (Smith et al. 2018).
      epochs: total epochs (90).
      decay_epochs: learning-rate ÷10 (or batch ×10) epochs (30, 60, 80).
      decay_factor: learning-rate multiplier at each decay epoch (0.1).
      base_learning_rate: learning rate per ``base_batch_size`` examples (0.1 per 256).
      base_batch_size: reference batch (256).
      per_replica_batch_size: n (32); the global batch is n × replicas ...
      global_batch_size: ... unless this is given.
      max_global_batch_size: largest batch of ``hybrid`` / ``grow_batch``.
      warmup: ``gradual`` (Goyal §2.2), ``constant`` or ``none``.
      warmup_epochs: 5.
      momentum: 0.9.
      momentum_correction: Goyal's momentum correction when the learning rate changes.
      weight_decay: λ = 1e-4 on conv/dense kernels, not on BatchNorm γ/β (the model does it).
      strategy: ``auto``, ``one_device``, ``mirrored`` or ``multi_worker``.
      all_reduce: ``auto``, ``ring`` or ``nccl``.
      num_cpu_devices: split the CPU into logical devices (tests, no GPU).
      mixed_precision: None, ``mixed_float16`` (with loss scaling) or ``mixed_bfloat16``.
      jit_compile: XLA-compile the forward/backward pass.
      model_dir: outputs and checkpoints; rerun to resume.
      seed: initialisation, shuffling and augmentation seed.
      max_per_replica_batch_size: gradient accumulation beyond this per-replica batch.
      steps_per_execution: training steps per compiled call.
      checkpoint_every_steps: extra checkpoints inside an epoch (0: epoch ends only).
      checkpoint_interval_seconds: epoch-end checkpoints at most this often (0: every epoch
        end; see `TrainerConfig`).
      eval_batch_size: evaluation batch (each worker evaluates the whole validation split).
      eval_every_epochs: evaluate every this many epochs (and after the last).
      shuffle_buffer_size: per-pipeline shuffle buffer, in examples.
      verbose: progress bar (1) or quiet (0).
    """

    data_dir: str | None = None
    dataset: str = "imagenet2012"
    model: str = "resnet50"
    image_size: int = 224
    mode: str = "decay_lr"
    epochs: int = 90
    decay_epochs: Sequence[int] = (30, 60, 80)
    decay_factor: float = 0.1
    base_learning_rate: float = 0.1
    base_batch_size: int = 256
    per_replica_batch_size: int = 32
    global_batch_size: int | None = None
    max_global_batch_size: int | None = None
    warmup: str = "gradual"
    warmup_epochs: float = 5
    momentum: float = 0.9
    momentum_correction: bool = True
    weight_decay: float = 1e-4
    strategy: str = "auto"
    all_reduce: str = "auto"
    num_cpu_devices: int | None = None
    mixed_precision: str | None = None
    jit_compile: bool = False
    model_dir: str = "/tmp/tf_largebatch_imagenet"
    seed: int = 0
    max_per_replica_batch_size: int | None = None
    steps_per_execution: int = 1
    checkpoint_every_steps: int = 0
    checkpoint_interval_seconds: float = 60.0
    eval_batch_size: int = 256
    eval_every_epochs: int = 1
    shuffle_buffer_size: int = 10_000
    verbose: int = 1

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_choice("warmup", self.warmup, WARMUPS)
        check_positive_int("image_size", self.image_size)
        check_positive_int("per_replica_batch_size", self.per_replica_batch_size)
        if self.global_batch_size is not None:
            check_positive_int("global_batch_size", self.global_batch_size)
        check_positive("base_learning_rate", self.base_learning_rate)
        check_non_negative("weight_decay", self.weight_decay)
        check_positive_int("eval_batch_size", self.eval_batch_size)


def make_imagenet_plan(config: ImageNetConfig, dataset_size: int, num_replicas: int) -> Any:
    """The `PhasePlan` of `config` for `dataset_size` examples on `num_replicas` replicas.

    The global batch is ``config.global_batch_size`` or per_replica_batch_size × replicas, and
    the learning rate ``base_learning_rate`` × global batch / ``base_batch_size``.

    Example:
      >>> plan = make_imagenet_plan(ImageNetConfig(), 1_281_167, num_replicas=256)
      >>> plan.phases[0].global_batch_size, plan.phases[0].learning_rate  # Goyal's kn = 8k
      (8192, 3.2)
    """
    from tf_largebatch.phases import plan_phases

    check_positive_int("num_replicas", num_replicas)
    same = ("epochs", "base_learning_rate", "base_batch_size", "decay_factor", "warmup")
    same += ("max_global_batch_size", "warmup_epochs", "momentum")  # same names as plan_phases
    return plan_phases(
        config.mode,
        dataset_size=dataset_size,
        global_batch_size=config.global_batch_size or config.per_replica_batch_size * num_replicas,
        decay_epochs=tuple(config.decay_epochs),
        **{name: getattr(config, name) for name in same},
    )


def run_imagenet(
    config: ImageNetConfig,
    *,
    strategy: tf.distribute.Strategy | None = None,
    on_plan: Callable[[Any, tf.distribute.Strategy], None] | None = None,
) -> dict[str, Any]:
    """Trains with the recipe of `config`: strategy → data → plan → model → `Trainer`.

    Args:
      config: the run.
      strategy: use this strategy instead of ``make_strategy(config.strategy, ...)``.
      on_plan: called as ``on_plan(plan, strategy)`` once the plan is made.

    Returns:
      The `Trainer` results (also in ``model_dir/results.json``) plus ``config``,
      ``dataset`` and ``model``.

    Raises:
      ValueError: naming a bad argument (for example a `data_dir` without the data set).

    References:
      Goyal et al. 2017, §2.1 (linear scaling), §2.2 (gradual warmup), §5.1 (recipe).
    """
    from tf_largebatch import distribute, models, optimizers, training

    if strategy is None:  # first: MultiWorkerMirroredStrategy must precede other TF work
        strategy = distribute.make_strategy(
            config.strategy, num_cpu_devices=config.num_cpu_devices, all_reduce=config.all_reduce
        )
    size, buffer = config.image_size, config.shuffle_buffer_size
    source = TFDSImageSource(config.dataset, config.data_dir, size, shuffle_buffer_size=buffer)
    plan = make_imagenet_plan(config, source.num_examples, strategy.num_replicas_in_sync)
    if on_plan is not None:
        on_plan(plan, strategy)

    def model_fn() -> Any:
        shape, classes, decay = source.input_shape, source.num_classes, config.weight_decay
        return models.build_model(
            config.model, shape, classes, weight_decay=decay, seed=config.seed
        )

    def optimizer_fn(learning_rate: Any) -> Any:
        momentum, correction = plan.phases[0].momentum, config.momentum_correction
        return optimizers.SGD(learning_rate, momentum=momentum, momentum_correction=correction)

    shared = {f.name for f in dataclasses.fields(training.TrainerConfig)}  # same-named fields
    trainer_config = training.TrainerConfig(
        **{k: v for k, v in dataclasses.asdict(config).items() if k in shared}
    )
    trainer = training.Trainer(
        model_fn, plan, trainer_config, optimizer_fn=optimizer_fn, strategy=strategy
    )
    trainer.fit(source, validation_data=source.make_eval_dataset(config.eval_batch_size))
    results = trainer.results
    results.update(dataset=config.dataset, model=config.model, config=dataclasses.asdict(config))
    trainer.state.write("results.json", results)  # chief only
    return results
