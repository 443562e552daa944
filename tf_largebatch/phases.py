"""Batch-size phases: "don't decay the learning rate, increase the batch size" (pure Python).

A `PhasePlan` splits training into phases of whole epochs, each with one global batch size,
learning rate and momentum. `plan_phases` turns a step-decay recipe (decay the learning rate by
`decay_factor` at `decay_epochs`) into such a plan in one of three modes:

- ``"decay_lr"``: the batch stays fixed and the learning rate falls (the usual recipe);
- ``"grow_batch"``: the learning rate stays fixed and the batch grows by ``1/decay_factor``;
- ``"hybrid"``: the batch grows while it stays within ``max_global_batch_size``, then the
  learning rate decays for the remaining boundaries (Smith et al. 2018 §5.1).

All three keep the SGD noise scale g ≈ εN/(B(1 − m)) on the same path (Smith et al. 2018 §3).
``scaled_momentum`` adds Smith's momentum scaling (§5.4): raising m to ``scaled_momentum`` and
multiplying every batch by (1 − m)/(1 − scaled_momentum) keeps g too, with fewer updates.

Phases that start inside an epoch (``"rampup"``, `plan_from_examples`) and the step-by-step
layout behind `PhasePlan.segments` live in `tf_largebatch.rampup`, which builds on this module;
their names stay importable from here.

Nothing here imports TensorFlow; `PhasePlan.learning_rate_schedule` imports Keras on call.

References:
  Smith, Kindermans, Ying & Le 2018, "Don't Decay the Learning Rate, Increase the Batch Size".
  Goyal et al. 2017, "Accurate, Large Minibatch SGD", §2 (linear scaling and warmup).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tf_largebatch._validation import (
    check_choice,
    check_increasing,
    check_momentum,
    check_non_negative,
    check_non_negative_int,
    check_positive,
    check_positive_int,
)
from tf_largebatch.scaling import noise_scale, scale_learning_rate

if TYPE_CHECKING:
    from tf_largebatch.rampup import Segment, plan_from_examples

__all__ = [
    "MODES",
    "STEP_MODES",
    "WARMUPS",
    "Phase",
    "PhasePlan",
    "Segment",
    "plan_from_examples",
    "plan_phases",
    "steps_per_epoch",
]

MODES = ("decay_lr", "grow_batch", "hybrid")
#: Modes whose phases start inside an epoch; `plan_phases` accepts them too. Kept out of
#: `MODES` until the experiment config carries their arguments (``rampup_batch_size``).
STEP_MODES = ("rampup",)
WARMUPS = ("gradual", "constant", "none")


@dataclasses.dataclass(frozen=True)
class Phase:
    """A run of steps trained with one global batch size, learning rate and momentum.

    A phase is either *epoch-aligned* (``num_steps`` is None: it trains the whole epochs
    ``start_epoch`` … ``end_epoch − 1``, ``steps_per_epoch`` steps each, from offset 0 of
    ``start_epoch``) or *step-defined* (``num_steps`` set: it runs ``num_steps`` steps from
    wherever the previous phase stopped, which may be inside an epoch; ``start_epoch`` is then
    the epoch of its first step and ``end_epoch`` the epoch after the one it stops in).

    Attributes:
      start_epoch: first epoch of the phase (0-based, inclusive).
      end_epoch: epoch at which the phase ends (exclusive).
      global_batch_size: examples per parameter update, summed over all replicas.
      learning_rate: the learning rate after any warmup.
      momentum: the momentum coefficient m.
      steps_per_epoch: parameter updates per whole epoch at this batch size.
      num_steps: the phase's length in steps when it is step-defined, else None.
    """

    start_epoch: int
    end_epoch: int
    global_batch_size: int
    learning_rate: float
    momentum: float
    steps_per_epoch: int
    num_steps: int | None = None

    @property
    def epochs(self) -> int:
        return self.end_epoch - self.start_epoch

    @property
    def steps(self) -> int:
        if self.num_steps is not None:
            return self.num_steps
        return self.epochs * self.steps_per_epoch

    @property
    def examples(self) -> int:
        return self.steps * self.global_batch_size


@dataclasses.dataclass(frozen=True)
class PhasePlan:
    """A training run as a sequence of batch-size phases (see `plan_phases`).

    Attributes:
      phases: the phases, contiguous in epochs from 0.
      mode: how the plan was made (``"decay_lr"``, ``"grow_batch"``, ``"hybrid"``, or
        ``"adaptive"`` for plans grown during training).
      dataset_size: training examples N.
      drop_remainder: whether an epoch drops the last partial batch (steps = ⌊N/B⌋) or keeps
        it (steps = ⌈N/B⌉).
      warmup: ``"gradual"``, ``"constant"`` or ``"none"``.
      warmup_epochs: epochs of warmup at the start of the first phase.
      warmup_initial_learning_rate: the learning rate at step 0 of a gradual warmup, or the
        learning rate during a constant warmup.
    """

    phases: tuple[Phase, ...]
    mode: str
    dataset_size: int
    drop_remainder: bool = True
    warmup: str = "none"
    warmup_epochs: float = 0
    warmup_initial_learning_rate: float = 0.0

    @property
    def epochs(self) -> int:
        return self.phases[-1].end_epoch

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    @property
    def total_examples(self) -> int:
        return sum(p.examples for p in self.phases)

    @property
    def warmup_steps(self) -> int:
        """Warmup length in steps (warmup lies inside the first phase)."""
        if self.warmup == "none":
            return 0
        return round(self.warmup_epochs * self.phases[0].steps_per_epoch)

    def phase_start_steps(self) -> list[int]:
        """The global step at which each phase starts."""
        starts, total = [], 0
        for p in self.phases:
            starts.append(total)
            total += p.steps
        return starts

    def phase_index(self, epoch: int) -> int:
        """Index of the phase that trains `epoch` (0-based); with phases inside an epoch, the
        phase of the epoch's first step."""
        for i, p in enumerate(self.phases):
            if p.num_steps is None and p.start_epoch <= epoch < p.end_epoch:
                return i
        for seg in self._layout[0]:
            if seg.epoch == epoch:
                return seg.phase_index
        raise ValueError(f"Argument `epoch` must be in [0, {self.epochs}). Received: epoch={epoch}")

    def step_at_epoch(self, epoch: int) -> int:
        """Parameter updates done before `epoch` starts, through the plan's phases."""
        if epoch == self.epochs:
            return self.total_steps
        i = self.phase_index(epoch)
        p = self.phases[i]
        if p.num_steps is None:
            return self.phase_start_steps()[i] + (epoch - p.start_epoch) * p.steps_per_epoch
        return next(seg.start_step for seg in self._layout[0] if seg.epoch == epoch)

    def epoch_at_step(self, step: int) -> float:
        """The (fractional) epoch reached after `step` updates, through the plan's phases
        (exactly ``start_epoch`` at an epoch-aligned phase's first step).

        Inside an epoch-aligned phase: start epoch + steps done / steps per epoch; inside a
        step-defined phase: epoch + examples of it consumed / N (`position_at_step`).
        """
        for start, p in zip(self.phase_start_steps(), self.phases):
            if step < start + p.steps:
                if p.num_steps is None:
                    return p.start_epoch + (step - start) / p.steps_per_epoch
                epoch, offset = self.position_at_step(max(step, 0))
                return epoch + offset / self.dataset_size
        return float(self.epochs)

    def batch_size_at_step(self, step: int) -> int:
        """The global batch of the update at `step` (0-based); the last phase's from
        ``total_steps`` on, like `learning_rate_at_step`.

        Raises:
          ValueError: a negative or non-integer `step`.
        """
        step = _check_step(step)
        batch = self.phases[0].global_batch_size
        for start, p in zip(self.phase_start_steps(), self.phases):
            if step >= start:
                batch = p.global_batch_size
        return batch

    def segments(self) -> list[Segment]:
        """The run as maximal runs of steps in one phase and one epoch, in step order.

        Epoch e is one pass over a permutation π_e of the data set, and each step takes the
        next global batch B (its phase's) from π_e. Before a step, if fewer than B examples
        are left in the epoch (with ``drop_remainder=False``: none are left), the rest of the
        epoch is dropped and the step starts epoch e + 1 at offset 0. A training loop builds
        one pipeline per segment: epoch ``seg.epoch``'s permutation, skip
        ``seg.example_offset`` examples, batch B, run ``seg.num_steps`` steps.

        For a plan of epoch-aligned phases the segments are the (phase, epoch) pairs, each with
        offset 0 and ``steps_per_epoch`` steps.

        Returns:
          A list of `Segment`s covering steps 0 … ``total_steps − 1`` without gap or overlap.

        Raises:
          ValueError: an epoch-aligned phase that does not start at offset 0 of its
            ``start_epoch`` (the previous phase stopped elsewhere), or a batch larger than N.

        Example:
          >>> plan = plan_phases("grow_batch", 1000, 4, 100, 0.1, base_batch_size=100,
          ...                    decay_epochs=(2,), decay_factor=0.5)
          >>> [(s.phase_index, s.epoch, s.start_step, s.num_steps) for s in plan.segments()]
          [(0, 0, 0, 10), (0, 1, 10, 10), (1, 2, 20, 5), (1, 3, 25, 5)]
        """
        return list(self._layout[0])

    def position_at_step(self, step: int) -> tuple[int, int]:
        """Where the update at `step` reads its batch: ``(epoch, example_offset)``.

        Consistent with `segments`: inside a segment, offset = ``seg.example_offset`` +
        (step − ``seg.start_step``)·B. At ``step == total_steps`` it is where the run stopped
        (``(epochs, 0)`` when the last epoch was finished).

        Raises:
          ValueError: `step` outside [0, total_steps].
        """
        step = _check_step(step)
        segments, end = self._layout
        if step == self.total_steps:
            return end
        if step > self.total_steps:
            raise ValueError(
                f"Argument `step` must be in [0, {self.total_steps}]. Received: step={step}"
            )
        starts = [seg.start_step for seg in segments]
        seg = segments[bisect.bisect_right(starts, step) - 1]
        batch = self.phases[seg.phase_index].global_batch_size
        return seg.epoch, seg.example_offset + (step - seg.start_step) * batch

    @functools.cached_property
    def _layout(self) -> tuple[tuple[Segment, ...], tuple[int, int]]:
        """(segments, position after the last step), computed once per plan."""
        from tf_largebatch.rampup import layout_segments  # rampup builds on this module

        return layout_segments(self.phases, self.dataset_size, self.drop_remainder)

    def learning_rate_at_step(self, step: int) -> float:
        """Pure-Python reference of `learning_rate_schedule()` at `step`."""
        w = self.warmup_steps
        if step < w:
            if self.warmup == "constant":
                return self.warmup_initial_learning_rate
            target = self.phases[0].learning_rate
            init = self.warmup_initial_learning_rate
            return init + (target - init) * step / w
        lr = self.phases[0].learning_rate
        for start, p in zip(self.phase_start_steps(), self.phases):
            if step >= start:
                lr = p.learning_rate
        return lr

    def noise_scale(self, phase: Phase) -> float:
        """Smith's noise scale g = ε(N/B − 1)/(1 − m) of a phase."""
        return noise_scale(
            phase.learning_rate, self.dataset_size, phase.global_batch_size, phase.momentum
        )

    def learning_rate_schedule(self) -> Any:
        """A serialisable Keras `LearningRateSchedule` that follows this plan.

        Phase boundaries are placed at the global steps where each phase starts, computed
        through every phase's own steps per epoch, so the schedule stays right when the batch
        (and with it the number of steps per epoch) changes. Warmup wraps the piecewise-constant
        phase learning rates (`schedules.LinearWarmup` or `schedules.ConstantWarmup`).
        """
        from tf_largebatch import schedules  # Keras is only needed here.

        return schedules.phase_schedule(
            phase_start_steps=self.phase_start_steps(),
            learning_rates=[p.learning_rate for p in self.phases],
            warmup=self.warmup,
            warmup_steps=self.warmup_steps,
            warmup_initial_learning_rate=self.warmup_initial_learning_rate,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the ``phases`` field of ``results.json`` among others)."""
        return {
            "mode": self.mode,
            "dataset_size": self.dataset_size,
            "drop_remainder": self.drop_remainder,
            "warmup": self.warmup,
            "warmup_epochs": self.warmup_epochs,
            "warmup_initial_learning_rate": self.warmup_initial_learning_rate,
            "total_steps": self.total_steps,
            "phases": [
                {
                    **{k: v for k, v in dataclasses.asdict(p).items() if v is not None},
                    "steps": p.steps,
                    "examples": p.examples,
                    "noise_scale": self.noise_scale(p),
                }
                for p in self.phases
            ],
        }

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> PhasePlan:
        """Inverse of `to_dict` (derived fields are ignored)."""
        fields = {f.name for f in dataclasses.fields(Phase)}
        phases = tuple(
            Phase(**{k: v for k, v in p.items() if k in fields}) for p in value["phases"]
        )
        keys = (
            "mode",
            "dataset_size",
            "drop_remainder",
            "warmup",
            "warmup_epochs",
            "warmup_initial_learning_rate",
        )
        return cls(phases=phases, **{k: value[k] for k in keys})

    def table(self) -> str:
        """The plan as a text table, one row per phase."""
        header = (
            f"{'epochs':>11} {'batch':>7} {'lr':>9} {'momentum':>8} {'steps/ep':>8} "
            f"{'steps':>8} {'noise g':>10}"
        )
        rows = [header, "-" * len(header)]
        for start, p in zip(self.phase_start_steps(), self.phases):
            if p.num_steps is None:
                span = f"{p.start_epoch:>5}-{p.end_epoch:<5}"
            else:  # a phase inside an epoch: fractional epochs at its first and after its last step
                first, last = self.epoch_at_step(start), self.epoch_at_step(start + p.steps)
                span = f"{first:>5.3g}-{last:<5.3g}"
            rows.append(
                f"{span} {p.global_batch_size:>7} "
                f"{p.learning_rate:>9.4g} {p.momentum:>8.4g} {p.steps_per_epoch:>8} "
                f"{p.steps:>8} {self.noise_scale(p):>10.4g}"
            )
        rounding = "dropped" if self.drop_remainder else "kept"
        warm = (
            f"{self.warmup} warmup over {self.warmup_epochs:g} epochs ({self.warmup_steps} steps) "
            f"from lr {self.warmup_initial_learning_rate:g}"
            if self.warmup != "none" and self.warmup_steps
            else "no warmup"
        )
        rows.append(
            f"mode={self.mode}, N={self.dataset_size}, total steps={self.total_steps}, "
            f"last partial batch {rounding}, {warm}"
        )
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str) -> None:
        """Draws learning rate and batch size against epochs to a PNG (Smith et al. Figure 2)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        edges = [self.epoch_at_step(s) for s in self.phase_start_steps()] + [self.epochs]
        lrs = [p.learning_rate for p in self.phases]
        batches = [p.global_batch_size for p in self.phases]
        fig, (ax_lr, ax_b) = plt.subplots(1, 2, figsize=(10, 3.5))
        ax_lr.stairs(lrs, edges, baseline=None)
        ax_lr.set(xlabel="epoch", ylabel="learning rate", yscale="log", title=self.mode)
        ax_b.stairs(batches, edges, baseline=None)
        ax_b.set(xlabel="epoch", ylabel="global batch size", yscale="log", title=self.mode)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _check_step(step: Any) -> int:
    """A global step as a Python int (NumPy integers accepted), >= 0."""
    if isinstance(step, numbers.Integral) and not isinstance(step, bool):
        step = int(step)
    check_non_negative_int("step", step)
    return step


