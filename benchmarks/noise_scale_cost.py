r"""The cost of measuring the gradient noise scale inside the Trainer's step.

  python benchmarks/noise_scale_cost.py --output=/tmp/noise_scale_cost.json

For each replica count (one process each, logical CPU devices), trains the same model on the
same data with and without ``measure_noise_scale`` and reports the median examples/second over
epochs (first epoch, which holds tracing, dropped) and the relative cost. Issue 7's target:
< 5% of step time with ≥ 2 replicas. Prints a table and writes JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def measure(model: str, replicas: int, epochs: int, rounds: int, batch: int) -> dict:
    """Runs in a fresh process (logical devices are set once per process)."""
    from statistics import median

    from tf_largebatch import configure_cpu_devices, make_strategy, plan_phases
    from tf_largebatch.data import load_data
    from tf_largebatch.models import build_model
    from tf_largebatch.training import Trainer, TrainerConfig

    configure_cpu_devices(max(replicas, 1))
    strategy = make_strategy("mirrored" if replicas > 1 else "one_device")
    d = load_data("digits")
    out: dict = {"model": model, "replicas": replicas, "global_batch_size": batch}
    speeds: dict = {False: [], True: []}
    for _ in range(rounds):
        for measured in (False, True):
            plan = plan_phases(
                "decay_lr", d.num_train_examples, epochs, batch, 0.05, base_batch_size=batch
            )
            with tempfile.TemporaryDirectory() as model_dir:
                trainer = Trainer(
                    lambda: build_model(model, d.input_shape, d.num_classes, seed=0),
                    plan,
                    TrainerConfig(
                        model_dir=model_dir,
                        verbose=0,
                        save_model=False,
                        measure_noise_scale=measured,
                        steps_per_execution=plan.phases[0].steps_per_epoch,
                    ),
                    strategy=strategy,
                )
                trainer.fit(d.x_train, d.y_train)
                results = trainer.results
            speeds[measured] += [h["examples_per_second"] for h in results["history"][1:]]
    out["examples_per_second"] = median(speeds[False])
    out["examples_per_second_measuring"] = median(speeds[True])
    out["cost"] = 1 - out["examples_per_second_measuring"] / out["examples_per_second"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--replicas", default="1,2,4")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--global_batch_size", type=int, default=128)
    parser.add_argument("--output", default="/tmp/noise_scale_cost.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # model:replicas, internal
    args = parser.parse_args()
    if args.worker:
        model, replicas = args.worker.split(":")
        row = measure(model, int(replicas), args.epochs, args.rounds, args.global_batch_size)
        print(json.dumps(row))
        return 0
    rows = []
    for model in args.models.split(","):
        for replicas in args.replicas.split(","):
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    f"--worker={model}:{replicas}",
                    f"--epochs={args.epochs}",
                    f"--rounds={args.rounds}",
                    f"--global_batch_size={args.global_batch_size}",
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'model':<6} {'replicas':>8} {'ex/s plain':>11} {'ex/s measuring':>15} {'cost':>7}")
    for r in rows:
        print(
            f"{r['model']:<6} {r['replicas']:>8} {r['examples_per_second']:>11.0f} "
            f"{r['examples_per_second_measuring']:>15.0f} {100 * r['cost']:>6.1f}%"
        )
    with open(args.output, "w") as f:
        json.dump({"rows": rows, "load_average": os.getloadavg(), "args": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
