"""Small-scale reproductions of Goyal et al. 2017 and Smith et al. 2018: many runs, one process.

A study is a list of `Run`s (one `ExperimentConfig`, or one `text.TextExperimentConfig` for
the byte-level language model, each), made from ONE reference recipe:

- `goyal_runs`: the small-batch reference n and large batches kn for several k, each trained
  with a variant of Goyal et al.'s recipe: the Linear Scaling Rule (η → kη) with gradual
  warmup, without warmup, with constant warmup, and without scaling (η kept);
- `smith_runs`: the same step-decay recipe as ``decay_lr``, ``hybrid``, ``grow_batch``,
  ``grow_batch`` with Smith's momentum scaling, and optionally a ``no_decay`` control.

`run_study` trains them one after another in this process (`run_experiment` per run, each
in its own ``model_dir`` under a work directory, so a rerun resumes finished runs from their
checkpoints; `text.run_text_experiment` for the language model) and returns one compact record
per run: test error and accuracy, and for the language model the validation bits per byte
(``validation_bits_per_byte``, lower is better). `summarize` gives mean ± sample standard
deviation over seeds, `goyal_table` / `smith_table` the tables, `write_study` the raw numbers
as JSON and CSV. The example binaries ``examples/reproduce_*.py`` draw the figures.

Nothing here imports TensorFlow at import time (`run_study` does, through `run_experiment`).

References:
  Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", §2, Table 1,
    Figures 2–4.
  Smith, Kindermans, Ying & Le 2018, "Don't Decay the Learning Rate, Increase the Batch Size",
    §5, Figures 1–3.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Union

from tf_largebatch._validation import _fail, check_momentum, check_positive_int
from tf_largebatch.experiment import ExperimentConfig

if TYPE_CHECKING:  # text.py imports TensorFlow
    from tf_largebatch.text import TextExperimentConfig

StudyConfig = Union[ExperimentConfig, "TextExperimentConfig"]
_log = logging.getLogger(__name__)

REFERENCE = "reference"
GOYAL_VARIANTS: dict[str, dict[str, Any]] = {
    "gradual_warmup": {"scaling_rule": "linear", "warmup": "gradual"},
    "no_warmup": {"scaling_rule": "linear", "warmup": "none"},
    "constant_warmup": {"scaling_rule": "linear", "warmup": "constant"},
    "no_scaling": {"scaling_rule": "none", "warmup": "none"},
}
# Not run by default: the same recipes with SGD's momentum correction off (Goyal §2.2).
GOYAL_EXTRA_VARIANTS: dict[str, dict[str, Any]] = {
    "gradual_warmup_uncorrected": {
        **GOYAL_VARIANTS["gradual_warmup"],
        "momentum_correction": False,
    },
    "no_warmup_uncorrected": {**GOYAL_VARIANTS["no_warmup"], "momentum_correction": False},
    # The square-root rule η → √k·η, the Adam family's counterpart of the linear rule.
    "sqrt_gradual_warmup": {"scaling_rule": "sqrt", "warmup": "gradual"},
    "sqrt_no_warmup": {"scaling_rule": "sqrt", "warmup": "none"},
}
ALL_GOYAL_VARIANTS = {**GOYAL_VARIANTS, **GOYAL_EXTRA_VARIANTS}
SMITH_MODES = ("decay_lr", "hybrid", "grow_batch", "scaled_momentum", "no_decay")
# Not run by default: McCandlish's adaptive batch (grows towards the measured B_simple).
SMITH_EXTRA_MODES = ("adaptive",)
# Per-epoch fields kept in a record's history, and the per-run fields of ``*_runs.csv``.
_HISTORY_KEYS = (
    *("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy"),
    *("learning_rate", "global_batch_size", "momentum", "steps", "noise_scale"),
    *("train_bits_per_byte", "validation_bits_per_byte"),  # the language model only
)
_RUN_KEYS = (
    *("name", "group", "k", "seed", "global_batch_size", "test_error", "test_accuracy"),
    *("test_loss", "final_train_loss", "parameter_updates", "wall_seconds"),
    *("noise_scale_epoch1", "hessian_top_eigenvalue", "perturbed_loss_increase"),
    "validation_bits_per_byte",
)
# What a study ranks by: the metric's column label, its scale, its digits, lower is better?
METRICS = {
    "test_error": ("test error %", 1.0, 2),
    "test_accuracy": ("test accuracy %", 100.0, 2),
    "validation_bits_per_byte": ("validation bits/byte", 1.0, 3),
}
_NOISE_POINTS = 200  # noise_scale_steps kept per record (evenly thinned)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a study.

    Attributes:
      name: unique within the study; the run's directory under the work directory.
      group: Goyal variant (or ``"reference"`` for k = 1) or Smith mode.
      k: the batch multiple of the reference batch (1 in Smith studies).
      seed: initialisation and data-order seed.
      config: what `run_experiment` trains.
    """

    name: str
    group: str
    k: int
    seed: int
    config: StudyConfig


