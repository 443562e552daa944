"""Tests for tf_largebatch.data: sources, per-epoch permutations, replica/pipeline slicing."""

from __future__ import annotations

import random

import numpy as np
import pytest
import tensorflow as tf

from tf_largebatch import data

N, B = 24, 8  # 3 steps per epoch


def _indexed(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """Images whose single pixel is their own index, labels = index: batches reveal indices."""
    return np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1), np.arange(n, dtype=np.int32)


def _labels(dataset: tf.data.Dataset) -> list[np.ndarray]:
    batches = []
    for x, y in dataset:
        np.testing.assert_array_equal(x.numpy().reshape(-1), y.numpy())  # x and y gathered alike
        batches.append(y.numpy())
    return batches


def _global_batches(strategy: tf.distribute.Strategy, dataset_fn: data.DatasetFn) -> list:
    """Per step: per-replica label batches in replica order, and their devices."""
    steps = []
    for _, y in strategy.distribute_datasets_from_function(dataset_fn):
        parts = strategy.experimental_local_results(y)
        steps.append(([p.numpy() for p in parts], [p.device for p in parts]))
    return steps


def _mirrored(replicas: int) -> tf.distribute.MirroredStrategy:
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])


# ----------------------------------------------------------------------------- sources


def test_digits_split_is_fixed_and_scaled() -> None:
    from sklearn.datasets import load_digits

    d = data.load_data("digits")
    assert (d.num_train_examples, len(d.x_test)) == (1437, 360)
    assert (data.DIGITS_NUM_TRAIN, data.DIGITS_NUM_TEST) == (1437, 360)
    assert d.input_shape == (8, 8, 1) and d.num_classes == 10
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    assert d.x_train.min() == 0.0 and d.x_train.max() == 1.0 and d.x_test.max() == 1.0
    reference = load_digits()
    perm = np.random.default_rng(0).permutation(1797)
    np.testing.assert_array_equal(d.x_test[..., 0], reference.images[perm[:360]] / 16.0)
    np.testing.assert_array_equal(d.y_train, reference.target[perm[360:]])
    assert set(np.unique(d.y_train)) == set(range(10))


def test_npz_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(1)
    x_train = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)  # (N, H, W) uint8
    x_test = rng.random((3, 5, 4, 1)).astype(np.float32)  # already scaled
    path = tmp_path / "toy.npz"
    y_train, y_test = np.array([0, 1, 2, 3, 6, 0]), np.array([[1.0], [6.0], [2.0]])
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    d = data.load_data(f"npz:{path}")
    assert d.name == f"npz:{path}" and d.input_shape == (5, 4, 1)
    np.testing.assert_array_equal(d.x_train[..., 0], x_train.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(d.x_test, x_test)
    np.testing.assert_array_equal(d.y_test, [1, 6, 2])  # whole-number floats converted
    assert d.y_test.dtype == np.int32 and d.y_train.dtype == np.int32
    assert d.num_classes == 7  # max label 6 + 1


def test_npz_missing_arrays_are_named(tmp_path) -> None:
    path = tmp_path / "half.npz"
    np.savez(path, x_train=np.zeros((2, 3, 3)), y_train=np.zeros(2))
    with pytest.raises(ValueError, match=r"`dataset`.*missing \['x_test', 'y_test'\]") as info:
        data.load_data(f"npz:{path}")
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match=r"`dataset`.*Received: dataset='npz:/no/such.npz'"):
        data.load_data("npz:/no/such.npz")


def test_tfds_mock_mnist() -> None:
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        d = data.load_data("mnist")
        with pytest.raises(ValueError, match="Received: dataset='no_such_data_set'"):
            data.load_data("no_such_data_set")
    assert d.x_train.shape == (12, 28, 28, 1) and d.x_test.shape == (12, 28, 28, 1)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    assert d.num_classes == 10 and d.y_train.min() >= 0 and d.y_train.max() < 10
    assert d.x_train.min() >= 0.0 and d.x_train.max() <= 1.0
    np.testing.assert_allclose(d.x_train * 255.0, np.round(d.x_train * 255.0), atol=1e-4)


