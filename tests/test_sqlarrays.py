"""Array literals round-trip through PostgreSQL unchanged, whatever the text holds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import sqlalchemy as sa

from worker.sqlarrays import array_literal

AWKWARD = ["plain", 'quote " inside', "back\\slash", "comma, brace { } [ ]", "NULL", "null", " spaced ", "", "é 日本"]


def test_text_survives_quotes_backslashes_braces_and_the_word_null(connection) -> None:
    back = connection.execute(sa.text("SELECT CAST(:a AS text[])"), {"a": array_literal(AWKWARD)}).scalar_one()
    assert back == AWKWARD


def test_none_is_null_and_numbers_stay_numbers(connection) -> None:
    back = connection.execute(
        sa.text("SELECT CAST(:t AS text[]), CAST(:n AS bigint[])"),
        {"t": array_literal(["a", None, "b"]), "n": array_literal([1, None, -9_007_199_254_740_993])},
    ).one()
    assert back == (["a", None, "b"], [1, None, -9_007_199_254_740_993])


def test_datetimes_keep_their_instant_to_the_microsecond(connection) -> None:
    moments = [datetime(2027, 3, 10, 11, 59, 0, 250_001, tzinfo=UTC),
               datetime(2027, 3, 10, 17, 29, tzinfo=timezone(timedelta(hours=5, minutes=30)))]  # fmt: skip
    back = connection.execute(sa.text("SELECT CAST(:a AS timestamptz[])"), {"a": array_literal(moments)}).scalar_one()
    assert back == moments


def test_an_empty_list_is_an_empty_array(connection) -> None:
    assert connection.execute(sa.text("SELECT CAST(:a AS uuid[])"), {"a": array_literal([])}).scalar_one() == []