def is_text(config: StudyConfig) -> bool:
    """Whether a run trains the byte-level language model (`text.run_text_experiment`)."""
    return not isinstance(config, ExperimentConfig)


def text_max_bytes(dataset: str) -> int | None:
    """The byte budget of a ``--dataset`` value ``text`` or ``text:MAX_BYTES``; None otherwise.

    Example:
      >>> text_max_bytes("text:200000"), text_max_bytes("text"), text_max_bytes("mnist1d")
      (200000, 0, None)

    ``0`` means: the `TextExperimentConfig` default.

    Raises:
      ValueError: ``text:`` followed by anything but a positive integer.
    """
    if dataset == "text":
        return 0
    if not dataset.startswith("text:"):
        return None
    value = dataset[len("text:") :]
    if not value.isdigit() or int(value) < 1:
        _fail("dataset", "text or text:MAX_BYTES with MAX_BYTES a positive integer", dataset)
    return int(value)


class FlagProfile:
    """A reproduction binary's flag values under its profiles of defaults.

    ``quick`` (``--quick``, holding the ``dataset`` it trains), ``text`` (``--dataset=text`` or
    ``text:MAX_BYTES``) and ``text_quick`` (both) replace flag defaults; a flag given on the
    command line always wins. ``flag_values`` is absl's ``FLAGS``, read when called (after
    parsing): ``flag = FlagProfile(FLAGS, QUICK, TEXT, TEXT_QUICK)``, then ``flag("epochs")``.
    """

    def __init__(
        self, flag_values: Any, quick: dict[str, Any], text: dict[str, Any],
        text_quick: dict[str, Any],
    ) -> None:  # fmt: skip
        self.flag_values = flag_values
        self.quick, self.text, self.text_quick = quick, text, text_quick

    def dataset(self) -> str:
        """``--dataset``, or the quick profile's unless given."""
        if self.flag_values.quick and not self.flag_values["dataset"].present:
            return self.quick["dataset"]
        return self.flag_values.dataset

    def profile(self) -> dict[str, Any]:
        """The defaults in force: by ``--dataset`` and ``--quick``, or none."""
        if text_max_bytes(self.dataset()) is not None:
            return self.text_quick if self.flag_values.quick else self.text
        return self.quick if self.flag_values.quick else {}

    def __call__(self, name: str) -> Any:
        """A flag's value: as given, else the profile's default, else the flag's default."""
        profile = self.profile()
        if not self.flag_values[name].present and name in profile:
            return profile[name]
        return self.flag_values[name].value


