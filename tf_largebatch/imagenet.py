"""ImageNet (or any TFDS image classification set) streamed from disk.

`TFDSImageSource` is a `Trainer` data source for data sets too large for memory: every input
pipeline reads its own share of the TFDS files, shuffles, decodes and augments on the fly.
Goyal et al.'s ResNet-50 recipe that uses it is in `imagenet_recipe`.

**How this differs from the in-memory path** (`data.ArraySource`): there, epoch e is one global
permutation π_e of the training set, identical on every worker and split among them (Goyal
Remark 4), so runs on 1, 2 or 4 replicas see the same global batches. Here, each input pipeline
shards the *files* (``tfds.ReadConfig(input_context=...)``), shuffles their order and then the
examples in a buffer, both seeded by (seed, epoch, pipeline). Every example is read once per
epoch by exactly one pipeline, so Remark 4 holds *approximately*: the split is by file, not by
a shared permutation; a pipeline whose files hold fewer examples than its share of
``steps_per_epoch`` global batches wraps around its own files (a few examples seen twice,
others not at all that epoch), and the batches depend on the number of input pipelines. Within
one setup the stream is deterministic: rerunning or resuming gives the same examples in the same
order with the same augmentation (the seeds of the stateless crop and flip are (seed, epoch,
pipeline, index in epoch)).

References:
  Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", §2–§5.
  Szegedy et al. 2015, "Going Deeper with Convolutions" (the random-resized crop).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from tf_largebatch._validation import (
    _fail,
    check_non_negative_int,
    check_positive_int,
)
from tf_largebatch.phases import steps_per_epoch

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
EVAL_RESIZE_RATIO = 256 / 224  # shorter side → image_size · 256/224, then a centre crop
AREA_RANGE, ASPECT_RATIO_RANGE = (0.08, 1.0), (3 / 4, 4 / 3)
DatasetFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]


def normalize(image: tf.Tensor) -> tf.Tensor:
    """(image − MEAN_RGB) / STDDEV_RGB per channel, for images in [0, 255]; float32."""
    return (tf.cast(image, tf.float32) - MEAN_RGB) / STDDEV_RGB


def _decode(image_bytes: tf.Tensor, jpeg: bool, window: tf.Tensor | None = None) -> tf.Tensor:
    """Decodes RGB uint8, cropped to ``window`` = [y, x, h, w] (fused for JPEG)."""
    if jpeg and window is not None:
        return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    if window is not None:
        image = tf.image.crop_to_bounding_box(image, window[0], window[1], window[2], window[3])
    return image


def _resize_and_centre_crop(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Bilinear resize of the shorter side to round(image_size · 256/224), centre crop."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = round(image_size * EVAL_RESIZE_RATIO) / tf.reduce_min(shape)
    new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), image_size)
    image = tf.image.resize(image, new_shape, method="bilinear")
    top, left = (new_shape[0] - image_size) // 2, (new_shape[1] - image_size) // 2
    return tf.image.crop_to_bounding_box(image, top, left, image_size, image_size)


def preprocess_for_eval(image_bytes: tf.Tensor, image_size: int, jpeg: bool = True) -> tf.Tensor:
    """Evaluation preprocessing: decode, shorter side to image_size·256/224, centre crop, normalise.

    Returns:
      float32 [image_size, image_size, 3], normalised by `normalize`.
    """
    image = _resize_and_centre_crop(_decode(image_bytes, jpeg), image_size)
    return normalize(image)


def preprocess_for_train(
    image_bytes: tf.Tensor, image_size: int, seed: tf.Tensor, jpeg: bool = True
) -> tf.Tensor:
    """Training preprocessing: random-resized crop, random horizontal flip, normalise.

    The crop (Inception-style, as in fb.resnet.torch which Goyal et al. follow) covers a
    fraction of the image area drawn from [0.08, 1] with aspect ratio in [3/4, 4/3]
    (``stateless_sample_distorted_bounding_box``, 10 attempts); it is decoded with the fused
    ``decode_and_crop_jpeg`` and resized (bilinear) to ``image_size``². When every attempt
    fails the whole image comes back, and the eval crop is used instead (as Model Garden does).
    The flip has probability ½. All randomness is stateless, keyed by `seed`.

    Args:
      image_bytes: an encoded image (JPEG; other formats with ``jpeg=False``).
      image_size: output side.
      seed: int32/int64 tensor of shape [2].
      jpeg: whether `image_bytes` is JPEG (enables the fused decode-and-crop).

    Returns:
      float32 [image_size, image_size, 3], normalised by `normalize`.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = (
        tf.image.extract_jpeg_shape(image_bytes) if jpeg else tf.shape(_decode(image_bytes, jpeg))
    )
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=crop_seed,
        min_object_covered=0.0,
        aspect_ratio_range=ASPECT_RATIO_RANGE,
        area_range=AREA_RANGE,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    failed = tf.reduce_all(tf.equal(size[:2], tf.cast(shape[:2], size.dtype)))
    image = tf.cond(
        failed,
        lambda: _resize_and_centre_crop(_decode(image_bytes, jpeg), image_size),
        lambda: tf.image.resize(_decode(image_bytes, jpeg, window), [image_size, image_size]),
    )
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return normalize(tf.ensure_shape(image, [image_size, image_size, 3]))


