"""Python lists as PostgreSQL array literals, for the set-based statements (`unnest(CAST(:ids AS uuid[]))`).

psycopg adapts a list element by element: about 4 µs for a datetime and 1 to 2 µs for a string, so the
dozen 1,000-element lists of one metering batch cost more in adaptation than the statements cost in
PostgreSQL. One literal per list costs a join, and the server's CAST parses it at its own input speed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import datetime

# Elements that need no quotes in an array literal: whole numbers and UUIDs. (Letters alone could spell
# NULL, which unquoted is no string at all, so words are never written bare.)
_BARE = re.compile(r"[0-9a-fA-F-]+(?:,[0-9a-fA-F-]+)*")


def array_literal(values: Iterable[str | int | datetime | None]) -> str:
    """`{"a","b",NULL}`: every element double-quoted (so commas, braces, spaces and the word NULL inside
    a string stay data) with backslashes and quotes escaped; None is NULL; datetimes are ISO 8601 with
    their UTC offset. Cast it to the array type in SQL."""
    return "{" + ",".join(map(_element, values)) + "}"


def bare_array(values: Sequence[str | int]) -> str:
    """`{1,2,3}` for whole numbers and UUIDs, written without a call per element. Anything else among
    them (checked on the whole literal at once) makes it fall back to `array_literal`."""
    body = ",".join(map(str, values))
    if not values or (_BARE.fullmatch(body) and body.count(",") == len(values) - 1):  # no comma inside one
        return "{" + body + "}"
    return array_literal(values)


# Text elements that need no quotes either: no quote, backslash, brace, comma or white space. (Whether one
# spells NULL is checked apart.)
_BARE_TEXT = re.compile(r'[^"\\{}\s,]+(?:,[^"\\{}\s,]+)*')
_NULL_WORD = re.compile(r"(?:^|,)null(?:,|$)", re.IGNORECASE)


def text_array(values: Sequence[str | None]) -> str:
    """`{a,b,NULL}` for text whose elements need no quotes (None is NULL), checked on the whole literal at
    once; anything else falls back to `array_literal`. Event ids, language codes and feature names almost
    always pass, and joining them costs a tenth of quoting each."""
    body = ",".join("NULL" if value is None else value for value in values)
    if not values or (
        _BARE_TEXT.fullmatch(body)
        and body.count(",") == len(values) - 1
        and not (_NULL_WORD.search(body) and any(value is not None and value.upper() == "NULL" for value in values))
    ):
        return "{" + body + "}"
    return array_literal(values)


def ms_time(expression: str) -> str:
    """SQL for the timestamptz of `expression`, whole milliseconds since the Unix epoch (a bigint). Sending
    times as numbers spares Python formatting them and PostgreSQL parsing them (a third of a microsecond
    each); the float8 is exact to the microsecond for every time this schema holds."""
    return f"to_timestamp(({expression})::float8 / 1000)"


def time_array(values: Iterable[datetime]) -> str:
    """`{2027-03-10T11:59:00.250000+00:00,...}`: ISO 8601 needs no quotes."""
    return "{" + ",".join(value.isoformat() for value in values) + "}"


def _element(value: str | int | datetime | None) -> str:
    if value is None:
        return "NULL"
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
