"""One training run from a flat config: data → plan → strategy → `Trainer` → results.

This is what the example binaries call after turning their flags into an `ExperimentConfig`;
it holds the wiring, never reads flags and never prints (the binaries print).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from tf_largebatch._validation import check_choice
from tf_largebatch.phases import MODES, WARMUPS, PhasePlan, plan_phases
from tf_largebatch.scaling import suggested_scaling_rule

_log = logging.getLogger(__name__)
OPTIMIZERS = ("sgd", "lars", "adam", "adamw", "lamb")
EXPERIMENT_MODES = (*MODES, "rampup", "adaptive")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one run needs; field names are the `examples/train.py` flag names.

    Attributes:
      dataset: ``digits`` (offline default), a TFDS name, or ``npz:PATH``.
      data_dir: TFDS data directory.
      model: ``auto``, ``mlp``, ``cnn``, ``resnet20``, ``resnet50``.
      mode: ``decay_lr``, ``grow_batch``, ``hybrid``, ``rampup`` (Megatron's batch ramp-up
        over ``rampup_batch_size``, phases inside an epoch) or ``adaptive`` (the ``decay_lr`` recipe
        whose batch grows at epoch ends towards the measured gradient noise scale, up to
        ``max_global_batch_size``, the learning rate following by ``adaptive_learning_rate_rule``).
      epochs: total epochs.
      decay_epochs: epochs where the recipe decays the learning rate (or grows the batch).
      decay_factor: learning-rate multiplier at each decay epoch (batch grows by its inverse).
      base_learning_rate: learning rate per ``base_batch_size`` examples.
      base_batch_size: reference batch of ``base_learning_rate``.
      global_batch_size: initial global batch (all replicas).
      max_global_batch_size: cap for ``hybrid`` and ``adaptive``.
      scaling_rule: ``linear``, ``sqrt``, ``none`` or ``auto`` (``sqrt`` for Adam, AdamW and
        LAMB, ``linear`` for SGD and LARS: `scaling.suggested_scaling_rule`).
      rampup_batch_size: ``(start, increment, ramp_samples)`` for ``mode=rampup``.
      warmup: ``gradual``, ``constant`` or ``none``.
      warmup_epochs: warmup length in epochs.
      optimizer: ``sgd`` (with momentum correction), ``lars``, ``adam``, ``adamw`` (decoupled
        ``weight_decay``) or ``lamb`` (Keras's, with ``weight_decay``).
      momentum: momentum coefficient.
      momentum_correction: Goyal's momentum correction in SGD.
      weight_decay: L2 weight decay on kernels (added to the loss, not rescaled).
      strategy: ``auto``, ``one_device``, ``mirrored``, ``multi_worker``.
      num_cpu_devices: split the CPU into this many logical devices (None: leave as is).
      all_reduce: ``auto``, ``ring`` or ``nccl``.
      model_dir: output and checkpoint directory.
      seed: initialisation and shuffling seed.
      max_per_replica_batch_size: gradient accumulation beyond this per-replica batch.
      steps_per_execution: training steps per compiled call (fewer host round trips; the
        progress bar and checkpoints still land on exact steps).
      checkpoint_every_steps: extra checkpoints inside an epoch (0: per epoch only).
      checkpoint_interval_seconds: epoch-end checkpoints at most this often (0: every epoch
        end; see `TrainerConfig`).
      scaled_momentum: Smith's momentum scaling target (None: off).
      jit_compile: XLA-compile the forward/backward pass.
      mixed_precision: ``None``, ``mixed_float16`` or ``mixed_bfloat16``.
      measure_noise_scale: estimate the gradient noise scale every step.
      adaptive_factor: batch growth factor of ``mode=adaptive``.
      adaptive_learning_rate_rule: ``linear``, ``sqrt`` or ``keep`` for a grown batch.
      save_model: write ``model_dir/model.keras`` at the end.
      eval_every_epochs: evaluate on the test split every this many epochs (and the last).
      verbose: progress bar on (1) or off (0).
      measure_sharpness: measure the final model's sharpness on the training set
        (`sharpness.sharpness`) into ``results["sharpness"]``.
      sharpness_max_examples: examples the sharpness measurement uses (None: all).
      sharpness_perturbation_size: relative size ‖δ‖/‖w‖ of the random weight perturbations
        of the sharpness measurement (``perturbed_loss_increase``).
      sharpness_num_perturbations: random perturbations averaged.
      plan_path: a JSON `PhasePlan` to train instead of the one made from the recipe flags:
        ``PhasePlan.to_dict()`` (``plan.json``'s ``current``), or the report of
        ``examples/plan_cluster.py --output`` (its ``recommendation.plan``). The data set must
        have the plan's ``dataset_size`` examples.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "auto"
    mode: str = "grow_batch"
    epochs: int = 30
    decay_epochs: Sequence[int] = (10, 20)
    decay_factor: float = 0.5
    base_learning_rate: float = 0.1
    base_batch_size: int = 32
    global_batch_size: int = 64
    max_global_batch_size: int | None = None
    scaling_rule: str = "linear"
    warmup: str = "gradual"
    warmup_epochs: float = 2
    optimizer: str = "sgd"
    momentum: float = 0.9
    momentum_correction: bool = True
    weight_decay: float = 0.0
    strategy: str = "auto"
    num_cpu_devices: int | None = None
    all_reduce: str = "auto"
    model_dir: str = "/tmp/tf_largebatch"
    seed: int = 0
    max_per_replica_batch_size: int | None = None
    steps_per_execution: int = 8
    checkpoint_every_steps: int = 0
    checkpoint_interval_seconds: float = 60.0
    scaled_momentum: float | None = None
    jit_compile: bool = False
    mixed_precision: str | None = None
    measure_noise_scale: bool = False
    adaptive_factor: int = 2
    adaptive_learning_rate_rule: str = "linear"
    save_model: bool = True
    eval_every_epochs: int = 1
    verbose: int = 1
    rampup_batch_size: Sequence[int] | None = None
    measure_sharpness: bool = False
    sharpness_max_examples: int | None = None
    sharpness_perturbation_size: float = 1e-3
    sharpness_num_perturbations: int = 5
    plan_path: str | None = None

    def __post_init__(self) -> None:
        if self.dataset == "text" or self.dataset.startswith("text:"):
            raise ValueError(
                "Argument `dataset`: the byte-level language model trains with "
                "examples/train_text.py (or examples/reproduce_goyal.py / reproduce_smith.py "
                f"--dataset=text for its studies). Received: dataset={self.dataset!r}"
            )
        check_choice("mode", self.mode, EXPERIMENT_MODES)
        if self.mode == "adaptive" and self.max_global_batch_size is None:
            raise ValueError("Argument `max_global_batch_size` is required for mode='adaptive'.")
        check_choice("warmup", self.warmup, WARMUPS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.mode == "rampup" and self.rampup_batch_size is None:
            raise ValueError("Argument `rampup_batch_size` is required for mode='rampup'.")

    @property
    def resolved_scaling_rule(self) -> str:
        """``scaling_rule``, with ``auto`` resolved for the optimizer."""
        if self.scaling_rule == "auto":
            return suggested_scaling_rule(self.optimizer)
        return self.scaling_rule


def read_plan(path: str) -> PhasePlan:
    """A `PhasePlan` from JSON: ``PhasePlan.to_dict()``, ``plan.json`` (its ``current``) or a
    ``plan_cluster.py`` report (its ``recommendation.plan``).

    Raises:
      ValueError: the file holds none of these.
    """
    import json

    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        why = error.strerror if isinstance(error, OSError) else error
        raise ValueError(
            f"Argument `plan_path` must name a readable JSON file. Received: plan_path={path!r} "
            f"({why})"
        ) from error
    for key in ("recommendation", "current"):
        if isinstance(value, dict) and key in value:
            value = value[key]
    if isinstance(value, dict) and "plan" in value and "phases" not in value:
        value = value["plan"]
    if not isinstance(value, dict) or "phases" not in value:
        raise ValueError(
            f"Argument `plan_path` must name a JSON PhasePlan (PhasePlan.to_dict(), plan.json "
            f"or a plan_cluster.py report). Received: plan_path={path!r} without 'phases'"
        )
    try:
        return PhasePlan.from_dict(value)
    except (KeyError, TypeError) as error:
        raise ValueError(
            f"Argument `plan_path`: {path!r} is not a valid PhasePlan ({error!r})"
        ) from error


def make_plan(config: ExperimentConfig, dataset_size: int) -> PhasePlan:
    """The `PhasePlan` of a config for a data set of `dataset_size` examples.

    Raises:
      ValueError: ``plan_path``'s plan is for another data set size.
    """
    if config.plan_path is not None:
        plan = read_plan(config.plan_path)
        if plan.dataset_size != dataset_size:
            raise ValueError(
                f"Argument `plan_path`: the plan in {config.plan_path!r} is for dataset_size="
                f"{plan.dataset_size}, but the data set has {dataset_size} training examples."
            )
        return plan
    plan = plan_phases(
        "decay_lr" if config.mode == "adaptive" else config.mode,
        dataset_size=dataset_size,
        epochs=config.epochs,
        global_batch_size=config.global_batch_size,
        base_learning_rate=config.base_learning_rate,
        base_batch_size=config.base_batch_size,
        decay_epochs=tuple(config.decay_epochs),
        decay_factor=config.decay_factor,
        max_global_batch_size=None if config.mode == "adaptive" else config.max_global_batch_size,
        warmup_epochs=config.warmup_epochs,
        warmup=config.warmup,
        momentum=config.momentum,
        scaling_rule=config.resolved_scaling_rule,
        scaled_momentum=config.scaled_momentum,
        **(
            {"rampup_batch_size": tuple(config.rampup_batch_size)}
            if config.mode == "rampup"
            else {}
        ),
    )
    return dataclasses.replace(plan, mode="adaptive") if config.mode == "adaptive" else plan


def _optimizer_fn(config: ExperimentConfig, plan: PhasePlan) -> Any:
    import keras

    from tf_largebatch import optimizers

    momentum = plan.phases[0].momentum

    def make(learning_rate: Any) -> Any:
        if config.optimizer == "sgd":
            return optimizers.SGD(
                learning_rate, momentum=momentum, momentum_correction=config.momentum_correction
            )
        if config.optimizer == "lars":
            return optimizers.LARS(
                learning_rate, momentum=momentum, weight_decay=config.weight_decay
            )
        if config.optimizer == "adamw":
            return keras.optimizers.AdamW(learning_rate, weight_decay=config.weight_decay)
        if config.optimizer == "lamb":
            return optimizers.Lamb(learning_rate, weight_decay=config.weight_decay or None)
        return keras.optimizers.Adam(learning_rate)

    return make


def run_experiment(config: ExperimentConfig, *, on_plan: Any = None) -> dict[str, Any]:
    """Runs one training job and returns its results (also in ``model_dir/results.json``).

    Order matters for TensorFlow: logical CPU devices and the strategy are set up before any
    other TensorFlow work (MultiWorkerMirroredStrategy must be created first in a process).
    Every input is checked before anything is written to ``model_dir``.

    Args:
      config: the run.
      on_plan: optional callback ``on_plan(plan, strategy)`` called once the plan is made
        (the binaries print the phase table with it).

    Returns:
      The `Trainer` results plus ``config``, ``dataset``, ``model``.

    Raises:
      ValueError: any bad input, naming the argument (flag) and the value.
    """
    from tf_largebatch import data, distribute, models, training

    if config.num_cpu_devices is not None:
        distribute.configure_cpu_devices(config.num_cpu_devices)
    strategy = distribute.make_strategy(config.strategy, all_reduce=config.all_reduce)
    arrays = data.load_data(config.dataset, data_dir=config.data_dir)
    plan = make_plan(config, arrays.num_train_examples)
    if on_plan is not None:
        on_plan(plan, strategy)
    model_name = models.resolve_model_name(config.model, arrays.input_shape)
    # Goyal Remark 1: weight decay is an L2 term in the loss (SGD, Adam); LARS, AdamW and LAMB
    # apply it in their update (decoupled).
    l2 = config.weight_decay if config.optimizer in ("sgd", "adam") else 0.0

    def model_fn() -> Any:
        return models.build_model(
            model_name, arrays.input_shape, arrays.num_classes, weight_decay=l2, seed=config.seed
        )

    trainer = training.Trainer(
        model_fn,
        plan,
        training.TrainerConfig(
            model_dir=config.model_dir,
            seed=config.seed,
            max_per_replica_batch_size=config.max_per_replica_batch_size,
            steps_per_execution=config.steps_per_execution,
            checkpoint_every_steps=config.checkpoint_every_steps,
            checkpoint_interval_seconds=config.checkpoint_interval_seconds,
            verbose=config.verbose,
            jit_compile=config.jit_compile,
            mixed_precision=config.mixed_precision,
            measure_noise_scale=config.measure_noise_scale,
            adaptive_max_global_batch_size=(
                config.max_global_batch_size if config.mode == "adaptive" else None
            ),
            adaptive_factor=config.adaptive_factor,
            adaptive_learning_rate_rule=config.adaptive_learning_rate_rule,
            save_model=config.save_model,
            eval_every_epochs=config.eval_every_epochs,
        ),
        optimizer_fn=_optimizer_fn(config, plan),
        strategy=strategy,
    )
    trainer.fit(arrays.x_train, arrays.y_train, validation_data=(arrays.x_test, arrays.y_test))
    results = trainer.results
    results.update(dataset=arrays.name, model=model_name, config=dataclasses.asdict(config))
    if config.measure_sharpness:  # every worker takes part (it is distributed)
        from tf_largebatch.sharpness import sharpness

        results["sharpness"] = sharpness(
            trainer.model, arrays.x_train, arrays.y_train, strategy=strategy,
            seed=config.seed, max_examples=config.sharpness_max_examples,
            perturbation_size=config.sharpness_perturbation_size,
            num_perturbations=config.sharpness_num_perturbations,
        )  # fmt: skip
    trainer.state.write("results.json", results)
    return results