def test_tfds_name_not_prepared_fails_fast_with_one_line(tmp_path) -> None:
    """Offline, no download is attempted: one line naming data_dir, --data_dir and npz:."""
    import time

    start = time.monotonic()
    with pytest.raises(ValueError) as info:
        data.load_data("mnist", data_dir=str(tmp_path))
    assert time.monotonic() - start < 10  # was 212 s of download retries
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        f"Argument `dataset` names a TFDS data set not found in data_dir={str(tmp_path)!r} (no "
        "download is attempted); prepare it first with a network (`tfds build mnist "
        "--data_dir=DIR`) and pass --data_dir=DIR, or use npz:PATH. Received: dataset='mnist'"
    )
    assert not list(tmp_path.rglob("*.tfrecord*"))  # nothing downloaded or prepared


def test_npz_that_is_not_an_archive_is_named(tmp_path) -> None:
    path = tmp_path / "notes.npz"
    path.write_text("not a zip file\n")
    with pytest.raises(ValueError, match="a NumPy .npz archive") as info:
        data.load_data(f"npz:{path}")
    assert f"{str(path)!r} is not one" in str(info.value)
    pickled = tmp_path / "objects.npz"  # a real archive holding pickled object arrays
    objects = np.array([{"a": 1}, None], dtype=object)
    np.savez(pickled, x_train=objects, y_train=objects, x_test=objects, y_test=objects)
    with pytest.raises(ValueError, match="readable .npz archive of plain arrays") as info:
        data.load_data(f"npz:{pickled}")
    assert str(pickled) in str(info.value)


def _save_npz(path, y_train, y_test) -> str:
    n, m = len(y_train), len(y_test)
    np.savez(path, x_train=np.zeros((n, 2, 2)), y_train=y_train, x_test=np.zeros((m, 2, 2)),
             y_test=y_test)  # fmt: skip
    return f"npz:{path}"


@pytest.mark.parametrize(
    "y_train, y_test, array, requirement, value",
    [
        ([0, -1, 2], [0], "y_train", ">= 0", "-1"),
        ([0, 1, 2], [1, -3], "y_test", ">= 0", "-3"),
        ([0.0, 1.5, 2.0], [1.0], "y_train", "whole numbers", "1.5"),
        ([0.0, 1.0], [np.nan], "y_test", "whole numbers", "nan"),
        (["a", "b"], ["a"], "y_train", "integers", "'a'"),
    ],
)
def test_bad_labels_name_the_array_and_value(
    tmp_path, y_train, y_test, array, requirement, value
) -> None:
    name = _save_npz(tmp_path / "labels.npz", np.array(y_train), np.array(y_test))
    with pytest.raises(ValueError) as info:
        data.load_data(name)
    assert str(info.value) == (
        f"Argument `dataset` must have {array} labels that are {requirement}. "
        f"Received: dataset={name!r} with {array} label {value}"
    )


def test_test_labels_absent_from_training(tmp_path) -> None:
    name = _save_npz(tmp_path / "labels.npz", np.array([0, 1, 1]), np.array([1, 2, 5]))
    with pytest.raises(ValueError) as info:
        data.load_data(name)
    assert str(info.value) == (
        "Argument `dataset` must have every y_test label among the y_train labels. "
        f"Received: dataset={name!r} with y_test label 2 absent from y_train (2 such labels)"
    )


def test_labels_at_or_above_a_known_class_count() -> None:
    x = np.zeros((3, 2, 2, 1), np.float32)
    with pytest.raises(ValueError, match=r"y_train labels that are < num_classes=3\. .*label 3$"):
        data._arrays("tfds_like", x, [0, 1, 3], x, [0, 1, 1], 3)
    d = data._arrays("tfds_like", x, [0, 1, 2], x, [0.0, 1.0, 2.0], 5)
    assert d.num_classes == 5 and d.y_test.tolist() == [0, 1, 2]


