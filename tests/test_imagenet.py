"""tf_largebatch.imagenet: preprocessing, the streaming TFDS source, the recipe end to end.

Two data sets, both offline: a tiny *real* TFDS data set of JPEGs prepared in tmp (4 files, so
file sharding by input pipeline really happens; labels identify examples), and ``imagenet2012``
under ``tfds.testing.mock_data`` (random JPEGs; metadata with split sizes written to tmp) for
`run_imagenet` end to end. The mock ignores ``ReadConfig``: it cannot show sharding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tf_largebatch.imagenet import (
    MEAN_RGB,
    STDDEV_RGB,
    TFDSImageSource,
    preprocess_for_eval,
    preprocess_for_train,
)
from tf_largebatch.imagenet_recipe import ImageNetConfig, make_imagenet_plan, run_imagenet

S = 32  # image size in these tests
TRAIN, EVAL = 24, 8  # tiny data set: train labels 0..23, validation labels 24..31


class TfLargebatchTinyJpegs(tfds.core.GeneratorBasedBuilder):
    """24 + 8 JPEGs of random sizes; the label of example i is its index (unique)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(num_classes=TRAIN + EVAL),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(0, TRAIN),
            "validation": self._generate_examples(TRAIN, EVAL),
        }

    def _generate_examples(self, first, count):
        rng = np.random.default_rng(first)
        for i in range(first, first + count):
            h, w = rng.integers(16, 48, size=2)
            yield i, {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "label": i}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builder = TfLargebatchTinyJpegs(data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=4))
    return data_dir


@pytest.fixture(scope="module")
def mock_imagenet(tmp_path_factory):
    """A data_dir with imagenet2012 metadata (48 train, 10 validation examples) for the mock."""
    data_dir = str(tmp_path_factory.mktemp("imagenet"))
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    tf.io.gfile.makedirs(builder.data_dir)
    splits = []
    for name, size in (("train", 48), ("validation", 10)):
        template = tfds.core.ShardedFileTemplate(
            data_dir=builder.data_dir, dataset_name="imagenet2012", split=name,
            filetype_suffix="tfrecord",
        )  # fmt: skip
        splits.append(tfds.core.SplitInfo(name, [size], 0, filename_template=template))
    builder.info.set_splits(tfds.core.SplitDict(splits))
    builder.info.write_to_directory(builder.data_dir)
    return data_dir


def mocked(data_dir):
    policy = tfds.testing.MockPolicy.USE_FILES
    return tfds.testing.mock_data(num_examples=20, policy=policy, data_dir=data_dir)


def jpeg(image: np.ndarray) -> tf.Tensor:
    return tf.io.encode_jpeg(image, quality=100)


def pixels(normalized) -> np.ndarray:
    """Undo the normalisation: back to [0, 255] values."""
    return np.asarray(normalized) * STDDEV_RGB + MEAN_RGB


def context(pipelines, index, replicas):
    return tf.distribute.InputContext(pipelines, index, replicas)


def labels_of(dataset) -> list[np.ndarray]:
    return [y.numpy() for _, y in dataset]


# ------------------------------------------------------------------------- preprocessing


