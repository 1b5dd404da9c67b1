"""workbench.data.checks.check_range: the one range check of data, methods and the explorers."""

import numpy as np
import pytest

from workbench.data.checks import check_range


def test_check_range_accepts_pairs_and_returns_plain_ints():
    assert check_range("layers", (np.int64(1), 3), 0, 3) == (1, 3)
    assert type(check_range("layers", [np.int64(1), 3], 0, 3)[0]) is int
    assert check_range("layers", None, 0, 3) == (0, 3)  # None: the whole range
    assert check_range("word_length", 4, 1, single=True) == (4, 4)
    assert check_range("word_length", (4, 99), 1) == (4, 99)  # no upper bound


@pytest.mark.parametrize("value, kw", [
    ((2, 1), {}), ((0, 4), {}), ((-1, 2), {}), ((True, 2), {}), ((1.0, 2), {}), (2, {}), ("1,2", {}), ((1, 2, 3), {}),
    (None, {"hi": None}),
])
def test_check_range_refuses_with_the_allowed_range(value, kw):
    kw = {"hi": 3} | kw
    with pytest.raises(ValueError, match=r"^x=.* is not allowed: x must be a \(first, last\) pair of ints with 0 <= "):
        check_range("x", value, 0, **kw)
