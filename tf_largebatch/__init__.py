"""tf_largebatch: accurate, fast large-batch data-parallel training for TensorFlow/Keras.

``import tf_largebatch`` imports only the planning layer (scaling rules, batch-size phases: pure
Python, no TensorFlow), so the launcher and the planning tools start fast. Every
Keras-serializable class of the package (schedules, optimizers) is registered as soon as Keras
is imported — at once if it already is, else by an import hook that runs when ``keras`` is first
imported — so ``keras.models.load_model(path)`` of a model compiled with ``lb.SGD``,
``lb.LARS`` or a warmup schedule works after a plain ``import tf_largebatch``. Everything that
needs TensorFlow is imported on first use (PEP 562 ``__getattr__``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

from tf_largebatch.phases import (
    STEP_MODES,
    Phase,
    PhasePlan,
    Segment,
    plan_from_examples,
    plan_phases,
)
from tf_largebatch.scaling import (
    SCALING_RULES,
    noise_scale,
    scale_learning_rate,
    suggested_scaling_rule,
)

__version__ = "0.1.0"

# Public name -> module that defines it (imported on first use).
_LAZY = {
    "SGD": "optimizers",
    "LARS": "optimizers",
    "Lamb": "optimizers",
    "LinearWarmup": "schedules",
    "ConstantWarmup": "schedules",
    "InverseSqrtDecay": "schedules",
    "WarmupStableDecay": "schedules",
    "goyal_schedule": "schedules",
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
    "NonFiniteLossError": "controller",
    "Controller": "controller",
    "AdaptiveBatchSize": "callbacks",
    "as_source": "inputs",
    "ArraysSource": "inputs",
    "DatasetSource": "inputs",
    "DatasetFnSource": "inputs",
    "Trainer": "training",
    "TrainerConfig": "training",
    "TrainStep": "steps",
    "EvalStep": "steps",
    "sharpness": "sharpness",
    "load_text": "text",
    "text_datasets": "text",
    "build_text_model": "text",
    "unigram_bits_per_byte": "text",
    "bits_per_byte": "text",
    "TextExperimentConfig": "text",
    "run_text_experiment": "text",
    "Cluster": "goodput",
    "Link": "goodput",
    "INTERCONNECTS": "goodput",
    "StepTimeModel": "goodput",
    "fit_step_time": "goodput",
    "allreduce_seconds": "goodput",
    "overlap_fraction": "goodput",
    "step_seconds": "goodput",
    "statistical_efficiency": "goodput",
    "grid_search": "goodput",
    "recommendation_plan": "goodput",
    "goyal_scaling_efficiency": "goodput",
    "time_train_step": "goodput_measure",
    "measure_local": "goodput_measure",
    "fit_local": "goodput_measure",
    "NoiseScaleEstimator": "noise",
    "gradient_noise_components": "noise",
    "suggest_global_batch_size": "noise",
    "grow_plan": "noise",
    "adapt_plan": "noise",
    "TFDSImageSource": "imagenet",
    "ImageNetConfig": "imagenet_recipe",
    "run_imagenet": "imagenet_recipe",
    "ExperimentConfig": "experiment",
    "run_experiment": "experiment",
}

__all__ = [
    "SCALING_RULES",
    "STEP_MODES",
    "Phase",
    "PhasePlan",
    "Segment",
    "noise_scale",
    "plan_from_examples",
    "plan_phases",
    "scale_learning_rate",
    "suggested_scaling_rule",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"tf_largebatch.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'tf_largebatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


_SERIALIZABLE_MODULES = ("tf_largebatch.schedules", "tf_largebatch.optimizers")


def _register_keras_classes() -> None:
    """Imports the modules whose import registers our Keras-serializable classes."""
    for name in _SERIALIZABLE_MODULES:
        importlib.import_module(name)


class _RegisterWhenKerasLoads(importlib.abc.MetaPathFinder):
    """Import hook: once ``keras`` has been imported, register our classes with it."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)  # one shot; let the other finders find Keras
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            _register_keras_classes()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if "keras" in sys.modules:
    _register_keras_classes()
elif not any(isinstance(f, _RegisterWhenKerasLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenKerasLoads())