def test_train_preprocessing_shape_range_and_seed():
    image = jpeg(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    a = preprocess_for_train(image, S, tf.constant([1, 2]))
    b = preprocess_for_train(image, S, tf.constant([1, 2]))
    c = preprocess_for_train(image, S, tf.constant([1, 3]))
    assert a.shape == (S, S, 3) and a.dtype == tf.float32
    np.testing.assert_array_equal(a, b)  # stateless: same seed, same crop and flip
    assert np.abs(a - c).max() > 0.1
    low, high = (-np.array(MEAN_RGB) / STDDEV_RGB), (255 - np.array(MEAN_RGB)) / STDDEV_RGB
    assert np.all(a >= low - 1e-5) and np.all(a <= high + 1e-5)


def test_random_resized_crop_area_aspect_and_flip():
    """On an image whose red = x and green = y, each output reveals its crop box and flip."""
    size = 200
    x, y = np.meshgrid(np.arange(size), np.arange(size))
    image = jpeg(np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8))
    areas, aspects, flips = [], [], 0
    for i in range(120):
        out = pixels(preprocess_for_train(image, S, tf.constant([7, i])))
        red, green = out[..., 0], out[..., 1]
        dx = (red[:, -1].mean() - red[:, 0].mean()) * S / (S - 1)  # ± crop width
        height = (green[-1].mean() - green[0].mean()) * S / (S - 1)
        flips += dx < 0
        areas.append(abs(dx) * height / size**2)
        aspects.append(abs(dx) / height)
    assert min(areas) > 0.08 - 0.01 and max(areas) <= 1.0 + 0.02
    assert min(areas) < 0.25 and max(areas) > 0.7  # really spans the 0.08–1 range
    assert min(aspects) > 0.75 - 0.04 and max(aspects) < 4 / 3 + 0.06
    assert 40 <= flips <= 80  # probability ½ (binomial(120, ½): ±3.6 sd)


def test_eval_preprocessing_is_resize_then_centre_crop():
    # Lossless PNG, so the expected value is exact: shorter side 64 → round(32·256/224) = 37,
    # 64×128 → 37×74, centre crop rows 2..33, columns 21..52.
    image = np.random.default_rng(1).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    out = preprocess_for_eval(tf.io.encode_png(image), S, jpeg=False)
    expected = (tf.image.resize(image, [37, 74])[2:34, 21:53] - MEAN_RGB) / STDDEV_RGB
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # Centre: a 64×256 image, black left half, white right half → crop straddles the edge.
    halves = np.zeros((64, 256, 3), np.uint8)
    halves[:, 128:] = 255
    out = pixels(preprocess_for_eval(jpeg(halves), S))
    assert out.shape == (S, S, 3)
    np.testing.assert_allclose(out[:, :12], 0, atol=4)
    np.testing.assert_allclose(out[:, -12:], 255, atol=4)
    tall = preprocess_for_eval(jpeg(np.zeros((300, 20, 3), np.uint8)), S)
    assert tall.shape == (S, S, 3)


# ------------------------------------------------------------------------- the source


def test_source_metadata_and_bad_arguments(tiny, tmp_path):
    source = TFDSImageSource("tf_largebatch_tiny_jpegs", tiny, image_size=S)
    assert (source.num_examples, source.num_eval_examples) == (TRAIN, EVAL)
    assert source.num_classes == TRAIN + EVAL and source.input_shape == (S, S, 3)
    sliced = TFDSImageSource("tf_largebatch_tiny_jpegs", tiny, S, split="train[:50%]")
    assert sliced.num_examples == TRAIN // 2
    with pytest.raises(ValueError, match="`name`.*no_such_dataset_xyz"):
        TFDSImageSource("no_such_dataset_xyz", tiny)
    with pytest.raises(ValueError, match="`data_dir`.*manual_dir"):
        TFDSImageSource("imagenet2012", str(tmp_path))
    with pytest.raises(ValueError, match="`split`.*Received: split='nope'"):
        TFDSImageSource("tf_largebatch_tiny_jpegs", tiny, split="nope")
    with pytest.raises(ValueError, match="image_size=0"):
        TFDSImageSource("tf_largebatch_tiny_jpegs", tiny, image_size=0)
    kw = {"seed": 0, "start_epoch": 0, "end_epoch": 1}
    with pytest.raises(ValueError, match="global_batch_size=32"):
        source.make_dataset_fn(32, **kw)
    with pytest.raises(ValueError, match="skip_steps=3"):
        source.make_dataset_fn(8, **kw, skip_steps=3)  # 24 // 8 = 3 steps per epoch
    with pytest.raises(ValueError, match="end_epoch=0"):
        source.make_dataset_fn(8, seed=0, start_epoch=0, end_epoch=0)
    with pytest.raises(ValueError, match="divisible by 3 replicas"):
        source.make_dataset_fn(8, **kw)(context(1, 0, 3))


