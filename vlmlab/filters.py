"""``--where`` metadata filters: a small SQL-like language compiled to a pyarrow expression.

Grammar: comparisons ``col = 'text'``, ``col != 3``, ``<``, ``<=``, ``>``, ``>=``,
``col IN ('a', 'b')``, ``col IS NULL``, ``col IS NOT NULL``, joined with ``AND``, ``OR``,
``NOT`` and parentheses. Column names are checked against the table so a typo fails loudly.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc

_TOKEN = re.compile(
    r"\s*(?:(?P<num>-?\d+(?:\.\d+)?)|'(?P<str>(?:[^']|'')*)'|(?P<op><=|>=|!=|<>|=|<|>|\(|\)|,)"
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_]*))"
)
_KEYWORDS = {"AND", "OR", "NOT", "IN", "IS", "NULL"}


class FilterError(ValueError):
    """A ``--where`` filter could not be parsed or names an unknown column."""


def _tokens(text: str) -> list[tuple[str, object]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise FilterError(f"cannot parse filter near {text[pos:]!r}")
        pos = m.end()
        if m.group("num") is not None:
            num = m.group("num")
            out.append(("lit", float(num) if "." in num else int(num)))
        elif m.group("str") is not None:
            out.append(("lit", m.group("str").replace("''", "'")))
        elif m.group("op") is not None:
            out.append(("op", m.group("op")))
        else:
            word = m.group("word")
            out.append(("kw", word.upper()) if word.upper() in _KEYWORDS else ("col", word))
    return out


def parse_where(text: str, schema: pa.Schema) -> pc.Expression:
    """Compile a filter string into a pyarrow expression over ``schema``'s columns."""
    toks = _tokens(text)
    pos = 0

    def peek() -> tuple[str, object] | None:
        return toks[pos] if pos < len(toks) else None

    def take(kind: str | None = None, value: object = None) -> tuple[str, object]:
        nonlocal pos
        tok = peek()
        if tok is None or (kind and tok[0] != kind) or (value is not None and tok[1] != value):
            raise FilterError(f"in filter {text!r}: expected {value or kind}, got {tok[1] if tok else 'end'}")
        pos += 1
        return tok

    def comparison() -> pc.Expression:
        if peek() == ("op", "("):
            take()
            expr = disjunction()
            take("op", ")")
            return expr
        if peek() == ("kw", "NOT"):
            take()
            return ~comparison()
        _, name = take("col")
        if name not in schema.names:
            raise FilterError(f"unknown column {name!r} in filter; columns: {', '.join(schema.names)}")
        field = pc.field(name)
        tok = take()
        if tok == ("kw", "IS"):
            if peek() == ("kw", "NOT"):
                take()
                take("kw", "NULL")
                return field.is_valid()
            take("kw", "NULL")
            return field.is_null()
        if tok == ("kw", "IN"):
            take("op", "(")
            values = [take("lit")[1]]
            while peek() == ("op", ","):
                take()
                values.append(take("lit")[1])
            take("op", ")")
            return field.isin(values)
        if tok[0] != "op" or tok[1] in ("(", ")", ","):
            raise FilterError(f"in filter {text!r}: expected a comparison after {name}")
        value = take("lit")[1]
        return {
            "=": field == value, "!=": field != value, "<>": field != value,
            "<": field < value, "<=": field <= value, ">": field > value, ">=": field >= value,
        }[tok[1]]

    def conjunction() -> pc.Expression:
        expr = comparison()
        while peek() == ("kw", "AND"):
            take()
            expr = expr & comparison()
        return expr

    def disjunction() -> pc.Expression:
        expr = conjunction()
        while peek() == ("kw", "OR"):
            take()
            expr = expr | conjunction()
        return expr

    if not toks:
        raise FilterError("empty filter")
    expr = disjunction()
    if pos != len(toks):
        raise FilterError(f"unexpected {toks[pos][1]!r} in filter {text!r}")
    return expr
