"""The bring-your-own-model example end to end: 1 device, and 2 MultiWorkerMirroredStrategy
workers through the local launcher (identical weights on both workers, equal to 1 device)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = str(REPO / "examples" / "fit_your_model.py")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}


def summary_lines(stdout: str) -> list[dict]:
    return [json.loads(line[line.index("{") :]) for line in stdout.splitlines() if "sha256" in line]


def run(args, timeout=400):
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return summary_lines(done.stdout)


@pytest.mark.slow
def test_dict_input_model_on_two_workers_equals_one_device(tmp_path):
    common = ["--epochs=4", "--input=dataset"]
    (single,) = run([sys.executable, EXAMPLE, *common, f"--model_dir={tmp_path / 'one'}"])
    launcher = [sys.executable, "-m", "tf_largebatch.launch", "--num_workers=2",
                "--timeout_seconds=360", "--"]  # fmt: skip
    workers = run([*launcher, EXAMPLE, *common, "--strategy=multi_worker",
                   f"--model_dir={tmp_path / 'mw'}"])  # fmt: skip
    assert len(workers) == 2
    assert workers[0]["weights_sha256"] == workers[1]["weights_sha256"]
    assert workers[0]["parameter_updates"] == single["parameter_updates"] == 32 * 2 + 16 * 2
    import keras

    one = keras.models.load_model(tmp_path / "one" / "model.keras").get_weights()
    two = keras.models.load_model(tmp_path / "mw" / "model.keras").get_weights()
    for a, b in zip(one, two):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    assert workers[0]["val_mae"] == pytest.approx(single["val_mae"], rel=1e-3)