def test_each_epoch_splits_the_files_among_input_pipelines(tiny):
    source = TFDSImageSource("tf_largebatch_tiny_jpegs", tiny, image_size=S, shuffle_buffer_size=8)
    fn = source.make_dataset_fn(8, seed=3, start_epoch=0, end_epoch=2, static_batch_size=False)
    per_pipeline = []
    for p in range(2):  # 2 workers, 1 replica each: per-replica batch 4, 3 steps per epoch
        dataset = fn(context(2, p, 2))
        assert dataset.element_spec[0].shape.as_list() == [None, S, S, 3]
        assert int(dataset.cardinality()) == 6
        batches = labels_of(dataset)
        assert [len(b) for b in batches] == [4] * 6
        per_pipeline.append([np.concatenate(batches[:3]), np.concatenate(batches[3:])])
    for epoch in range(2):
        a, b = per_pipeline[0][epoch], per_pipeline[1][epoch]
        assert len(set(a)) == 12 and not set(a) & set(b)  # disjoint files, each example once
        assert sorted([*a, *b]) == list(range(TRAIN))
    assert not np.array_equal(per_pipeline[0][0], per_pipeline[0][1])  # reshuffled per epoch
    # One pipeline feeding 2 local replicas reads every file: each example once per epoch.
    one = labels_of(fn(context(1, 0, 2)))
    assert sorted(np.concatenate(one[:6])) == list(range(TRAIN))


def test_a_short_shard_wraps_around(tiny):
    """3 pipelines over 4 files (6 examples each) hold 12, 6, 6 examples; each reads 8."""
    source = TFDSImageSource("tf_largebatch_tiny_jpegs", tiny, image_size=S, shuffle_buffer_size=8)
    fn = source.make_dataset_fn(6, seed=0, start_epoch=0, end_epoch=1)  # 4 steps of 3 × 2
    counts = [np.concatenate(labels_of(fn(context(3, p, 3)))) for p in range(3)]
    assert [len(c) for c in counts] == [8, 8, 8]
    assert len(set(counts[0])) == 8 and len(set(counts[1])) == 6  # wrapped: 2 seen twice


def test_resumed_stream_equals_the_uninterrupted_one(tiny):
    source = TFDSImageSource("tf_largebatch_tiny_jpegs", tiny, image_size=S, shuffle_buffer_size=8)
    whole = list(source.make_dataset_fn(8, seed=5, start_epoch=0, end_epoch=2)(context(1, 0, 1)))
    resumed = source.make_dataset_fn(8, seed=5, start_epoch=1, end_epoch=2, skip_steps=1)
    resumed = list(resumed(context(1, 0, 1)))
    assert len(whole) == 6 and len(resumed) == 2
    for (xa, ya), (xb, yb) in zip(whole[4:], resumed):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)  # same crops and flips


def test_eval_dataset_reads_every_example_once(tiny):
    source = TFDSImageSource("tf_largebatch_tiny_jpegs", tiny, image_size=S)
    batches = list(source.make_eval_dataset(3))
    assert [len(y) for _, y in batches] == [3, 3, 2]
    assert sorted(np.concatenate([y for _, y in batches])) == list(range(TRAIN, TRAIN + EVAL))
    assert batches[0][0].shape == (3, S, S, 3) and batches[0][1].dtype == tf.int32


# ------------------------------------------------------------------------- the recipe


def test_default_config_is_goyal_and_its_plan_at_kn_8k():
    config = ImageNetConfig()
    assert (config.model, config.image_size, config.per_replica_batch_size) == ("resnet50", 224, 32)
    assert (config.base_learning_rate, config.base_batch_size, config.momentum) == (0.1, 256, 0.9)
    assert (config.weight_decay, config.warmup, config.warmup_epochs) == (1e-4, "gradual", 5)
    assert (tuple(config.decay_epochs), config.decay_factor, config.epochs) == (
        (30, 60, 80),
        0.1,
        90,
    )
    plan = make_imagenet_plan(config, 1_281_167, num_replicas=256)  # 256 GPUs × 32 = 8192
    assert [p.global_batch_size for p in plan.phases] == [8192] * 4
    assert [p.learning_rate for p in plan.phases] == pytest.approx([3.2, 0.32, 0.032, 0.0032])
    assert plan.phases[0].steps_per_epoch == 1_281_167 // 8192 == 156
    assert plan.total_steps == 90 * 156
    grow = make_imagenet_plan(ImageNetConfig(mode="grow_batch"), 1_281_167, num_replicas=8)
    assert [p.global_batch_size for p in grow.phases] == [256, 2560, 25600, 256000]
    with pytest.raises(ValueError, match="mode='nope'"):
        ImageNetConfig(mode="nope")
    with pytest.raises(ValueError, match="per_replica_batch_size=0"):
        ImageNetConfig(per_replica_batch_size=0)


