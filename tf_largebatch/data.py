"""Data sources and the per-replica `tf.data` pipeline for a global batch size.

Sources (`load_data`): scikit-learn's 8×8 digits (offline default), MNIST-1D generated offline
(``mnist1d``, ``mnist1d:N``), a TFDS classification data set already prepared in a data
directory, or a NumPy archive ``npz:PATH``. Every source's labels are checked (integers,
0 ≤ y < num_classes, every test class seen in training) before anything is trained.

Pipelines (`make_dataset_fn`, `make_dataset`): epoch e draws ONE permutation π_e of the whole
training set from (seed, e) alone, in-graph with stateless ops, so every worker computes the same
π_e (Goyal et al. 2017, Remark 4). Global batch t of epoch e is π_e[t·B : (t+1)·B] whatever the
number of replicas, and the concatenation over replicas of one step's per-replica batches is
exactly that global batch: runs on 1, 2 or 4 replicas see the same data in the same order.

References:
  Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", §3, Remark 4.
"""

from __future__ import annotations

import dataclasses
import functools
import logging as logging_std
import os
import random
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from tf_largebatch._validation import _fail, check_non_negative_int, check_positive_int
from tf_largebatch.phases import steps_per_epoch

DIGITS_NUM_TRAIN, DIGITS_NUM_TEST = 1437, 360  # 1,797 digits; test: ceil(0.2 · 1,797) = 360.
MNIST1D_NUM_EXAMPLES = 5000  # the published MNIST-1D: 4,000 train / 1,000 test
_CHUNK = 8192  # TFDS examples per chunk while loading a split into memory.
_NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
DatasetFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: NumPy fields make `==` ambiguous.
class ArrayData:
    """An in-memory classification data set.

    Attributes:
      name: Where it came from (``"digits"``, ``"mnist1d"``, ``"mnist1d:N"``, a TFDS name,
        or ``"npz:PATH"``).
      x_train: float32 inputs, shape (N, ...): images (N, H, W, C) in [0, 1], or other
        examples such as MNIST-1D's signals (N, 40, 1).
      y_train: int32 labels, shape (N,).
      x_test: float32 inputs, shape (M, ...) like ``x_train``.
      y_test: int32 labels, shape (M,).
      num_classes: Number of classes; labels lie in [0, num_classes).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. (H, W, C) for images or (40, 1) for MNIST-1D."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_train_examples(self) -> int:
        """Number of training examples N."""
        return int(self.x_train.shape[0])


def _images(x: np.ndarray) -> np.ndarray:
    """uint8 → /255; float kept; (N, H, W) gains a channel axis; always float32."""
    x = np.asarray(x)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return x[..., None] if x.ndim == 3 else x


def _labels(name: str, array: str, y: Any, num_classes: int | None) -> np.ndarray:
    """int32 labels; whole-number floats are converted, anything else is an error."""
    y = np.asarray(y).reshape(-1)

    def fail(requirement: str, value: Any) -> None:
        raise ValueError(
            f"Argument `dataset` must have {array} labels that are {requirement}. "
            f"Received: dataset={name!r} with {array} label {value!r}"
        )

    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.number):
        fail("integers", y[0].item() if len(y) else str(y.dtype))
    if np.issubdtype(y.dtype, np.inexact):
        bad = ~np.isfinite(y) | (y != np.round(y)) if len(y) else np.zeros(0, bool)
        if bad.any():
            fail("whole numbers", y[bad][0].item())
    if len(y) and y.min() < 0:
        fail(">= 0", y.min().item())
    if num_classes is not None and len(y) and y.max() >= num_classes:
        fail(f"< num_classes={num_classes}", y.max().item())
    if len(y) and y.max() > np.iinfo(np.int32).max:
        fail("< 2**31", y.max().item())
    return y.astype(np.int32)


def _arrays(
    name: str,
    x_tr: Any,
    y_tr: Any,
    x_te: Any,
    y_te: Any,
    classes: int | None,
    images: bool = True,
) -> ArrayData:
    """Checks and converts one source's arrays (``classes=None``: max label + 1)."""
    if images:
        x_tr, x_te = _images(x_tr), _images(x_te)
    else:
        x_tr, x_te = np.asarray(x_tr, np.float32), np.asarray(x_te, np.float32)
    y_tr, y_te = _labels(name, "y_train", y_tr, classes), _labels(name, "y_test", y_te, classes)
    if x_tr.ndim < 2 or x_te.ndim < 2 or len(x_tr) != len(y_tr) or len(x_te) != len(y_te):
        raise ValueError(
            f"Argument `dataset` must give inputs (N, ...) with one label each. Received: "
            f"dataset={name!r} with x_train {x_tr.shape}, y_train {y_tr.shape}, "
            f"x_test {x_te.shape}, y_test {y_te.shape}"
        )
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise ValueError(
            f"Argument `dataset` must give train and test examples of one shape. Received: "
            f"dataset={name!r} with x_train {x_tr.shape}, x_test {x_te.shape}"
        )
    unseen = np.setdiff1d(y_te, y_tr)
    if unseen.size:
        raise ValueError(
            f"Argument `dataset` must have every y_test label among the y_train labels. "
            f"Received: dataset={name!r} with y_test label {int(unseen[0])} absent from y_train "
            f"({unseen.size} such label{'s' if unseen.size > 1 else ''})"
        )
    if classes is None:
        classes = int(max(y_tr.max(initial=0), y_te.max(initial=0))) + 1
    return ArrayData(name, x_tr, y_tr, x_te, y_te, int(classes))