@pytest.mark.slow
def test_mnist1d_is_the_published_benchmark() -> None:
    d = data.load_data("mnist1d")
    assert d.name == "mnist1d" and d.num_classes == 10 and data.MNIST1D_NUM_EXAMPLES == 5000
    assert d.x_train.shape == (4000, 40, 1) and d.x_test.shape == (1000, 40, 1)
    assert d.input_shape == (40, 1) and d.x_train.dtype == np.float32
    assert d.y_train.dtype == np.int32 and set(np.unique(d.y_train)) == set(range(10))
    assert d.y_test.min() == 0 and d.y_test.max() == 9
    # 500 examples of each class in all (5,000 // 10), shuffled together.
    counts = np.bincount(d.y_train, minlength=10) + np.bincount(d.y_test, minlength=10)
    assert counts.tolist() == [500] * 10
    # Standardised over the whole set (train and test together) by make_dataset.
    whole = np.concatenate([d.x_train, d.x_test])
    assert float(whole.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(whole.std()) == pytest.approx(1.0, abs=1e-5)
    assert data.load_data("mnist1d").x_train is d.x_train  # cached per process


def test_mnist1d_is_the_package_procedure_and_leaves_global_rngs_alone() -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    np.random.seed(123)
    random.seed(123)
    before = np.random.get_state()[1].copy(), random.getstate()
    d = data.load_data("mnist1d:500")
    np.testing.assert_array_equal(np.random.get_state()[1], before[0])
    assert random.getstate() == before[1]
    # The package's own procedure with its published arguments (seed 42, 80/20 split).
    args = get_dataset_args()
    args.num_samples = 500
    reference = make_dataset(args)
    np.testing.assert_array_equal(d.x_train[..., 0], reference["x"].astype(np.float32))
    np.testing.assert_array_equal(d.x_test[..., 0], reference["x_test"].astype(np.float32))
    np.testing.assert_array_equal(d.y_train, reference["y"])
    np.testing.assert_array_equal(d.y_test, reference["y_test"])


def test_mnist1d_with_n_examples() -> None:
    d = data.load_data("mnist1d:200")
    assert d.name == "mnist1d:200" and d.num_classes == 10
    assert (d.num_train_examples, len(d.x_test)) == (160, 40)  # int(200 · 0.8)
    assert (
        np.bincount(d.y_train, minlength=10) + np.bincount(d.y_test, minlength=10)
    ).tolist() == [20] * 10  # noqa: E501
    data._mnist1d_arrays.cache_clear()
    again = data.load_data("mnist1d:200")  # regenerated, not cached: identical
    np.testing.assert_array_equal(again.x_train, d.x_train)
    np.testing.assert_array_equal(again.y_test, d.y_test)
    assert not np.array_equal(data.load_data("mnist1d:300").x_train[:160], d.x_train)


@pytest.mark.parametrize("name", ["mnist1d:15", "mnist1d:0", "mnist1d:abc", "mnist1d:"])
def test_mnist1d_bad_count(name) -> None:
    with pytest.raises(ValueError) as info:
        data.load_data(name)
    assert str(info.value) == (
        "Argument `dataset` must be 'mnist1d' or 'mnist1d:N' with N a multiple of 10, >= 10. "
        f"Received: dataset={name!r}"
    )


# ----------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize(
    "num_examples, batch, drop, expected",
    [(1437, 64, True, 22), (1437, 64, False, 23), (64, 64, True, 1), (65, 64, False, 2)],
)
def test_steps_per_epoch(num_examples: int, batch: int, drop: bool, expected: int) -> None:
    assert data.steps_per_epoch(num_examples, batch, drop) == expected


