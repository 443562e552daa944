"""Byte-level text data, the unigram baseline and the small Transformer (tf_largebatch.text)."""

import math

import keras
import numpy as np
import pytest

from tf_largebatch import text


@pytest.fixture(scope="module")
def corpus():
    return text.load_text(max_bytes=50_000)


def write_files(tmp_path, contents):
    for name, body in contents.items():
        (tmp_path / name).write_bytes(body)
    return str(tmp_path / "*.txt")


def test_stdlib_corpus_is_deterministic_and_split_by_file(corpus):
    again = text.load_text(max_bytes=50_000)
    assert np.array_equal(corpus.train_bytes, again.train_bytes)
    assert np.array_equal(corpus.validation_bytes, again.validation_bytes)
    assert corpus.train_files == again.train_files
    assert len(corpus.train_bytes) == 45_000 and len(corpus.validation_bytes) == 5_000
    assert not set(corpus.train_files) & set(corpus.validation_files)
    assert all(f.endswith(".py") for f in corpus.train_files + corpus.validation_files)
    first = open(corpus.train_files[0], "rb").read()  # noqa: SIM115
    n = min(len(first), 45_000)
    assert corpus.train_bytes[:n].tobytes() == first[:n]  # the files' bytes, in order


def test_glob_split_takes_whole_files_and_budgets(tmp_path):
    files = {f"f{i}.txt": bytes([65 + i]) * 100 for i in range(10)}
    corpus = text.load_text(write_files(tmp_path, files), max_bytes=500, validation_fraction=0.2)
    # k = 5: the 5th and 10th files in hash order are validation; budgets 400 and 100.
    assert len(corpus.train_bytes) == 400 and len(corpus.validation_bytes) == 100
    assert len(corpus.train_files) == 4 and len(corpus.validation_files) == 1
    train_letters = set(corpus.train_bytes.tolist())
    assert len(train_letters) == 4 and not train_letters & set(corpus.validation_bytes.tolist())


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"text_files": "/nonexistent/*.txt"}, "text_files"),
        ({"max_bytes": 0}, "max_bytes"),
        ({"validation_fraction": 0.0}, "validation_fraction"),
        ({"validation_fraction": 0.7}, "validation_fraction"),
    ],
)
def test_load_text_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`.*Received: {name}="):
        text.load_text(**kwargs)


def test_windows_are_shifted_by_one_byte(corpus):
    x, y = text.text_windows(corpus.train_bytes, 32)
    assert x.shape == y.shape == ((45_000 - 1) // 32, 32) and x.dtype == np.int32
    assert np.array_equal(x[:, 1:], y[:, :-1])
    assert np.array_equal(x.ravel(), corpus.train_bytes[: x.size])
    assert np.array_equal(y[:, -1], x[1:, 0].tolist() + [corpus.train_bytes[x.size]])
    assert x.min() >= 0 and x.max() <= 255


@pytest.mark.parametrize("length", [1, 0, 2.0, True])
def test_sequence_length_must_be_an_integer_of_at_least_two(length):
    with pytest.raises(ValueError, match="`sequence_length`.*Received: sequence_length="):
        text.text_windows(np.arange(100), length)
    with pytest.raises(ValueError, match="`sequence_length`"):
        text.build_text_model(length)


def test_dataset_is_unbatched_windows_with_validation_arrays(corpus):
    data = text.text_datasets(corpus, 16)
    x, y = next(iter(data.train))
    assert x.shape == y.shape == (16,) and x.dtype.name == "int32"
    assert data.num_train_examples == (45_000 - 1) // 16 == int(data.train.cardinality())
    xv, yv = data.validation
    assert xv.shape == ((5_000 - 1) // 16, 16)
    assert np.array_equal(xv.ravel(), corpus.validation_bytes[: xv.size])
    np.testing.assert_array_equal(x.numpy(), corpus.train_bytes[:16])
    with pytest.raises(ValueError, match="`sequence_length`"):
        text.text_datasets(corpus, 6_000)  # longer than the validation text


def test_unigram_entropy_matches_numpy(corpus):
    counts = np.array([np.sum(corpus.train_bytes == b) for b in range(256)], dtype=float)
    p = counts[counts > 0] / counts.sum()
    want = -np.sum(p * np.log(p)) / np.log(2)
    assert text.unigram_bits_per_byte(corpus.train_bytes) == pytest.approx(want, rel=1e-12)
    assert 3.5 < want < 5.5  # Python source
    assert text.unigram_bits_per_byte(np.frombuffer(b"aaaa", np.uint8)) == 0.0
    assert text.unigram_bits_per_byte(np.arange(256, dtype=np.uint8)) == pytest.approx(8.0)
    assert text.bits_per_byte(math.log(2) * 3) == pytest.approx(3.0)


def test_model_shapes_and_seed():
    model = text.build_text_model(12, d_model=16, num_heads=2, num_layers=2, seed=3)
    x = np.random.default_rng(0).integers(0, 256, size=(5, 12)).astype("int32")
    assert model(x).shape == (5, 12, 256)
    twin = text.build_text_model(12, d_model=16, num_heads=2, num_layers=2, seed=3)
    for a, b in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(a, b)
    other = text.build_text_model(12, d_model=16, num_heads=2, num_layers=2, seed=4)
    assert not np.array_equal(model.get_weights()[0], other.get_weights()[0])
    qkv = model.get_layer("block0_attention").qkv.kernel.numpy()
    assert not np.allclose(qkv[:, :16], qkv[:, 16:32])  # queries and keys drawn apart


def test_causal_mask_later_tokens_do_not_change_earlier_logits():
    model = text.build_text_model(10, d_model=16, num_heads=4, num_layers=2, seed=0)
    x = np.random.default_rng(1).integers(0, 256, size=(2, 10)).astype("int32")
    changed = x.copy()
    changed[:, 6:] = (changed[:, 6:] + 1) % 256
    a, b = model(x).numpy(), model(changed).numpy()
    np.testing.assert_allclose(a[:, :6], b[:, :6], rtol=1e-5, atol=1e-6)
    assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-3  # and later ones do change


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_heads": 3}, "num_heads"),
        ({"num_layers": -1}, "num_layers"),
        ({"d_model": 0}, "d_model"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_model_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        text.build_text_model(8, **{"d_model": 16, **kwargs})


def test_model_trains_and_reloads(tmp_path, corpus):
    data = text.text_datasets(corpus, 16)
    model = text.build_text_model(16, d_model=16, num_heads=2, num_layers=1, seed=0)
    model.compile(
        optimizer=keras.optimizers.AdamW(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = model.evaluate(*data.validation, verbose=0)
    assert before == pytest.approx(math.log(256), rel=0.05)  # uniform over bytes at init
    model.fit(data.train.batch(32), epochs=1, verbose=0)
    after = model.evaluate(*data.validation, verbose=0)
    assert text.bits_per_byte(after) < text.unigram_bits_per_byte(corpus.train_bytes)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    xv = data.validation[0][:4]
    np.testing.assert_allclose(loaded(xv), model(xv), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "warmup, learning_rates",
    [
        ("gradual", [1e-3, 1e-3 + 3e-3 * 5 / 10, 4e-3, 4e-3]),  # η → 4η over 10 steps
        ("constant", [1e-3, 1e-3, 4e-3, 4e-3]),
        ("none", [4e-3, 4e-3, 4e-3, 4e-3]),
    ],
)
def test_goyal_schedule_warmup_shapes(warmup, learning_rates):
    """schedule="goyal": the plan's warmup (Goyal §2.2) from η at base_batch_size."""
    config = text.TextExperimentConfig(
        schedule="goyal",
        mode="decay_lr",
        epochs=2,
        decay_epochs=(),
        base_learning_rate=1e-3,
        base_batch_size=8,
        global_batch_size=32,
        scaling_rule="linear",
        warmup=warmup,
        warmup_epochs=0.5,
    )
    plan = text.text_plan(config, 640)  # 20 steps per epoch at 32: warmup 10 steps
    assert plan.warmup == warmup
    lrs = [plan.learning_rate_at_step(s) for s in (0, 5, 10, 30)]
    assert lrs == pytest.approx(learning_rates)


def test_hybrid_mode_caps_the_batch():
    config = text.TextExperimentConfig(
        schedule="goyal",
        mode="hybrid",
        epochs=3,
        decay_epochs=(1, 2),
        decay_factor=0.5,
        base_learning_rate=1e-3,
        base_batch_size=8,
        global_batch_size=8,
        max_global_batch_size=16,
    )
    plan = text.text_plan(config, 640)
    assert [p.global_batch_size for p in plan.phases] == [8, 16, 16]
    assert [p.learning_rate for p in plan.phases] == pytest.approx([1e-3, 1e-3, 5e-4])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"warmup": "cosine"}, "warmup"),
        ({"mode": "hybrid"}, "max_global_batch_size"),
        ({"mode": "adaptive"}, "max_global_batch_size"),
    ],
)
def test_config_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        text.TextExperimentConfig(**kwargs)


@pytest.mark.slow
def test_noise_scale_and_sharpness_are_measured(tmp_path):
    config = text.TextExperimentConfig(
        max_bytes=20_000,
        sequence_length=16,
        d_model=16,
        num_heads=2,
        num_layers=1,
        epochs=1,
        mode="decay_lr",
        global_batch_size=16,
        base_batch_size=16,
        strategy="one_device",
        model_dir=str(tmp_path),
        verbose=0,
        measure_noise_scale=True,
        measure_sharpness=True,
        sharpness_max_examples=64,
        sharpness_perturbation_size=1e-2,
        sharpness_num_perturbations=2,
    )
    results = text.run_text_experiment(config)
    assert results["noise_scale_steps"] and "noise_scale" in results["history"][0]
    sharp = results["sharpness"]
    assert sharp["num_examples"] == 64 and sharp["perturbation_size"] == 1e-2
    assert len(sharp["perturbed_loss_increases"]) == 2
    assert sharp["hessian_top_eigenvalue"] > 0 and sharp["perturbed_loss_increase"] > 0
