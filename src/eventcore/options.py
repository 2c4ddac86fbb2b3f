"""Validation of option values: durations, counts and booleans given to the executor, the stores and
projections, in one place so every option of a kind accepts the same values and says the same thing.

Store options may come from a URL's query string, so their validators take text too (`text=True`);
arguments of Python calls take only numbers (a str there is a mistake worth naming).
"""
from __future__ import annotations

import math
import numbers
import threading

from .errors import ValidationError


def described(value: object) -> str:
    """`type: repr` of a bad argument, the repr cut to 80 characters."""
    text = repr(value)
    return f"{type(value).__name__}: {text if len(text) <= 80 else text[:77] + '...'}"


#: The longest wait a thread can make (threading.TIMEOUT_MAX, ~292 years on Linux): a duration that becomes
#: a wait, a sleep or a lock timeout must not be longer, or it is an OverflowError there.
LONGEST_WAIT = threading.TIMEOUT_MAX


def seconds(name: str, value: object, *, allow_zero: bool = False, maximum: float = LONGEST_WAIT,
            text: bool = False) -> float:
    """A duration as a float, or ValidationError naming the option: a real number (or, with `text`, its
    text; never a bool), finite (a wait, a lock timeout, libpq and the server all overflow on
    infinity), > 0 (>= 0 with `allow_zero`) and at most `maximum`."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or (text and isinstance(value, str))):
        raise ValidationError(f"{name} must be a number of seconds, got {described(value)}")
    try:
        result = float(value)
    except OverflowError:  # an int past the largest float
        result = math.inf
    except ValueError:
        raise ValidationError(f"{name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(result) or result < 0 or (result == 0 and not allow_zero):
        raise ValidationError(
            f"{name} must be a finite number of seconds {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    if result > maximum:
        raise ValidationError(f"{name} must be at most {maximum:,} seconds, got {value!r}")
    return result


def count(name: str, value: object, minimum: int, *, text: bool = False) -> int:
    """A whole number >= `minimum` (with `text`, also its decimal text), or ValidationError naming it."""
    if isinstance(value, bool) or not (isinstance(value, int) or (text and isinstance(value, str))):
        raise ValidationError(f"{name} must be an integer, got {described(value)}")
    try:
        n = int(value)
    except ValueError:
        raise ValidationError(f"{name} must be an integer, got {value!r}") from None
    if n < minimum:
        raise ValidationError(f"{name} must be >= {minimum}, got {value!r}")
    return n


def boolean(name: str, value: object) -> bool:
    """A boolean option given as a bool or as URL text (true/false, 1/0, yes/no, on/off)."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValidationError(f"{name} must be a boolean (true/false), got {value!r}")
