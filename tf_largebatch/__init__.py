"""tf_largebatch: accurate, fast large-batch data-parallel training for TensorFlow/Keras.

The pure-Python planning layer (scaling rules, batch-size phases) is imported eagerly and needs no
TensorFlow; everything that needs TensorFlow is imported on first use, so
``import tf_largebatch`` stays fast and TensorFlow-free until a Keras object is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

from tf_largebatch.phases import Phase, PhasePlan, plan_phases
from tf_largebatch.scaling import SCALING_RULES, noise_scale, scale_learning_rate

__version__ = "0.1.0"

# Public name -> module that defines it (imported lazily: these modules import TensorFlow).
_LAZY = {
    "LinearWarmup": "schedules",
    "ConstantWarmup": "schedules",
    "goyal_schedule": "schedules",
    "SGD": "optimizers",
    "LARS": "optimizers",
    "Lamb": "optimizers",
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
    "SCALING_RULES",
    "Phase",
    "PhasePlan",
    "noise_scale",
    "plan_phases",
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