def _load_digits() -> ArrayData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1), values 0..16.
    y = digits.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(x))
    test, train = perm[:DIGITS_NUM_TEST], perm[DIGITS_NUM_TEST:]
    return ArrayData("digits", x[train], y[train], x[test], y[test], 10)


def _load_npz(name: str) -> ArrayData:
    path = name[len("npz:") :]
    if not os.path.isfile(path):
        _fail("dataset", "'npz:' followed by an existing file", name)
    if not zipfile.is_zipfile(path):  # np.load would try to unpickle it, or say nothing useful
        _fail("dataset", f"'npz:' followed by a NumPy .npz archive; {path!r} is not one", name)
    try:
        with np.load(path, allow_pickle=False) as archive:
            files = archive.files
            arrays = [archive[key] for key in _NPZ_ARRAYS if key in files]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # damaged, or pickles
        _fail("dataset", f"a readable .npz archive of plain arrays; {path!r}: {error}", name)
    missing = [key for key in _NPZ_ARRAYS if key not in files]
    if missing:
        _fail("dataset", f"an archive with arrays {_NPZ_ARRAYS}, missing {missing}", name)
    return _arrays(name, *arrays, None)


def _generate_mnist1d(num_examples: int) -> tuple[np.ndarray, ...]:
    """MNIST-1D by the package's published procedure; the global RNG states are restored."""
    import mnist1d  # noqa: F401  (imports matplotlib: only when MNIST-1D is asked for)
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()  # seed 42, 80/20 split, 40-sample signals
    args.num_samples = num_examples
    states = np.random.get_state(), random.getstate()
    try:
        generated = make_dataset(args)  # seeds NumPy's and Python's global RNGs with args.seed
    finally:
        np.random.set_state(states[0])
        random.setstate(states[1])
    return generated["x"], generated["y"], generated["x_test"], generated["y_test"]


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(num_examples: int) -> tuple[np.ndarray, ...]:
    """Cached per process (generation is pure Python per example); arrays read-only."""
    arrays = _generate_mnist1d(num_examples)
    x_tr, y_tr, x_te, y_te = (np.asarray(a) for a in arrays)
    out = (x_tr[..., None].astype(np.float32), y_tr, x_te[..., None].astype(np.float32), y_te)
    for array in out:
        array.flags.writeable = False
    return out


