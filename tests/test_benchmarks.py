"""The benchmark scripts run end to end with ``--quick`` and write the JSON they promise.

Smoke tests, not timings: speeds are only checked to be positive and finite; what is checked
exactly is the structure, the arithmetic of the derived figures (medians, ratios, overheads) and
what the run itself guarantees (window counts, steps per call, no retrace at a phase change).
"""

import json
import math
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 1437 // 128  # digits training set at the default global batch: 11


def run_script(name, tmp_path, *args):
    output = tmp_path / f"{name}.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}
    command = [sys.executable, os.path.join(ROOT, "benchmarks", f"{name}.py"), "--quick"]
    done = subprocess.run(
        [*command, f"--output={output}", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(output) as f:
        return json.load(f), done.stdout


def positive(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_throughput_quick(tmp_path):
    # One process for both groups (--isolate=none): the quick path through 1 and 2 replicas.
    result, stdout = run_script("throughput", tmp_path, "--replicas=1,2", "--isolate=none")
    assert result["benchmark"] == "throughput"
    assert result["machine"]["nproc"] == os.cpu_count()
    assert len(result["machine"]["load_average"]) == 3
    settings = result["settings"]
    assert settings["models"] == ["mlp"] and settings["epochs"] == 3 and settings["rounds"] == 1
    assert settings["paired"] is True
    groups = result["groups"]
    assert [(g["model"], g["replicas"]) for g in groups] == [("mlp", 1), ("mlp", 2)]
    for group in groups:
        assert group["input_shape"] == [8, 8, 1] and group["num_examples"] == 1437
        assert group["steps_per_epoch"] == STEPS_PER_EPOCH
        assert group["steps_per_execution"] == STEPS_PER_EPOCH  # K = 0 means one epoch
        methods = group["methods"]
        assert list(methods) == settings["methods"]
        for name, entry in methods.items():
            assert entry["steps_per_execution"] == (
                1 if name.endswith(("_spe1", "_loop")) else STEPS_PER_EPOCH
            )
            assert entry["peak_rss_mb"] > 100 and entry["rss_before_mb"] > 100
            if "error" in entry:  # model.fit with K > 1 under MirroredStrategy (keras#19246)
                assert group["replicas"] > 1 and name == "fit"
                assert entry["num_windows"] == 0 and entry["examples_per_second"] is None
                continue
            windows = [w for run in entry["runs"] for w in run["windows"]]
            assert len(windows) == 2 == entry["num_windows"]  # 3 epochs, the first dropped
            assert all(positive(w) for w in windows)
            assert entry["examples_per_second"] == statistics.median(windows)
            assert entry["min"] == min(windows) and entry["max"] == max(windows)
            references = [r for run in entry["runs"] for r in run["reference_windows"]]
            assert len(references) == 2 == entry["num_pairs"] and all(map(positive, references))
            assert entry["paired_ratio"] == pytest.approx(
                statistics.median(w / r for w, r in zip(windows, references))
            )
            if name.startswith(("trainer", "fit")):
                examples = STEPS_PER_EPOCH * 128
                expected = examples / (
                    examples / entry["examples_per_second"] + entry["outside_epoch_seconds"]
                )
                assert entry["wall_examples_per_second"] == pytest.approx(expected, rel=1e-12)
        assert methods["trainer"]["runs"][0]["trace_count"] == 1
        eps = {name: entry["examples_per_second"] for name, entry in methods.items()}
        ratios = group["ratios"]
        assert ratios["trainer/fit_spe1"] == pytest.approx(eps["trainer"] / eps["fit_spe1"])
        best = max(eps["bare_range"], eps["bare_loop"])
        assert ratios["trainer/bare_best"] == pytest.approx(eps["trainer"] / best)
        assert ratios["bare_pipeline/bare_best"] == pytest.approx(eps["bare_pipeline"] / best)
        assert ratios["trainer/bare_keras"] == pytest.approx(eps["trainer"] / eps["bare_keras"])
        paired = {name: entry.get("paired_ratio") for name, entry in methods.items()}
        assert ratios["paired trainer/bare_best"] == pytest.approx(
            paired["trainer"] / max(paired["bare_range"], paired["bare_loop"])
        )
        assert ratios["paired noise_scale_cost"] == pytest.approx(
            1 - paired["trainer_noise"] / paired["trainer"]
        )
        memory = group["tf_memory_info"]  # CPU allocator stats: often unavailable or partial
        assert "error" in memory or (memory["peak"] >= memory["current"] >= 0)
    assert "trainer/fit" in groups[0]["ratios"]  # 1 replica: model.fit with K > 1 works
    assert "trainer/fit" not in groups[1]["ratios"]  # 2 replicas: it failed, no ratio
    assert "ratios: trainer/fit = " in stdout and "bare_gather" in stdout


@pytest.mark.slow
def test_phase_switch_quick(tmp_path):
    # A fresh worker process with 2 logical devices (the default --isolate=group path).
    result, stdout = run_script("phase_switch", tmp_path, "--replicas=2")
    assert result["benchmark"] == "phase_switch" and result["target_seconds"] == 2.0
    (group,) = result["groups"]
    assert (group["model"], group["replicas"]) == ("mlp", 2)
    # --quick: 2 phases of 2 epochs, the batch doubling: 128 (11 steps/epoch) -> 256 (5).
    assert group["phases"] == [
        {"global_batch_size": 128, "steps_per_epoch": 11},
        {"global_batch_size": 256, "steps_per_epoch": 5},
    ]
    assert group["steps_per_execution"] == 11
    assert group["trace_counts"] == [1]  # one trace serves both batch sizes
    (change,) = group["trainer"]
    assert change["global_batch_size"] == 256 and change["first_call_steps"] == 5
    assert positive(change["switch_seconds"]) and positive(change["steady_first_call_seconds"])
    assert change["overhead_seconds"] == pytest.approx(
        change["switch_seconds"] - change["steady_first_call_seconds"], rel=1e-12
    )
    assert group["max_switch_seconds"] == change["switch_seconds"]
    assert group["target_met"] == (change["switch_seconds"] < 2.0)
    (pipeline,) = group["pipeline"]
    assert positive(pipeline["build_seconds"]) and positive(pipeline["first_element_seconds"])
    (fit,) = group["fit_phases"]
    assert fit["overhead_seconds"] == pytest.approx(
        fit["switch_seconds"] - fit["steady_step_seconds"], rel=1e-12
    )
    assert group["peak_rss_mb"] > 100
    assert group["process_maxrss_mb"] == pytest.approx(group["peak_rss_mb"], abs=1.0)
    assert "traces per run: [1]" in stdout
