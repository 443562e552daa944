r"""What one training step runs: graph ops in the Trainer's compiled loop body vs the bare step.

  python benchmarks/step_ops.py                # digits mlp, 1 replica, a few seconds
  python benchmarks/step_ops.py --model=cnn

Counts the nodes of the ``while`` body of (a) the `Trainer`'s compiled call (in-memory arrays
gathered on the device, the compiled loss and ``accuracy`` metric, one trace for every batch
size, so the batch dimension is unknown at trace time) and (b) `throughput.py`'s ``bare_range``
step (a slice of a pre-batched constant, a hand-written loss, an argmax hit count; static
shapes). ``Const``/``Identity``/``NoOp`` nodes are left out (free at run time). The op types only
one of them runs are printed: what a Trainer step holds besides the model, the gradients and
the optimizer. No timing, and op counts do not predict time: most of the difference is
Keras's compiled loss and metric, which `throughput.py`'s ``bare_keras`` shows cost the bare
step nothing measurable on the digits mlp (BUILD_NOTES, issue 14 part 4 third round).
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
from typing import Any

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_enum("model", "mlp", ["mlp", "cnn"], "Model, as in throughput.py.")
FLAGS = flags.FLAGS
FREE = ("Const", "Identity", "NoOp")


def loop_body_ops(concrete: Any) -> list[tuple[str, str]]:
    """(op, name) of the largest function in a concrete function's library: the loop body."""
    library = concrete.graph.as_graph_def().library.function
    body = max(library, key=lambda f: len(f.node_def))
    return [(n.op, n.name) for n in body.node_def if n.op not in FREE]


def main(argv: list[str]) -> None:
    del argv
    import keras
    import tensorflow as tf
    import throughput

    from tf_largebatch.optimizers import SGD
    from tf_largebatch.training import Trainer, TrainerConfig

    ctx = throughput.make_context(
        FLAGS.model, 1, {"global_batch_size": 128, "steps_per_execution": 0, "epochs": 1}
    )
    x, y, batch, steps = ctx["x"], ctx["y"], ctx["global_batch_size"], ctx["steps_per_epoch"]
    config = TrainerConfig(model_dir=tempfile.mkdtemp(), verbose=0, save_model=False)
    trainer = Trainer(ctx["model_fn"], ctx["plan"], config, strategy=ctx["strategy"])
    trainer.fit(x, y)  # traces the call bound to the arrays on the device
    ours = loop_body_ops(next(iter(trainer.train_step._bound[2].values())))  # noqa: SLF001

    model = ctx["model_fn"]()
    plan = ctx["plan"]
    optimizer = SGD(plan.learning_rate_schedule(), momentum=plan.phases[0].momentum)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    xs = tf.constant(x[: steps * batch].reshape(steps, batch, *x.shape[1:]))
    ys = tf.constant(y[: steps * batch].reshape(steps, batch))

    @tf.function
    def bare(n: tf.Tensor) -> tf.Tensor:  # throughput.run_bare's step over a tensor
        total = tf.constant(0.0)
        for i in tf.range(n):
            with tf.GradientTape() as tape:
                logits = model(xs[i], training=True)
                loss = tf.reduce_sum(loss_fn(ys[i], logits)) / float(batch)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            hits = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), tf.cast(ys[i], tf.int32))
            total += loss + 0.0 * tf.reduce_sum(tf.cast(hits, tf.float32))
        return total

    theirs = loop_body_ops(bare.get_concrete_function(tf.constant(1)))
    print(f"model {FLAGS.model}: ops in the loop body (Const/Identity/NoOp left out)")
    print(f"  Trainer   {len(ours):4d}")
    print(f"  bare step {len(theirs):4d}")
    ours_ops = collections.Counter(op for op, _ in ours)
    theirs_ops = collections.Counter(op for op, _ in theirs)
    print(f"  only in the Trainer (by op type): {dict(ours_ops - theirs_ops)}")
    print(f"  only in the bare step (by op type): {dict(theirs_ops - ours_ops)}")


if __name__ == "__main__":
    app.run(main)
