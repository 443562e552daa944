"""Rebuild goyal_results.json from per-run results.json (runs killed before the binary wrote
it)."""

import json
import os
import sys

from tf_largebatch.experiment import ExperimentConfig
from tf_largebatch.reproduce import _record, goyal_runs, summarize, write_study

work, out, lr, wall = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
variants = (
    "gradual_warmup",
    "no_warmup",
    "constant_warmup",
    "no_scaling",
    "gradual_warmup_uncorrected",
)
config = ExperimentConfig(
    dataset="mnist1d:20000",
    model="cnn1d",
    mode="decay_lr",
    epochs=8,
    decay_epochs=(5, 7),
    decay_factor=0.1,
    base_learning_rate=lr,
    base_batch_size=32,
    global_batch_size=32,
    warmup_epochs=1,
    momentum=0.9,
    weight_decay=0.0,
    strategy="one_device",
    steps_per_execution=16,
    measure_noise_scale=True,
    measure_sharpness=True,
    sharpness_max_examples=2000,
    save_model=False,
    verbose=0,
    optimizer="sgd",
)
runs = goyal_runs(config, (1, 8), range(3), variants)
records = []
for run in runs:
    with open(os.path.join(work, run.name, "results.json")) as f:
        records.append(_record(run, json.load(f)))
cmd = (
    "python examples/reproduce_goyal.py --dataset=mnist1d:20000 --model=cnn1d"
    " --global_batch_size=32 "
    f"--base_learning_rate={lr} --epochs=8 --decay_epochs=5,7 --warmup_epochs=1 --ks=1,8"
    " --seeds=3 --variants="
    + ",".join(variants)
    + " --measure_noise_scale --measure_sharpness --sharpness_max_examples=2000"
)
write_study(
    out,
    "goyal",
    records,
    summarize(records),
    command=cmd,
    reference_config=records[0]["config"],
    ks=[1, 8],
    seeds=[0, 1, 2],
    variants=list(variants),
    wall_seconds=wall,
    cpu_count=os.cpu_count(),
    load_average_start=None,
    load_average_end=None,
    note=(
        "rebuilt from the runs' results.json: the sweep (then with --ks=1,8,32 / 1,8,16,32)"
        " was stopped after k = 8"
    ),
)