def test_each_epoch_is_one_permutation_fixed_by_seed_and_epoch() -> None:
    x, y = _indexed()
    dataset = data.make_dataset(x, y, B, seed=7, epochs=3)
    batches = _labels(dataset)
    assert len(batches) == dataset.cardinality() == 9 and all(b.shape == (B,) for b in batches)
    epochs = [np.concatenate(batches[3 * e : 3 * e + 3]) for e in range(3)]
    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), np.arange(N))  # each example exactly once
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    again = _labels(data.make_dataset(x, y, B, seed=7, epochs=3))
    np.testing.assert_array_equal(np.concatenate(again), np.concatenate(epochs))
    later = _labels(data.make_dataset(x, y, B, seed=7, start_epoch=2, epochs=3))
    np.testing.assert_array_equal(np.concatenate(later), epochs[2])  # depends on (seed, e) only
    other = np.concatenate(_labels(data.make_dataset(x, y, B, seed=8, epochs=1)))
    assert not np.array_equal(other, epochs[0])
    unshuffled = _labels(data.make_dataset(x, y, B, seed=7, epochs=2, shuffle=False))
    np.testing.assert_array_equal(np.concatenate(unshuffled), np.tile(np.arange(N), 2))


def test_dataset_options_and_static_shapes() -> None:
    x, y = _indexed()
    dataset = data.make_dataset(x, y, B, seed=0, epochs=1)
    options = dataset.options()
    assert options.deterministic is True
    assert options.experimental_distribute.auto_shard_policy == (
        tf.data.experimental.AutoShardPolicy.OFF
    )
    assert dataset.element_spec[0].shape == (B, 1, 1, 1) and dataset.element_spec[1].shape == (B,)


def test_drop_remainder() -> None:
    x, y = _indexed(26)
    dropped = _labels(data.make_dataset(x, y, B, seed=3, epochs=2))
    assert [len(b) for b in dropped] == [B] * 6
    first_epoch = np.concatenate(dropped[:3])
    assert len(np.unique(first_epoch)) == 24 and first_epoch.max() < 26
    kept = _labels(data.make_dataset(x, y, B, seed=3, epochs=2, drop_remainder=False))
    assert [len(b) for b in kept] == [8, 8, 8, 2] * 2
    np.testing.assert_array_equal(np.sort(np.concatenate(kept[:4])), np.arange(26))
    np.testing.assert_array_equal(np.concatenate(kept[:3]), first_epoch)  # same permutation


def test_skip_steps_resumes_mid_epoch() -> None:
    x, y = _indexed()
    full = _labels(data.make_dataset(x, y, B, seed=5, epochs=3))
    dataset = data.make_dataset(x, y, B, seed=5, start_epoch=1, skip_steps=2, epochs=3)
    resumed = _labels(dataset)
    assert len(resumed) == dataset.cardinality() == 4  # 1 step left of epoch 1, 3 of epoch 2
    np.testing.assert_array_equal(np.concatenate(resumed), np.concatenate(full[5:]))


