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
# Bounds on what a filter may be: it comes from users and HTTP requests, and a parser must answer a
# hostile one (thousands of parentheses or NOTs, huge numbers) with a clear error, never a crash.
MAX_FILTER_CHARS = 4000
MAX_DEPTH = 32  # nested parentheses / NOTs
MAX_TERMS = 256  # comparisons and IN values


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


def _literal(name: str, type_: pa.DataType, value: object, text: str) -> object:
    """``value`` checked against the column's type: text for text columns, numbers in range for numbers."""
    if pa.types.is_string(type_) or pa.types.is_large_string(type_):
        if not isinstance(value, str):
            raise FilterError(f"in filter {text!r}: column {name} holds text; quote the value ('{value}')")
        return value
    if isinstance(value, str):
        raise FilterError(f"in filter {text!r}: column {name} holds numbers, not text ({value!r})")
    if pa.types.is_integer(type_) and isinstance(value, int):
        bits = type_.bit_width
        low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if pa.types.is_signed_integer(type_) else \
            (0, (1 << bits) - 1)
        if not low <= value <= high:
            raise FilterError(f"in filter {text!r}: {value} is out of range for column {name} ({type_})")
    return value


def parse_where(text: str, schema: pa.Schema) -> pc.Expression:
    """Compile a filter string into a pyarrow expression over ``schema``'s columns.

    Raises :class:`FilterError` (never another exception) for anything it cannot compile: a syntax error,
    an unknown column, a value of the wrong type or range, or a filter past the size bounds above."""
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(f"filter of {len(text)} characters; the limit is {MAX_FILTER_CHARS}")
    toks = _tokens(text)
    if sum(t == ("op", "(") or t == ("kw", "NOT") for t in toks) > MAX_TERMS or \
            sum(t[0] == "lit" for t in toks) > MAX_TERMS:
        raise FilterError(f"filter has more than {MAX_TERMS} terms")
    pos = 0
    depth = 0

    def peek() -> tuple[str, object] | None:
        return toks[pos] if pos < len(toks) else None

    def take(kind: str | None = None, value: object = None) -> tuple[str, object]:
        nonlocal pos
        tok = peek()
        if tok is None or (kind and tok[0] != kind) or (value is not None and tok[1] != value):
            raise FilterError(f"in filter {text!r}: expected {value or kind}, got {tok[1] if tok else 'end'}")
        pos += 1
        return tok

    def nested() -> None:
        nonlocal depth
        depth += 1
        if depth > MAX_DEPTH:
            raise FilterError(f"filter nests deeper than {MAX_DEPTH} levels of parentheses / NOT")

    def comparison() -> pc.Expression:
        nonlocal depth
        if peek() == ("op", "("):
            take()
            nested()
            expr = disjunction()
            take("op", ")")
            depth -= 1
            return expr
        if peek() == ("kw", "NOT"):
            take()
            nested()
            expr = ~comparison()
            depth -= 1
            return expr
        _, name = take("col")
        if name not in schema.names:
            raise FilterError(f"unknown column {name!r} in filter; columns: {', '.join(schema.names)}")
        field = pc.field(name)
        column_type = schema.field(name).type
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
            values = [_literal(name, column_type, take("lit")[1], text)]
            while peek() == ("op", ","):
                take()
                values.append(_literal(name, column_type, take("lit")[1], text))
            take("op", ")")
            return field.isin(values)
        if tok[0] != "op" or tok[1] in ("(", ")", ","):
            raise FilterError(f"in filter {text!r}: expected a comparison after {name}")
        value = _literal(name, column_type, take("lit")[1], text)
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
