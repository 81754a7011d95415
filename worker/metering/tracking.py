"""usage_tracking: the seed's hourly rows (one per user, UTC date and hour), and the conversation keys that
make `conversation_count` a count of distinct conversations across batches.

One statement writes a batch's hours in key order: metering adds to them, rebuild-usage replaces them
with totals recomputed from the ledger.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker.metering.events import HourTotals, numbers_json, seconds_json, to_datetime, to_ms
from worker.sqlarrays import array_literal, bare_array, time_array

# The start of the UTC hour of usage_tracking row `t` (its date and hour), as SQL.
HOUR_START = "((t.date + make_interval(hours => t.hour)) AT TIME ZONE 'UTC')"

_NEW_HOUR_CONVERSATIONS = sa.text(
    """
    INSERT INTO usage_hour_conversations (user_id, hour_start, conversation_id)
    SELECT * FROM unnest(CAST(:user_ids AS uuid[]), CAST(:hours AS timestamptz[]), CAST(:conversations AS uuid[]))
    ORDER BY 1, 2, 3
    ON CONFLICT DO NOTHING
    RETURNING user_id::text, hour_start
    """
)


def new_conversation_counts(conn: Connection, totals: dict[tuple[str, int], HourTotals]) -> dict[tuple[str, int], int]:
    """Per (user, hour): conversations seen in that hour for the first time, by this batch or any before."""
    keys = sorted((user, hour, conversation) for (user, hour), t in totals.items() for conversation in t.conversations)
    counts: dict[tuple[str, int], int] = defaultdict(int)
    if not keys:
        return counts
    rows = conn.execute(
        _NEW_HOUR_CONVERSATIONS,
        {
            "user_ids": bare_array([k[0] for k in keys]),
            "hours": time_array(to_datetime(k[1]) for k in keys),
            "conversations": bare_array([k[2] for k in keys]),
        },
    )
    for user_id, hour_start in rows:
        counts[user_id, to_ms(hour_start)] += 1
    return counts


_TRACKING_ROWS = """
    INSERT INTO usage_tracking AS t (user_id, tracked_at, date, hour, microphone_ms, message_count,
                                     conversation_count, language_breakdown, feature_usage, is_aggregated)
    SELECT r.user_id, :now, (r.hour_start AT TIME ZONE 'UTC')::date,
           EXTRACT(HOUR FROM r.hour_start AT TIME ZONE 'UTC')::int,
           r.ms, r.messages, r.conversations, r.languages, r.features, false
    FROM unnest(CAST(:user_ids AS uuid[]), CAST(:hours AS timestamptz[]), CAST(:ms AS bigint[]),
                CAST(:messages AS int[]), CAST(:conversations AS int[]), CAST(:languages AS jsonb[]),
                CAST(:features AS jsonb[]))
         AS r(user_id, hour_start, ms, messages, conversations, languages, features)
    ORDER BY r.user_id, r.hour_start
    ON CONFLICT (user_id, date, hour) DO UPDATE SET
        tracked_at = EXCLUDED.tracked_at,
        is_aggregated = false,  -- the aggregation looks at the row again (it rolls up only what is new)
"""


def _sum_merged(column: str) -> str:
    """SQL for the row's JSON map `column` with the new row's numbers added key by key: what
    jsonb_sum_merge(t.column, EXCLUDED.column) answers, computed inline. Calling that function once per
    row and column took 40 % of the statement (a function with its own search_path cannot be inlined
    and sets the path at every call); this walks only the new row's keys (one or two)."""
    return f"""
        CASE WHEN jsonb_typeof(t.{column}) = 'object' THEN t.{column} ELSE '{{}}' END
        || COALESCE((SELECT jsonb_object_agg(e.key, COALESCE((t.{column} ->> e.key)::numeric, 0) + e.value::numeric)
                     FROM jsonb_each_text(EXCLUDED.{column}) AS e), '{{}}')"""


_ADD_TO_TRACKING = sa.text(
    _TRACKING_ROWS
    + f"""
        microphone_ms = t.microphone_ms + EXCLUDED.microphone_ms,
        message_count = COALESCE(t.message_count, 0) + EXCLUDED.message_count,
        conversation_count = COALESCE(t.conversation_count, 0) + EXCLUDED.conversation_count,
        language_breakdown = {_sum_merged("language_breakdown")},
        feature_usage = {_sum_merged("feature_usage")}
    """
)
# Sets rather than adds: a rebuild from the ledger writes whole recomputed hours.
_REPLACE_TRACKING = sa.text(
    _TRACKING_ROWS
    + """
        microphone_ms = EXCLUDED.microphone_ms,
        message_count = EXCLUDED.message_count,
        conversation_count = EXCLUDED.conversation_count,
        language_breakdown = EXCLUDED.language_breakdown,
        feature_usage = EXCLUDED.feature_usage
    """
)


def write_tracking(
    conn: Connection,
    totals: dict[tuple[str, int], HourTotals],
    conversation_counts: dict[tuple[str, int], int],
    now: datetime,
    replace: bool = False,
) -> None:
    """Add (or, with `replace`, set) hourly totals in usage_tracking, one statement in key order."""
    rows = tracking_rows(totals, now)
    write_tracking_rows(conn, rows, conversation_counts, replace)


@dataclass
class TrackingRows:
    """The usage_tracking statement's arrays, all but the conversation counts (known only once the
    conversations are inserted), in key order."""

    keys: list[tuple[str, int]]
    params: dict[str, Any]


def tracking_rows(totals: dict[tuple[str, int], HourTotals], now: datetime) -> TrackingRows:
    keys = sorted(totals)
    return TrackingRows(
        keys,
        {
            "now": now,
            "user_ids": bare_array([user for user, _ in keys]),
            "hours": time_array(to_datetime(hour) for _, hour in keys),
            "ms": bare_array([totals[k].microphone_ms for k in keys]),
            "messages": bare_array([totals[k].message_count for k in keys]),
            "languages": array_literal(seconds_json(totals[k].language_ms) for k in keys),
            "features": array_literal(numbers_json(totals[k].feature_counts) for k in keys),
        },
    )


def write_tracking_rows(
    conn: Connection, rows: TrackingRows, conversation_counts: dict[tuple[str, int], int], replace: bool = False
) -> None:
    conversations = bare_array([conversation_counts.get(k, 0) for k in rows.keys])
    conn.execute(_REPLACE_TRACKING if replace else _ADD_TO_TRACKING, {**rows.params, "conversations": conversations})
