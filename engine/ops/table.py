"""The one plain-text table printer: `settle top`'s screens and the benchmarks' summaries (bench imports it)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def cell(value: object) -> str:
    """A value as a table shows it: ``-`` for none, ``n/a`` for NaN, thousands separated, short decimals."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def text_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """Lines of a table: the first column aligned left (names), the others right (numbers)."""
    cells = [list(header), *([cell(v) for v in row] for row in rows)]
    for row in cells:
        if len(row) != len(header):
            raise ValueError(f"a table row has {len(row)} cells for {len(header)} columns: {row}")
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
            .rstrip() for row in cells]