def _check_seeds(seeds: Sequence[int]) -> tuple[int, ...]:
    seeds = tuple(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        _fail("seeds", "a non-empty sequence of distinct integers", seeds)
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            _fail("seeds", "integers >= 0", seeds)
    return seeds


def goyal_runs(
    config: StudyConfig,
    ks: Sequence[int],
    seeds: Sequence[int],
    variants: Sequence[str] = tuple(GOYAL_VARIANTS),
) -> list[Run]:
    """Goyal et al.'s comparison: reference batch n and batches kn with each recipe variant.

    The reference is ``config`` itself without warmup (n = ``config.global_batch_size``, its
    learning rate η from ``base_learning_rate`` per ``base_batch_size``); it is run once per
    seed, since at k = 1 every variant is the same run (linear scaling keeps η, a warmup from
    η to η is constant). For every k > 1 and variant the global batch is kn and:

    - ``gradual_warmup``: η·k, ramped linearly from η over ``config.warmup_epochs`` (§2.2);
    - ``no_warmup``: η·k from the first step;
    - ``constant_warmup``: η for ``config.warmup_epochs``, then η·k (§2.2, "constant warmup");
    - ``no_scaling``: η at every k, no warmup;
    - ``sqrt_gradual_warmup``, ``sqrt_no_warmup``: the square-root rule η·√k (Adam's), with
      and without the gradual warmup;
    - ``*_uncorrected``: SGD's momentum correction off.

    Args:
      config: the small-batch reference recipe (mode, epochs, decay epochs, model, ...): an
        `ExperimentConfig`, or a `text.TextExperimentConfig` with ``schedule="goyal"`` (the
        language model; the ``*_uncorrected`` variants do not apply).
      ks: batch multiples; 1 may be listed (the reference always runs).
      seeds: one run per seed for every (variant, k).
      variants: a subset of `ALL_GOYAL_VARIANTS` (`GOYAL_VARIANTS` and the momentum
        correction off or the square-root rule, `GOYAL_EXTRA_VARIANTS`).

    Returns:
      The reference runs first, then runs by k, variant and seed.

    Raises:
      ValueError: bad ``ks``, ``seeds`` or ``variants``, or a warmup variant with
        ``config.warmup_epochs`` = 0.

    Example:
      >>> runs = goyal_runs(ExperimentConfig(global_batch_size=16, base_batch_size=16),
      ...                   ks=(1, 8), seeds=(0, 1))
      >>> len(runs), runs[-1].name, runs[-1].config.global_batch_size
      (10, 'no_scaling_k8_seed1', 128)
    """
    seeds = _check_seeds(seeds)
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        _fail("ks", "a non-empty sequence of integers >= 1", ks)
    if len(set(ks)) != len(ks):
        _fail("ks", "distinct integers", ks)
    variants = tuple(variants)
    if not variants or any(v not in ALL_GOYAL_VARIANTS for v in variants):
        _fail("variants", f"a non-empty subset of {tuple(ALL_GOYAL_VARIANTS)}", variants)
    if is_text(config):
        if config.schedule != "goyal":
            _fail(
                "schedule",
                "'goyal' (the plan's warmup and decays) in a Goyal study",
                config.schedule,
            )
        if any("momentum_correction" in ALL_GOYAL_VARIANTS[v] for v in variants):
            _fail(
                "variants", "variants without momentum correction for the language model", variants
            )
    if config.warmup_epochs <= 0 and any(
        ALL_GOYAL_VARIANTS[v]["warmup"] != "none" for v in variants
    ):
        _fail("warmup_epochs", "> 0 for the warmup variants", config.warmup_epochs)
    replace = functools.partial(dataclasses.replace, config)
    runs = [
        Run(
            f"{REFERENCE}_k1_seed{s}",
            REFERENCE,
            1,
            s,
            replace(warmup="none", warmup_epochs=0, seed=s),
        )
        for s in seeds
    ]
    for k in sorted(k for k in ks if k > 1):
        for variant in variants:
            overrides = ALL_GOYAL_VARIANTS[variant]
            warmup_epochs = config.warmup_epochs if overrides["warmup"] != "none" else 0
            for s in seeds:
                run_config = replace(
                    global_batch_size=k * config.global_batch_size,
                    warmup_epochs=warmup_epochs,
                    seed=s,
                    **overrides,
                )
                runs.append(Run(f"{variant}_k{k}_seed{s}", variant, k, s, run_config))
    return runs


def smith_runs(
    config: StudyConfig,
    seeds: Sequence[int],
    *,
    max_global_batch_size: int,
    scaled_momentum: float = 0.95,
    modes: Sequence[str] = SMITH_MODES,
    adaptive_max_global_batch_size: int | None = None,
) -> list[Run]:
    """Smith et al.'s comparison: one step-decay recipe trained in several modes.

    - ``decay_lr``: batch B₀ fixed, learning rate × ``decay_factor`` at each decay epoch;
    - ``hybrid``: the batch grows by 1/``decay_factor`` while ≤ ``max_global_batch_size``,
      then the learning rate decays (§5.1);
    - ``grow_batch``: learning rate fixed, batch × 1/``decay_factor`` at each decay epoch;
    - ``scaled_momentum``: ``grow_batch`` with momentum m → ``scaled_momentum`` and every
      batch × (1 − m)/(1 − ``scaled_momentum``), same noise scale g = εN/(B(1 − m)) (§5.4);
    - ``no_decay``: the control, B₀ and the learning rate fixed throughout (not in the paper;
      it shows whether the decay matters at all for this recipe).
    - ``adaptive`` (in `SMITH_EXTRA_MODES`): the ``decay_lr`` recipe whose batch grows at epoch
      ends towards the measured gradient noise scale B_simple (McCandlish et al. 2018), up to
      ``adaptive_max_global_batch_size``, the learning rate scaled linearly with it.

    Args:
      config: the ``decay_lr`` recipe (its ``mode`` and ``max_global_batch_size`` are
        replaced per mode); a `text.TextExperimentConfig` (``schedule="goyal"``, the plan's
        per-phase learning rates) trains the language model, without ``scaled_momentum``.
      seeds: one run per seed and mode.
      max_global_batch_size: the batch cap of ``hybrid``.
      scaled_momentum: the raised momentum of ``scaled_momentum``, > ``config.momentum``.
      modes: a subset of `SMITH_MODES` + `SMITH_EXTRA_MODES`.
      adaptive_max_global_batch_size: the batch cap of ``adaptive`` (None: the largest batch
        of ``grow_batch``, B₀ / decay_factor^len(decay_epochs)).

    Returns:
      Runs by mode and seed (k = 1).

    Raises:
      ValueError: bad ``seeds``, ``modes``, ``max_global_batch_size`` or ``scaled_momentum``.

    Example:
      >>> runs = smith_runs(ExperimentConfig(global_batch_size=16), seeds=(0,),
      ...                   max_global_batch_size=64)
      >>> [r.config.mode for r in runs]
      ['decay_lr', 'hybrid', 'grow_batch', 'grow_batch', 'decay_lr']
    """
    seeds = _check_seeds(seeds)
    modes = tuple(modes)
    known = (*SMITH_MODES, *SMITH_EXTRA_MODES)
    if not modes or any(m not in known for m in modes) or len(set(modes)) != len(modes):
        _fail("modes", f"distinct names from {known}", modes)
    if is_text(config):
        if config.schedule != "goyal":
            _fail("schedule", "'goyal' (the plan's per-phase learning rates)", config.schedule)
        if "scaled_momentum" in modes:
            _fail("modes", "modes without scaled_momentum for the language model (Adam)", modes)
    if adaptive_max_global_batch_size is None:
        growth = round((1 / config.decay_factor) ** len(tuple(config.decay_epochs)))
        adaptive_max_global_batch_size = config.global_batch_size * max(growth, 1)
    check_positive_int("adaptive_max_global_batch_size", adaptive_max_global_batch_size)
    check_positive_int("max_global_batch_size", max_global_batch_size)
    check_momentum("scaled_momentum", scaled_momentum)
    if not is_text(config) and scaled_momentum <= config.momentum:
        _fail("scaled_momentum", f"> momentum ({config.momentum})", scaled_momentum)
    overrides = {
        "decay_lr": {"mode": "decay_lr"},
        "hybrid": {"mode": "hybrid", "max_global_batch_size": max_global_batch_size},
        "grow_batch": {"mode": "grow_batch"},
        "scaled_momentum": {"mode": "grow_batch", "scaled_momentum": scaled_momentum},
        "no_decay": {"mode": "decay_lr", "decay_epochs": ()},
        "adaptive": {
            "mode": "adaptive",
            "max_global_batch_size": adaptive_max_global_batch_size,
            "measure_noise_scale": True,
        },
    }
    base = {"max_global_batch_size": None}
    if not is_text(config):
        base["scaled_momentum"] = None
    return [
        Run(
            f"{m}_seed{s}",
            m,
            1,
            s,
            dataclasses.replace(config, **{**base, **overrides[m], "seed": s}),
        )
        for m in modes
        for s in seeds
    ]


def _record(run: Run, results: dict[str, Any]) -> dict[str, Any]:
    accuracy = float(results["test_accuracy"])
    noise = results.get("noise_scale_steps") or []
    stride = max(1, math.ceil(len(noise) / _NOISE_POINTS))
    history = [{k: h[k] for k in _HISTORY_KEYS if k in h} for h in results["history"]]
    bits = results.get("validation_bits_per_byte")
    if bits is not None:  # the language model: losses in nats per byte, also as bits
        for h in history:
            h["train_bits_per_byte"] = h["train_loss"] / math.log(2)
            h["validation_bits_per_byte"] = h["test_loss"] / math.log(2)
    sharp = results.get("sharpness") or {}
    return {
        "name": run.name,
        "group": run.group,
        "k": run.k,
        "seed": run.seed,
        "global_batch_size": run.config.global_batch_size,
        "test_error": 100.0 * (1.0 - accuracy),
        "test_accuracy": accuracy,
        "test_loss": float(results["test_loss"]),
        "final_train_loss": float(results["final_train_loss"]),
        "parameter_updates": int(results["parameter_updates"]),
        "wall_seconds": float(results["wall_seconds"]),
        "plan": results["plan"],
        "history": history,
        "config": dataclasses.asdict(run.config),
        # McCandlish's B_simple (EMA estimate) at the end of the first epoch, and thinned.
        "noise_scale_epoch1": (
            float(history[0]["noise_scale"]) if history and "noise_scale" in history[0] else None
        ),
        "noise_scale_steps": [list(p) for p in noise[::stride]],
        "hessian_top_eigenvalue": sharp.get("hessian_top_eigenvalue"),
        "perturbed_loss_increase": sharp.get("perturbed_loss_increase"),
        "validation_bits_per_byte": None if bits is None else float(bits),
        "unigram_bits_per_byte": results.get("unigram_bits_per_byte"),
    }


def run_study(
    runs: Sequence[Run],
    work_dir: str,
    *,
    on_run: Callable[[int, int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Trains every run in this process, one after another, and returns one record per run.

    Each run trains in ``work_dir/<run.name>`` (rerunning with the same ``work_dir`` and the
    same runs resumes from the checkpoints there, finished runs are only evaluated).
    Strategies are built per run, so use ``"one_device"`` or ``"mirrored"`` (not
    ``"multi_worker"``, which must be the first TensorFlow object of a process).

    Args:
      runs: from `goyal_runs` or `smith_runs`.
      work_dir: parent of the runs' model directories.
      on_run: called after each run as ``on_run(index, len(runs), record)``.

    Returns:
      Per run: name, group, k, seed, initial global_batch_size, test_error (percent),
      test_accuracy, test_loss, final_train_loss, parameter_updates, wall_seconds, plan
      (`PhasePlan.to_dict`), per-epoch history and config; for the language model also
      validation_bits_per_byte and unigram_bits_per_byte (None otherwise), and the losses of
      the history as bits per byte.

    Raises:
      ValueError: duplicate run names, or any bad config (from `run_experiment`).
    """
    from tf_largebatch.experiment import run_experiment  # imports TensorFlow

    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        _fail("runs", "runs with distinct names", names)
    records = []
    for i, run in enumerate(runs):
        config = dataclasses.replace(run.config, model_dir=os.path.join(work_dir, run.name))
        if is_text(config):
            from tf_largebatch.text import run_text_experiment

            record = _record(run, run_text_experiment(config))
        else:
            record = _record(run, run_experiment(config))
        _log.info("%d/%d %s: test error %.2f%%", i + 1, len(runs), run.name, record["test_error"])
        records.append(record)
        if on_run is not None:
            on_run(i, len(runs), record)
    return records


def summarize(
    records: Sequence[dict[str, Any]], metric: str = "test_error"
) -> list[dict[str, Any]]:
    """Mean ± sample standard deviation (n − 1; 0 for one seed) of ``metric`` per (group, k).

    Rows keep the order in which (group, k) first appears. Each has group, k,
    global_batch_size, num_seeds, mean, std, min, max, parameter_updates (of the first seed:
    equal for all seeds) and the ``metric`` name.

    Example:
      >>> rows = summarize([{"group": "a", "k": 1, "global_batch_size": 8, "test_error": e,
      ...                    "parameter_updates": 10} for e in (1.0, 3.0)])
      >>> rows[0]["mean"], rows[0]["std"]
      (2.0, 1.4142135623730951)
    """
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["group"], r["k"]), []).append(r)
    rows = []
    for (group, k), members in groups.items():
        values = [float(m[metric]) for m in members if m.get(metric) is not None]
        if not values:
            continue
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        rows.append(
            {
                "group": group,
                "k": k,
                "global_batch_size": members[0]["global_batch_size"],
                "metric": metric,
                "num_seeds": len(values),
                "mean": mean,
                "std": math.sqrt(var),
                "min": min(values),
                "max": max(values),
                "parameter_updates": members[0]["parameter_updates"],
            }
        )
    return rows


def mean_curve(
    records: Sequence[dict[str, Any]], group: str, key: str, *, k: int = 1, x: str = "epoch"
) -> tuple[list[float], list[float], list[float], list[float]]:
    """A history field averaged over the seeds of one (group, k): x, mean, min and max.

    ``x`` is a history field too (``"epoch"``, or ``"steps"``: updates at the epoch's end);
    values are matched by epoch and x is taken from the first seed.

    Raises:
      ValueError: no record has this group and k.

    Example:
      >>> recs = [{"group": "a", "k": 1, "history": [{"epoch": 0, "steps": 5, "loss": v}]}
      ...         for v in (1.0, 2.0)]
      >>> mean_curve(recs, "a", "loss", x="steps")
      ([5.0], [1.5], [1.0], [2.0])
    """
    members = [r for r in records if r["group"] == group and r["k"] == k]
    if not members:
        _fail("group", f"a group with k={k} among the records", group)
    epochs = min(len(r["history"]) for r in members)
    columns = [[float(r["history"][e][key]) for r in members] for e in range(epochs)]
    xs = [float(members[0]["history"][e][x]) for e in range(epochs)]
    return (
        xs,
        [sum(c) / len(c) for c in columns],
        [min(c) for c in columns],
        [max(c) for c in columns],
    )


def _cell(row: dict[str, Any] | None, digits: int = 2) -> str:
    return f"{row['mean']:.{digits}f} ± {row['std']:.{digits}f}" if row else "–"


def goyal_table(
    summary: Sequence[dict[str, Any]],
    variants: Sequence[str],
    *,
    delta_variant: str = "gradual_warmup",
    digits: int = 2,
) -> str:
    """Final metric mean ± std per k (rows) and variant (columns), as Markdown.

    Like Goyal et al.'s Table 1 / Figure 3 (test error %, or any ``summarize`` metric such as
    validation bits per byte); k = 1 shows the reference in every column. The last column is
    ``delta_variant``'s value minus the reference's (if both were run), with ``digits``
    decimals like the cells.
    """
    by = {(r["group"], r["k"]): r for r in summary}
    reference = {r["k"]: r for r in summary if r["group"] == REFERENCE}.get(1)
    ks = sorted({r["k"] for r in summary})
    label = "gradual" if delta_variant == "gradual_warmup" else delta_variant.replace("_", " ")
    head = ["k", "kn", "updates", *(v.replace("_", " ") for v in variants), f"Δ {label} − ref"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in ks:
        rows = [reference if k == 1 else by.get((v, k)) for v in variants]
        any_row = next(r for r in [*rows, reference] if r)
        other = reference if k == 1 else by.get((delta_variant, k))
        delta = f"{other['mean'] - reference['mean']:+.{digits}f}" if other and reference else "–"
        cells = [str(k), str(any_row["global_batch_size"]), str(any_row["parameter_updates"])]
        values = [_cell(r, digits) for r in rows]
        lines.append("| " + " | ".join([*cells, *values, delta]) + " |")
    return "\n".join(lines)


def smith_table(summary: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]]) -> str:
    """Final metric mean ± std and parameter updates per mode, as Markdown.

    Updates are also given relative to ``decay_lr`` and the metric as the difference from it
    (if ``decay_lr`` was run). ``summary`` comes from ``summarize(records, metric)`` with a
    metric of `METRICS`: ``test_accuracy`` (shown in %) or ``validation_bits_per_byte``.
    """
    plans = {r["group"]: r["plan"] for r in records}
    base = next((r for r in summary if r["group"] == "decay_lr"), None)
    label, scale, digits = METRICS[summary[0]["metric"] if summary else "test_accuracy"]
    head = ["mode", "batch per phase", "lr per phase", "momentum", "updates", "updates / decay_lr"]
    head += [label, "Δ vs decay_lr"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary:
        phases = plans[row["group"]]["phases"]
        value = {key: scale * row[key] for key in ("mean", "std")}
        cells = [
            row["group"],
            ", ".join(str(p["global_batch_size"]) for p in phases),
            ", ".join(f"{p['learning_rate']:.4g}" for p in phases),
            f"{phases[0]['momentum']:g}",
            str(row["parameter_updates"]),
            f"{row['parameter_updates'] / base['parameter_updates']:.2f}" if base else "–",
            _cell(value, digits),
            f"{scale * (row['mean'] - base['mean']):+.{digits}f}" if base else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metrics_table(
    records: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    *,
    scale: dict[str, float] | None = None,
) -> str:
    """Mean ± std over seeds of several record fields per (group, k), as Markdown.

    For the measurements beside the error: ``noise_scale_epoch1``, ``hessian_top_eigenvalue``,
    ``perturbed_loss_increase``, ``test_error``, ``parameter_updates``, ... Fields a run did
    not measure (None) are left out; a row with none of them shows "–". ``scale`` multiplies
    a metric (e.g. ``{"test_accuracy": 100}``).
    """
    scale = scale or {}
    rows: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for metric in metrics:
        for row in summarize(records, metric):
            rows.setdefault((row["group"], row["k"]), {})[metric] = row
    order = list(dict.fromkeys((r["group"], r["k"]) for r in records))
    head = ["group", "k", "batch", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    batch = {(r["group"], r["k"]): r["global_batch_size"] for r in records}
    for key in order:
        cells = []
        for metric in metrics:
            row = rows.get(key, {}).get(metric)
            f = scale.get(metric, 1.0)
            cells.append(f"{f * row['mean']:.4g} ± {f * row['std']:.2g}" if row else "–")
        lines.append("| " + " | ".join([key[0], str(key[1]), str(batch[key]), *cells]) + " |")
    return "\n".join(lines)


def _rounded(value: Any) -> Any:
    """Floats to 7 significant digits (float32 precision), inside lists and dicts too."""
    if isinstance(value, float):
        return float(f"{value:.7g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def _write_csv(path: str, rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(_rounded(list(rows)))


def write_study(
    output_dir: str,
    prefix: str,
    records: Sequence[dict[str, Any]],
    summary: Sequence[dict[str, Any]],
    **extra: Any,
) -> list[str]:
    """Writes a study's raw numbers; returns the paths written.

    Files: ``{prefix}_results.json`` (``extra`` fields, ``summary`` and every record with its
    history, plan and config), ``{prefix}_runs.csv`` (one row per run), ``{prefix}_history.csv``
    (one row per run and epoch) and ``{prefix}_summary.csv`` (one row per group and k).
    Floats are written to 7 significant digits (the training computes in float32).
    """
    os.makedirs(output_dir, exist_ok=True)
    paths = [os.path.join(output_dir, f"{prefix}_{n}") for n in ("results.json", "runs.csv")]
    paths += [os.path.join(output_dir, f"{prefix}_{n}") for n in ("history.csv", "summary.csv")]
    with open(paths[0], "w") as f:
        json.dump(_rounded({**extra, "summary": list(summary), "runs": list(records)}), f)
    _write_csv(paths[1], records, _RUN_KEYS)
    history = [
        {**{k: r[k] for k in ("name", "group", "k", "seed")}, **h}
        for r in records
        for h in r["history"]
    ]
    _write_csv(paths[2], history, ("name", "group", "k", "seed", *_HISTORY_KEYS))
    _write_csv(paths[3], summary, list(summary[0]) if summary else ["group"])
    return paths
