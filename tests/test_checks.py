"""checks: the number and integer tests that settings share (bools refused, numpy accepted)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpt2_lightning.checks import check_integer, is_integer, is_number


def test_numbers_and_integers_are_told_from_bools_strings_and_non_finite_values():
    assert [is_number(v) for v in (1, 2.5, np.float32(0.5), np.int64(3))] == [True] * 4
    assert [is_number(v) for v in (True, "1", None, math.inf, math.nan)] == [False] * 5
    assert [is_integer(v) for v in (0, -3, np.int64(3))] == [True] * 3
    assert [is_integer(v) for v in (False, 1.0, "1", None)] == [False] * 4


def test_check_integer_returns_the_value_or_names_the_key_and_what_is_valid():
    assert check_integer("data.batch_size", 8, 1) == 8
    assert check_integer("eval.limit", None, 1, none=True) is None
    cases = [
        (("data.batch_size", 0, 1), "data.batch_size=0 is invalid: must be a positive integer"),
        (("data.seed", True), "data.seed=True is invalid: must be an integer >= 0"),
        (
            ("trainer.max_steps", -2, -1),
            "trainer.max_steps=-2 is invalid: must be an integer >= -1",
        ),
        (("eval.limit", None, 1), "eval.limit=None is invalid: must be a positive integer"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError) as error:
            check_integer(*args)
        assert str(error.value) == message
    with pytest.raises(ValueError) as error:
        check_integer("eval.limit", "all", 1, none=True)
    assert (
        str(error.value)
        == "eval.limit='all' is invalid: must be a positive integer, or null for all"
    )
