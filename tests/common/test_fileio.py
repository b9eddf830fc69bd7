"""File helpers (archc/common/fileio.py): the one size formatter."""

from __future__ import annotations

import pytest

from archc.common.fileio import size_text


@pytest.mark.parametrize("count, text", [
    (0, "0 B"), (1, "1 B"), (999, "999 B"), (1000, "1.0 kB"), (11_812_800, "11.8 MB"),
    (999_960, "1.0 MB"), (3_400_000_000, "3.4 GB"), (5_000_000_000_000, "5,000.0 GB"),
])
def test_a_size_switches_units_above_1000(count, text):
    assert size_text(count) == text
