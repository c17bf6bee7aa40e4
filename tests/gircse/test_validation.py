"""gircse.validation: numpy scalars are numbers, bools are not, errors name the argument."""
import math
import pathlib

import numpy as np
import pytest

from gircse.validation import as_bool, as_float, as_int, as_path, one_of, optional


def test_as_int():
    assert as_int("n", np.int64(3)) == 3 and type(as_int("n", np.uint8(3))) is int
    for bad in (True, np.bool_(True), 3.0, np.float32(3), "3", None):
        with pytest.raises(TypeError, match="n must be an int"):
            as_int("n", bad)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        as_int("n", 0, minimum=1)
    with pytest.raises(ValueError, match="n must be <= 5, got 6"):
        as_int("n", 6, maximum=5)


def test_as_float():
    assert as_float("x", np.float32(0.5)) == 0.5 and type(as_float("x", np.int8(2))) is float
    for bad in (math.nan, math.inf, np.float64("-inf")):
        with pytest.raises(ValueError, match="x must be finite"):
            as_float("x", bad)
    for bad in (True, "1.0", None):
        with pytest.raises(TypeError, match="x must be a number"):
            as_float("x", bad)
    with pytest.raises(ValueError, match="> 0"):
        as_float("x", 0.0, above=0)
    with pytest.raises(ValueError, match="< 1"):
        as_float("x", 1.0, below=1)
    with pytest.raises(ValueError, match=">= 0"):
        as_float("x", -1e-9, minimum=0)


def test_as_bool_path_and_rules():
    assert as_bool("b", np.bool_(False)) is False
    for bad in (1, "false", None):
        with pytest.raises(TypeError, match="b must be True or False"):
            as_bool("b", bad)
    assert as_path("p", pathlib.Path("a/b")) == "a/b"
    with pytest.raises(TypeError, match="p must be a str or os.PathLike"):
        as_path("p", 3)
    with pytest.raises(ValueError, match="p is an empty path"):
        as_path("p", "")
    assert optional(one_of(("a", "b")))("m", None) is None
    with pytest.raises(ValueError, match=r"m must be one of \('a', 'b'\)"):
        one_of(("a", "b"))("m", "c")
