"""`import tf_largebatch` registers its Keras classes: `load_model` works in a fresh process.

Issue 11: with a lazy (PEP 562) import of the Keras-object modules, a fresh
``import keras, tf_largebatch; keras.models.load_model(p)`` failed with
``Could not locate class 'SGD'``. Both halves run in their own interpreter, so nothing the test
process imported can register the classes for them.
"""

import json
import subprocess
import sys

import pytest

STEPS = [0, 10, 19, 20, 29, 30, 45]

_SAVE = """
import json, sys
import keras
import tf_largebatch as lb

def tiny_model(optimizer):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=optimizer, loss="mse")
    return model

# Goyal: 0.1 per 256 at 1024 -> 0.4, gradual warmup from 0.1 over 2 epochs of 10 steps,
# decay by 0.1 after epoch 3.
goyal = lb.goyal_schedule(0.1, 1024, 10, warmup_epochs=2, decay_epochs=(3,))
optimizers = {
    "sgd_goyal": lb.SGD(goyal, momentum=0.9),
    "lars_linear_warmup": lb.LARS(
        lb.LinearWarmup(2.0, warmup_steps=20, initial_learning_rate=0.5), weight_decay=1e-4),
    "sgd_constant_warmup": lb.SGD(
        lb.ConstantWarmup(0.8, warmup_steps=20, warmup_learning_rate=0.2)),
}
for name, optimizer in optimizers.items():
    tiny_model(optimizer).save(f"{sys.argv[1]}/{name}.keras")
print(json.dumps(sorted(optimizers)))
"""

_LOAD = """
import json, sys
import keras
import tf_largebatch

values = {}
for name in json.loads(sys.argv[2]):
    model = keras.models.load_model(f"{sys.argv[1]}/{name}.keras")
    optimizer = model.optimizer
    schedule = optimizer._learning_rate
    values[name] = {
        "optimizer": type(optimizer).__module__ + "." + type(optimizer).__name__,
        "schedule": type(schedule).__name__,
        "lr": [float(schedule(step)) for step in json.loads(sys.argv[3])],
    }
print(json.dumps(values))
"""


def _run(code, *args):
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _goyal(step):
    if step < 20:
        return 0.1 + (0.4 - 0.1) * step / 20
    return 0.4 if step < 30 else 0.04


def _linear_warmup(step):
    return 0.5 + (2.0 - 0.5) * step / 20 if step < 20 else 2.0


@pytest.mark.slow
@pytest.mark.parametrize("order", ["keras_first", "tf_largebatch_first"])
def test_load_model_after_plain_import_in_fresh_process(tmp_path, order):
    names = _run(_SAVE, tmp_path)
    load = _LOAD
    if order == "tf_largebatch_first":  # registered by the import hook when keras loads
        load = load.replace(
            "import keras\nimport tf_largebatch\n", "import tf_largebatch\nimport keras\n"
        )
        assert load != _LOAD
    loaded = _run(load, tmp_path, json.dumps(names), json.dumps(STEPS))
    assert sorted(loaded) == ["lars_linear_warmup", "sgd_constant_warmup", "sgd_goyal"]
    assert loaded["sgd_goyal"]["optimizer"] == "tf_largebatch.optimizers.SGD"
    assert loaded["lars_linear_warmup"]["optimizer"] == "tf_largebatch.optimizers.LARS"
    assert loaded["lars_linear_warmup"]["schedule"] == "LinearWarmup"
    assert loaded["sgd_constant_warmup"]["schedule"] == "ConstantWarmup"
    assert loaded["sgd_goyal"]["lr"] == pytest.approx([_goyal(s) for s in STEPS], rel=1e-6)
    assert loaded["lars_linear_warmup"]["lr"] == pytest.approx(
        [_linear_warmup(s) for s in STEPS], rel=1e-6
    )
    assert loaded["sgd_constant_warmup"]["lr"] == pytest.approx(
        [0.2 if s < 20 else 0.8 for s in STEPS], rel=1e-6
    )


def test_plain_import_registers_the_keras_classes():
    """In-process check of the registry names `load_model` looks up."""
    import keras

    import tf_largebatch as lb

    for name in ("SGD", "LARS", "LinearWarmup", "ConstantWarmup"):
        assert keras.saving.get_registered_object(f"tf_largebatch>{name}") is getattr(lb, name)


def test_plain_import_loads_no_tensorflow():
    """The registration waits for Keras: `import tf_largebatch` alone stays TensorFlow-free."""
    code = "import sys, tf_largebatch; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["False", "False"], result.stderr[-2000:]