def steps_per_epoch(dataset_size: int, global_batch_size: int, drop_remainder: bool = True) -> int:
    """⌊N/B⌋ when the last partial batch is dropped, else ⌈N/B⌉.

    Example:
      >>> steps_per_epoch(1437, 64), steps_per_epoch(1437, 64, drop_remainder=False)
      (22, 23)
    """
    check_positive_int("dataset_size", dataset_size)
    check_positive_int("global_batch_size", global_batch_size)
    if drop_remainder:
        return dataset_size // global_batch_size
    return math.ceil(dataset_size / global_batch_size)


def plan_phases(
    mode: str,
    dataset_size: int,
    epochs: int,
    global_batch_size: int,
    base_learning_rate: float,
    base_batch_size: int = 256,
    decay_epochs: Sequence[int] = (),
    decay_factor: float = 0.1,
    max_global_batch_size: int | None = None,
    warmup_epochs: float = 0,
    warmup: str = "gradual",
    momentum: float = 0.9,
    scaling_rule: str = "linear",
    drop_remainder: bool = True,
    scaled_momentum: float | None = None,
    warmup_initial_learning_rate: float | None = None,
    rampup_batch_size: Sequence[int] | None = None,
) -> PhasePlan:
    """Plans batch-size phases from a step-decay recipe, or a batch ramp-up.

    The initial learning rate is ``scale_learning_rate(base_learning_rate, global_batch_size,
    base_batch_size, scaling_rule)``. At each of ``decay_epochs`` the recipe multiplies the
    learning rate by ``decay_factor``; ``"grow_batch"`` instead multiplies the batch by
    ``1/decay_factor`` (rounded to the nearest integer), ``"hybrid"`` does so while the batch
    stays ≤ ``max_global_batch_size`` and decays the learning rate after.

    ``"rampup"`` grows the batch inside the run, Megatron-LM's ``--rampup-batch-size start
    increment ramp_samples``: before each step, with c the examples trained so far and
    K = (``global_batch_size`` − start)/increment increments,

        B(c) = min(global_batch_size, start + increment·⌊c / (ramp_samples/K)⌋),

    so phases start at any step (`Phase.num_steps`), inside an epoch; each phase's learning
    rate is ``scale_learning_rate(base_learning_rate, B, base_batch_size, scaling_rule)``
    (``scaling_rule="none"`` keeps it put). Epochs still drop only their last partial batch.

    Args:
      mode: ``"decay_lr"``, ``"grow_batch"``, ``"hybrid"`` or ``"rampup"``.
      dataset_size: training examples N.
      epochs: total epochs.
      global_batch_size: the initial global batch B₀.
      base_learning_rate: learning rate per ``base_batch_size`` examples.
      base_batch_size: the reference batch of ``base_learning_rate``.
      decay_epochs: epochs (strictly increasing, in (0, epochs)) where the recipe decays.
      decay_factor: learning-rate multiplier at each decay epoch, in (0, 1).
      max_global_batch_size: largest batch ``"hybrid"`` (and ``"grow_batch"``) may use.
      warmup_epochs: warmup length; must end by the first decay epoch.
      warmup: ``"gradual"`` (Goyal's linear ramp), ``"constant"`` or ``"none"``.
      momentum: momentum m in [0, 1).
      scaling_rule: ``"linear"``, ``"sqrt"`` or ``"none"``.
      drop_remainder: steps per epoch ⌊N/B⌋ if True, else ⌈N/B⌉.
      scaled_momentum: if set, Smith §5.4 momentum scaling: momentum becomes this value and
        every batch is multiplied by (1 − momentum)/(1 − scaled_momentum).
      warmup_initial_learning_rate: start of the gradual ramp (or the constant warmup rate);
        defaults to the unscaled ``base_learning_rate`` (Goyal §2.2), or the scaled rate if
        that is lower (k < 1: nothing to warm up); 0 is allowed.
      rampup_batch_size: ``(start, increment, ramp_samples)`` for ``mode="rampup"`` (and only
        then): 0 < start < ``global_batch_size``, (``global_batch_size`` − start) a whole
        multiple of increment, ramp_samples > 0 examples. ``decay_epochs``,
        ``max_global_batch_size`` and ``scaled_momentum`` do not apply to it.

    Returns:
      A `PhasePlan`.

    Raises:
      ValueError: naming the argument and value, for any input that cannot be planned.

    Example:
      >>> plan = plan_phases("grow_batch", 50_000, 200, 128, 0.1, base_batch_size=128,
      ...                    decay_epochs=(60, 120, 160), decay_factor=0.2)
      >>> [p.global_batch_size for p in plan.phases]
      [128, 640, 3200, 16000]
      >>> ramp = plan_phases("rampup", 10_000, 1, 128, 0.1, base_batch_size=32,
      ...                    rampup_batch_size=(32, 32, 3000))
      >>> [(p.global_batch_size, p.num_steps) for p in ramp.phases]
      [(32, 32), (64, 16), (96, 10), (128, 54)]

    References:
      Megatron-LM, ``megatron/core/num_microbatches_calculator.py``
      (``RampupBatchsizeNumMicroBatchesCalculator``).
    """
    check_choice("mode", mode, MODES + STEP_MODES)
    check_positive_int("dataset_size", dataset_size)
    check_positive_int("epochs", epochs)
    check_positive_int("global_batch_size", global_batch_size)
    check_positive("base_learning_rate", base_learning_rate)
    check_positive_int("base_batch_size", base_batch_size)
    check_choice("warmup", warmup, WARMUPS)
    check_non_negative("warmup_epochs", warmup_epochs)
    check_momentum("momentum", momentum)
    decay_epochs = tuple(decay_epochs)
    for e in decay_epochs:
        if isinstance(e, bool) or not isinstance(e, int) or not 0 < e < epochs:
            raise ValueError(
                f"Argument `decay_epochs` must hold integers in (0, epochs={epochs}). "
                f"Received: decay_epochs={decay_epochs}"
            )
    check_increasing("decay_epochs", decay_epochs)
    check_positive("decay_factor", decay_factor)
    if decay_epochs and not decay_factor < 1:
        raise ValueError(
            "Argument `decay_factor` must be in (0, 1): the learning rate is multiplied by it, "
            f"the batch grows by its inverse. Received: decay_factor={decay_factor}"
        )
    if warmup != "none" and warmup_epochs > (decay_epochs[0] if decay_epochs else epochs):
        bound = f"the first decay epoch ({decay_epochs[0]})" if decay_epochs else f"{epochs=}"
        raise ValueError(
            f"Argument `warmup_epochs` must be <= {bound}. Received: warmup_epochs={warmup_epochs}"
        )
    if scaled_momentum is not None:
        check_momentum("scaled_momentum", scaled_momentum)
        if scaled_momentum <= momentum:
            raise ValueError(
                f"Argument `scaled_momentum` must be > momentum ({momentum}). "
                f"Received: scaled_momentum={scaled_momentum}"
            )
    if mode == "hybrid" and max_global_batch_size is None:
        raise ValueError("Argument `max_global_batch_size` is required for mode='hybrid'.")
    if mode == "rampup":
        for name, value, unset in (
            ("decay_epochs", decay_epochs, ()),
            ("max_global_batch_size", max_global_batch_size, None),
            ("scaled_momentum", scaled_momentum, None),
        ):
            if value != unset:
                raise ValueError(
                    f"Argument `{name}` does not apply to mode='rampup'. Received: {name}={value}"
                )
        from tf_largebatch.rampup import plan_rampup  # rampup builds on this module

        return plan_rampup(
            dataset_size,
            epochs,
            global_batch_size,
            rampup_batch_size,
            base_learning_rate=base_learning_rate,
            base_batch_size=base_batch_size,
            scaling_rule=scaling_rule,
            momentum=momentum,
            drop_remainder=drop_remainder,
            warmup=warmup,
            warmup_epochs=warmup_epochs,
            warmup_initial_learning_rate=warmup_initial_learning_rate,
        )
    if rampup_batch_size is not None:
        raise ValueError(
            "Argument `rampup_batch_size` applies only to mode='rampup'. "
            f"Received: rampup_batch_size={rampup_batch_size}"
        )

    learning_rate = scale_learning_rate(
        base_learning_rate, global_batch_size, base_batch_size, scaling_rule
    )
    batch = float(global_batch_size)
    if scaled_momentum is not None:
        batch *= (1.0 - momentum) / (1.0 - scaled_momentum)
        momentum = scaled_momentum
    if max_global_batch_size is not None:
        check_positive_int("max_global_batch_size", max_global_batch_size)
        if max_global_batch_size < round(batch):
            raise ValueError(
                f"Argument `max_global_batch_size` must be >= the initial global batch "
                f"({round(batch)}). Received: max_global_batch_size={max_global_batch_size}"
            )

    boundaries = (0, *decay_epochs, epochs)
    phases = []
    for i, (start, end) in enumerate(zip(boundaries, boundaries[1:])):
        if i > 0:
            grown = batch / decay_factor
            may_grow = mode == "grow_batch" or (
                mode == "hybrid" and round(grown) <= max_global_batch_size
            )
            if may_grow:
                batch = grown
            else:
                learning_rate *= decay_factor
        b = round(batch)
        if max_global_batch_size is not None and b > max_global_batch_size:
            raise ValueError(
                f"Argument `max_global_batch_size` ({max_global_batch_size}) is exceeded at epoch "
                f"{start} (batch {b}); use mode='hybrid' to decay the learning rate instead. "
                f"Received: max_global_batch_size={max_global_batch_size}"
            )
        if b > dataset_size:
            raise ValueError(
                f"Argument `global_batch_size` grows to {b} at epoch {start}, more than the "
                f"data set ({dataset_size} examples). "
                f"Received: global_batch_size={global_batch_size}"
            )
        phases.append(
            Phase(
                start_epoch=start,
                end_epoch=end,
                global_batch_size=b,
                learning_rate=learning_rate,
                momentum=momentum,
                steps_per_epoch=steps_per_epoch(dataset_size, b, drop_remainder),
            )
        )
    if warmup_initial_learning_rate is None:  # Goyal: from η up to kη (never down, for k < 1)
        warmup_initial_learning_rate = min(float(base_learning_rate), phases[0].learning_rate)
    check_non_negative("warmup_initial_learning_rate", warmup_initial_learning_rate)
    return PhasePlan(
        phases=tuple(phases),
        mode=mode,
        dataset_size=dataset_size,
        drop_remainder=drop_remainder,
        warmup=warmup if warmup_epochs > 0 else "none",
        warmup_epochs=warmup_epochs if warmup != "none" else 0,
        warmup_initial_learning_rate=warmup_initial_learning_rate,
    )


_RAMPUP_NAMES = ("Segment", "plan_from_examples")


def __getattr__(name: str) -> Any:
    """The step-level names that moved to `tf_largebatch.rampup`, importable from here as
    before (PEP 562: `rampup` imports this module, so this one imports it on first use)."""
    if name in _RAMPUP_NAMES:
        from tf_largebatch import rampup

        return getattr(rampup, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
