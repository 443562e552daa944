"""Checkpoint integrity on restore and atomic JSON writes (tf_largebatch.checkpoints)."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from tf_largebatch import checkpoints
from tf_largebatch.checkpoints import RunState, write_json
from tf_largebatch.phases import plan_phases

PLAN = plan_phases("decay_lr", 1000, 100, 4, 0.1, decay_epochs=(2,))


def _state(model_dir, weights: tf.Variable) -> RunState:
    return RunState(
        str(model_dir), is_chief=True, worker=("worker", 0), trackables={"w": weights},
        max_to_keep=3,
    )  # fmt: skip


def _run_with_checkpoints(model_dir) -> None:
    """Checkpoints at steps 10, 20, 30 with weights 1, 2, 3 and epoch = weight."""
    weights = tf.Variable(np.zeros(500, np.float32))
    state = _state(model_dir, weights)
    for value in (1, 2, 3):
        weights.assign(np.full(500, value, np.float32))
        state.epoch.assign(value)
        state.save(step=10 * value)


def _restore(model_dir) -> tuple[float, int]:
    weights = tf.Variable(np.zeros(500, np.float32))
    state = _state(model_dir, weights)
    state.restore(PLAN)
    assert len(set(weights.numpy().tolist())) == 1
    return float(weights.numpy()[0]), int(state.epoch.numpy())


def _truncate(path: str) -> None:
    with open(path, "rb+") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_byte(path: str) -> None:
    with open(path, "rb+") as f:
        f.seek(os.path.getsize(path) // 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_intact_checkpoints_restore_the_newest(tmp_path, caplog):
    _run_with_checkpoints(tmp_path)
    ckpt = str(tmp_path / "ckpt")
    assert checkpoints.checkpoint_paths(ckpt) == [f"{ckpt}/ckpt-{n}" for n in (30, 20, 10)]
    with caplog.at_level(logging.WARNING):
        assert _restore(tmp_path) == (3.0, 3)
    assert not caplog.records


@pytest.mark.parametrize(
    "suffix, damage, error",
    [
        (".data-00000-of-00001", _truncate, "IndexError: Read less bytes than requested"),
        (".data-00000-of-00001", _flip_byte, "Checksum does not match"),
        (".index", _truncate, "bad magic number"),
        (".index", _flip_byte, "block checksum mismatch"),
    ],
)
def test_damaged_latest_checkpoint_falls_back_with_a_warning(
    tmp_path, caplog, suffix, damage, error
):
    _run_with_checkpoints(tmp_path)
    latest = str(tmp_path / "ckpt" / "ckpt-30")
    damage(latest + suffix)
    assert error in checkpoints.checkpoint_error(latest)
    with caplog.at_level(logging.WARNING, logger="tf_largebatch.checkpoints"):
        assert _restore(tmp_path) == (2.0, 2)  # the step-20 checkpoint
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert message.startswith(f"Skipping unreadable checkpoint(s) {latest} (")
    assert message.endswith(f"restoring the previous one, {tmp_path / 'ckpt' / 'ckpt-20'}.")


def test_two_damaged_checkpoints_fall_back_to_the_third(tmp_path):
    _run_with_checkpoints(tmp_path)
    _truncate(str(tmp_path / "ckpt" / "ckpt-30.data-00000-of-00001"))
    os.remove(tmp_path / "ckpt" / "ckpt-20.data-00000-of-00001")
    assert _restore(tmp_path) == (1.0, 1)


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
    _run_with_checkpoints(tmp_path)
    for n in (10, 20, 30):
        _truncate(str(tmp_path / "ckpt" / f"ckpt-{n}.index"))
    with pytest.raises(ValueError) as info:
        _restore(tmp_path)
    message = str(info.value)
    assert message.startswith(
        "Argument `model_dir` holds checkpoints none of which is readable: ckpt-30 ("
    )
    assert "ckpt-20 (" in message and "ckpt-10 (" in message and "\n" not in message
    assert message.endswith(
        f"Remove {tmp_path / 'ckpt'} to start the run over, or use a new model_dir. "
        f"Received: model_dir={str(tmp_path)!r}"
    )


def test_no_checkpoint_restores_nothing(tmp_path):
    assert _restore(tmp_path) == (0.0, 0)


def test_json_write_failing_midway_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "history.json")
    write_json(path, [{"epoch": 0, "loss": 1.5}])
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json(path, [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": object()}])
    with open(path) as f:
        assert json.load(f) == [{"epoch": 0, "loss": 1.5}]
    assert sorted(os.listdir(tmp_path)) == ["history.json"]  # no history.json.tmp left
    write_json(path, {"done": True})
    with open(path) as f:
        assert json.load(f) == {"done": True}
