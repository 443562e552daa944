"""examples/train.py end to end, as a user runs it: results, bad input, kill and resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "examples" / "train.py")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0"}
QUICK = ["--epochs=4", "--decay_epochs=2", "--warmup_epochs=1", "--verbose=0"]
RESULT_FIELDS = {
    "test_accuracy",
    "test_loss",
    "final_train_loss",
    "parameter_updates",
    "epochs_completed",
    "examples_per_second",
    "wall_seconds",
    "num_replicas",
    "phases",
    "history",
    "trace_count",
    "phase_switch_seconds",
}


def run(*args, timeout=240, check=True):
    proc = subprocess.run(
        [sys.executable, TRAIN, *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
        cwd=ROOT,
    )
    if check and proc.returncode:
        raise AssertionError(proc.stdout[-2000:] + proc.stderr[-4000:])
    return proc


def results(model_dir):
    return json.loads((Path(model_dir) / "results.json").read_text())


def test_default_job_writes_results(tmp_path):
    proc = run(f"--model_dir={tmp_path}", *QUICK, "--verbose=1")
    assert "steps/ep" in proc.stdout and "Summary:" in proc.stdout  # phase table and summary
    r = results(tmp_path)
    assert set(r) >= RESULT_FIELDS
    assert r["parameter_updates"] == sum(p["steps"] for p in r["phases"])
    assert r["epochs_completed"] == 4 and len(r["history"]) == 4
    assert [p["global_batch_size"] for p in r["phases"]] == [64, 128]
    assert set(r["phases"][0]) >= {
        "start_epoch",
        "end_epoch",
        "global_batch_size",
        "learning_rate",
        "momentum",
        "steps",
    }
    assert set(r["history"][0]) >= {
        "epoch",
        "train_loss",
        "train_accuracy",
        "test_accuracy",
        "learning_rate",
        "global_batch_size",
    }
    assert r["trace_count"] == 1 and len(r["phase_switch_seconds"]) == 1
    assert r["phase_switch_seconds"][0] < 2.0
    assert r["test_accuracy"] > 0.9
    assert (tmp_path / "model.keras").exists() and (tmp_path / "tensorboard").is_dir()


def test_mirrored_two_cpu_devices_matches_one_device(tmp_path):
    run(f"--model_dir={tmp_path / 'one'}", *QUICK, "--global_batch_size=64")
    run(
        f"--model_dir={tmp_path / 'two'}",
        *QUICK,
        "--global_batch_size=64",
        "--num_cpu_devices=2",
        "--strategy=mirrored",
    )
    one, two = results(tmp_path / "one"), results(tmp_path / "two")
    assert two["num_replicas"] == 2
    assert two["parameter_updates"] == one["parameter_updates"]
    assert two["final_train_loss"] == pytest.approx(one["final_train_loss"], rel=1e-4)


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--num_cpu_devices=3", "--strategy=mirrored"], "global_batch_size"),
        (["--dataset=no_such_dataset_xyz"], "dataset"),
        (["--num_cpu_devices=0"], "num_cpu_devices"),
        (["--global_batch_size=4096"], "global_batch_size"),
        (["--global_batch_size=-32"], "global_batch_size"),
        (["--warmup_epochs=3", "--decay_epochs=2"], "warmup_epochs"),
        (["--decay_epochs=2,x"], "decay_epochs"),
    ],
)
def test_bad_input_is_one_clear_line_and_keeps_checkpoint(tmp_path, args, flag, good_run):
    model_dir, before = good_run
    proc = run(f"--model_dir={model_dir}", *QUICK, *args, check=False)
    assert proc.returncode == 2
    error = own_stderr(proc)
    assert len(error) == 1 and error[0].startswith("train.py: error: "), proc.stderr[-2000:]
    assert flag in error[0]
    assert snapshot(model_dir) == before  # nothing written over the good run


def test_npz_missing_arrays(tmp_path):
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((4, 8, 8)), y_train=np.zeros(4))
    proc = run(
        f"--model_dir={tmp_path / 'm'}", f"--dataset=npz:{tmp_path / 'bad.npz'}", check=False
    )
    assert proc.returncode != 0 and "x_test" in proc.stderr and "dataset" in proc.stderr


# TensorFlow's C++ runtime writes these to stderr whatever TF_CPP_MIN_LOG_LEVEL says.
TF_RUNTIME_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog|[IWE]\d{4} )"
)


def own_stderr(proc):
    """The stderr lines train.py itself wrote (TensorFlow's runtime lines dropped)."""
    return [line for line in proc.stderr.splitlines() if not TF_RUNTIME_NOISE.match(line)]


def _npz(path, y_train, y_test):
    n, m = len(y_train), len(y_test)
    np.savez(path, x_train=np.zeros((n, 8, 8)), y_train=y_train, x_test=np.zeros((m, 8, 8)),
             y_test=y_test)  # fmt: skip
    return path


def _bad_inputs(tmp_path):
    """(flags, the one expected stderr line) for each bad input of issue 11."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory\n")
    not_npz = tmp_path / "notes.npz"
    not_npz.write_text("not an archive\n")
    labels = np.arange(40) % 10
    negative = _npz(tmp_path / "neg.npz", np.r_[labels[:-1], -1], labels[:10])
    fractional = _npz(tmp_path / "frac.npz", np.r_[labels[:-1], 2.5], labels[:10])
    unseen = _npz(tmp_path / "unseen.npz", labels % 5, labels[:10])
    tfds_dir = tmp_path / "tfds"
    e = "train.py: error: "
    return {
        "negative_label": (
            [f"--dataset=npz:{negative}"],
            f"{e}Argument `dataset` must have y_train labels that are >= 0. "
            f"Received: dataset='npz:{negative}' with y_train label -1",
        ),
        "fractional_label": (
            [f"--dataset=npz:{fractional}"],
            f"{e}Argument `dataset` must have y_train labels that are whole numbers. "
            f"Received: dataset='npz:{fractional}' with y_train label 2.5",
        ),
        "test_label_unseen": (
            [f"--dataset=npz:{unseen}"],
            f"{e}Argument `dataset` must have every y_test label among the y_train labels. "
            f"Received: dataset='npz:{unseen}' with y_test label 5 absent from y_train "
            "(5 such labels)",
        ),
        "npz_not_an_archive": (
            [f"--dataset=npz:{not_npz}"],
            f"{e}Argument `dataset` must be 'npz:' followed by a NumPy .npz archive; "
            f"'{not_npz}' is not one. Received: dataset='npz:{not_npz}'",
        ),
        "tfds_offline": (
            ["--dataset=mnist", f"--data_dir={tfds_dir}"],
            f"{e}Argument `dataset` names a TFDS data set not found in data_dir='{tfds_dir}' "
            "(no download is attempted); prepare it first with a network (`tfds build mnist "
            "--data_dir=DIR`) and pass --data_dir=DIR, or use npz:PATH. Received: "
            "dataset='mnist'",
        ),
        "model_dir_is_a_file": (
            [f"--model_dir={a_file}"],
            f"{e}Flag --model_dir must be a directory; it names an existing file. "
            f"Received: --model_dir={a_file}",
        ),
        "model_dir_inside_a_file": (
            [f"--model_dir={a_file / 'run'}"],
            f"{e}Flag --model_dir must be a directory; it is inside '{a_file}', an existing "
            f"file. Received: --model_dir={a_file / 'run'}",
        ),
        "flag_not_an_integer": (
            ["--global_batch_size=abc"],
            f"{e}flag --global_batch_size=abc: invalid literal for int() with base 10: 'abc'",
        ),
        "flag_not_a_choice": (
            ["--model=xyz"],
            f"{e}flag --model=xyz: value should be one of <auto|mlp|cnn|cnn1d|resnet20|resnet50>",
        ),
        "text_is_train_text": (
            ["--dataset=text"],
            f"{e}Argument `dataset`: the byte-level language model trains with "
            "examples/train_text.py (or examples/reproduce_goyal.py / reproduce_smith.py "
            "--dataset=text for its studies). Received: dataset='text'",
        ),
        "plan_with_recipe_flags": (
            [f"--plan={a_file}"],
            f"{e}Flag --plan fixes the phases (batch sizes, learning rates, momentum, epochs); "
            f"drop --epochs, --decay_epochs, --warmup_epochs or drop --plan. "
            f"Received: --plan={a_file}",
        ),
        "mnist1d_bad_count": (
            ["--dataset=mnist1d:15"],
            f"{e}Argument `dataset` must be 'mnist1d' or 'mnist1d:N' with N a multiple of 10, "
            ">= 10. Received: dataset='mnist1d:15'",
        ),
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        "negative_label",
        "fractional_label",
        "test_label_unseen",
        "npz_not_an_archive",
        "tfds_offline",
        "model_dir_is_a_file",
        "model_dir_inside_a_file",
        "flag_not_an_integer",
        "flag_not_a_choice",
        "plan_with_recipe_flags",
        "text_is_train_text",
        "mnist1d_bad_count",
    ],
)
def test_front_door_errors_are_one_line_exit_2_nothing_left(tmp_path, case):
    args, expected = _bad_inputs(tmp_path)[case]
    model_dir = tmp_path / "run"
    start = time.monotonic()
    proc = run(f"--model_dir={model_dir}", *QUICK, *args, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert own_stderr(proc) == [expected]
    assert not model_dir.exists()  # nothing left behind
    assert time.monotonic() - start < 60  # offline TFDS: no download retries


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume(tmp_path):
    """SIGINT mid-training: exit 130 and one line saying to rerun the same command."""
    args = [f"--model_dir={tmp_path}", "--epochs=200", "--decay_epochs=100", "--verbose=0",
            "--checkpoint_interval_seconds=0"]  # history.json at every epoch end  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, TRAIN, *args],
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (tmp_path / "history.json").exists() and time.time() < deadline:
        time.sleep(0.05)  # training has started: at least one epoch done
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if not TF_RUNTIME_NOISE.match(line)]
    assert line.startswith("train.py: ") and str(tmp_path) in line
    assert "rerun the same command to resume" in line.lower()
    assert (tmp_path / "ckpt").is_dir()


def snapshot(model_dir):
    return {p.name: p.stat().st_mtime_ns for p in sorted(Path(model_dir).rglob("*"))}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("good")
    run(f"--model_dir={model_dir}", *QUICK)
    return model_dir, snapshot(model_dir)


@pytest.mark.slow
def test_sigkill_in_a_later_phase_then_resume(tmp_path):
    args = [
        "--epochs=12",
        "--decay_epochs=4,8",
        "--global_batch_size=16",
        "--base_batch_size=16",
        "--verbose=0",
        "--checkpoint_every_steps=10",
    ]
    run(f"--model_dir={tmp_path / 'whole'}", *args)
    whole = results(tmp_path / "whole")
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [sys.executable, TRAIN, f"--model_dir={cut}", *args],
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 180
    history = cut / "history.json"
    while time.time() < deadline:  # wait until the run is inside the second phase
        if history.exists():
            try:
                if len(json.loads(history.read_text())) >= 5:
                    break
            except json.JSONDecodeError:
                pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "results.json").exists()  # it really died before the end
    run(f"--model_dir={cut}", *args)
    resumed = results(cut)
    assert resumed["parameter_updates"] == whole["parameter_updates"]
    assert resumed["epochs_completed"] == whole["epochs_completed"] == 12
    assert [h["epoch"] for h in resumed["history"]] == list(range(12))


def launch(num_workers, *args, timeout=300):
    cmd = [
        sys.executable,
        "-m",
        "tf_largebatch.launch",
        f"--num_workers={num_workers}",
        f"--timeout_seconds={timeout - 30}",
        "--",
        TRAIN,
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout, cwd=ROOT)


def worker_digests(stdout):
    found = re.findall(r'\[worker (\d+)\]\s+"weights_sha256": "([0-9a-f]+)"', stdout)
    return dict(found)


@pytest.mark.slow
def test_two_workers_agree_and_match_two_replica_mirrored(tmp_path):
    import keras

    args = [*QUICK, "--global_batch_size=64"]
    proc = launch(2, f"--model_dir={tmp_path / 'mw'}", "--strategy=multi_worker", *args)
    assert proc.returncode == 0, proc.stdout[-4000:]
    digests = worker_digests(proc.stdout)
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]  # identical weights
    mw = results(tmp_path / "mw")
    assert mw["num_replicas"] == 2
    assert not list((tmp_path / "mw").glob(".tmp_*"))  # non-chief temp checkpoints removed
    run(f"--model_dir={tmp_path / 'mirrored'}", *args, "--num_cpu_devices=2", "--strategy=mirrored")
    mirrored = results(tmp_path / "mirrored")
    assert mirrored["parameter_updates"] == mw["parameter_updates"]
    a = keras.models.load_model(tmp_path / "mw" / "model.keras").get_weights()
    b = keras.models.load_model(tmp_path / "mirrored" / "model.keras").get_weights()
    for wa, wb in zip(a, b):
        np.testing.assert_allclose(wa, wb, atol=1e-5)


@pytest.mark.parametrize(
    "args",
    [
        ["--optimizer=adam", "--base_learning_rate=0.001", "--scaling_rule=sqrt"],
        ["--optimizer=lars", "--base_learning_rate=2.0", "--weight_decay=1e-4"],
        ["--optimizer=sgd", "--nomomentum_correction", "--weight_decay=1e-4"],
        ["--optimizer=adamw", "--base_learning_rate=0.003", "--scaling_rule=auto"],
        ["--optimizer=lamb", "--base_learning_rate=0.01", "--mode=rampup",
         "--rampup_batch_size=16,16,600", "--global_batch_size=64", "--warmup=none",
         "--decay_epochs="],
    ],
)  # fmt: skip
def test_optimizer_flags_train(tmp_path, args):
    run(f"--model_dir={tmp_path}", *QUICK, *args)
    assert results(tmp_path)["test_accuracy"] > 0.85  # measured 0.94 (adam, lars) at 6 epochs


@pytest.mark.slow
def test_nan_in_the_inputs_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """One NaN pixel: exit 1, one line, checkpoints before it finite, nothing written after."""
    import tensorflow as tf

    from tf_largebatch.data import load_data

    d = load_data("digits")
    x = d.x_train.copy()
    x[1000, 3, 4, 0] = np.nan
    path = tmp_path / "nan.npz"
    np.savez(path, x_train=x, y_train=d.y_train, x_test=d.x_test, y_test=d.y_test)
    model_dir = tmp_path / "run"
    proc = run(f"--model_dir={model_dir}", f"--dataset=npz:{path}", "--epochs=2",
               "--decay_epochs=", "--steps_per_execution=1", "--checkpoint_every_steps=5",
               "--verbose=0", check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = own_stderr(proc)
    assert line.startswith("train.py: error: The training loss is nan at epoch 1")
    assert not (model_dir / "model.keras").exists() and not (model_dir / "results.json").exists()
    latest = tf.train.latest_checkpoint(str(model_dir / "ckpt"))
    assert latest is not None  # steps before the NaN example were checkpointed
    reader = tf.train.load_checkpoint(latest)
    weights = [n for n in reader.get_variable_to_shape_map() if "_trainable_variables/" in n]
    assert len(weights) == 4  # the mlp's kernels and biases, all finite
    assert all(np.isfinite(reader.get_tensor(n)).all() for n in weights)
