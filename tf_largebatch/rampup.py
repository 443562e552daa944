"""Phases inside an epoch: step-level layout, plans from example counts, batch ramp-up.

The step-defined side of `tf_largebatch.phases` (pure Python, no TensorFlow): `Segment` and
`layout_segments` walk a plan step by step through the epochs (what `PhasePlan.segments` and
`PhasePlan.position_at_step` answer from), `plan_from_examples` builds phases that change after
given numbers of trained examples, and `plan_rampup` is ``plan_phases("rampup", ...)``,
Megatron-LM's ``--rampup-batch-size start increment ramp_samples``. `Segment` and
`plan_from_examples` stay importable from `tf_largebatch.phases`, as before the split; `phases`
imports this module only when a step-level query runs (this module builds on it).

References:
  Megatron-LM, ``megatron/core/num_microbatches_calculator.py``
  (``RampupBatchsizeNumMicroBatchesCalculator``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tf_largebatch._validation import (
    check_momentum,
    check_non_negative,
    check_positive,
    check_positive_int,
)
from tf_largebatch.phases import Phase, PhasePlan, steps_per_epoch
from tf_largebatch.scaling import scale_learning_rate


@dataclasses.dataclass(frozen=True)
class Segment:
    """A maximal run of steps that stays in one phase and one epoch (see `PhasePlan.segments`).

    Epoch e is one pass over a permutation π_e of the data set; steps take consecutive global
    batches from π_e. A segment's data are π_e[example_offset : example_offset +
    num_steps·B] (B the phase's global batch; with ``drop_remainder=False`` the epoch's last
    batch may be shorter).

    Attributes:
      phase_index: index of the phase in `PhasePlan.phases`.
      epoch: the epoch (0-based) the segment's steps read from.
      start_step: global step of the segment's first update.
      num_steps: updates in the segment (> 0).
      example_offset: examples of ``epoch`` consumed before ``start_step``.
    """

    phase_index: int
    epoch: int
    start_step: int
    num_steps: int
    example_offset: int


def layout_segments(
    phases: Sequence[Phase], dataset_size: int, drop_remainder: bool = True
) -> tuple[tuple[Segment, ...], tuple[int, int]]:
    """Walks `phases` step by step through the epochs (the body of `PhasePlan.segments`).

    Before each step, if fewer than B examples are left in the epoch (with
    ``drop_remainder=False``: none are left), the rest of the epoch is dropped and the step
    starts the next epoch at offset 0. An epoch-aligned phase (``num_steps`` None) must start at
    offset 0 of its ``start_epoch``.

    Args:
      phases: the plan's phases, in order.
      dataset_size: training examples N.
      drop_remainder: whether an epoch drops its last partial batch.

    Returns:
      ``(segments, (epoch, example_offset) after the last step)``.

    Raises:
      ValueError: a batch larger than N, or an epoch-aligned phase that does not start where
        the previous phase stopped.

    Example:
      >>> segments, end = layout_segments([Phase(0, 1, 30, 0.1, 0.9, 3, num_steps=4)], 100)
      >>> [(s.epoch, s.start_step, s.num_steps, s.example_offset) for s in segments], end
      ([(0, 0, 3, 0), (1, 3, 1, 0)], (1, 30))
    """
    n, drop = dataset_size, drop_remainder
    segments: list[Segment] = []
    epoch = offset = step = 0

    def advance(epoch: int, offset: int, batch: int) -> tuple[int, int]:
        left = n - offset
        if left == 0 or (drop and left < batch):
            return epoch + 1, 0
        return epoch, offset

    for i, p in enumerate(phases):
        batch = p.global_batch_size
        if batch > n:
            raise ValueError(
                f"Argument `phases`: phase {i} has a global batch ({batch}) larger than "
                f"the data set ({n} examples). Received: global_batch_size={batch}"
            )
        if p.num_steps is None:
            if p.steps and advance(epoch, offset, batch) != (p.start_epoch, 0):
                raise ValueError(
                    f"Argument `phases` must be contiguous: phase {i} trains whole epochs "
                    f"from epoch {p.start_epoch}, but the previous phase stops at epoch "
                    f"{epoch}, example {offset} (give it `num_steps`). "
                    f"Received: start_epoch={p.start_epoch}"
                )
            for e in range(p.start_epoch, p.end_epoch):
                segments.append(Segment(i, e, step, p.steps_per_epoch, 0))
                step += p.steps_per_epoch
            if p.steps:
                epoch, offset = p.end_epoch, 0
            continue
        left = p.num_steps
        while left > 0:
            epoch, offset = advance(epoch, offset, batch)
            room = (n - offset) // batch if drop else -(-(n - offset) // batch)
            k = min(left, room)
            segments.append(Segment(i, epoch, step, k, offset))
            step, left, offset = step + k, left - k, min(offset + k * batch, n)
    end = advance(epoch, offset, phases[-1].global_batch_size)
    return tuple(segments), end


def plan_from_examples(
    dataset_size: int,
    epochs: int,
    global_batch_sizes: Sequence[int],
    learning_rates: Sequence[float],
    boundary_examples: Sequence[int],
    momentum: float = 0.9,
    drop_remainder: bool = True,
    mode: str = "custom",
) -> PhasePlan:
    """A plan whose phases change after given numbers of trained examples, at any step.

    Phase i trains while the examples trained so far c (before the step) are
    < ``boundary_examples[i]``; the last phase trains to the end of epoch ``epochs − 1``.
    Steps walk the epochs as in `PhasePlan.segments` (an epoch's last partial batch is
    dropped, or kept with ``drop_remainder=False``), so a phase changes inside an epoch
    without repeating or skipping an example. A phase that the boundaries leave no step is
    left out.

    Args:
      dataset_size: training examples N.
      epochs: the run's length in epochs.
      global_batch_sizes: the batch of each phase, each in [1, N].
      learning_rates: the learning rate of each phase (> 0).
      boundary_examples: ``len(global_batch_sizes) − 1`` non-decreasing example counts > 0
        (equal ones skip a phase).
      momentum: momentum m of every phase.
      drop_remainder: whether an epoch drops its last partial batch.
      mode: recorded in the plan.

    Returns:
      A `PhasePlan` of step-defined phases (`Phase.num_steps`).

    Raises:
      ValueError: naming the argument and value, for lengths that differ, batches outside
        [1, N], decreasing boundaries.

    Example:
      >>> plan = plan_from_examples(100, 2, [30, 50], [0.1, 0.2], boundary_examples=[60])
      >>> [(p.global_batch_size, p.num_steps, p.start_epoch, p.end_epoch) for p in plan.phases]
      [(30, 2, 0, 1), (50, 2, 1, 2)]
    """
    check_positive_int("dataset_size", dataset_size)
    check_positive_int("epochs", epochs)
    check_momentum("momentum", momentum)
    batches, rates, bounds = list(global_batch_sizes), list(learning_rates), list(boundary_examples)
    if not batches or len(rates) != len(batches) or len(bounds) != len(batches) - 1:
        raise ValueError(
            "Arguments `global_batch_sizes`, `learning_rates` and `boundary_examples` must have "
            "lengths n > 0, n and n − 1. Received: "
            f"global_batch_sizes={batches}, learning_rates={rates}, boundary_examples={bounds}"
        )
    for b in batches:
        check_positive_int("global_batch_sizes", b)
        if b > dataset_size:
            raise ValueError(
                f"Argument `global_batch_sizes` must hold batches <= dataset_size "
                f"({dataset_size}). Received: global_batch_sizes={batches}"
            )
    for r in rates:
        check_positive("learning_rates", r)
    for c in bounds:
        check_positive_int("boundary_examples", c)
    if any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(
            f"Argument `boundary_examples` must be non-decreasing. Received: boundary_examples="
            f"{bounds}"
        )

    n = dataset_size
    runs: list[list[int]] = []  # [phase, steps, first epoch, last epoch]
    epoch = offset = consumed = 0
    i = 0
    while True:
        while i < len(bounds) and consumed >= bounds[i]:
            i += 1
        batch = batches[i]
        left = n - offset
        if left == 0 or (drop_remainder and left < batch):
            epoch, offset, left = epoch + 1, 0, n
        if epoch >= epochs:
            break
        room = left // batch or 1  # ≥ 1 full batch, or (kept) the epoch's last partial one
        if i < len(bounds):  # steps until c reaches the next boundary
            room = min(room, -(-(bounds[i] - consumed) // batch))
        taken = min(room * batch, left)
        if runs and runs[-1][0] == i:
            runs[-1][1] += room
            runs[-1][3] = epoch
        else:
            runs.append([i, room, epoch, epoch])
        offset, consumed = offset + taken, consumed + taken
    phases = tuple(
        Phase(
            start_epoch=first,
            end_epoch=last + 1,
            global_batch_size=batches[i],
            learning_rate=float(rates[i]),
            momentum=momentum,
            steps_per_epoch=steps_per_epoch(n, batches[i], drop_remainder),
            num_steps=steps,
        )
        for i, steps, first, last in runs
    )
    return PhasePlan(phases=phases, mode=mode, dataset_size=n, drop_remainder=drop_remainder)


def plan_rampup(
    dataset_size: int,
    epochs: int,
    global_batch_size: int,
    rampup_batch_size: Sequence[int] | None,
    *,
    base_learning_rate: float,
    base_batch_size: int,
    scaling_rule: str,
    momentum: float,
    drop_remainder: bool,
    warmup: str,
    warmup_epochs: float,
    warmup_initial_learning_rate: float | None,
) -> PhasePlan:
    """``plan_phases("rampup", ...)``: Megatron's batch ramp-up as example-count boundaries.

    With K = (``global_batch_size`` − start)/increment increments, the batch before a step
    that has c examples trained before it is B(c) = min(``global_batch_size``,
    start + increment·⌊c / (ramp_samples/K)⌋); phase j (batch start + j·increment) begins at
    c ≥ ⌈j·ramp_samples/K⌉ (`plan_from_examples`). `plan_phases` documents the arguments and
    validates those it shares with the other modes before calling this.

    Returns:
      A `PhasePlan` of step-defined phases with ``mode="rampup"``.

    Raises:
      ValueError: a malformed `rampup_batch_size`, a target batch above N, or a warmup longer
        than the first ramp-up phase.
    """
    value = rampup_batch_size
    if (
        value is None
        or isinstance(value, str)
        or len(value) != 3
        or any(isinstance(v, bool) or not isinstance(v, int) for v in value)
    ):
        raise ValueError(
            "Argument `rampup_batch_size` must be three integers (start, increment, "
            f"ramp_samples) for mode='rampup'. Received: rampup_batch_size={value}"
        )
    start, increment, ramp_samples = value
    if not 0 < start < global_batch_size or increment <= 0 or ramp_samples <= 0:
        raise ValueError(
            "Argument `rampup_batch_size` must have 0 < start < global_batch_size "
            f"({global_batch_size}), increment > 0 and ramp_samples > 0. "
            f"Received: rampup_batch_size={tuple(value)}"
        )
    if (global_batch_size - start) % increment:
        raise ValueError(
            "Argument `rampup_batch_size` must have (global_batch_size − start) a whole number "
            f"of increments: ({global_batch_size} − {start}) / {increment} is not. "
            f"Received: rampup_batch_size={tuple(value)}"
        )
    if global_batch_size > dataset_size:
        raise ValueError(
            f"Argument `global_batch_size` must be <= dataset_size ({dataset_size}). "
            f"Received: global_batch_size={global_batch_size}"
        )
    k = (global_batch_size - start) // increment
    batches = [start + j * increment for j in range(k + 1)]
    # B(c) = start + increment·⌊c·K/ramp⌋ reaches start + j·increment at c ≥ ⌈j·ramp/K⌉.
    bounds = [-(-j * ramp_samples // k) for j in range(1, k + 1)]
    rates = [
        scale_learning_rate(base_learning_rate, b, base_batch_size, scaling_rule) for b in batches
    ]
    plan = plan_from_examples(
        dataset_size, epochs, batches, rates, bounds, momentum, drop_remainder, mode="rampup"
    )
    if warmup_initial_learning_rate is None:
        warmup_initial_learning_rate = min(float(base_learning_rate), plan.phases[0].learning_rate)
    check_non_negative("warmup_initial_learning_rate", warmup_initial_learning_rate)
    plan = dataclasses.replace(
        plan,
        warmup=warmup if warmup_epochs > 0 else "none",
        warmup_epochs=warmup_epochs if warmup != "none" else 0,
        warmup_initial_learning_rate=warmup_initial_learning_rate,
    )
    if plan.warmup_steps > plan.phases[0].steps:
        raise ValueError(
            f"Argument `warmup_epochs` must end within the first ramp-up phase "
            f"({plan.phases[0].steps} steps at batch {start}); it lasts {plan.warmup_steps} "
            f"steps. Received: warmup_epochs={warmup_epochs}"
        )
    return plan
