"""Scaling rules and Smith's noise scale against their formulas."""

import math
import os
import subprocess
import sys

import pytest

from tf_largebatch import noise_scale, scale_learning_rate


@pytest.mark.parametrize(
    "batch, rule, expected",
    [
        (256, "linear", 0.1),
        (8192, "linear", 3.2),  # Goyal: k = 32
        (128, "linear", 0.05),
        (1024, "sqrt", 0.2),  # √4 = 2
        (8192, "sqrt", 0.1 * math.sqrt(32)),
        (8192, "none", 0.1),
    ],
)
def test_scale_learning_rate(batch, rule, expected):
    assert scale_learning_rate(0.1, batch, 256, rule) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"base_learning_rate": -0.1}, "base_learning_rate"),
        ({"base_learning_rate": 0.0}, "base_learning_rate"),
        ({"global_batch_size": 0}, "global_batch_size"),
        ({"global_batch_size": -8}, "global_batch_size"),
        ({"base_batch_size": 0}, "base_batch_size"),
        ({"rule": "quadratic"}, "rule"),
    ],
)
def test_scale_learning_rate_rejects_bad_input(kwargs, name):
    args = {"base_learning_rate": 0.1, "global_batch_size": 512, **kwargs}
    with pytest.raises(ValueError, match=f"`{name}`.*Received: {name}="):
        scale_learning_rate(**args)


def test_noise_scale_exact_formula():
    # g = ε(N/B − 1)/(1 − m)
    assert noise_scale(0.1, 50_000, 128, 0.9) == pytest.approx(0.1 * (50_000 / 128 - 1) / 0.1)
    assert noise_scale(0.5, 50_000, 3200, 0.98) == pytest.approx(0.5 * (50_000 / 3200 - 1) / 0.02)
    assert noise_scale(0.1, 1000, 10) == pytest.approx(9.9)


def test_momentum_scaling_keeps_smith_quantity():
    # Smith §5.4: ε=0.1, B=128, m=0.9 and ε=0.5, B=3200, m=0.98 share ε/(B(1 − m)).
    assert pytest.approx(0.5 / (3200 * (1 - 0.98))) == 0.1 / (128 * (1 - 0.9))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"global_batch_size": 60_000}, "global_batch_size"),
        ({"learning_rate": 0}, "learning_rate"),
    ],
)
def test_noise_scale_rejects_bad_input(kwargs, name):
    args = {"learning_rate": 0.1, "dataset_size": 50_000, "global_batch_size": 128, **kwargs}
    with pytest.raises(ValueError, match=f"`{name}`"):
        noise_scale(**args)


PURE_MODULES = (  # layer 1: no TensorFlow, no Keras
    "_validation", "scaling", "phases", "rampup", "plan_growth", "trainer_config", "goodput",
    "goodput_allreduce", "goodput_throughput", "goodput_efficiency", "goodput_search",
    "goodput_goyal", "goodput_local",
)  # fmt: skip

_PURE_LOADER = """
import importlib.util, pathlib, sys, types
sys.modules["tensorflow"] = None  # any `import tensorflow` / `import keras` now fails
sys.modules["keras"] = None
package_dir = pathlib.Path(sys.argv[1])
stub = types.ModuleType("tf_largebatch")  # the real __init__ imports Keras objects
stub.__path__ = [str(package_dir)]
sys.modules["tf_largebatch"] = stub
for name in sys.argv[2:]:
    spec = importlib.util.spec_from_file_location(
        f"tf_largebatch.{name}", package_dir / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
plan = sys.modules["tf_largebatch.phases"].plan_phases(
    "grow_batch", 1000, 10, 10, 0.1, decay_epochs=(5,))
print(len(plan.phases), sorted(m for m in sys.modules if m.startswith("tf_largebatch.")))
"""


def test_planning_layer_imports_no_tensorflow():
    """The pure modules load and plan with `tensorflow` and `keras` made unimportable."""
    import tf_largebatch

    package_dir = os.path.dirname(tf_largebatch.__file__)
    result = subprocess.run(
        [sys.executable, "-c", _PURE_LOADER, package_dir, *PURE_MODULES],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    expected = sorted(f"tf_largebatch.{name}" for name in PURE_MODULES)
    assert result.stdout.strip() == f"2 {expected}"


def test_pure_module_check_fails_on_a_tensorflow_import(tmp_path):
    """The check above can fail: a module that imports TensorFlow does not load."""
    (tmp_path / "bad.py").write_text("import tensorflow\n")
    result = subprocess.run(
        [sys.executable, "-c", _PURE_LOADER.split("plan =")[0], str(tmp_path), "bad"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "ModuleNotFoundError: import of tensorflow halted; None in sys.modules" in result.stderr
