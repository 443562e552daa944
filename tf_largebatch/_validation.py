"""Argument checks shared by every layer (pure Python, no TensorFlow).

Each check raises ``ValueError`` with a message that names the argument and the value received,
in the style of Keras: ``Argument `warmup_steps` must be >= 0. Received: warmup_steps=-1``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def _fail(name: str, requirement: str, value: Any) -> None:
    raise ValueError(f"Argument `{name}` must be {requirement}. Received: {name}={value!r}")


def check_positive(name: str, value: Any) -> None:
    """Requires a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, "a number > 0", value)
    if not math.isfinite(value) or value <= 0:
        _fail(name, "> 0", value)


def check_non_negative(name: str, value: Any) -> None:
    """Requires a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, "a number >= 0", value)
    if not math.isfinite(value) or value < 0:
        _fail(name, ">= 0", value)


def check_positive_int(name: str, value: Any) -> None:
    """Requires an integer > 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(name, "an integer > 0", value)


def check_non_negative_int(name: str, value: Any) -> None:
    """Requires an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail(name, "an integer >= 0", value)


def check_momentum(name: str, value: Any) -> None:
    """Requires a momentum coefficient in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, "a float in [0, 1)", value)
    if not 0.0 <= value < 1.0:
        _fail(name, "in [0, 1)", value)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    """Requires one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        _fail(name, f"one of {choices}", value)


def check_increasing(name: str, values: Sequence[float]) -> None:
    """Requires a strictly increasing sequence."""
    if any(b <= a for a, b in zip(values, values[1:])):
        _fail(name, "strictly increasing", tuple(values))
