"""Durations in role files and on the command line: ``30``, ``"30s"``, ``"5m"``."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

__all__ = ["MAX_DURATION", "Duration", "parse_duration"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
#: The longest duration a role file may set: far beyond any real ack_wait or
#: timeout, and well inside what the server stores (nanoseconds in 64 bits).
MAX_DURATION = 365 * 86400.0


def parse_duration(value: object) -> float:
    """Seconds from ``30``, ``"30s"``, ``"500ms"``, ``"5m"``, ``"2h"`` or ``"1d"``."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '30s'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration: use seconds (30) or '30s', '5m', '2h'")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    if seconds > MAX_DURATION:
        raise ValueError(f"{value!r} is longer than the longest duration allowed, 365d")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
