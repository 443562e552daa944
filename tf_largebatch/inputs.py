"""What the `Trainer` trains on: `model.fit`'s inputs turned into per-phase `tf.data` pipelines.

A *source* has ``num_examples`` and ``make_dataset_fn(global_batch_size, *, seed, start_epoch,
end_epoch, skip_steps=0, static_batch_size=True)`` returning the ``dataset_fn(input_context)``
that `tf.distribute.Strategy.distribute_datasets_from_function` takes: per-replica batches of
epochs [start_epoch, end_epoch), the first `skip_steps` steps of `start_epoch` skipped (resume).
`ArraysSource` and `DatasetSource` also take ``example_offset``: `start_epoch` begins that many
examples into its permutation (a phase that starts inside an epoch, `PhasePlan.segments`).
`as_source` turns what `model.fit` takes into one:

- NumPy arrays, or tuples / dicts of them (``x``, ``y``, ``sample_weight``): `ArraysSource`,
  one permutation π_e of the whole set per epoch drawn from (seed, e) alone, so every worker
  and every replica count sees the same global batches (Goyal et al. 2017, Remark 4);
- a `tf.data.Dataset` of *unbatched* elements ``(x, y)`` or ``(x, y, sample_weight)``:
  `DatasetSource`, shuffled per epoch with a seed keyed by (seed, e), batched by the phase's
  global batch, each global batch cut into the replicas' pieces;
- a function ``dataset_fn(global_batch_size, input_context)`` returning per-replica batches
  (users who shard and batch themselves): `DatasetFnSource`;
- anything that already is a source (`data.ArraySource`, `imagenet.TFDSImageSource`).

Global batch t of an epoch is cut into one contiguous piece per replica, piece k =
[⌊k·n/R⌋, ⌊(k+1)·n/R⌋) of its n examples; pipeline p of P (R/P local replicas) yields its
pieces in replica order. The concatenation over replicas is the global batch, whatever R is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_largebatch._validation import _fail, check_positive_int
from tf_largebatch.data import _permutation
from tf_largebatch.phases import steps_per_epoch

DatasetFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]
UserDatasetFn = Callable[[int, tf.distribute.InputContext], tf.data.Dataset]


def _options(dataset: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    off = tf.data.experimental.AutoShardPolicy.OFF  # sharded by input pipeline here
    options.experimental_distribute.auto_shard_policy = off
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def _replica_pieces(
    batch: Any, input_context: tf.distribute.InputContext, size: tf.Tensor
) -> tf.data.Dataset:
    """This pipeline's per-replica pieces of one global batch of `size` examples (nested)."""
    replicas = input_context.num_replicas_in_sync
    local = replicas // input_context.num_input_pipelines
    first = input_context.input_pipeline_id * local
    edges = tf.range(first, first + local + 1, dtype=tf.int64) * size // replicas
    pieces = tf.data.Dataset.from_tensor_slices((edges[:-1], edges[1:]))
    return pieces.map(lambda lo, hi: tf.nest.map_structure(lambda t: t[lo:hi], batch))


def _batch_size(batch: Any) -> tf.Tensor:
    return tf.shape(tf.nest.flatten(batch)[0], out_type=tf.int64)[0]


def _element(x: Any, y: Any, sample_weight: Any) -> tuple[Any, ...]:
    if sample_weight is not None:
        return (x, y, sample_weight)
    return (x,) if y is None else (x, y)