@pytest.mark.parametrize("replicas", [2, 4])
def test_replicas_see_the_single_replica_global_batches(replicas: int) -> None:
    x, y = _indexed()
    reference = _labels(data.make_dataset(x, y, B, seed=11, epochs=2))
    fn = data.make_dataset_fn(x, y, B, seed=11, start_epoch=0, end_epoch=2)
    steps = _global_batches(_mirrored(replicas), fn)
    assert len(steps) == len(reference) == 6
    for (parts, devices), expected in zip(steps, reference, strict=True):
        assert [len(p) for p in parts] == [B // replicas] * replicas
        assert [d.rsplit(":", 1)[-1] for d in devices] == [str(r) for r in range(replicas)]
        np.testing.assert_array_equal(np.concatenate(parts), expected)


@pytest.mark.parametrize("pipelines", [2, 4])
def test_input_pipelines_take_contiguous_slices(pipelines: int) -> None:
    """Multi-worker layout: pipeline p of P owns [p·B/P, (p+1)·B/P) of each global batch."""
    x, y = _indexed()
    reference = _labels(data.make_dataset(x, y, B, seed=2, start_epoch=1, epochs=2))
    fn = data.make_dataset_fn(x, y, B, seed=2, start_epoch=1, end_epoch=2)
    local = 4 // pipelines
    datasets = [fn(tf.distribute.InputContext(pipelines, p, 4)) for p in range(pipelines)]
    assert [int(d.cardinality()) for d in datasets] == [3 * local] * pipelines
    per_pipeline = [_labels(d) for d in datasets]
    for step, expected in enumerate(reference):
        parts = [per_pipeline[p][step * local + r] for p in range(pipelines) for r in range(local)]
        assert [len(part) for part in parts] == [2, 2, 2, 2]
        np.testing.assert_array_equal(np.concatenate(parts), expected)


def test_kept_last_batch_splits_over_replicas() -> None:
    x, y = _indexed(26)  # last batch: 2 examples
    fn = data.make_dataset_fn(x, y, B, seed=4, start_epoch=0, end_epoch=1, drop_remainder=False)
    reference = _labels(data.make_dataset(x, y, B, seed=4, epochs=1, drop_remainder=False))
    steps = _global_batches(_mirrored(2), fn)
    assert [[len(p) for p in parts] for parts, _ in steps] == [[4, 4]] * 3 + [[1, 1]]
    for (parts, _), expected in zip(steps, reference, strict=True):
        np.testing.assert_array_equal(np.concatenate(parts), expected)
    with pytest.raises(ValueError, match=r"`drop_remainder`.*2 examples.*4 replicas"):
        fn(tf.distribute.InputContext(1, 0, 4))


def test_eval_datasets_cover_every_example_once_in_order() -> None:
    x, y = _indexed(10)
    assert [len(b) for b in _labels(data.make_eval_dataset(x, y, 4))] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(_labels(data.make_eval_dataset(x, y, 4))), y)
    steps = _global_batches(_mirrored(4), data.make_eval_dataset_fn(x, y, 8))
    assert [[len(p) for p in parts] for parts, _ in steps] == [[2, 2, 2, 2], [0, 1, 0, 1]]
    np.testing.assert_array_equal(np.concatenate([np.concatenate(p) for p, _ in steps]), y)


def test_argument_errors() -> None:
    x, y = _indexed()
    fn = data.make_dataset_fn(x, y, 6, seed=0, start_epoch=0, end_epoch=1)
    with pytest.raises(ValueError, match=r"`global_batch_size`.*replica count 4.*=6"):
        fn(tf.distribute.InputContext(1, 0, 4))
    with pytest.raises(ValueError, match=r"`global_batch_size` must be <= .*\(24\).*=25"):
        data.make_dataset_fn(x, y, 25, seed=0, start_epoch=0, end_epoch=1)
    with pytest.raises(ValueError, match=r"`skip_steps` must be < steps per epoch \(3\)"):
        data.make_dataset(x, y, B, seed=0, epochs=1, skip_steps=3)
    with pytest.raises(ValueError, match=r"`end_epoch` must be > start_epoch=2.*end_epoch=2"):
        data.make_dataset_fn(x, y, B, seed=0, start_epoch=2, end_epoch=2)
    with pytest.raises(ValueError, match=r"`x` and `y`.*len\(x\)=24, len\(y\)=23"):
        data.make_dataset(x, y[:-1], B, seed=0, epochs=1)
    with pytest.raises(ValueError, match=r"`seed`.*seed=1.5"):
        data.make_dataset(x, y, B, seed=1.5, epochs=1)
    with pytest.raises(ValueError, match=r"`global_batch_size`.*global_batch_size=0"):
        data.make_dataset(x, y, 0, seed=0, epochs=1)
    with pytest.raises(ValueError, match=r"`batch_size` must be <= "):
        data.make_eval_dataset(x, y, 100)
