"""Argument checks shared by the model API, the CLIs and ``TrainConfig`` (no heavy imports).

Every check names the argument and what was expected, accepts numpy scalars wherever a Python int or
float is accepted (``numbers.Integral`` / ``numbers.Real``; bools are rejected as numbers), and returns
the value as a plain Python object, so it can go into JSON, ``range`` or a format string unchanged.
"""
from __future__ import annotations

import math
import numbers
import os

__all__ = ["as_bool", "as_float", "as_int", "as_path", "boolean", "integer", "lone_surrogate", "one_of", "optional",
           "real"]


def as_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int (numpy integers too); TypeError for other types, ValueError out of range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        expected = "an int" if minimum is None else f"an int >= {minimum}"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r:.60}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def as_float(name: str, value, *, minimum: float | None = None, above: float | None = None,
             below: float | None = None) -> float:
    """``value`` as a finite Python float (ints and numpy scalars too). ``minimum``: value >= minimum;
    ``above``: value > above; ``below``: value < below."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r:.60}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if above is not None and value <= above:
        raise ValueError(f"{name} must be > {above}, got {value}")
    if below is not None and value >= below:
        raise ValueError(f"{name} must be < {below}, got {value}")
    return value


def as_bool(name: str, value) -> bool:
    """True/False (numpy bools too); ints and strings are rejected (``"false"`` would be truthy)."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if not (isinstance(value, bool) or numpy_bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r:.60}")
    return bool(value)


def as_path(name: str, value) -> str:
    """A ``str`` or ``os.PathLike`` (e.g. ``pathlib.Path``) as a non-empty ``str``."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike path, got {type(value).__name__}")
    value = os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a text path, got bytes {value!r:.60}")
    if not value:
        raise ValueError(f"{name} is an empty path")
    return value


def lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate (U+D800..U+DFFF) in ``text``, else None. JSON escapes such as
    ``"\\ud800"`` and undecodable command-line bytes produce them; they are not text (no UTF-8 encoding),
    and tokenizers fail on them deep inside."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


def one_of(choices):
    """A rule (``rule(name, value) -> value``) accepting exactly one of ``choices``."""
    def check(name: str, value):
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
        return value
    return check


def optional(rule):
    """A rule accepting None, or what ``rule`` accepts."""
    def check(name: str, value):
        return None if value is None else rule(name, value)
    return check


# Rules: ``rule(name, value) -> value`` (checked and normalized), for tables of options such as
# ``TrainConfig.RULES``: one line per option.
def integer(minimum: int | None = None, maximum: int | None = None):
    return lambda name, value: as_int(name, value, minimum=minimum, maximum=maximum)


def real(*, minimum: float | None = None, above: float | None = None, below: float | None = None):
    return lambda name, value: as_float(name, value, minimum=minimum, above=above, below=below)


def boolean(name: str, value) -> bool:
    return as_bool(name, value)
