"""Array literals round-trip through PostgreSQL unchanged, whatever the text holds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import sqlalchemy as sa

from worker.sqlarrays import array_literal, bare_array, ms_time, text_array, time_array

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


def test_bare_arrays_of_numbers_and_uuids_round_trip(connection) -> None:
    ids = ["0d8b7f6c-4f7e-4f43-9a39-8a0c8f0e1e21", "5B0F9C2E-2D1C-4A8E-9F55-1C1F0F7B9D10"]
    back = connection.execute(
        sa.text("SELECT CAST(:u AS uuid[])::text[], CAST(:n AS bigint[])"),
        {"u": bare_array(ids), "n": bare_array([0, -1, 3_600_000])},
    ).one()
    assert back == ([value.lower() for value in ids], [0, -1, 3_600_000])


def test_bare_arrays_quote_whatever_is_not_a_number_or_uuid(connection) -> None:
    for values in (["", "a"], [""], ["NULL"], ["null", "1"], ["a,b"], ["x y"], AWKWARD):
        back = connection.execute(sa.text("SELECT CAST(:a AS text[])"), {"a": bare_array(values)}).scalar_one()
        assert back == values
    assert connection.execute(sa.text("SELECT CAST(:a AS int[])"), {"a": bare_array([])}).scalar_one() == []


def test_time_arrays_keep_the_instant(connection) -> None:
    moments = [datetime(2027, 1, 1, tzinfo=UTC), datetime(2026, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)]
    assert connection.execute(sa.text("SELECT CAST(:a AS timestamptz[])"), {"a": time_array(moments)}).scalar_one() == (
        moments
    )


def test_text_arrays_round_trip_whatever_the_text_holds(connection) -> None:
    for values in (AWKWARD, ["a", None, "b"], ["NULL", None], [None], ["nul", "nulls", "xnull"], ["é", "日本"], []):
        back = connection.execute(sa.text("SELECT CAST(:a AS text[])"), {"a": text_array(values)}).scalar_one()
        assert back == values, values


def test_text_arrays_are_bare_when_nothing_needs_quotes() -> None:
    assert text_array(["3f2a.batch.1", "pt-BR", None, "pronunciation_check"]) == (
        "{3f2a.batch.1,pt-BR,NULL,pronunciation_check}"
    )
    for awkward in ('a"b', "a\\b", "a{", "a}", "a,b", "a b", "a\tb", "", "null", "Null"):
        assert text_array(["x", awkward]).startswith('{"x",'), awkward


def test_milliseconds_become_the_same_instant(connection) -> None:
    moments = [datetime(1970, 1, 1, tzinfo=UTC), datetime(2027, 3, 10, 11, 59, 0, 999_000, tzinfo=UTC),
               datetime(2099, 12, 31, 23, 59, 59, 1_000, tzinfo=UTC)]  # fmt: skip
    ms = [round(moment.timestamp() * 1000) for moment in moments]
    back = connection.execute(
        sa.text(f"SELECT array_agg({ms_time('m')} ORDER BY m) FROM unnest(CAST(:ms AS bigint[])) AS m"),
        {"ms": bare_array(ms)},
    ).scalar_one()
    assert back == moments
