"""vlmlab.filters: --where filters compile to pushdown expressions; hostile ones fail with FilterError."""

from __future__ import annotations

import pyarrow as pa
import pytest

from vlmlab.filters import MAX_DEPTH, FilterError, parse_where
from vlmlab.store import store_schema

SCHEMA = store_schema(8)
ROWS = pa.table({"source": ["real", "synthetic", "real"], "tile_z": pa.array([17, 17, None], pa.int32())})


def test_filters_select_rows():
    assert ROWS.filter(parse_where("source = 'real' AND tile_z = 17", SCHEMA)).num_rows == 1
    assert ROWS.filter(parse_where("NOT (source = 'real') OR tile_z IS NULL", SCHEMA)).num_rows == 2
    assert ROWS.filter(parse_where("source IN ('real', 'x')", SCHEMA)).num_rows == 2


@pytest.mark.parametrize("where, reason", [
    ("(" * 3000 + "tile_z = 1" + ")" * 3000, "limit"),
    ("NOT " * 5000 + "tile_z = 1", "limit"),
    ("(" * (MAX_DEPTH + 1) + "tile_z = 1" + ")" * (MAX_DEPTH + 1), "deeper"),
    ("NOT " * (MAX_DEPTH + 1) + "tile_z = 1", "deeper"),
    ("tile_z = 99999999999999999999", "out of range"),
    ("tile_z = 3000000000", "out of range"),
    ("source = 3", "quote"),
    ("tile_z = 'a'", "numbers"),
    ("tile_z IN (" + ", ".join(["1"] * 300) + ")", "terms"),
    ("nope = 1", "unknown column"),
    ("tile_z = ", "expected"),
])
def test_hostile_or_wrong_filters_are_filter_errors(where, reason):
    with pytest.raises(FilterError, match=reason):
        parse_where(where, SCHEMA)