class ArraysSource:
    """An in-memory training set of (nested) arrays, permuted once per epoch.

    Args:
      x: inputs: an array, or a tuple / dict of arrays (a model's named inputs).
      y: targets: None, an array, or a tuple / dict of arrays (several outputs).
      sample_weight: None or per-example weights (nested like `y` when it is nested).

    Raises:
      ValueError: no examples, or leaves with different numbers of examples.
    """

    def __init__(self, x: Any, y: Any = None, sample_weight: Any = None) -> None:
        self.element = _element(x, y, sample_weight)
        leaves = tf.nest.flatten(self.element)
        sizes = {len(leaf) for leaf in leaves}
        if len(sizes) != 1 or 0 in sizes:
            shapes = tf.nest.map_structure(lambda a: tuple(np.shape(a)), self.element)
            raise ValueError(
                "Arguments `x`, `y` and `sample_weight` must hold the same number (> 0) of "
                f"examples along their first axis. Received shapes: {shapes}"
            )
        self.num_examples = sizes.pop()
        self._tensors: Any = None

    def tensors(self) -> Any:
        """The arrays as tensors (converted once)."""
        if self._tensors is None:
            self._tensors = tf.nest.map_structure(tf.convert_to_tensor, self.element)
        return self._tensors

    def make_dataset_fn(
        self,
        global_batch_size: int,
        *,
        seed: int,
        start_epoch: int,
        end_epoch: int,
        skip_steps: int = 0,
        static_batch_size: bool = True,
        shuffle: bool = True,
        example_offset: int = 0,
    ) -> DatasetFn:
        """Per-replica batches of epochs [start_epoch, end_epoch) (see the module docstring)."""
        check_positive_int("global_batch_size", global_batch_size)
        n, batch = self.num_examples, global_batch_size
        if batch > n:
            _fail("global_batch_size", f"<= the number of examples ({n})", batch)
        offset = _first_offset(n, batch, skip_steps, example_offset)
        tensors = self.tensors()
        static = batch if static_batch_size else None

        def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
            replicas = input_context.num_replicas_in_sync
            if batch % replicas:
                _fail("global_batch_size", f"divisible by the replica count {replicas}", batch)
            size = tf.constant(batch, tf.int64)

            def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
                perm = _permutation(n, seed, epoch, shuffle)  # the same π_e as data.py
                first = tf.where(epoch == start_epoch, tf.constant(offset, tf.int64), 0)
                starts = tf.data.Dataset.range(first, n - batch + 1, batch)
                return starts.flat_map(
                    lambda i: _replica_pieces(perm[i : i + size], input_context, size)
                )

            def gather(idx: tf.Tensor) -> Any:
                if static is not None:
                    idx = tf.ensure_shape(idx, [static // replicas])
                return tf.nest.map_structure(lambda t: tf.gather(t, idx), tensors)

            dataset = tf.data.Dataset.range(start_epoch, end_epoch).flat_map(epoch_batches)
            dataset = dataset.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            return _options(dataset)

        return dataset_fn

    def make_eval_dataset_fn(self, batch_size: int) -> DatasetFn:
        """One pass in data order, every example once, the last batch kept (pieces may be 0)."""
        check_positive_int("batch_size", batch_size)
        tensors, n = self.tensors(), self.num_examples

        def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
            def pieces(begin: tf.Tensor) -> tf.data.Dataset:
                size = tf.minimum(tf.constant(batch_size, tf.int64), n - begin)
                return _replica_pieces(tf.range(begin, begin + size), input_context, size)

            dataset = tf.data.Dataset.range(0, n, batch_size).flat_map(pieces)
            gather = lambda idx: tf.nest.map_structure(lambda t: tf.gather(t, idx), tensors)  # noqa: E731
            return _options(dataset.map(gather))

        return dataset_fn

    def eval_steps(self, batch_size: int) -> int:
        return -(-self.num_examples // batch_size)


def count_examples(dataset: tf.data.Dataset) -> int:
    """Elements in a finite dataset: its cardinality, or counted once when unknown.

    Raises:
      ValueError: an infinite dataset.
    """
    cardinality = int(dataset.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            "Argument `x` must be a finite tf.data.Dataset of unbatched examples (the Trainer "
            "repeats, shuffles and batches it per phase). Received: an infinite dataset "
            "(remove `.repeat()`, or pass a `dataset_fn` with the plan's dataset_size)"
        )
    if cardinality >= 0:
        return cardinality
    return int(dataset.reduce(np.int64(0), lambda count, _: count + 1))


class DatasetSource:
    """A `tf.data.Dataset` of unbatched examples, shuffled, batched and split per phase.

    Each epoch e is the dataset shuffled with a buffer of `shuffle_buffer_size` elements
    (default: the whole dataset, a uniform permutation) and the seed (seed, e), cut into
    global batches (the last partial one dropped), each global batch cut into the replicas'
    pieces. Every worker reads the whole dataset and keeps its pieces, so the order depends only
    on the seed: the same for 1 replica, N replicas and N workers.

    Args:
      dataset: elements ``(x, y)`` or ``(x, y, sample_weight)`` (x and y may be nested), one
        example each, finite.
      shuffle_buffer_size: shuffle buffer in elements (None: the whole dataset; 0: no shuffle).
      num_examples: the dataset size when known (skips counting).
    """

    def __init__(
        self,
        dataset: tf.data.Dataset,
        *,
        shuffle_buffer_size: int | None = None,
        num_examples: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.num_examples = num_examples if num_examples is not None else count_examples(dataset)
        if self.num_examples <= 0:
            _fail("x", "a dataset with at least one example", "an empty dataset")
        self.shuffle_buffer_size = (
            self.num_examples if shuffle_buffer_size is None else shuffle_buffer_size
        )

    def make_dataset_fn(
        self,
        global_batch_size: int,
        *,
        seed: int,
        start_epoch: int,
        end_epoch: int,
        skip_steps: int = 0,
        static_batch_size: bool = True,
        example_offset: int = 0,
    ) -> DatasetFn:
        """Per-replica batches of epochs [start_epoch, end_epoch) (see the class docstring)."""
        del static_batch_size  # the batch dimension is dynamic after the cut: one trace
        check_positive_int("global_batch_size", global_batch_size)
        batch, buffer = global_batch_size, self.shuffle_buffer_size
        if batch > self.num_examples:
            _fail("global_batch_size", f"<= the number of examples ({self.num_examples})", batch)
        offset = _first_offset(self.num_examples, batch, skip_steps, example_offset)

        def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
            replicas = input_context.num_replicas_in_sync
            if batch % replicas:
                _fail("global_batch_size", f"divisible by the replica count {replicas}", batch)
            size = tf.constant(batch, tf.int64)

            @tf.autograph.experimental.do_not_convert
            def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
                data = self.dataset
                # This function's own graph seed: the order depends on (seed, epoch) alone,
                # not on the caller's global seed (whose value 0 breaks tensor op seeds).
                tf.compat.v1.get_default_graph().seed = 1
                if buffer:
                    data = data.shuffle(
                        buffer, seed=tf.constant(seed, tf.int64) * 1_000_003 + epoch
                    )
                data = data.skip(_skip(epoch, start_epoch, offset))  # examples, then batch
                data = data.batch(batch, drop_remainder=True)
                return data.flat_map(lambda *b: _replica_pieces(_unwrap(b), input_context, size))

            dataset = tf.data.Dataset.range(start_epoch, end_epoch).flat_map(epoch_batches)
            return _options(dataset)

        return dataset_fn


def _skip(epoch: tf.Tensor, start_epoch: int, count: int) -> tf.Tensor:
    """What to skip in `epoch`: `count` in the first epoch of a pipeline, else 0."""
    return tf.where(epoch == start_epoch, tf.constant(count, tf.int64), 0)


def _first_offset(num_examples: int, batch: int, skip_steps: int, example_offset: int) -> int:
    """Examples of the first epoch to skip: ``example_offset + skip_steps·batch``.

    Raises:
      ValueError: not a whole batch left in the first epoch after the offset.
    """
    offset = example_offset + skip_steps * batch
    if skip_steps < 0 or example_offset < 0 or offset + batch > num_examples:
        _fail(
            "skip_steps",
            f"leaving a whole batch of {batch} in the first epoch of {num_examples} examples "
            f"after example_offset={example_offset}",
            skip_steps,
        )
    return offset


def _unwrap(elements: tuple[Any, ...]) -> Any:
    """`flat_map(lambda *b: ...)` gets a tuple element as arguments: a single one unwrapped."""
    return elements[0] if len(elements) == 1 else elements


@dataclasses.dataclass(frozen=True)
class DatasetFnSource:
    """The user's ``dataset_fn(global_batch_size, input_context)`` of per-replica batches.

    A finite dataset is one epoch and is iterated again for every epoch (``take`` of the plan's
    steps per epoch, so it must yield at least that many batches); an infinite one is read on.
    A resumed run skips the steps of its epoch already done.

    Attributes:
      dataset_fn: ``(global_batch_size, input_context) -> tf.data.Dataset`` of per-replica
        batches of ``input_context.get_per_replica_batch_size(global_batch_size)`` examples.
      num_examples: the training set size (the plan's ``dataset_size``).
    """

    dataset_fn: UserDatasetFn
    num_examples: int

    def make_dataset_fn(
        self,
        global_batch_size: int,
        *,
        seed: int,
        start_epoch: int,
        end_epoch: int,
        skip_steps: int = 0,
        static_batch_size: bool = True,
    ) -> DatasetFn:
        del seed, static_batch_size  # the user's pipeline owns its order and shapes
        steps = steps_per_epoch(self.num_examples, global_batch_size)

        def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
            data = self.dataset_fn(global_batch_size, input_context)
            # each step takes one batch for each of this pipeline's replicas
            local = input_context.num_replicas_in_sync // input_context.num_input_pipelines
            if int(data.cardinality()) == tf.data.INFINITE_CARDINALITY:
                return data.skip(skip_steps * local)
            epochs = tf.data.Dataset.range(start_epoch, end_epoch)
            return epochs.flat_map(
                lambda e: data.take(steps * local).skip(_skip(e, start_epoch, skip_steps) * local)
            )

        return dataset_fn


def is_source(x: Any) -> bool:
    return hasattr(x, "make_dataset_fn") and hasattr(x, "num_examples")


def as_source(
    x: Any, y: Any = None, sample_weight: Any = None, *, num_examples: int | None = None
) -> Any:
    """`model.fit`'s training inputs as a source (see the module docstring).

    Args:
      x: arrays (nested), a `tf.data.Dataset` of unbatched examples, a
        ``dataset_fn(global_batch_size, input_context)``, or a source.
      y: targets (arrays only).
      sample_weight: per-example weights (arrays only).
      num_examples: the data set size, needed for a ``dataset_fn`` (the plan's).

    Raises:
      ValueError: `y` or `sample_weight` given with a dataset, a dataset_fn or a source.
    """
    if isinstance(x, (tf.data.Dataset, keras.utils.PyDataset)) or callable(x) or is_source(x):
        if y is not None or sample_weight is not None:
            raise ValueError(
                "Arguments `y` and `sample_weight` must be None when `x` is a dataset, a "
                f"dataset_fn or a source (they come from `x`). Received: x={type(x).__name__}"
            )
        if isinstance(x, tf.data.Dataset):
            return DatasetSource(x)
        if is_source(x):
            return x
        if callable(x):
            return DatasetFnSource(x, num_examples)
        _fail("x", "arrays, a tf.data.Dataset, a dataset_fn or a source", type(x).__name__)
    return ArraysSource(x, y, sample_weight)


class EvalDataset:
    """Evaluation data for a strategy: every example once, pieces split over replicas."""

    def __init__(self, x: Any, y: Any = None, sample_weight: Any = None, *, batch_size: int):
        check_positive_int("batch_size", batch_size)
        if isinstance(x, tf.data.Dataset):  # batched, as model.evaluate takes it
            if y is not None or sample_weight is not None:
                _fail("y", "None when `x` is a tf.data.Dataset", type(y).__name__)
            self._dataset: tf.data.Dataset | None = x.unbatch()
            self.num_examples = count_examples(self._dataset)
            self._arrays = None
        else:
            self._arrays = ArraysSource(x, y, sample_weight)
            self._dataset = None
            self.num_examples = self._arrays.num_examples
        self.batch_size = batch_size
        self.steps = -(-self.num_examples // batch_size)

    def dataset_fn(self) -> DatasetFn:
        if self._arrays is not None:
            return self._arrays.make_eval_dataset_fn(self.batch_size)
        data, batch_size = self._dataset, self.batch_size

        def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
            batches = data.batch(batch_size)
            return _options(
                batches.flat_map(
                    lambda *b: _replica_pieces(_unwrap(b), input_context, _batch_size(b))
                )
            )

        return dataset_fn