def _mix(*values: int) -> int:
    """A stable 31-bit seed from integers (same on every host and Python run)."""
    digest = hashlib.sha256("/".join(map(str, values)).encode()).digest()
    return int.from_bytes(digest[:4], "little") % 2**31


class TFDSImageSource:
    """A TFDS image classification split streamed from disk, as a `Trainer` data source.

    Training (`make_dataset_fn`): each input pipeline reads its share of the split's files
    (``tfds.ReadConfig(input_context=...)``), file order and a ``shuffle_buffer_size`` example
    buffer shuffled per epoch, images decoded and augmented by `preprocess_for_train`, batched
    per replica by ``input_context.get_per_replica_batch_size(global_batch_size)``. Each
    epoch yields exactly ``steps_per_epoch(num_examples, global_batch_size)`` global batches
    (last partial batch dropped) on every pipeline, so workers never run out at different
    steps. See the module docstring for what differs from the in-memory `data.ArraySource`.
    Evaluation (`make_eval_dataset`): `preprocess_for_eval`, in file order, every example once.

    Args:
      name: TFDS name, with ``image`` and ``label`` features.
      data_dir: TFDS data directory holding the prepared data set.
      image_size: side of the square crops.
      split: the training split (TFDS slicing such as ``"train[:10%]"`` works).
      eval_split: the split of `make_eval_dataset`.
      shuffle_buffer_size: examples (still encoded) in each pipeline's shuffle buffer.

    Raises:
      ValueError: an unknown name, a data set that is not prepared in `data_dir`, or bad values.

    Example:
      >>> source = TFDSImageSource("imagenet2012", data_dir="/data/tfds")
      >>> trainer.fit(source, validation_data=source.make_eval_dataset(256))
    """

    def __init__(
        self,
        name: str = "imagenet2012",
        data_dir: str | None = None,
        image_size: int = 224,
        split: str = "train",
        *,
        eval_split: str = "validation",
        shuffle_buffer_size: int = 10_000,
    ) -> None:
        import tensorflow_datasets as tfds  # slow import: only when a source is made

        check_positive_int("image_size", image_size)
        check_positive_int("shuffle_buffer_size", shuffle_buffer_size)
        self.name, self.data_dir, self.image_size = name, data_dir, image_size
        self.split, self.eval_split = split, eval_split
        self.shuffle_buffer_size = shuffle_buffer_size
        try:
            self._builder = tfds.builder(name, data_dir=data_dir)
            features = self._builder.info.features
            self.num_classes = int(features["label"].num_classes)
            image_feature = features["image"]
        except (tfds.core.DatasetNotFoundError, KeyError) as error:
            _fail("name", f"a TFDS image data set with image and label ({error!r})", name)
        self._jpeg = getattr(image_feature, "encoding_format", "jpeg") in ("jpeg", None)
        self.num_examples = self._split_size(split, "split")
        self.num_eval_examples = self._split_size(eval_split, "eval_split")

    def _split_size(self, split: str, arg: str) -> int:
        try:
            return int(self._builder.info.splits[split].num_examples)
        except (KeyError, ValueError):
            if not self._builder.info.splits:
                how = (
                    "a directory holding the prepared data set (ImageNet: download the archives "
                    "by hand, then `tfds build imagenet2012 --manual_dir=DIR --data_dir=DATA_DIR`)"
                )
                _fail("data_dir", how, self.data_dir)
            _fail(arg, f"one of the splits {sorted(self._builder.info.splits)}", split)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one preprocessed image, (image_size, image_size, 3)."""
        return (self.image_size, self.image_size, 3)

    def _read(self, split: str, *, seed: int | None, context: Any = None) -> tf.data.Dataset:
        """(encoded image, int32 label) pairs; files shuffled by `seed` (None: file order)."""
        import tensorflow_datasets as tfds

        read_config = tfds.ReadConfig(
            input_context=context, shuffle_seed=seed, try_autocache=False, skip_prefetch=True
        )
        dataset = self._builder.as_dataset(
            split=split,
            shuffle_files=seed is not None,
            read_config=read_config,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        return dataset.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)))

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
        """The per-replica training pipeline of epochs [start_epoch, end_epoch).

        Epoch e on pipeline p of P: the pipeline's files in an order seeded by s = mix(seed,
        e, p), a shuffle buffer seeded by s, repeated and cut to steps·R·b examples (R local
        replicas, b per-replica batch), the i-th augmented with stateless seed (s, i).
        `skip_steps` skips whole global batches of `start_epoch` before decoding.

        Args:
          global_batch_size: B, divisible by the replica count; B <= num_examples.
          seed: the run's seed.
          start_epoch: first epoch (inclusive).
          end_epoch: last epoch (exclusive), > start_epoch.
          skip_steps: steps of `start_epoch` already done (resume), < steps per epoch.
          static_batch_size: static batch dimension (the `Trainer` passes False).

        Returns:
          ``dataset_fn(input_context) -> tf.data.Dataset`` of per-replica (images, labels).

        Raises:
          ValueError: naming a bad argument (B not divisible by the replicas: when called).
        """
        check_positive_int("global_batch_size", global_batch_size)
        if global_batch_size > self.num_examples:
            _fail("global_batch_size", f"<= num_examples ({self.num_examples})", global_batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            _fail("seed", "an integer", seed)
        check_non_negative_int("start_epoch", start_epoch)
        if not isinstance(end_epoch, int) or end_epoch <= start_epoch:
            _fail("end_epoch", f"an integer > start_epoch={start_epoch}", end_epoch)
        steps = steps_per_epoch(self.num_examples, global_batch_size)
        check_non_negative_int("skip_steps", skip_steps)
        if skip_steps >= steps:
            _fail("skip_steps", f"< steps per epoch ({steps})", skip_steps)

        def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
            replicas = context.num_replicas_in_sync
            if global_batch_size % replicas:
                _fail("global_batch_size", f"divisible by {replicas} replicas", global_batch_size)
            local = replicas // context.num_input_pipelines
            batch = context.get_per_replica_batch_size(global_batch_size)
            per_epoch = steps * local * batch
            epochs = []
            for epoch in range(start_epoch, end_epoch):
                epoch_seed = _mix(seed, epoch, context.input_pipeline_id)
                examples = self._read(self.split, seed=epoch_seed, context=context)
                examples = examples.shuffle(self.shuffle_buffer_size, seed=epoch_seed)
                examples = examples.repeat().take(per_epoch).enumerate()
                examples = examples.map(
                    lambda i, ex, s=epoch_seed: (tf.stack([tf.constant(s, tf.int64), i]), *ex)
                )
                skip = skip_steps * local * batch if epoch == start_epoch else 0
                epochs.append(examples.skip(skip))
            dataset = functools.reduce(lambda a, b: a.concatenate(b), epochs)
            dataset = dataset.map(
                lambda s, image, label: (
                    preprocess_for_train(image, self.image_size, s, self._jpeg),
                    label,
                ),
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True,
            )
            dataset = dataset.batch(batch, drop_remainder=static_batch_size)
            count = local * ((end_epoch - start_epoch) * steps - skip_steps)
            dataset = dataset.apply(tf.data.experimental.assert_cardinality(count))
            options = tf.data.Options()
            options.deterministic = True
            off = tf.data.experimental.AutoShardPolicy.OFF  # sharded by input pipeline above
            options.experimental_distribute.auto_shard_policy = off
            return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)

        return dataset_fn

    def make_eval_dataset(self, batch_size: int) -> tf.data.Dataset:
        """(images, labels) batches of `eval_split` by `preprocess_for_eval`, last batch kept.

        For ``Trainer.fit(validation_data=...)`` (every worker evaluates the whole split).
        """
        check_positive_int("batch_size", batch_size)
        dataset = self._read(self.eval_split, seed=None).map(
            lambda image, label: (preprocess_for_eval(image, self.image_size, self._jpeg), label),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
