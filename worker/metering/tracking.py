"""usage_tracking: the seed's hourly rows (one per user, UTC date and hour), and the conversation keys that
make `conversation_count` a count of distinct conversations across batches.

One statement writes a batch's hours in key order: metering adds to them (inserting the batch's
conversation keys first, in the same statement, and counting the ones that were new), rebuild-usage
replaces them with totals recomputed from the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker.metering.events import HOUR_MS, HourTotals, numbers_json, seconds_json
from worker.sqlarrays import array_literal, bare_array, ms_time

# The start of the UTC hour of usage_tracking row `t` (its date and hour), as SQL.
HOUR_START = "((t.date + make_interval(hours => t.hour)) AT TIME ZONE 'UTC')"
DAY_MS = 24 * HOUR_MS

# The rows of a batch (r.hour_ms: the hour's start in epoch milliseconds), their UTC date and hour computed
# in integers rather than through timestamps.
_ROWS = f"""
    INSERT INTO usage_tracking AS t (user_id, tracked_at, date, hour, microphone_ms, message_count,
                                     conversation_count, language_breakdown, feature_usage, is_aggregated)
    SELECT r.user_id, :now, DATE '1970-01-01' + (r.hour_ms / {DAY_MS})::int, (r.hour_ms / {HOUR_MS} % 24)::int,
           r.ms, r.messages, {{conversations}}, r.languages, r.features, false
    FROM unnest(CAST(:user_ids AS uuid[]), CAST(:hours AS bigint[]), CAST(:ms AS bigint[]),
                CAST(:messages AS int[]), CAST(:languages AS jsonb[]), CAST(:features AS jsonb[]){{more}})
         AS r(user_id, hour_ms, ms, messages, languages, features{{more_names}})
    {{join}}
    ORDER BY r.user_id, r.hour_ms
    ON CONFLICT (user_id, date, hour) DO UPDATE SET
        tracked_at = EXCLUDED.tracked_at,
        is_aggregated = false,  -- the aggregation looks at the row again (it rolls up only what is new)
"""


def _sum_merged(column: str) -> str:
    """SQL for the row's JSON map `column` with the new row's numbers added key by key: what
    jsonb_sum_merge(t.column, EXCLUDED.column) answers, computed inline. Calling that function once per
    row and column took 40 % of the statement (a function with its own search_path cannot be inlined
    and sets the path at every call); this walks only the new row's keys (one or two), and none when the new
    row has none (a third of the hours have no feature)."""
    return f"""
        CASE WHEN EXCLUDED.{column} = '{{}}' AND jsonb_typeof(t.{column}) = 'object' THEN t.{column}  -- nothing to add
        ELSE CASE WHEN jsonb_typeof(t.{column}) = 'object' THEN t.{column} ELSE '{{}}' END
        || COALESCE((SELECT jsonb_object_agg(e.key, COALESCE((t.{column} ->> e.key)::numeric, 0) + e.value::numeric)
                     FROM jsonb_each_text(EXCLUDED.{column}) AS e), '{{}}') END"""


# Metering: the batch's (user, hour, conversation) keys go in first (all of them before the first hour row,
# which keeps the lock order), and each hour counts the ones that were new to it.
_ADD_TO_TRACKING = sa.text(
    f"""
    WITH new_keys AS (
        INSERT INTO usage_hour_conversations (user_id, hour_start, conversation_id)
        SELECT k.user_id, {ms_time("k.hour_ms")}, k.conversation_id
        FROM unnest(CAST(:key_users AS uuid[]), CAST(:key_hours AS bigint[]), CAST(:key_conversations AS uuid[]))
             AS k(user_id, hour_ms, conversation_id)
        ORDER BY 1, 2, 3
        ON CONFLICT DO NOTHING
        RETURNING user_id, hour_start
    ), new_counts AS (
        SELECT user_id, hour_start, count(*)::int AS conversations FROM new_keys GROUP BY 1, 2
    )
    """
    + _ROWS.format(
        conversations="COALESCE(c.conversations, 0)",
        more="",
        more_names="",
        join=f"LEFT JOIN new_counts c ON c.user_id = r.user_id AND c.hour_start = {ms_time('r.hour_ms')}",
    )
    + f"""
        microphone_ms = t.microphone_ms + EXCLUDED.microphone_ms,
        message_count = COALESCE(t.message_count, 0) + EXCLUDED.message_count,
        conversation_count = COALESCE(t.conversation_count, 0) + EXCLUDED.conversation_count,
        language_breakdown = {_sum_merged("language_breakdown")},
        feature_usage = {_sum_merged("feature_usage")}
    """
)
# Sets rather than adds: a rebuild from the ledger writes whole recomputed hours (and their conversations).
_REPLACE_TRACKING = sa.text(
    _ROWS.format(
        conversations="r.conversations", more=", CAST(:conversations AS int[])", more_names=", conversations", join=""
    )
    + """
        microphone_ms = EXCLUDED.microphone_ms,
        message_count = EXCLUDED.message_count,
        conversation_count = EXCLUDED.conversation_count,
        language_breakdown = EXCLUDED.language_breakdown,
        feature_usage = EXCLUDED.feature_usage
    """
)


@dataclass
class TrackingRows:
    """The usage_tracking statement's arrays, in key order."""

    keys: list[tuple[str, int]]
    params: dict[str, Any]


def tracking_rows(totals: dict[tuple[str, int], HourTotals], now: datetime) -> TrackingRows:
    keys = sorted(totals)
    rows = [totals[key] for key in keys]
    return TrackingRows(
        keys,
        {
            "now": now,
            "user_ids": bare_array([user for user, _ in keys]),
            "hours": bare_array([hour for _, hour in keys]),
            "ms": bare_array([row.microphone_ms for row in rows]),
            "messages": bare_array([row.message_count for row in rows]),
            "languages": array_literal([seconds_json(row.language_ms) for row in rows]),
            "features": array_literal([numbers_json(row.feature_counts) for row in rows]),
        },
    )


def add_tracking(conn: Connection, rows: TrackingRows, totals: dict[tuple[str, int], HourTotals]) -> None:
    """Add a batch's hourly totals (of events new to the ledger), counting each conversation once per hour
    across batches."""
    keys = sorted((user, hour, conversation) for (user, hour), t in totals.items() for conversation in t.conversations)
    conn.execute(
        _ADD_TO_TRACKING,
        {
            **rows.params,
            "key_users": bare_array([key[0] for key in keys]),
            "key_hours": bare_array([key[1] for key in keys]),
            "key_conversations": bare_array([key[2] for key in keys]),
        },
    )


def replace_tracking(
    conn: Connection, totals: dict[tuple[str, int], HourTotals], conversation_counts: dict[tuple[str, int], int],
    now: datetime,
) -> None:  # fmt: skip
    """Set hourly totals recomputed from the ledger (their conversation keys are the caller's)."""
    rows = tracking_rows(totals, now)
    conversations = bare_array([conversation_counts.get(key, 0) for key in rows.keys])
    conn.execute(_REPLACE_TRACKING, {**rows.params, "conversations": conversations})
