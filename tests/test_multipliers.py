"""One check of a multiplier for the mask file, the runtime, the CLI and the server."""

from __future__ import annotations

import pytest

from cna_local.errors import CnaLocalError
from cna_local.multipliers import MultiplierError, check_multiplier, check_multipliers, parse_multipliers


@pytest.mark.parametrize("good, value", [(0, 0.0), (-1.5, -1.5), ("2", 2.0), (-0.0, 0.0), (10**3, 1000.0)])
def test_finite_numbers_pass(good, value):
    assert check_multiplier(good) == value


@pytest.mark.parametrize("bad, message", [
    (float("nan"), "must be a finite number, got nan"),
    (float("-inf"), "must be a finite number, got -inf"),
    ("strong", "must be a number, got 'strong'"),
    (None, "must be a number, got None"),
    (True, "must be a number, got True"),  # float(True) would silently be 1 (unsteered)
    ([1.0], "must be a number"),
])
def test_anything_else_is_a_named_error(bad, message):
    with pytest.raises(MultiplierError, match=message) as info:
        check_multiplier(bad)
    assert isinstance(info.value, CnaLocalError) and "0 ablates" in str(info.value)


def test_what_names_the_field():
    with pytest.raises(MultiplierError, match=r"neuron_masks\[1\]\.multiplier must be a finite number"):
        check_multiplier(float("nan"), what="neuron_masks[1].multiplier")


def test_lists_drop_duplicates_and_keep_order():
    assert check_multipliers([1, 0, -1, 0, -0.0]) == [1.0, 0.0, -1.0]
    for bad in ([float("nan")], [1, float("inf")], ["x"], []):
        with pytest.raises(MultiplierError):
            check_multipliers(bad)


@pytest.mark.parametrize("text, message", [
    ("1,nan,0", "finite number, got 'nan'"),
    ("1,abc", "must be a number, got 'abc'"),
    ("1,,0", "has an empty item"),
    (" , ", "no multiplier given"),
])
def test_parse_names_the_bad_item(text, message):
    with pytest.raises(MultiplierError, match=message):
        parse_multipliers(text)
    assert parse_multipliers("1, 0,-1.5") == [1.0, 0.0, -1.5]
