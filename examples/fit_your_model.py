r"""Bring your own model: a compiled Keras model with dict inputs, trained like ``model.fit``.

  python examples/fit_your_model.py                             # 1 device, NumPy arrays
  python examples/fit_your_model.py --input=dataset             # an unbatched tf.data.Dataset
  python examples/fit_your_model.py --num_cpu_devices=2 --strategy=mirrored
  python -m tf_largebatch.launch --num_workers=2 -- examples/fit_your_model.py \
      --strategy=multi_worker --model_dir=/tmp/byo_mw

A regression with two named inputs and targets of shape (N, 1), compiled with
``loss="mse", metrics=["mae"]``, trained through a two-phase ``grow_batch`` plan with Keras's
EarlyStopping and CSVLogger. Prints the History's last values and the final weights' SHA-256
(equal on every worker, and equal for 1 or 2 replicas).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

import json

import numpy as np
from absl import app, flags

import tf_largebatch as lb

flags.DEFINE_enum("input", "arrays", ["arrays", "dataset"], "Training data as arrays or dataset.")
flags.DEFINE_enum("strategy", "auto", ["auto", "one_device", "mirrored", "multi_worker"], "")
flags.DEFINE_integer("num_cpu_devices", None, "Split the CPU into this many logical devices.")
flags.DEFINE_integer("epochs", 6, "Epochs (the batch doubles halfway).")
flags.DEFINE_string("model_dir", "/tmp/tf_largebatch_byo", "Checkpoints and results.")
FLAGS = flags.FLAGS


def make_data(n: int = 2048, seed: int = 0) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = {"a": rng.normal(size=(n, 4)), "b": rng.normal(size=(n, 3))}
    x = {k: v.astype("float32") for k, v in x.items()}
    y = x["a"].sum(1, keepdims=True) - 2 * x["b"][:, :1] + 0.1 * rng.normal(size=(n, 1))
    return x, y.astype("float32")


def model_fn():  # what you already have for model.fit: a compiled model
    import keras

    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    h = keras.layers.Dense(32, activation="relu")(keras.layers.Concatenate()([a, b]))
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(1)(h))
    model.compile(optimizer=keras.optimizers.SGD(momentum=0.9), loss="mse", metrics=["mae"])
    return model


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.num_cpu_devices:
        lb.configure_cpu_devices(FLAGS.num_cpu_devices)
    strategy = lb.make_strategy(FLAGS.strategy)  # first: before any other TensorFlow work
    import keras
    import tensorflow as tf

    x, y = make_data()
    x_val, y_val = make_data(512, seed=1)
    # model.fit(x, y, batch_size=64, epochs=6, validation_data=(x_val, y_val), callbacks=cbs)
    # becomes: a plan (batch 64, doubled halfway; lr 0.02 per 64) and the Trainer.
    plan = lb.plan_phases(
        "grow_batch", dataset_size=len(y), epochs=FLAGS.epochs, global_batch_size=64,
        base_learning_rate=0.02, base_batch_size=64, decay_epochs=(FLAGS.epochs // 2,),
        decay_factor=0.5, warmup_epochs=1,
    )  # fmt: skip
    trainer = lb.Trainer(
        model_fn, plan, lb.TrainerConfig(model_dir=FLAGS.model_dir), strategy=strategy
    )
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=2),
        keras.callbacks.CSVLogger(os.path.join(FLAGS.model_dir, "log.csv")),
    ]
    train = (x, y) if FLAGS.input == "arrays" else (tf.data.Dataset.from_tensor_slices((x, y)),)
    history = trainer.fit(*train, validation_data=(x_val, y_val), callbacks=callbacks)
    summary = {k: round(v[-1], 4) for k, v in history.history.items()}
    summary["weights_sha256"] = trainer.results["weights_sha256"]
    summary["parameter_updates"] = trainer.results["parameter_updates"]
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