@pytest.mark.parametrize("replicas", [1, 2])
def test_run_imagenet_end_to_end_on_mock_data(mock_imagenet, tmp_path, replicas):
    devices = [f"/cpu:{i}" for i in range(replicas)]
    strategy = (
        tf.distribute.MirroredStrategy(devices, tf.distribute.ReductionToOneDevice())
        if replicas > 1
        else tf.distribute.OneDeviceStrategy(devices[0])
    )
    config = ImageNetConfig(
        data_dir=mock_imagenet, image_size=S, model="resnet20", mode="grow_batch", epochs=3,
        decay_epochs=(2,), decay_factor=0.5, warmup_epochs=1, per_replica_batch_size=4,
        model_dir=str(tmp_path), verbose=0, eval_batch_size=4, shuffle_buffer_size=16,
        checkpoint_every_steps=2,
    )  # fmt: skip
    plans = []
    with mocked(mock_imagenet):
        results = run_imagenet(config, strategy=strategy, on_plan=lambda p, s: plans.append(p))
    batch = 4 * replicas  # per-replica batch × replicas
    plan = plans[0]
    assert [p.global_batch_size for p in plan.phases] == [batch, 2 * batch]
    assert plan.phases[0].learning_rate == pytest.approx(0.1 * batch / 256)
    steps = 2 * (48 // batch) + 48 // (2 * batch)
    assert results["parameter_updates"] == plan.total_steps == steps
    assert results["num_replicas"] == replicas and results["epochs_completed"] == 3
    assert results["trace_count"] == 1 and results["model"] == "resnet20"
    assert 0.0 <= results["test_accuracy"] <= 1.0 and np.isfinite(results["final_train_loss"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["image_size"] == S and saved["parameter_updates"] == steps
    assert (tmp_path / "model.keras").exists()


@pytest.mark.slow
def test_example_binary_trains_resnet50_on_mock_imagenet(mock_imagenet, tmp_path):
    """examples/imagenet_resnet50.py as a user runs it (inside mock_data), the default model."""
    example = Path(__file__).resolve().parents[1] / "examples" / "imagenet_resnet50.py"
    flags = [
        f"--data_dir={mock_imagenet}", f"--model_dir={tmp_path}", "--image_size=32", "--epochs=2",
        "--decay_epochs=1", "--warmup_epochs=1", "--per_replica_batch_size=8", "--verbose=0",
        "--strategy=one_device", "--eval_batch_size=10", "--shuffle_buffer_size=16",
    ]  # fmt: skip
    wrapper = (
        "import runpy, sys, tensorflow_datasets as tfds\n"
        f"sys.argv = [{str(example)!r}, *{flags!r}]\n"
        f"kw = dict(policy=tfds.testing.MockPolicy.USE_FILES, data_dir={mock_imagenet!r})\n"
        "with tfds.testing.mock_data(num_examples=20, **kw):\n"
        f"    runpy.run_path({str(example)!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", wrapper], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "steps/ep" in proc.stdout and "Summary:" in proc.stdout  # the phase table, a summary
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["model"] == "resnet50" and results["config"]["weight_decay"] == 1e-4
    assert results["parameter_updates"] == 2 * (48 // 8) and results["num_replicas"] == 1
    assert results["phases"][0]["learning_rate"] == pytest.approx(0.1 * 8 / 256)
    assert (tmp_path / "model.keras").exists()
