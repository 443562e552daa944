"""examples/train_text.py end to end: it learns (below the byte-unigram entropy) and gives the
same weights on 1 device, 2 replicas and 2 MultiWorkerMirroredStrategy workers."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = str(REPO / "examples" / "train_text.py")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
# A small model on 60 kB of the standard library: 2 epochs, 52 + 26 steps (batch 32 → 64).
QUICK = [
    "--max_bytes=60000",
    "--sequence_length=32",
    "--d_model=32",
    "--num_heads=2",
    "--num_layers=1",
    "--epochs=2",
    "--global_batch_size=32",
    "--verbose=0",
]


def run(args, timeout=400):
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return [
        json.loads(line[line.index("{") :])
        for line in done.stdout.splitlines()
        if "Summary:" in line
    ]


def weights(path):
    import keras

    import tf_largebatch.text  # noqa: F401 (registers the model's layers)

    return keras.models.load_model(path).get_weights()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("one")
    (summary,) = run([sys.executable, EXAMPLE, *QUICK, f"--model_dir={model_dir}"])
    return model_dir, summary


@pytest.mark.slow
def test_quick_run_learns_below_the_unigram_entropy(single):
    model_dir, summary = single
    results = json.loads((model_dir / "results.json").read_text())
    assert results["parameter_updates"] == summary["parameter_updates"] == 52 + 26
    assert results["validation_bits_per_byte"] == pytest.approx(
        results["test_loss"] / math.log(2), rel=1e-9
    )
    assert results["validation_loss"] == results["test_loss"]
    assert 4.0 < results["unigram_bits_per_byte"] < 5.0  # Python source
    assert results["validation_bits_per_byte"] < results["unigram_bits_per_byte"] - 0.3
    assert results["train_bytes"] == 54_000 and results["validation_bytes"] == 6_000
    assert [p["global_batch_size"] for p in results["phases"]] == [32, 64]
    assert (model_dir / "model.keras").exists()
    assert list((model_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_one_device_two_replicas_and_two_workers_end_with_the_same_weights(single, tmp_path):
    model_dir, summary = single
    (mirrored,) = run([sys.executable, EXAMPLE, *QUICK, "--num_cpu_devices=2",
                       "--strategy=mirrored", f"--model_dir={tmp_path / 'mirrored'}"])  # fmt: skip
    launcher = [sys.executable, "-m", "tf_largebatch.launch", "--num_workers=2",
                "--timeout_seconds=360", "--"]  # fmt: skip
    workers = run([*launcher, EXAMPLE, *QUICK, "--strategy=multi_worker",
                   f"--model_dir={tmp_path / 'mw'}"])  # fmt: skip
    assert mirrored["num_replicas"] == 2 and len(workers) == 2
    assert workers[0]["num_replicas"] == 2
    assert workers[0]["weights_sha256"] == workers[1]["weights_sha256"]
    assert summary["parameter_updates"] == mirrored["parameter_updates"] == 78
    one = weights(model_dir / "model.keras")
    for other in ("mirrored", "mw"):
        for a, b in zip(one, weights(tmp_path / other / "model.keras"), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=other)
    for other in (mirrored, workers[0]):
        assert other["validation_bits_per_byte"] == pytest.approx(
            summary["validation_bits_per_byte"], rel=1e-4
        )


@pytest.mark.slow
@pytest.mark.parametrize(
    "flag, message",
    [
        ("--optimizer=sgd", "--optimizer"),
        ("--sequence_length=1", "`sequence_length`.*Received: sequence_length=1"),
    ],
)
def test_bad_flags_are_one_line_and_exit_status_2(flag, message, tmp_path):
    done = subprocess.run(
        [sys.executable, EXAMPLE, flag, f"--model_dir={tmp_path / 'bad'}"],
        capture_output=True, text=True, timeout=120, env=ENV,
    )  # fmt: skip
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("train_text.py:")]
    assert len(lines) == 1 and re.search(message, lines[0]), done.stderr[-2000:]
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_rampup_with_lamb_and_wsd(tmp_path):
    # 1,687 windows; batch 16 → 64 by 16 over the first 800 windows (Megatron's rule), then 64.
    args = ["--mode=rampup", "--optimizer=lamb", "--schedule=wsd", "--global_batch_size=64",
            "--rampup_batch_size=16,16,800", f"--model_dir={tmp_path}"]  # fmt: skip
    (summary,) = run([sys.executable, EXAMPLE, *QUICK, *args])
    results = json.loads((tmp_path / "results.json").read_text())
    phases = [(p["global_batch_size"], p["num_steps"]) for p in results["phases"]]
    assert phases == [(16, 17), (32, 9), (48, 5), (64, 39)]  # 272, 288, 240, 2496 windows
    assert summary["parameter_updates"] == 70
    assert results["validation_bits_per_byte"] < results["unigram_bits_per_byte"] - 0.3
    assert results["config"]["optimizer"] == "lamb"
    import keras

    import tf_largebatch.text  # noqa: F401

    optimizer = keras.models.load_model(tmp_path / "model.keras").optimizer
    assert type(optimizer).__name__ == "Lamb"
    assert optimizer.get_config()["learning_rate"]["class_name"] == "WarmupStableDecay"
