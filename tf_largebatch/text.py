"""Byte-level language modelling on text every machine has: data, baseline and a tiny Transformer.

The default corpus is the Python standard library's own source, read from the running
interpreter's installation (``sysconfig.get_paths()["stdlib"]``), so nothing is downloaded;
``text_files`` takes any glob instead. Text is tokenised as raw bytes (vocabulary 256), split
into training and validation *by file* (no file contributes to both), and cut into windows
``(tokens[:-1], tokens[1:])`` for next-byte prediction. `build_text_model` is a small
decoder-only Transformer (GPT-style: token + learned position embedding, pre-LayerNorm blocks
of causal self-attention and an MLP, a final LayerNorm and a Dense layer to the logits).

A loss in nats per byte becomes bits per byte as loss / ln 2 (`bits_per_byte`); the reference
a model must beat is the entropy of the training text's byte unigram distribution
(`unigram_bits_per_byte`), the loss of a model that ignores context.

Example:
  >>> corpus = load_text(max_bytes=200_000)
  >>> data = text_datasets(corpus, sequence_length=64)
  >>> model = build_text_model(sequence_length=64, seed=0)
  >>> model.compile(optimizer="adamw", loss=keras.losses.SparseCategoricalCrossentropy(
  ...     from_logits=True))

References:
  Vaswani et al. 2017, "Attention Is All You Need" (§3, the Transformer decoder).
  Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (pre-LayerNorm).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import math
import os
import sysconfig
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tf_largebatch._validation import _fail, check_choice, check_positive_int
from tf_largebatch.phases import PhasePlan, plan_phases, steps_per_epoch
from tf_largebatch.scaling import scale_learning_rate, suggested_scaling_rule

VOCAB_SIZE = 256  # bytes
DEFAULT_MAX_BYTES = 1_000_000


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    """Training and validation text as bytes, split by file.

    Attributes:
      train_bytes: the training text, ``uint8`` of shape (n,).
      validation_bytes: the validation text, ``uint8`` of shape (m,).
      train_files: the files (in order) the training text was read from.
      validation_files: the files the validation text was read from (none in both).
    """

    train_bytes: np.ndarray
    validation_bytes: np.ndarray
    train_files: tuple[str, ...]
    validation_files: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TextDatasets:
    """Next-byte windows of a `TextCorpus` for the `Trainer`.

    Attributes:
      train: an *unbatched* `tf.data.Dataset` of ``(x, y)`` int32 windows of shape (T,),
        ``y`` being ``x`` shifted by one byte.
      num_train_examples: windows in ``train`` (the plan's ``dataset_size``).
      validation: ``(x, y)`` int32 arrays of shape (M, T).
    """

    train: tf.data.Dataset
    num_train_examples: int
    validation: tuple[np.ndarray, np.ndarray]


def stdlib_text_files() -> list[str]:
    """The running interpreter's standard-library ``*.py`` files (top level), sorted."""
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


def load_text(
    text_files: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    validation_fraction: float = 0.1,
) -> TextCorpus:
    """Reads up to `max_bytes` of text and splits it into training and validation by file.

    Files are taken in a fixed pseudo-random order, that of the SHA-256 of their base names
    (so a small budget mixes many modules rather than the alphabet's first few, and the order
    does not depend on where the files are installed; ties by path). With
    k = round(1/validation_fraction), every k-th file in that order (the k-th, 2k-th, ...; the
    last one when there are fewer than k) goes to validation and the others to training. Each
    split takes whole files in order until its budget (``validation_fraction·max_bytes`` for
    validation, the rest for training) is reached; the last file is cut at the budget.

    Args:
      text_files: a glob (``**`` allowed) of text files; None: the standard library's
        top-level ``*.py`` files (`stdlib_text_files`).
      max_bytes: total bytes to read (training + validation), > 0.
      validation_fraction: share of `max_bytes` for validation, in (0, 0.5].

    Returns:
      A `TextCorpus`.

    Raises:
      ValueError: a glob matching no file or only one, bad `max_bytes` or
        `validation_fraction`, or a split left empty.
    """
    check_positive_int("max_bytes", max_bytes)
    if isinstance(validation_fraction, bool) or not 0 < validation_fraction <= 0.5:
        _fail("validation_fraction", "in (0, 0.5]", validation_fraction)
    if text_files is None:
        files = stdlib_text_files()
    else:
        files = sorted(f for f in glob.glob(text_files, recursive=True) if os.path.isfile(f))
    files.sort(key=lambda f: (hashlib.sha256(os.path.basename(f).encode()).hexdigest(), f))
    if len(files) < 2:
        raise ValueError(
            f"Argument `text_files` must match at least 2 files (validation takes whole files); "
            f"it matches {len(files)}. Received: text_files={text_files!r}"
        )
    k = max(2, round(1 / validation_fraction))
    validation_index = {i for i in range(k - 1, len(files), k)} or {len(files) - 1}
    budgets = {"validation": int(max_bytes * validation_fraction)}
    budgets["train"] = max_bytes - budgets["validation"]
    chunks: dict[str, list[bytes]] = {"train": [], "validation": []}
    used: dict[str, list[str]] = {"train": [], "validation": []}
    for i, path in enumerate(files):
        split = "validation" if i in validation_index else "train"
        if budgets[split] <= 0:
            if all(b <= 0 for b in budgets.values()):
                break
            continue
        with open(path, "rb") as f:
            content = f.read(budgets[split])
        if content:
            chunks[split].append(content)
            used[split].append(path)
            budgets[split] -= len(content)
    for split in ("train", "validation"):
        if not chunks[split]:
            raise ValueError(
                f"Argument `text_files` left the {split} split empty (empty files, or "
                f"max_bytes too small). Received: text_files={text_files!r}, max_bytes={max_bytes}"
            )
    return TextCorpus(
        train_bytes=np.frombuffer(b"".join(chunks["train"]), dtype=np.uint8),
        validation_bytes=np.frombuffer(b"".join(chunks["validation"]), dtype=np.uint8),
        train_files=tuple(used["train"]),
        validation_files=tuple(used["validation"]),
    )


def text_windows(data: np.ndarray, sequence_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Cuts a byte stream into next-byte windows.

    Window i is ``x = data[iT : iT + T]``, ``y = data[iT + 1 : iT + T + 1]`` with
    T = `sequence_length`: consecutive windows share one byte, so every byte after the first
    is a target exactly once (up to the cut tail).

    Args:
      data: a 1-D array of token ids.
      sequence_length: T ≥ 2.

    Returns:
      ``(x, y)``, int32 arrays of shape (⌊(len(data) − 1)/T⌋, T).

    Raises:
      ValueError: `sequence_length` < 2 or longer than the data allows for one window.

    Example:
      >>> text_windows(np.arange(7), 3)
      (array([[0, 1, 2],
             [3, 4, 5]], dtype=int32), array([[1, 2, 3],
             [4, 5, 6]], dtype=int32))
    """
    check_sequence_length(sequence_length)
    data = np.asarray(data)
    count = (len(data) - 1) // sequence_length
    if count < 1:
        raise ValueError(
            f"Argument `sequence_length` must leave at least one window in {len(data)} tokens. "
            f"Received: sequence_length={sequence_length}"
        )
    idx = np.arange(count)[:, None] * sequence_length + np.arange(sequence_length)
    return data[idx].astype(np.int32), data[idx + 1].astype(np.int32)


def text_datasets(corpus: TextCorpus, sequence_length: int) -> TextDatasets:
    """The training windows as an unbatched `tf.data.Dataset`, the validation ones as arrays.

    Args:
      corpus: from `load_text`.
      sequence_length: T ≥ 2, the model's context.

    Returns:
      `TextDatasets`.

    Raises:
      ValueError: `sequence_length` < 2 or too long for a split.
    """
    x, y = text_windows(corpus.train_bytes, sequence_length)
    validation = text_windows(corpus.validation_bytes, sequence_length)
    return TextDatasets(tf.data.Dataset.from_tensor_slices((x, y)), len(x), validation)


def unigram_bits_per_byte(train_bytes: np.ndarray) -> float:
    """Entropy of the byte unigram distribution: −Σ p(b)·log₂ p(b) over bytes b with p(b) > 0.

    The cross-entropy, in bits per byte, of the best context-free model of `train_bytes`: a
    language model should be well below it.

    Raises:
      ValueError: empty `train_bytes`.

    Example:
      >>> unigram_bits_per_byte(np.frombuffer(b"abab", np.uint8))
      1.0
    """
    counts = np.bincount(np.asarray(train_bytes, dtype=np.uint8), minlength=VOCAB_SIZE)
    if counts.sum() == 0:
        _fail("train_bytes", "non-empty", "[]")
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def bits_per_byte(loss_nats: float) -> float:
    """A cross-entropy in nats per byte as bits per byte: loss / ln 2."""
    return float(loss_nats) / math.log(2)


def check_sequence_length(sequence_length: Any) -> None:
    """``sequence_length`` must be an integer ≥ 2 (one input and one target byte)."""
    if isinstance(sequence_length, bool) or not isinstance(sequence_length, int):
        _fail("sequence_length", "an integer >= 2", sequence_length)
    if sequence_length < 2:
        _fail("sequence_length", "an integer >= 2", sequence_length)


# ---- the model ------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="tf_largebatch")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding of each position 0 … T − 1 to a (batch, T, d) input."""

    def __init__(self, sequence_length: int, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sequence_length = sequence_length
        self.seed = seed

    def build(self, input_shape: Sequence[int | None]) -> None:
        init = keras.initializers.RandomNormal(stddev=0.02, seed=self.seed)
        self.embeddings = self.add_weight(
            shape=(self.sequence_length, input_shape[-1]), initializer=init, name="embeddings"
        )

    def call(self, inputs: Any) -> Any:
        length = ops.shape(inputs)[1]
        return inputs + ops.cast(self.embeddings[:length], inputs.dtype)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "sequence_length": self.sequence_length, "seed": self.seed}


@keras.saving.register_keras_serializable(package="tf_largebatch")
class CausalSelfAttention(keras.layers.Layer):
    """Multi-head self-attention where position t attends to positions ≤ t only.

    One Dense without bias projects to queries, keys and values (d → 3d),
    ``keras.ops.dot_product_attention`` with ``is_causal=True`` mixes them per head, one Dense
    projects back (d → d). No bias on q, k, v: a key bias has a zero gradient (softmax is
    shift-invariant), and Adam's g/√v would turn the rounding noise of that zero into full-size
    steps, differently for different replica counts.
    """

    def __init__(
        self, d_model: int, num_heads: int, seed: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if d_model % num_heads:
            raise ValueError(
                f"Argument `num_heads` must divide d_model={d_model}. Received: num_heads="
                f"{num_heads}"
            )
        self.d_model, self.num_heads, self.seed = d_model, num_heads, seed
        seeds = (None, None) if seed is None else (seed, seed + 1)
        self.qkv = keras.layers.Dense(
            3 * d_model,
            use_bias=False,
            kernel_initializer=keras.initializers.GlorotUniform(seeds[0]),
            name="qkv",
        )
        self.out = keras.layers.Dense(
            d_model, kernel_initializer=keras.initializers.GlorotUniform(seeds[1]), name="out"
        )

    def build(self, input_shape: Sequence[int | None]) -> None:
        self.qkv.build(input_shape)
        self.out.build((*input_shape[:-1], self.d_model))

    def call(self, inputs: Any) -> Any:
        batch, length = ops.shape(inputs)[0], ops.shape(inputs)[1]
        head = self.d_model // self.num_heads
        qkv = ops.reshape(self.qkv(inputs), (batch, length, 3, self.num_heads, head))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        mixed = ops.dot_product_attention(q, k, v, is_causal=True)
        return self.out(ops.reshape(mixed, (batch, length, self.d_model)))

    def get_config(self) -> dict[str, Any]:
        config = {"d_model": self.d_model, "num_heads": self.num_heads, "seed": self.seed}
        return {**super().get_config(), **config}


def build_text_model(
    sequence_length: int,
    vocab_size: int = VOCAB_SIZE,
    d_model: int = 64,
    num_heads: int = 4,
    num_layers: int = 2,
    mlp_ratio: int = 4,
    dropout_rate: float = 0.0,
    seed: int | None = None,
) -> keras.Model:
    """A small decoder-only Transformer: (batch, T) token ids → (batch, T, vocab) logits.

    h = TokenEmbedding(x) + PositionEmbedding; each of `num_layers` blocks is
    h ← h + Attention(LN(h)), h ← h + MLP(LN(h)) with MLP = Dense(mlp_ratio·d, GELU) → Dense(d);
    logits = Dense(vocab)(LN(h)). The model is returned uncompiled.

    Args:
      sequence_length: T ≥ 2, the input length.
      vocab_size: token ids are in [0, vocab_size).
      d_model: width d, a multiple of `num_heads`.
      num_heads: attention heads.
      num_layers: Transformer blocks (≥ 0).
      mlp_ratio: MLP hidden width over d.
      dropout_rate: dropout after attention and MLP (0: none, deterministic training).
      seed: every initializer gets its own seed derived from it (two builds with one seed
        have equal weights); None: Keras draws seeds.

    Returns:
      An uncompiled `keras.Model`.

    Raises:
      ValueError: naming the argument and value.
    """
    check_sequence_length(sequence_length)
    for name, value in (("vocab_size", vocab_size), ("d_model", d_model)):
        check_positive_int(name, value)
    check_positive_int("num_heads", num_heads)
    check_positive_int("mlp_ratio", mlp_ratio)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
        _fail("num_layers", "an integer >= 0", num_layers)
    if d_model % num_heads:
        _fail("num_heads", f"a divisor of d_model={d_model}", num_heads)
    if not 0 <= dropout_rate < 1:
        _fail("dropout_rate", "in [0, 1)", dropout_rate)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        _fail("seed", "an integer or None", seed)
    counter = itertools.count()

    def next_seed() -> int | None:
        return None if seed is None else (seed * 1_000_003 + 2 * next(counter)) % 2**31

    def dense(units: int, **kwargs: Any) -> keras.layers.Dense:
        init = keras.initializers.GlorotUniform(next_seed())
        return keras.layers.Dense(units, kernel_initializer=init, **kwargs)

    tokens = keras.Input((sequence_length,), dtype="int32", name="tokens")
    embed = keras.initializers.RandomNormal(stddev=0.02, seed=next_seed())
    h = keras.layers.Embedding(vocab_size, d_model, embeddings_initializer=embed)(tokens)
    h = PositionEmbedding(sequence_length, seed=next_seed())(h)
    for i in range(num_layers):
        a = keras.layers.LayerNormalization(epsilon=1e-5, name=f"block{i}_ln_attention")(h)
        a = CausalSelfAttention(d_model, num_heads, seed=next_seed(), name=f"block{i}_attention")(a)
        if dropout_rate:
            a = keras.layers.Dropout(dropout_rate, seed=next_seed())(a)
        h = keras.layers.Add()([h, a])
        m = keras.layers.LayerNormalization(epsilon=1e-5, name=f"block{i}_ln_mlp")(h)
        m = dense(mlp_ratio * d_model, activation="gelu", name=f"block{i}_mlp_in")(m)
        m = dense(d_model, name=f"block{i}_mlp_out")(m)
        if dropout_rate:
            m = keras.layers.Dropout(dropout_rate, seed=next_seed())(m)
        h = keras.layers.Add()([h, m])
    h = keras.layers.LayerNormalization(epsilon=1e-5, name="final_ln")(h)
    logits = dense(vocab_size, name="logits")(h)
    return keras.Model(tokens, logits, name="text_transformer")


# ---- one run: config → data → plan → strategy → Trainer → results ---------------------------

TEXT_OPTIMIZERS = ("adamw", "lamb")
TEXT_SCHEDULES = ("inverse_sqrt", "wsd", "goyal")
TEXT_MODES = ("decay_lr", "grow_batch", "hybrid", "rampup", "adaptive")
TEXT_WARMUPS = ("gradual", "constant", "none")
DEFAULT_BASE_LEARNING_RATES = {"adamw": 3e-3, "lamb": 3e-2}


@dataclasses.dataclass(frozen=True)
class TextExperimentConfig:
    """One language-model run; field names are the `examples/train_text.py` flag names.

    Attributes:
      text_files: glob of text files; None: the standard library's source (`load_text`).
      max_bytes: bytes of text read (training + validation).
      sequence_length: context T of the model, in bytes.
      d_model: Transformer width.
      num_heads: attention heads.
      num_layers: Transformer blocks.
      optimizer: ``adamw`` or ``lamb``.
      weight_decay: decoupled weight decay (not on biases and LayerNorm parameters).
      schedule: ``inverse_sqrt`` (warmup, then peak·√(W/step)), ``wsd`` (warmup, stable,
        then a linear decay over the last ``wsd_decay_fraction`` of the steps) or ``goyal``
        (the plan's own warmup and per-phase learning rates). The peak of the first two is
        the learning rate scaled to ``global_batch_size``; the plan then sets only the batch
        sizes.
      wsd_decay_fraction: share of all steps in the decay of ``schedule="wsd"``.
      mode: ``decay_lr``, ``grow_batch``, ``hybrid``, ``rampup`` or ``adaptive`` (see
        `plan_phases` and `TrainerConfig.adaptive_max_global_batch_size`).
      epochs: passes over the training windows.
      decay_epochs: epochs where the recipe decays (``decay_lr``, ``adaptive``) or grows the
        batch (``grow_batch``); None: ``(epochs // 2,)`` for those modes (none if epochs is 1)
        and none for ``rampup``.
      decay_factor: learning-rate multiplier per decay epoch (the batch grows by its inverse).
      global_batch_size: initial global batch in windows (the target batch for ``rampup``).
      base_learning_rate: learning rate per ``base_batch_size`` windows; None: 3e-3 for
        ``adamw``, 3e-2 for ``lamb`` (its step is relative to each layer's weight norm;
        measured on the quick test setting, 3e-3 left LAMB above the unigram entropy).
      base_batch_size: the reference batch of ``base_learning_rate``.
      scaling_rule: ``linear``, ``sqrt`` or ``none``; None: `suggested_scaling_rule` of the
        optimizer (``sqrt``).
      warmup_steps: warmup length in steps; None: from ``warmup_epochs``.
      warmup: ``schedule="goyal"`` only: ``gradual``, ``constant`` or ``none`` (Goyal §2.2).
      warmup_epochs: warmup length in epochs of the first phase's batch.
      rampup_batch_size: ``(start, increment, ramp_samples)`` for ``mode="rampup"``.
      max_global_batch_size: the batch cap of ``mode="adaptive"`` and ``mode="hybrid"``.
      strategy: ``auto``, ``one_device``, ``mirrored`` or ``multi_worker``.
      num_cpu_devices: split the CPU into this many logical devices (None: as is).
      max_per_replica_batch_size: gradient accumulation beyond this per-replica batch.
      steps_per_execution: training steps per compiled call.
      checkpoint_interval_seconds: epoch-end checkpoints at most this often (0: every epoch
        end; see `TrainerConfig`).
      model_dir: checkpoints, TensorBoard logs, ``results.json``, ``model.keras``.
      seed: initialisation and shuffling seed.
      verbose: 1: a progress bar per epoch; 0: quiet.
      measure_noise_scale: estimate the gradient noise scale B_simple every step.
      measure_sharpness: measure the final model's sharpness on the first
        ``sharpness_max_examples`` training windows (`sharpness.sharpness`) into
        ``results["sharpness"]``, with relative perturbation size
        ``sharpness_perturbation_size`` averaged over ``sharpness_num_perturbations`` draws.
    """

    text_files: str | None = None
    max_bytes: int = 600_000
    sequence_length: int = 64
    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 2
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    schedule: str = "inverse_sqrt"
    wsd_decay_fraction: float = 0.2
    mode: str = "grow_batch"
    epochs: int = 2
    decay_epochs: tuple[int, ...] | None = None
    decay_factor: float = 0.5
    global_batch_size: int = 32
    base_learning_rate: float | None = None
    base_batch_size: int = 32
    scaling_rule: str | None = None
    warmup_steps: int | None = None
    warmup: str = "gradual"
    warmup_epochs: float = 0.25
    rampup_batch_size: tuple[int, int, int] | None = None
    max_global_batch_size: int | None = None
    strategy: str = "auto"
    num_cpu_devices: int | None = None
    max_per_replica_batch_size: int | None = None
    steps_per_execution: int = 8
    checkpoint_interval_seconds: float = 60.0
    model_dir: str = "/tmp/tf_largebatch_text"
    seed: int = 0
    verbose: int = 1
    measure_noise_scale: bool = False
    measure_sharpness: bool = False
    sharpness_max_examples: int | None = 512
    sharpness_perturbation_size: float = 1e-3
    sharpness_num_perturbations: int = 5

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, TEXT_OPTIMIZERS)
        check_choice("schedule", self.schedule, TEXT_SCHEDULES)
        check_choice("mode", self.mode, TEXT_MODES)
        check_choice("warmup", self.warmup, TEXT_WARMUPS)
        check_sequence_length(self.sequence_length)
        if self.scaling_rule is not None:
            check_choice("scaling_rule", self.scaling_rule, ("linear", "sqrt", "none"))
        if self.warmup_steps is not None:
            check_positive_int("warmup_steps", self.warmup_steps)
        if not 0 < self.wsd_decay_fraction < 1:
            _fail("wsd_decay_fraction", "in (0, 1)", self.wsd_decay_fraction)
        if self.mode in ("adaptive", "hybrid") and self.max_global_batch_size is None:
            raise ValueError(
                f"Argument `max_global_batch_size` is required for mode={self.mode!r}."
            )

    @property
    def resolved_base_learning_rate(self) -> float:
        if self.base_learning_rate is not None:
            return self.base_learning_rate
        return DEFAULT_BASE_LEARNING_RATES[self.optimizer]

    @property
    def resolved_scaling_rule(self) -> str:
        return self.scaling_rule or suggested_scaling_rule(self.optimizer)


def text_plan(config: TextExperimentConfig, dataset_size: int) -> PhasePlan:
    """The `PhasePlan` of a config for `dataset_size` training windows."""
    decay_epochs = config.decay_epochs
    if decay_epochs is None:
        decay_epochs = (
            (config.epochs // 2,) if config.mode != "rampup" and config.epochs > 1 else ()
        )
    warmup_epochs = config.warmup_epochs
    if config.warmup_steps is not None:
        first_batch = (config.rampup_batch_size or (config.global_batch_size,))[0]
        warmup_epochs = config.warmup_steps / steps_per_epoch(dataset_size, first_batch)
    plan = plan_phases(
        "decay_lr" if config.mode == "adaptive" else config.mode,
        dataset_size=dataset_size,
        epochs=config.epochs,
        global_batch_size=config.global_batch_size,
        base_learning_rate=config.resolved_base_learning_rate,
        base_batch_size=config.base_batch_size,
        decay_epochs=tuple(decay_epochs),
        decay_factor=config.decay_factor,
        warmup=config.warmup if config.schedule == "goyal" else "none",
        warmup_epochs=warmup_epochs if config.schedule == "goyal" else 0,
        max_global_batch_size=config.max_global_batch_size if config.mode == "hybrid" else None,
        momentum=0.0,
        scaling_rule=config.resolved_scaling_rule,
        rampup_batch_size=config.rampup_batch_size,
    )
    return dataclasses.replace(plan, mode="adaptive") if config.mode == "adaptive" else plan


def text_learning_rate_fn(config: TextExperimentConfig, dataset_size: int) -> Any:
    """``learning_rate_fn(plan)`` for the `Trainer`: the config's schedule for a plan."""
    from tf_largebatch import schedules

    peak = scale_learning_rate(
        config.resolved_base_learning_rate,
        config.global_batch_size,
        config.base_batch_size,
        config.resolved_scaling_rule,
    )
    if config.warmup_steps is not None:
        warmup = config.warmup_steps
    else:
        first_batch = (config.rampup_batch_size or (config.global_batch_size,))[0]
        warmup = max(1, round(config.warmup_epochs * dataset_size / first_batch))

    def learning_rate_fn(plan: PhasePlan) -> Any:
        if config.schedule == "goyal":
            return plan.learning_rate_schedule()
        if config.schedule == "inverse_sqrt":
            return schedules.InverseSqrtDecay(peak, warmup)
        decay = max(1, round(config.wsd_decay_fraction * plan.total_steps))
        stable = max(0, plan.total_steps - warmup - decay)
        return schedules.WarmupStableDecay(peak, warmup, stable, decay)

    return learning_rate_fn


def run_text_experiment(
    config: TextExperimentConfig, *, on_plan: Callable[[PhasePlan, Any], None] | None = None
) -> dict[str, Any]:
    """Trains a byte-level Transformer language model through the `Trainer`.

    The strategy is made first (MultiWorkerMirroredStrategy must precede other TensorFlow
    work), then the text is read (`load_text`), windowed (`text_datasets`), planned
    (`text_plan`) and trained; the validation windows are evaluated after every epoch.

    Args:
      config: the run.
      on_plan: optional ``on_plan(plan, strategy)`` once the plan is made.

    Returns:
      The `Trainer`'s results plus ``validation_loss`` (nats per byte),
      ``validation_bits_per_byte``, ``unigram_bits_per_byte`` (of the training text),
      ``train_bytes``, ``validation_bytes``, ``text_files`` and ``config``; also written to
      ``model_dir/results.json`` (with ``model.keras`` and ``tensorboard/``).

    Raises:
      ValueError: any bad input, naming the argument (flag) and the value.
    """
    from tf_largebatch import distribute, training

    if config.num_cpu_devices is not None:
        distribute.configure_cpu_devices(config.num_cpu_devices)
    strategy = distribute.make_strategy(config.strategy)
    corpus = load_text(config.text_files, max_bytes=config.max_bytes)
    data = text_datasets(corpus, config.sequence_length)
    plan = text_plan(config, data.num_train_examples)
    if on_plan is not None:
        on_plan(plan, strategy)
    learning_rate_fn = text_learning_rate_fn(config, data.num_train_examples)

    def model_fn() -> keras.Model:
        model = build_text_model(
            config.sequence_length,
            d_model=config.d_model,
            num_heads=config.num_heads,
            num_layers=config.num_layers,
            seed=config.seed,
        )
        optimizer_class = {"adamw": keras.optimizers.AdamW, "lamb": keras.optimizers.Lamb}
        optimizer = optimizer_class[config.optimizer](
            learning_rate=learning_rate_fn(plan), weight_decay=config.weight_decay
        )
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        return model

    trainer = training.Trainer(
        model_fn,
        plan,
        training.TrainerConfig(
            model_dir=config.model_dir,
            seed=config.seed,
            max_per_replica_batch_size=config.max_per_replica_batch_size,
            steps_per_execution=config.steps_per_execution,
            checkpoint_interval_seconds=config.checkpoint_interval_seconds,
            verbose=config.verbose,
            measure_noise_scale=config.measure_noise_scale,
            adaptive_max_global_batch_size=(
                config.max_global_batch_size if config.mode == "adaptive" else None
            ),
            adaptive_learning_rate_rule={"none": "keep"}.get(
                config.resolved_scaling_rule, config.resolved_scaling_rule
            ),
        ),
        strategy=strategy,
        learning_rate_fn=learning_rate_fn,
    )
    trainer.fit(data.train, validation_data=data.validation)
    results = dict(trainer.results)
    results.update(
        validation_loss=results["test_loss"],
        validation_bits_per_byte=bits_per_byte(results["test_loss"]),
        unigram_bits_per_byte=unigram_bits_per_byte(corpus.train_bytes),
        train_bytes=len(corpus.train_bytes),
        validation_bytes=len(corpus.validation_bytes),
        text_files=config.text_files or "stdlib",
        config=dataclasses.asdict(config),
    )
    if config.measure_sharpness:  # every worker takes part (it is distributed)
        from tf_largebatch.sharpness import sharpness

        results["sharpness"] = sharpness(
            trainer.model, *text_windows(corpus.train_bytes, config.sequence_length),
            strategy=strategy, seed=config.seed, max_examples=config.sharpness_max_examples,
            perturbation_size=config.sharpness_perturbation_size,
            num_perturbations=config.sharpness_num_perturbations,
        )  # fmt: skip
    trainer.state.write("results.json", results)
    return results