def _load_mnist1d(name: str) -> ArrayData:
    num_examples = MNIST1D_NUM_EXAMPLES
    if name != "mnist1d":
        count = name[len("mnist1d:") :]
        if not count.isdigit() or int(count) < 10 or int(count) % 10:
            _fail("dataset", "'mnist1d' or 'mnist1d:N' with N a multiple of 10, >= 10", name)
        num_examples = int(count)
    return _arrays(name, *_mnist1d_arrays(num_examples), 10, images=False)


class _DropMissingVariantWarnings(logging_std.Filter):
    """Drops TFDS's "Variant folder ... has no dataset_info.json" lines: we report that case."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return "has no dataset_info.json" not in record.getMessage()


def _load_tfds(name: str, data_dir: str | None) -> ArrayData:
    quiet = _DropMissingVariantWarnings()
    absl_logger = logging_std.getLogger("absl")
    absl_logger.addFilter(quiet)
    try:
        return _load_tfds_prepared(name, data_dir)
    finally:
        absl_logger.removeFilter(quiet)


def _load_tfds_prepared(name: str, data_dir: str | None) -> ArrayData:
    import tensorflow_datasets as tfds  # Slow import: only when a TFDS data set is asked for.

    try:
        builder = tfds.builder(name, data_dir=data_dir)
        num_classes = builder.info.features["label"].num_classes
    except (tfds.core.DatasetNotFoundError, KeyError) as error:
        kind = (
            "'digits', 'mnist1d[:N]', 'npz:PATH' or a TFDS classification data set with a `label`"
        )
        _fail("dataset", f"{kind} ({type(error).__name__})", name)
    # Never download: offline, TFDS retries for minutes and ends in a long traceback. The data
    # must be prepared beforehand (`tfds build NAME --data_dir=DIR` with a network).
    # Chunks, not batch_size=-1, which batches by the metadata's example count: 0 under
    # `tfds.testing.mock_data`, where TF then aborts the process on batch(sys.maxsize).
    try:
        splits = tfds.load(
            name,
            split=["train", "test"],
            as_supervised=True,
            batch_size=_CHUNK,
            data_dir=data_dir,
            download=False,
        )
    except AssertionError:  # TFDS's "could not find data in DIR" (download=False)
        if builder.is_prepared():
            raise
        root = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))
        raise ValueError(
            f"Argument `dataset` names a TFDS data set not found in data_dir={root!r} (no "
            f"download is attempted); prepare it first with a network (`tfds build {name} "
            f"--data_dir=DIR`) and pass --data_dir=DIR, or use npz:PATH. Received: "
            f"dataset={name!r}"
        ) from None
    (x_tr, y_tr), (x_te, y_te) = (map(np.concatenate, zip(*tfds.as_numpy(d))) for d in splits)
    return _arrays(name, x_tr, y_tr, x_te, y_te, num_classes)


def load_data(name: str = "digits", data_dir: str | None = None) -> ArrayData:
    """Loads a classification data set into memory.

    Args:
      name: ``"digits"``: scikit-learn's `load_digits` (1,797 real 8×8 grey images, 10 classes,
        no download), scaled by 1/16 to [0, 1], shape (N, 8, 8, 1), split by
        ``np.random.default_rng(0).permutation(1797)``: its first 360 indices are the test set,
        the other 1,437 the training set. ``"mnist1d"``: MNIST-1D (Greydanus 2020), generated
        offline by the ``mnist1d`` package's published procedure (``make_dataset`` with
        ``get_dataset_args()``: seed 42, 5,000 examples, the first 80% train): 4,000 train /
        1,000 test signals of shape (40, 1), 10 classes; ``"mnist1d:N"``: the same procedure
        with N examples (N a multiple of 10), split 80/20. Generation is deterministic,
        leaves NumPy's and Python's global random states as they were, and is cached per
        process (mnist1d:20000 takes a few seconds). ``"npz:PATH"``: a NumPy archive with
        arrays ``x_train, y_train, x_test, y_test``; uint8 images are divided by 255,
        (N, H, W) images get a channel axis, num_classes = max label + 1. Any other name: a
        TFDS data set with ``train`` and ``test`` splits, already prepared in `data_dir` (it
        is never downloaded here), read whole in chunks; num_classes from its ``label``
        feature. Labels must be integers (whole-number floats are converted), >= 0 and
        < num_classes, and every test label must occur in the training labels.
      data_dir: TFDS data directory (TFDS names only; None: TFDS's default).

    Returns:
      An `ArrayData`.

    Raises:
      ValueError: ``npz:`` file missing, not an .npz archive or lacking arrays; an unknown
        TFDS name or one not prepared in `data_dir`; bad ``mnist1d:N``; bad labels (the
        message names the array and the offending value).

    Example:
      >>> data = load_data("digits")
      >>> data.num_train_examples, data.input_shape, data.num_classes
      (1437, (8, 8, 1), 10)
    """
    if name == "digits":
        data = _load_digits()
    elif name == "mnist1d" or name.startswith("mnist1d:"):
        data = _load_mnist1d(name)
    elif name.startswith("npz:"):
        data = _load_npz(name)
    else:
        data = _load_tfds(name, data_dir)
    logging.info("Loaded %s: %d train / %d test.", name, len(data.x_train), len(data.x_test))
    return data


def _check_arrays(x: Any, y: Any, batch_size: int, arg: str = "global_batch_size") -> int:
    check_positive_int(arg, batch_size)
    num_examples = len(x)
    if num_examples == 0 or len(y) != num_examples:
        raise ValueError(
            "Arguments `x` and `y` must hold the same number (> 0) of examples. "
            f"Received: len(x)={num_examples}, len(y)={len(y)}"
        )
    if batch_size > num_examples:
        _fail(arg, f"<= the number of examples ({num_examples})", batch_size)
    return num_examples


def _permutation(num_examples: int, seed: int, epoch: tf.Tensor, shuffle: bool) -> tf.Tensor:
    """π_e: argsort of N stateless full-range int64 draws keyed by (seed, epoch)."""
    if not shuffle:
        return tf.range(num_examples)
    key = tf.stack([tf.constant(seed, tf.int64), epoch])
    draws = tf.random.stateless_uniform([num_examples], key, None, None, dtype=tf.int64)
    return tf.argsort(draws, direction="DESCENDING", stable=True)


def _make_fn(
    x: Any,
    y: Any,
    global_batch_size: int,
    *,
    seed: int = 0,
    epochs: tuple[int, int] = (0, 1),
    skip_steps: int = 0,
    shuffle: bool = False,
    drop_remainder: bool = False,
    even: bool = False,
    static_batch_size: bool = True,
) -> DatasetFn:
    """The shared pipeline: per-replica batches of epochs [start, end).

    Each global batch of n examples is cut into one contiguous piece per replica,
    piece k = [⌊k·n/replicas⌋, ⌊(k+1)·n/replicas⌋) (all b = n/replicas when that divides,
    which `even` requires); pipeline p of P yields pieces p·R, ..., p·R + R - 1 (R = replicas/P)
    in that order, one element each.
    """
    num_examples = len(x)
    start_epoch, end_epoch = epochs
    steps = steps_per_epoch(num_examples, global_batch_size, drop_remainder)
    last = global_batch_size if drop_remainder else num_examples - (steps - 1) * global_batch_size
    x_t, y_t = tf.convert_to_tensor(x), tf.convert_to_tensor(y)

    def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        replicas = input_context.num_replicas_in_sync
        local = replicas // input_context.num_input_pipelines
        if even and global_batch_size % replicas:
            _fail(
                "global_batch_size", f"divisible by the replica count {replicas}", global_batch_size
            )
        if even and last % replicas:
            why = f"the last batch, {last} examples, does not split over {replicas} replicas"
            _fail("drop_remainder", f"True when {why}", drop_remainder)
        first = input_context.input_pipeline_id * local
        cuts = tf.range(first, first + local + 1, dtype=tf.int64)
        size = global_batch_size // replicas if drop_remainder and static_batch_size else None

        def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
            perm = _permutation(num_examples, seed, epoch, shuffle)
            first_step = tf.where(epoch == start_epoch, tf.constant(skip_steps, tf.int64), 0)

            def bounds(step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
                begin = step * global_batch_size
                n = tf.minimum(tf.constant(global_batch_size, tf.int64), num_examples - begin)
                edges = begin + cuts * n // replicas
                return edges[:-1], edges[1:]

            def indices(lo: tf.Tensor, hi: tf.Tensor) -> tf.Tensor:
                return perm[lo:hi] if size is None else tf.ensure_shape(perm[lo:hi], [size])

            return tf.data.Dataset.range(first_step, steps).map(bounds).unbatch().map(indices)

        dataset = tf.data.Dataset.range(start_epoch, end_epoch).flat_map(epoch_batches)
        count = local * ((end_epoch - start_epoch) * steps - skip_steps)  # known: Keras needs it
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(count))
        dataset = dataset.map(
            lambda idx: (tf.gather(x_t, idx), tf.gather(y_t, idx)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        options = tf.data.Options()
        options.deterministic = True  # `experimental_deterministic` is the deprecated alias.
        off = tf.data.experimental.AutoShardPolicy.OFF  # We shard by input pipeline ourselves.
        options.experimental_distribute.auto_shard_policy = off
        return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)

    return dataset_fn


def make_dataset_fn(
    x: np.ndarray,
    y: np.ndarray,
    global_batch_size: int,
    *,
    seed: int,
    start_epoch: int,
    end_epoch: int,
    skip_steps: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    static_batch_size: bool = True,
) -> DatasetFn:
    """Builds the per-replica training pipeline for `distribute_datasets_from_function`.

    Epoch e ∈ [start_epoch, end_epoch) uses π_e = argsort(stateless_uniform([N], (seed, e))).
    Step t's global batch is π_e[t·B:(t+1)·B]. With `replicas` in sync over P input pipelines,
    R = replicas/P and b = B/replicas, pipeline p yields per step R consecutive per-replica
    batches, local replica r getting π_e[t·B + (p·R + r)·b : t·B + (p·R + r + 1)·b], so the
    concatenation over all replicas is the global batch. With ``drop_remainder=False`` the
    last batch of n = N - (steps-1)·B examples is cut the same way into n/replicas pieces.

    Args:
      x: Training images (N, ...), indexed along axis 0.
      y: Labels (N,).
      global_batch_size: B, examples per optimizer step over all replicas; B <= N.
      seed: Shuffle seed; with the epoch it alone determines π_e.
      start_epoch: First epoch (inclusive).
      end_epoch: Last epoch (exclusive); > start_epoch.
      skip_steps: Steps of `start_epoch` to skip (resume mid-epoch), < steps per epoch.
      shuffle: If False, π_e is the identity.
      drop_remainder: Drop each epoch's last partial batch (steps = ⌊N/B⌋) or keep it
        (steps = ⌈N/B⌉; its size must then be divisible by the replica count).
      static_batch_size: give elements a static batch dimension. The `Trainer` passes False
        so one traced step serves every phase's batch size (no retrace at a phase change).

    Returns:
      ``dataset_fn(input_context) -> tf.data.Dataset`` of (x, y) per-replica batches.

    Raises:
      ValueError: bad arguments, B > N, or (when `dataset_fn` is called) B, or the kept
        last batch, not divisible by ``input_context.num_replicas_in_sync``.

    Example:
      >>> strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
      >>> fn = make_dataset_fn(x, y, 64, seed=0, start_epoch=0, end_epoch=10)
      >>> dist_dataset = strategy.distribute_datasets_from_function(fn)

    References:
      Goyal et al. 2017, §3, Remark 4 (one permutation per epoch, split across workers).
    """
    num_examples = _check_arrays(x, y, global_batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        _fail("seed", "an integer", seed)
    check_non_negative_int("start_epoch", start_epoch)
    check_non_negative_int("end_epoch", end_epoch)
    if end_epoch <= start_epoch:
        _fail("end_epoch", f"> start_epoch={start_epoch}", end_epoch)
    check_non_negative_int("skip_steps", skip_steps)
    steps = steps_per_epoch(num_examples, global_batch_size, drop_remainder)
    if skip_steps >= steps:
        _fail("skip_steps", f"< steps per epoch ({steps})", skip_steps)
    return _make_fn(
        x,
        y,
        global_batch_size,
        seed=seed,
        epochs=(start_epoch, end_epoch),
        skip_steps=skip_steps,
        shuffle=shuffle,
        drop_remainder=drop_remainder,
        even=True,
        static_batch_size=static_batch_size,
    )


def make_dataset(
    x: np.ndarray,
    y: np.ndarray,
    global_batch_size: int,
    *,
    seed: int,
    epochs: int,
    start_epoch: int = 0,
    skip_steps: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> tf.data.Dataset:
    """Whole global batches of epochs [start_epoch, epochs), for ``model.fit``.

    The 1-replica case of `make_dataset_fn` (same batches, same order). `epochs` and
    `start_epoch` mean what ``model.fit(epochs=..., initial_epoch=...)`` means, so
    ``model.fit(dataset, epochs=E, initial_epoch=S, steps_per_epoch=steps_per_epoch(N, B))``
    consumes it exactly.

    Example:
      >>> dataset = make_dataset(x, y, 64, seed=0, epochs=10)
    """
    dataset_fn = make_dataset_fn(
        x,
        y,
        global_batch_size,
        seed=seed,
        start_epoch=start_epoch,
        end_epoch=epochs,
        skip_steps=skip_steps,
        shuffle=shuffle,
        drop_remainder=drop_remainder,
    )
    return dataset_fn(tf.distribute.InputContext())


def make_eval_dataset_fn(x: np.ndarray, y: np.ndarray, global_batch_size: int) -> DatasetFn:
    """Distributed evaluation: one pass in data order, every example exactly once.

    Each global batch (the last may be short) is cut into one contiguous piece per replica,
    piece k = [⌊k·n/replicas⌋, ⌊(k+1)·n/replicas⌋) of its n examples: sizes differ by at most
    one and may be 0, so sum per-example metrics rather than averaging per replica. Any
    `global_batch_size` <= N is accepted.
    """
    _check_arrays(x, y, global_batch_size)
    return _make_fn(x, y, global_batch_size)  # One epoch, in order, last batch kept.


def make_eval_dataset(x: np.ndarray, y: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Evaluation batches in data order, last partial batch kept (every example once).

    The 1-replica case of `make_eval_dataset_fn`; batches have a dynamic leading dimension.
    """
    _check_arrays(x, y, batch_size, arg="batch_size")
    return make_eval_dataset_fn(x, y, batch_size)(tf.distribute.InputContext())


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
    """An in-memory training set as a `Trainer` data source (see `make_dataset_fn`)."""

    x: np.ndarray
    y: np.ndarray

    @property
    def num_examples(self) -> int:
        return len(self.x)

    @property
    def element(self) -> tuple[np.ndarray, np.ndarray]:
        """The examples as ``(x, y)`` (what `device_data.DeviceArrays` holds)."""
        return (self.x, self.y)

    def make_dataset_fn(self, global_batch_size: int, **kwargs: Any) -> DatasetFn:
        """`make_dataset_fn` over this source's arrays."""
        return make_dataset_fn(self.x, self.y, global_batch_size, **kwargs)
