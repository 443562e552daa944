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
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tf_largebatch._validation import _fail, check_positive_int

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

    One Dense projects to queries, keys and values (d → 3d), ``keras.ops.dot_product_attention``
    with ``is_causal=True`` mixes them per head, one Dense projects back (d → d).
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
            3 * d_model, kernel_initializer=keras.initializers.GlorotUniform(seeds[0]), name="qkv"
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
