"""The `model.fit` path (schedules, `SGD`, `LARS`, `fit_phases`) on every installed Keras backend.

Each backend runs in a subprocess with ``KERAS_BACKEND`` set before ``import keras`` (a Keras
process has one backend). TensorFlow may be imported there too (``tf_largebatch`` allows it), but
Keras must compute with the chosen backend. The `Trainer` stays on TensorFlow's `tf.distribute`.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

BACKENDS = ("jax", "torch")

WORKER = textwrap.dedent(
    """
    import json, sys
    import keras  # first, with KERAS_BACKEND set by the parent
    import numpy as np

    import tf_largebatch as lb
    from tf_largebatch.fitting import fit_phases
    from tf_largebatch.optimizers import LARS, SGD
    from tf_largebatch.phases import plan_phases
    from tf_largebatch.schedules import goyal_schedule

    out = {"backend": keras.backend.backend()}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")
    steps = [0, 3, 4, 5, 11, 12, 13, 19]

    def model_fn():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
        )

    def schedule(lr):  # 4 steps/epoch: warmup to step 4, decay at step 12
        return goyal_schedule(lr, 128, 4, base_batch_size=64, warmup_epochs=1, decay_epochs=(3,))

    for name, opt in [
        ("sgd", SGD(schedule(0.02), momentum=0.9)),
        ("lars", LARS(schedule(0.2), momentum=0.5, trust_coefficient=0.1)),
    ]:
        model = model_fn()
        model.compile(optimizer=opt, loss="mse")
        history = model.fit(x, y, batch_size=64, epochs=5, shuffle=False, verbose=0)
        path = f"{sys.argv[1]}/{name}.keras"
        model.save(path)
        loaded = keras.models.load_model(path)
        lr = loaded.optimizer.get_config()["learning_rate"]
        clone = keras.saving.deserialize_keras_object(lr)
        out[name] = {
            "loss": history.history["loss"],
            "iterations": int(keras.ops.convert_to_numpy(loaded.optimizer.iterations)),
            "optimizer": type(loaded.optimizer).__name__,
            "schedule": [float(keras.ops.convert_to_numpy(clone(s))) for s in steps],
            "same_weights": all(
                np.array_equal(a, b) for a, b in zip(model.get_weights(), loaded.get_weights())
            ),
        }

    plan = plan_phases("grow_batch", 256, 4, 32, 0.05, base_batch_size=32,
                       decay_epochs=(2,), decay_factor=0.5)

    def make_dataset(global_batch_size):
        def batches():
            while True:
                for i in range(0, 256 - global_batch_size + 1, global_batch_size):
                    yield x[i : i + global_batch_size], y[i : i + global_batch_size]
        return batches()

    model = model_fn()
    model.compile(optimizer=SGD(0.05, momentum=0.9), loss="mse")
    history = fit_phases(model, make_dataset, plan, verbose=0)
    out["fit_phases"] = {
        "loss": history.history["loss"],
        "global_batch_size": history.history["global_batch_size"],
        "learning_rate": history.history["learning_rate"],
        "iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "total_steps": plan.total_steps,
        "momentum": float(keras.ops.convert_to_numpy(model.optimizer.momentum)),
    }
    print("RESULT " + json.dumps(out))
    """
)


def goyal_reference(step, lr, k=2.0, spe=4, warmup_epochs=1, decay_epoch=3):
    """Goyal §2.1–2.2 with these test sizes: ramp from η to kη, ×0.1 at the decay epoch."""
    w = warmup_epochs * spe
    if step < w:
        return lr + (k * lr - lr) * step / w
    return k * lr * (0.1 if step >= decay_epoch * spe else 1.0)


def run_backend(backend, tmp_path):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_fit_path_on_backend(backend, tmp_path):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    out = run_backend(backend, tmp_path)
    assert out["backend"] == backend
    steps = [0, 3, 4, 5, 11, 12, 13, 19]
    for name, lr in (("sgd", 0.02), ("lars", 0.2)):
        result = out[name]
        assert result["loss"][-1] < 0.5 * result["loss"][0], (name, result["loss"])
        assert result["iterations"] == 20 and result["same_weights"]
        assert result["optimizer"] == name.upper()
        want = [goyal_reference(s, lr) for s in steps]
        np.testing.assert_allclose(result["schedule"], want, rtol=1e-6)
    fit = out["fit_phases"]
    assert fit["iterations"] == fit["total_steps"] == 8 * 2 + 4 * 2
    assert fit["global_batch_size"] == [32, 32, 64, 64]
    assert fit["learning_rate"] == pytest.approx([0.05] * 4)
    assert fit["momentum"] == pytest.approx(0.9)
    assert fit["loss"][-1] < fit["loss"][0]
