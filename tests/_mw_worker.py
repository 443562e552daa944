"""One worker of the MultiWorkerMirroredStrategy smoke test in test_launch.py.

Run by the launcher with TF_CONFIG set. Prints one line ``RESULT {json}`` with the cross-worker sum
of ``replica id + 1``, one SGD step on a shared variable, and this worker's identity.

The step: w = 1, worker i holds x_i = i + 1, per-example loss (w·x)²/2 averaged over the global
batch of N workers, so the gradient is w·Σx_i²/N and w ← w − 0.1·w·Σx_i²/N. For 2 workers:
Σ(id + 1) = 3 and w = 1 − 0.1·5/2 = 0.75 on every worker.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tf_largebatch.distribute import is_chief, make_strategy, worker_info  # noqa: E402

# Must come first: MultiWorkerMirroredStrategy configures collectives before any other op.
strategy = make_strategy("multi_worker", all_reduce=sys.argv[1] if len(sys.argv) > 1 else "auto")

import tensorflow as tf  # noqa: E402

num_replicas = strategy.num_replicas_in_sync
task_type, task_id = worker_info(strategy)

with strategy.scope():
    w = tf.Variable(1.0)


@tf.function
def step() -> tuple[tf.Tensor, tf.Tensor]:
    def replica_fn() -> tuple[tf.Tensor, tf.Tensor]:
        ctx = tf.distribute.get_replica_context()
        rank = tf.cast(ctx.replica_id_in_sync_group, tf.float32)
        with tf.GradientTape() as tape:
            x = tf.reshape(rank + 1.0, [1])
            loss = tf.nn.compute_average_loss(0.5 * (w * x) ** 2, global_batch_size=num_replicas)
        grad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tape.gradient(loss, w))
        w.assign_sub(0.1 * grad)
        return rank + 1.0, grad

    ranks, grads = strategy.run(replica_fn)
    return strategy.reduce(tf.distribute.ReduceOp.SUM, ranks, axis=None), grads


rank_sum, grad = step()
grad = strategy.experimental_local_results(grad)[0]
result = {
    "task": [task_type, task_id],
    "is_chief": is_chief(strategy),
    "should_checkpoint": bool(strategy.extended.should_checkpoint),
    "num_replicas": num_replicas,
    "rank_sum": float(rank_sum),
    "grad": float(grad),
    "w": float(w.numpy()),
}
print("RESULT " + json.dumps(result), flush=True)
