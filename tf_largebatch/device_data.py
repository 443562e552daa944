"""In-memory training data kept on the replicas' devices and gathered inside the compiled loop.

For a training set that fits in device memory (arrays passed to `Trainer.fit`), a `tf.data`
pipeline is a fixed cost every step pays: the iterator's ``GetNext``, the pipeline's stages and
the per-replica split run on the host between steps (about 90 µs a step on a 2-core CPU, as much
as a small MLP's whole step). `DeviceArrays` removes it: the arrays are copied once into
non-trainable variables created under ``strategy.scope()`` (a mirrored copy on every replica's
device), the epoch's permutation π_e is a variable too, and each step's batch is a
``tf.gather`` of π_e's slice for this replica, computed in the same compiled loop as the step.
The call that ends epoch e draws π_{e+1} beside its steps (`DeviceArrays.load_next_epoch`), so
the shuffle is off the steps' path.

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
            self.loaded_epoch = tf.Variable(-1, dtype=tf.int64, trainable=False, name="epoch")

    def load_epoch(self, epoch: Any) -> None:
        """Puts π_epoch in place unless it is there already (eagerly or in a `tf.function`:
        the compiled step calls it with the epoch of its first batch, cross-replica)."""
        epoch = tf.convert_to_tensor(epoch, tf.int64)
        loaded = tf.equal(self.loaded_epoch, epoch)
        tf.cond(loaded, lambda: tf.constant(False), lambda: self._load(epoch))

    def load_next_epoch(
        self, epoch: tf.Tensor, start: tf.Tensor, global_batch_size: int, num_steps: tf.Tensor
    ) -> None:
        """In the epoch's last call, after `replica_indices` read the call's indices: puts
        π_{epoch+1} in place while the call's steps run (they read only those indices, so
        the two run side by side), and the next epoch's first call finds it loaded.

        A call is the epoch's last when no whole batch is left after its `num_steps`
        batches from example `start` (batches are whole: ``drop_remainder``).
        """
        if not self.shuffle:
            return
        end = start + tf.cast(num_steps, tf.int64) * global_batch_size
        last = end + global_batch_size > self.num_examples
        tf.cond(last, lambda: self._load(epoch + 1), lambda: tf.constant(False))

    def _load(self, epoch: tf.Tensor) -> tf.Tensor:
        order = _permutation(self.num_examples, self.seed, epoch, self.shuffle)
        self.permutation.assign(tf.cast(order, tf.int64))
        self.loaded_epoch.assign(epoch)
        return tf.constant(True)

    def replica_indices(
        self, start: tf.Tensor, global_batch_size: int | tf.Tensor, num_steps: tf.Tensor
    ) -> tf.Tensor:
        """In replica context: this replica's example indices for `num_steps` steps from
        example `start` of π_e, shape [num_steps, global_batch_size / replicas] (computed once
        per compiled call, so that a step only slices a row and gathers; a Python int
        `global_batch_size` gives the batches a static shape)."""
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync
        replica = tf.cast(context.replica_id_in_sync_group, tf.int64)
        window = self.permutation[start : start + tf.cast(num_steps, tf.int64) * global_batch_size]
        per_step = tf.reshape(window, [-1, replicas, global_batch_size // replicas])
        return tf.gather(per_step, replica, axis=1)

    def gather(self, indices: tf.Tensor) -> Any:
        """The examples at `indices` (one row of `replica_indices`), from this replica's copy."""
        return tf.nest.map_structure(lambda t: tf.gather(t, indices), self.tensors)

    def replica_batch(self, start: tf.Tensor, global_batch_size: tf.Tensor) -> Any:
        """In replica context: this replica's piece of π_e[start : start + global_batch_size]."""
        return self.gather(self.replica_indices(start, global_batch_size, 1)[0])


class DeviceFeed:
    """What one compiled call reads: `DeviceArrays` from example `start` of π_epoch,
    ``global_batch_size`` examples a step (the controller's counterpart of an iterator)."""

    def __init__(self, data: DeviceArrays, epoch: int, start: int, global_batch_size: int) -> None:
        self.data, self.epoch = data, epoch
        self.start, self.global_batch_size = start, global_batch_size
