"""The one way fields are checked: what each check accepts, refuses, and says."""

import math

import pytest

from tamp_modifier.validation import above, as_list, at_least, in_range, one_of


@pytest.mark.parametrize("value", [0, 0.0, 0.5, 0.999])
def test_in_range_accepts_the_half_open_interval(value):
    assert in_range("sparsity", value, 0, 1) == value


@pytest.mark.parametrize("value", [-0.1, 1, 1.0, math.nan, True, "0.5", None])
def test_in_range_refuses_outside_nan_bools_and_non_numbers(value):
    with pytest.raises(ValueError, match=r"^sparsity must be in \[0, 1\), got "):
        in_range("sparsity", value, 0, 1)


def test_in_range_closed_and_reason():
    assert in_range("keep", 1.0, 0, 1, high_inclusive=True) == 1.0
    with pytest.raises(ValueError, match=r"keep must be in \[0, 1\], got 2: a share"):
        in_range("keep", 2, 0, 1, high_inclusive=True, why="a share")


@pytest.mark.parametrize("check, args", [(at_least, ("n", math.nan, 0)), (at_least, ("n", -1, 0)),
                                         (above, ("n", 0, 0)), (above, ("n", math.nan, 0)),
                                         (at_least, ("n", False, 0))])
def test_lower_bounds_refuse_nan_bools_and_values_below(check, args):
    with pytest.raises(ValueError, match="^n must be >"):
        check(*args)


def test_one_of_names_the_choices():
    assert one_of("knee", "kneedle", ("kneedle", "iqr")) == "kneedle"
    with pytest.raises(ValueError, match=r"knee must be one of \('kneedle', 'iqr'\), got 'elbow'"):
        one_of("knee", "elbow", ("kneedle", "iqr"))


def test_as_list_keeps_a_bare_pattern_whole():
    assert as_list("Linear") == ["Linear"]  # not ['L', 'i', 'n', ...]
    assert as_list(("a", "b")) == ["a", "b"] and as_list(None) is None
