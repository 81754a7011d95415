"""Limits: the 80 % and 100 % alerts of a period, and the subscription's view of its current period.

`subscriptions.monthly_minutes_used` is the seed's whole-minute view of the exact period total, and
`limit_reached_at` marks the moment usage reached the limit; both are written only when they change, so a
batch that moves neither writes no subscription row. Every writer of a period's usage keeps its
subscription's minutes in step (metering here, resets and plan changes in periods.py, rebuild-usage), so
a batch looks up only the subscriptions whose period's whole minutes it moved, or whose period is at its
limit (about one user in four of a batch, rather than every one).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker.sqlarrays import array_literal, bare_array, time_array

_RAISE_ALERTS = sa.text(
    """
    INSERT INTO usage_alerts (user_id, period_start, threshold_percent, used_ms, limit_ms, triggered_at)
    SELECT * , :now FROM unnest(CAST(:user_ids AS uuid[]), CAST(:starts AS timestamptz[]),
                                CAST(:thresholds AS smallint[]), CAST(:used AS bigint[]), CAST(:limits AS bigint[]))
    ORDER BY 1, 2, 3
    ON CONFLICT (user_id, period_start, threshold_percent) DO NOTHING
    """
)

_MARK_SUBSCRIPTIONS = sa.text(
    """
    UPDATE subscriptions s
    SET monthly_minutes_used = d.used_ms / 60000,
        updated_at = :now,
        limit_reached_at = CASE WHEN d.used_ms >= d.limit_ms THEN COALESCE(s.limit_reached_at, :now)
                                ELSE s.limit_reached_at END
    FROM unnest(CAST(:user_ids AS uuid[]), CAST(:starts AS timestamptz[]), CAST(:used AS bigint[]),
                CAST(:limits AS bigint[])) AS d(user_id, period_start, used_ms, limit_ms)
    WHERE s.user_id = d.user_id AND s.current_period_start = d.period_start
      AND (s.monthly_minutes_used IS DISTINCT FROM d.used_ms / 60000
           OR (d.used_ms >= d.limit_ms AND s.limit_reached_at IS NULL))
    """
)

ALERT_THRESHOLDS = (80, 100)  # percent of the period's limit


def raise_alerts(conn: Connection, periods_used: Sequence[Any], now: datetime) -> None:
    """The 80 % and 100 % alerts of the periods whose usage crossed them: rows with user_id,
    period_start, used_before, used_ms and limit_ms. An alert already raised stays as it is."""
    crossed = sorted(
        (row.user_id, row.period_start, threshold, row.used_ms, row.limit_ms)
        for row in periods_used
        for threshold in ALERT_THRESHOLDS
        if row.used_ms * 100 >= row.limit_ms * threshold > row.used_before * 100
    )
    if crossed:
        columns = [array_literal(column) for column in zip(*crossed, strict=True)]
        conn.execute(
            _RAISE_ALERTS,
            {"now": now, "user_ids": columns[0], "starts": columns[1], "thresholds": columns[2],
             "used": columns[3], "limits": columns[4]},
        )  # fmt: skip


def mark_subscriptions(conn: Connection, periods_used: Sequence[Any], now: datetime) -> None:
    """Bring each user's subscription in line with its current period's new usage: rows with user_id,
    period_start, used_before, used_ms and limit_ms (rows of other periods than the current one change
    nothing)."""
    rows = sorted(
        (row for row in periods_used
         if row.used_ms // 60_000 != row.used_before // 60_000 or row.used_ms >= row.limit_ms),
        key=lambda row: row.user_id,
    )  # fmt: skip
    if not rows:
        return
    conn.execute(
        _MARK_SUBSCRIPTIONS,
        {
            "now": now,
            "user_ids": bare_array([row.user_id for row in rows]),
            "starts": time_array(row.period_start for row in rows),
            "used": bare_array([row.used_ms for row in rows]),
            "limits": bare_array([row.limit_ms for row in rows]),
        },
    )
