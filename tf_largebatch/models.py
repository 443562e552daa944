"""A small zoo of reference models: mlp, cnn, cnn1d, CIFAR ResNet-20, ResNet-50 with zero-γ.

Every model maps its inputs — images (H, W, C), or 1-D signals (L, C) or (L,) for ``mlp`` and
``cnn1d`` — to logits (no softmax). ResNets follow Goyal et al. 2017:

* zero-γ: the last BatchNorm of every residual block starts with γ = 0, so each block starts
  as the identity and the network behaves like a shallower one early in training (§5.1);
* convolutions He-initialised, N(0, 2/fan_out) with fan_out = k·k·filters (Caffe2's MSRAFill,
  `VarianceScaling(2.0, "fan_out", "untruncated_normal")`), bias-free before BatchNorm;
* final fully connected layer N(0, 0.01²), bias 0 (§5.1);
* weight decay λ on conv/dense kernels only, as the loss term (λ/2)‖w‖² (Keras
  ``L2(λ/2)``), so its gradient is the λw of Goyal's update (§3, weight decay); BatchNorm γ/β
  are not decayed (§5.1) and neither are biases (Model Garden practice).

BatchNorm uses momentum 0.9 and ε = 1e-5. Under `MirroredStrategy` each replica normalises with
its own per-replica batch statistics (Keras's default ``synchronized=False``), which is Goyal et
al.'s setting (§2.3: BN statistics over the n examples of one worker).

References:
  He et al. 2016, "Deep Residual Learning for Image Recognition", §4.2 (CIFAR ResNets).
  Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", §2.3, §3, §5.1.
  Greydanus 2020, "Scaling Down Deep Learning" (MNIST-1D), the ``ConvBase`` baseline (cnn1d).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import keras

from tf_largebatch._validation import _fail, check_choice, check_non_negative, check_positive_int

MODEL_NAMES = ("auto", "mlp", "cnn", "cnn1d", "resnet20", "resnet50")
_SIGNAL_MODELS = ("mlp", "cnn1d")  # accept 1-D signals (L, C) or (L,)
_IMAGE_MODELS = ("mlp", "cnn", "resnet20", "resnet50")  # accept images (H, W, C)
_BN_MOMENTUM, _BN_EPSILON = 0.9, 1e-5
_RESNET50_BLOCKS = (3, 4, 6, 3)


def resolve_model_name(name: str, input_shape: Sequence[int]) -> str:
    """Resolves ``"auto"`` to a concrete model for an input shape, and checks the pair.

    Rule for images (H, W, C): H, W ≤ 16 → ``"mlp"`` (digits); H, W ≤ 32 and C = 1 →
    ``"cnn"`` (MNIST-like); H, W ≤ 64 → ``"resnet20"`` (CIFAR-like); otherwise ``"resnet50"``.
    1-D signals (L, C) or (L,) (MNIST-1D) → ``"mlp"``. Other names pass through when they
    accept the shape: ``"cnn1d"`` takes signals only; ``"cnn"`` and the ResNets take images
    only; ``"mlp"`` takes both.

    Raises:
      ValueError: unknown `name` (names ``model``), `input_shape` not (H, W, C), (L, C) or
        (L,) of positive integers, or a model that cannot take that shape.

    Example:
      >>> resolve_model_name("auto", (8, 8, 1)), resolve_model_name("auto", (32, 32, 3))
      ('mlp', 'resnet20')
      >>> resolve_model_name("auto", (40, 1)), resolve_model_name("cnn1d", (40, 1))
      ('mlp', 'cnn1d')
    """
    check_choice("model", name, MODEL_NAMES)
    shape = tuple(input_shape)
    if not 1 <= len(shape) <= 3 or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        _fail(
            "input_shape",
            "(height, width, channels), (length, channels) or (length,) of positive integers",
            shape,
        )
    is_image = len(shape) == 3
    if name == "auto":
        if not is_image:
            return "mlp"
        height, width, channels = shape
        if height <= 16 and width <= 16:
            return "mlp"
        if height <= 32 and width <= 32 and channels == 1:
            return "cnn"
        if height <= 64 and width <= 64:
            return "resnet20"
        return "resnet50"
    if is_image and name not in _IMAGE_MODELS:
        _fail("input_shape", f"(length, channels) or (length,) for model={name!r}", shape)
    if not is_image and name not in _SIGNAL_MODELS:
        _fail("input_shape", f"(height, width, channels) for model={name!r}", shape)
    return name


class _Layers:
    """Layer factory for one build: per-layer seeds drawn from `seed`, L2(λ/2) on kernels."""

    def __init__(self, seed: int | None, weight_decay: float) -> None:
        self._seed = seed
        self._counter = itertools.count()
        self._weight_decay = weight_decay

    def seed(self) -> int | None:
        """A distinct, reproducible seed per initializer (None: Keras draws one at random)."""
        if self._seed is None:
            return None
        return (self._seed * 1_000_003 + next(self._counter)) % 2**31

    def decay(self) -> keras.regularizers.Regularizer | None:
        return keras.regularizers.L2(self._weight_decay / 2) if self._weight_decay > 0 else None

    def dense(self, units: int, name: str, *, activation: str | None = None, **kw: Any) -> Any:
        kw.setdefault("kernel_initializer", keras.initializers.GlorotUniform(self.seed()))
        return keras.layers.Dense(
            units, activation=activation, kernel_regularizer=self.decay(), name=name, **kw
        )

    def logits(self, x: Any, num_classes: int) -> Any:
        """Goyal's FC: kernel N(0, 0.01²), bias 0."""
        init = keras.initializers.RandomNormal(stddev=0.01, seed=self.seed())
        return self.dense(num_classes, "logits", kernel_initializer=init)(x)

    def conv(self, x: Any, filters: int, kernel: int, strides: int, name: str) -> Any:
        """He-initialised (fan_out), bias-free conv; strided convs pad symmetrically (Caffe)."""
        if strides > 1 and kernel > 1:
            x = keras.layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
        padding = "valid" if strides > 1 else "same"
        init = keras.initializers.VarianceScaling(
            2.0, "fan_out", "untruncated_normal", seed=self.seed()
        )
        return keras.layers.Conv2D(
            filters,
            kernel,
            strides,
            padding,
            use_bias=False,
            name=name,
            kernel_initializer=init,
            kernel_regularizer=self.decay(),
        )(x)

    def bn(self, x: Any, name: str, *, zero_gamma: bool = False, relu: bool = True) -> Any:
        x = keras.layers.BatchNormalization(
            momentum=_BN_MOMENTUM,
            epsilon=_BN_EPSILON,
            name=name,
            gamma_initializer="zeros" if zero_gamma else "ones",
        )(x)
        return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _residual(layers: _Layers, x: Any, y: Any, filters: int, strides: int, name: str) -> Any:
    """relu(y + shortcut(x)): identity, or 1×1 conv + BN when the shape changes."""
    if strides != 1 or x.shape[-1] != filters:
        x = layers.conv(x, filters, 1, strides, f"{name}_proj_conv")
        x = layers.bn(x, f"{name}_proj_bn", relu=False)
    y = keras.layers.Add(name=f"{name}_add")([x, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _basic_block(layers: _Layers, x: Any, filters: int, strides: int, name: str) -> Any:
    y = layers.bn(layers.conv(x, filters, 3, strides, f"{name}_conv1"), f"{name}_bn1")
    y = layers.conv(y, filters, 3, 1, f"{name}_conv2")
    y = layers.bn(y, f"{name}_bn2", zero_gamma=True, relu=False)
    return _residual(layers, x, y, filters, strides, name)


def _bottleneck(layers: _Layers, x: Any, filters: int, strides: int, name: str) -> Any:
    """1×1 → 3×3 (stride here, "v1.5" as in fb.resnet.torch / Model Garden) → 1×1 (4·filters)."""
    y = layers.bn(layers.conv(x, filters, 1, 1, f"{name}_conv1"), f"{name}_bn1")
    y = layers.bn(layers.conv(y, filters, 3, strides, f"{name}_conv2"), f"{name}_bn2")
    y = layers.conv(y, 4 * filters, 1, 1, f"{name}_conv3")
    y = layers.bn(y, f"{name}_bn3", zero_gamma=True, relu=False)
    return _residual(layers, x, y, 4 * filters, strides, name)


def _mlp(layers: _Layers, inputs: Any, num_classes: int) -> Any:
    x = keras.layers.Flatten(name="flatten")(inputs)
    x = layers.dense(128, "hidden", activation="relu")(x)
    return layers.dense(num_classes, "logits")(x)


def _cnn(layers: _Layers, inputs: Any, num_classes: int) -> Any:
    x = inputs
    for i, filters in enumerate((32, 64), start=1):
        x = keras.layers.Conv2D(
            filters,
            3,
            padding="same",
            activation="relu",
            name=f"conv{i}",
            kernel_initializer=keras.initializers.GlorotUniform(layers.seed()),
            kernel_regularizer=layers.decay(),
        )(x)
        x = keras.layers.MaxPooling2D(2, padding="same", name=f"pool{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = layers.dense(128, "hidden", activation="relu")(x)
    return layers.dense(num_classes, "logits")(x)


def _cnn1d(layers: _Layers, inputs: Any, num_classes: int) -> Any:
    """MNIST-1D's ``ConvBase`` (Greydanus 2020): 3 × [conv1d(25) stride 2, pad 1, relu] → FC.

    Kernels 5, 3, 3 (a length-40 signal becomes 19 → 10 → 5 positions, 5 × 25 = 125 features);
    weights and biases drawn as PyTorch's defaults, U(±1/√fan_in), as in the published baseline.
    """
    x = inputs if len(inputs.shape) == 3 else keras.layers.Reshape((-1, 1), name="channels")(inputs)
    for i, kernel in enumerate((5, 3, 3), start=1):
        x = keras.layers.ZeroPadding1D(1, name=f"conv{i}_pad")(x)
        fan_in = kernel * x.shape[-1]
        x = keras.layers.Conv1D(
            25,
            kernel,
            strides=2,
            activation="relu",
            name=f"conv{i}",
            kernel_initializer=_torch_uniform(layers),
            bias_initializer=_torch_uniform(layers, fan_in),
            kernel_regularizer=layers.decay(),
        )(x)
    x = keras.layers.Flatten(name="flatten")(x)
    return layers.dense(
        num_classes,
        "logits",
        kernel_initializer=_torch_uniform(layers),
        bias_initializer=_torch_uniform(layers, x.shape[-1]),
    )(x)


def _torch_uniform(layers: _Layers, fan_in: int | None = None) -> keras.initializers.Initializer:
    """PyTorch's default init, U(±1/√fan_in): for kernels (fan_in from the shape) or biases."""
    if fan_in is None:  # kaiming_uniform(a=√5): bound √(6 / ((1 + 5)·fan_in)) = 1/√fan_in
        return keras.initializers.VarianceScaling(
            1.0 / 3.0, "fan_in", "uniform", seed=layers.seed()
        )
    bound = fan_in**-0.5
    return keras.initializers.RandomUniform(-bound, bound, seed=layers.seed())


def _resnet20(layers: _Layers, inputs: Any, num_classes: int) -> Any:
    """He et al. §4.2 with n = 3: 3×3 conv(16), 3 stages × 3 basic blocks (16/32/64)."""
    x = layers.bn(layers.conv(inputs, 16, 3, 1, "stem_conv"), "stem_bn")
    for stage, filters in enumerate((16, 32, 64), start=1):
        for block in range(1, 4):
            strides = 2 if stage > 1 and block == 1 else 1
            x = _basic_block(layers, x, filters, strides, f"stage{stage}_block{block}")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return layers.logits(x, num_classes)


def _resnet50(layers: _Layers, inputs: Any, num_classes: int) -> Any:
    """He et al. ResNet-50: 7×7/2 conv, 3×3/2 max pool, bottleneck stages (3, 4, 6, 3)."""
    x = layers.bn(layers.conv(inputs, 64, 7, 2, "stem_conv"), "stem_bn")
    x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    x = keras.layers.MaxPooling2D(3, 2, name="stem_pool")(x)
    for stage, (blocks, filters) in enumerate(zip(_RESNET50_BLOCKS, (64, 128, 256, 512)), 2):
        for block in range(1, blocks + 1):
            strides = 2 if stage > 2 and block == 1 else 1
            x = _bottleneck(layers, x, filters, strides, f"stage{stage}_block{block}")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return layers.logits(x, num_classes)


_BUILDERS = {
    "mlp": _mlp,
    "cnn": _cnn,
    "cnn1d": _cnn1d,
    "resnet20": _resnet20,
    "resnet50": _resnet50,
}


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    weight_decay: float = 0.0,
    seed: int | None = None,
) -> keras.Model:
    """Builds a reference model that outputs logits.

    Models: ``"mlp"`` Flatten → Dense(128, relu) → Dense(classes) (the offline default for
    digits); ``"cnn"`` 2 × [3×3 conv (32, 64) relu + 2×2 max pool] → Dense(128, relu) →
    Dense(classes); ``"cnn1d"`` MNIST-1D's published CNN (``ConvBase``, Greydanus 2020):
    3 × [conv1d 25 channels, kernels 5/3/3, stride 2, padding 1, relu] → Dense(classes), 5,210
    parameters for (40, 1) → 10, PyTorch-default U(±1/√fan_in) init; ``"resnet20"`` He et
    al.'s CIFAR ResNet (0.27M parameters for 10 classes, 1×1 projection shortcuts when
    downsampling); ``"resnet50"`` ResNet-50 v1 bottlenecks (3, 4, 6, 3), 25.56M trainable
    parameters at 1000 classes; ``"auto"`` picks one by input size (see
    `resolve_model_name`). ResNets carry Goyal et al.'s zero-γ,
    He-normal and N(0, 0.01²) FC initialisations (module docstring).

    Args:
      name: One of `MODEL_NAMES`.
      input_shape: Image shape (H, W, C) (ResNet-50 builds down to 8×8), or signal shape
        (L, C) or (L,) for ``"mlp"`` and ``"cnn1d"``.
      num_classes: Number of logits.
      weight_decay: λ; adds (λ/2)‖w‖² per conv/dense kernel to ``model.losses`` (so the
        gradient is λw). BatchNorm γ/β and biases are not decayed. 0 adds nothing.
      seed: Makes initialisation deterministic: every initializer gets its own seed derived
        from `seed` and its position, so two builds with the same seed have identical weights
        (also inside a `strategy.scope()`). None: random.

    Returns:
      A functional `keras.Model` named after the resolved model, input named ``"images"``.

    Raises:
      ValueError: unknown `name` (names ``model``), bad `input_shape`, `num_classes`,
        `weight_decay` or `seed`.

    Example:
      >>> model = build_model("resnet20", (32, 32, 3), 10, weight_decay=1e-4, seed=0)
      >>> model.output_shape
      (None, 10)

    References:
      Goyal et al. 2017, §5.1 (zero-γ, weight decay on weights only, FC init).
      Greydanus 2020, "Scaling Down Deep Learning", MNIST-1D baselines (cnn1d).
    """
    resolved = resolve_model_name(name, input_shape)
    check_positive_int("num_classes", num_classes)
    check_non_negative("weight_decay", weight_decay)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        _fail("seed", "an integer or None", seed)
    layers = _Layers(seed, float(weight_decay))
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    outputs = _BUILDERS[resolved](layers, inputs, num_classes)
    return keras.Model(inputs, outputs, name=resolved)
