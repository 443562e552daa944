"""In-memory training data kept on the replicas' devices and gathered inside the compiled loop.

For a training set that fits in device memory (arrays passed to `Trainer.fit`), a `tf.data`
pipeline is a fixed cost every step pays: the iterator's ``GetNext``, the pipeline's stages and
the per-replica split run on the host between steps (about 90 µs a step on a 2-core CPU, as much
as a small MLP's whole step). `DeviceArrays` removes it: the arrays are copied once into
non-trainable variables created under ``strategy.scope()`` (a mirrored copy on every replica's
device), the epoch's permutation π_e is a variable too, and each step's batch is a
``tf.gather`` of π_e's slice for this replica, computed in the same compiled loop as the step.

The batches are the ones `inputs.ArraysSource` yields, element for element: the same π_e
(`data._permutation`, keyed by (seed, e) only), global batch t of an epoch is
π_e[offset + t·B : offset + (t+1)·B] and replica k of R takes its k-th contiguous piece of
B/R examples, so training gives the same weights through either path, for any replica count.

Not used (the `tf.data` path is): data larger than ``TrainerConfig.in_graph_data_max_bytes``
(every replica holds a whole copy), non-numeric arrays (strings), sources that are not arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from tf_largebatch.data import _permutation


def nbytes(element: Any) -> int:
    """Bytes of a nested structure of arrays."""
    return sum(int(np.asarray(leaf).nbytes) for leaf in tf.nest.flatten(element))


def eligible(element: Any, max_bytes: int) -> bool:
    """Whether arrays can live on the devices: numeric or boolean, at most `max_bytes`."""
    leaves = [np.asarray(leaf) for leaf in tf.nest.flatten(element)]
    numeric = all(leaf.dtype.kind in "biuf" for leaf in leaves)
    return max_bytes > 0 and numeric and nbytes(element) <= max_bytes


class DeviceArrays:
    """A training set held in variables on every replica's device, batched in-graph.

    Args:
      element: the examples: a tuple ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)`` of
        arrays or nested structures of arrays (all with the same first dimension).
      strategy: the strategy whose replicas gather their batches.
      seed: the permutation seed (the same π_e as `inputs.ArraysSource`).
      shuffle: permute every epoch (False: data order).

    Attributes:
      num_examples: examples in the set.
      element_spec: `tf.TensorSpec`s of one batch (unknown batch dimension).
    """

    def __init__(
        self, element: Any, strategy: tf.distribute.Strategy, *, seed: int, shuffle: bool = True
    ) -> None:
        leaves = tf.nest.flatten(element)
        self.num_examples = len(leaves[0])
        self.seed, self.shuffle = seed, shuffle
        self.element_spec = tf.nest.map_structure(
            lambda a: tf.TensorSpec([None, *np.shape(a)[1:]], tf.as_dtype(np.asarray(a).dtype)),
            element,
        )
        with strategy.scope():
            self.tensors = tf.nest.map_structure(
                lambda a: tf.Variable(a, trainable=False, name="train_data"), element
            )
            self.permutation = tf.Variable(
                tf.range(self.num_examples, dtype=tf.int64), trainable=False, name="permutation"
            )
        self._epoch: int | None = None

    def load_epoch(self, epoch: int) -> None:
        """Puts π_epoch in place (a no-op if it is there already)."""
        if epoch != self._epoch:
            epoch_t = tf.constant(epoch, tf.int64)
            order = _permutation(self.num_examples, self.seed, epoch_t, self.shuffle)
            self.permutation.assign(tf.cast(order, tf.int64))
            self._epoch = epoch

    def replica_batch(self, start: tf.Tensor, global_batch_size: tf.Tensor) -> Any:
        """In replica context: this replica's piece of π_e[start : start + global_batch_size]."""
        context = tf.distribute.get_replica_context()
        per_replica = global_batch_size // context.num_replicas_in_sync
        replica = tf.cast(context.replica_id_in_sync_group, tf.int64)
        first = start + replica * per_replica
        indices = self.permutation[first : first + per_replica]
        return tf.nest.map_structure(lambda t: tf.gather(t, indices), self.tensors)


class DeviceFeed:
    """What one compiled call reads: `DeviceArrays` from example `start` of the loaded epoch,
    ``global_batch_size`` examples a step (the controller's counterpart of an iterator)."""

    def __init__(self, data: DeviceArrays, start: int, global_batch_size: int) -> None:
        self.data, self.start, self.global_batch_size = data, start, global_batch_size
