"""The one text table printer, as `settle top` and the benchmarks print through it."""

from __future__ import annotations

import math

import pytest

from bench.common import table
from engine.ops.table import cell, text_table


def test_names_align_left_numbers_right_and_values_read_well() -> None:
    lines = text_table(["shard", "settled/s", "lag p99"], [["0", 12_345, 0.0123], ["11", None, math.nan]])
    assert lines == [
        "shard  settled/s  lag p99",
        "0         12,345    0.012",
        "11             -      n/a",
    ]


@pytest.mark.parametrize(("value", "shown"), [
    (None, "-"), (math.nan, "n/a"), (1234567, "1,234,567"), (True, "True"), (12.345, "12.3"), (0.5, "0.500"),
    ("ready", "ready"),
])
def test_cells(value: object, shown: str) -> None:
    assert cell(value) == shown


def test_a_row_that_does_not_fit_the_header_is_refused() -> None:
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        text_table(["a", "b", "c"], [["1", "2"]])


def test_the_benchmarks_print_their_dict_rows_through_the_same_printer() -> None:
    rows: list[dict[str, object]] = [{"store": "embedded", "trades_per_s": 41_000.5}, {"store": "cassandra"}]
    assert table(rows, ["store", "trades_per_s"]).splitlines() == text_table(
        ["store", "trades_per_s"], [["embedded", 41_000.5], ["cassandra", None]])
    assert table(rows, ["store", "trades_per_s"]).splitlines()[1] == "embedded       41,000.5"
