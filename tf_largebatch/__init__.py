"""tf_largebatch: accurate, fast large-batch data-parallel training for TensorFlow/Keras.

``import tf_largebatch`` imports the planning layer (scaling rules, batch-size phases, pure
Python) and the Keras objects (`schedules`, `optimizers`) eagerly: importing them registers
every Keras-serializable class of the package, so ``keras.models.load_model(path)`` of a model
compiled with ``lb.SGD``, ``lb.LARS`` or a warmup schedule works after a plain
``import tf_largebatch``. Everything else (data, models, distribution, training) is imported on
first use (PEP 562 ``__getattr__``). The planning modules themselves (`scaling`, `phases`,
`_validation`) still import no TensorFlow and can be used without it.
"""

from __future__ import annotations

import importlib
from typing import Any

# `optimizers` and `schedules` are eager: importing them registers their Keras classes.
from tf_largebatch.optimizers import LARS, SGD, Lamb
from tf_largebatch.phases import Phase, PhasePlan, plan_phases
from tf_largebatch.scaling import SCALING_RULES, noise_scale, scale_learning_rate
from tf_largebatch.schedules import ConstantWarmup, LinearWarmup, goyal_schedule

__version__ = "0.1.0"

# Public name -> module that defines it (imported on first use).
_LAZY = {
    "fit_phases": "fitting",
    "ArrayData": "data",
    "ArraySource": "data",
    "load_data": "data",
    "make_dataset": "data",
    "make_dataset_fn": "data",
    "make_eval_dataset": "data",
    "build_model": "models",
    "resolve_model_name": "models",
    "make_strategy": "distribute",
    "configure_cpu_devices": "distribute",
    "build_tf_config": "distribute",
    "tf_config_json": "distribute",
    "validate_tf_config": "distribute",
    "is_chief": "distribute",
    "worker_info": "distribute",
    "slurm_cluster_resolver": "distribute",
    "tf_config_from_slurm": "distribute",
    "Preempted": "controller",
    "Trainer": "training",
    "TrainerConfig": "training",
    "NoiseScaleEstimator": "noise",
    "gradient_noise_components": "noise",
    "suggest_global_batch_size": "noise",
    "grow_plan": "noise",
    "TFDSImageSource": "imagenet",
    "ImageNetConfig": "imagenet_recipe",
    "run_imagenet": "imagenet_recipe",
    "ExperimentConfig": "experiment",
    "run_experiment": "experiment",
}

__all__ = [
    "LARS",
    "SGD",
    "ConstantWarmup",
    "Lamb",
    "LinearWarmup",
    "SCALING_RULES",
    "Phase",
    "PhasePlan",
    "noise_scale",
    "plan_phases",
    "goyal_schedule",
    "scale_learning_rate",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"tf_largebatch.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'tf_largebatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
