"""examples/measure_noise_scale.py end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_measures_and_suggests(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "measure_noise_scale.py"),
            f"--output_dir={tmp_path}",
            "--epochs=2",
            "--global_batch_size=16",
            "--base_batch_size=16",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "noise_scale.json").read_text())
    assert len(summary["steps"]) == 2 * (1437 // 16)
    b = summary["b_simple"]
    assert 5 < b < 1000  # digits mlp: tens (measured 27–38 at batch 32)
    suggested = summary["suggested_global_batch_size"]
    assert suggested >= 16 and suggested <= max(b, 16) and suggested % 16 == 0
    assert "Suggested global batch size" in proc.stdout
    assert (tmp_path / "noise_scale.png").read_bytes()[:4] == b"\x89PNG"
