"""Learning progress: usage_tracking hours that have ended, rolled into language_settings,
learning_progress and the streak achievements (maintenance.aggregate_usage).

usage_tracking hours that have ended roll into learning progress per user and language. What is rolled
is the difference between an hour's language_breakdown and the part already rolled (aggregated_breakdown),
so a second run adds nothing and usage arriving late for an aggregated hour (metering adds to the hour and
clears is_aggregated) is added by its difference only. Minutes stay exact: learning_progress keeps the
exact total in milliseconds (total_study_ms), and both minute totals grow by the whole minutes that total
gained (floor(new ms / 60000) - floor(old ms / 60000)); adding each hour's own rounded minutes would lose
up to a minute per hour. Days and weeks are the user's (profiles.timezone, UTC when unset or unknown); an
hour counts for the local day in which it starts (in zones with a half-hour offset, the half hour after
local midnight is counted with the day before, as hours are the finest unit usage_tracking keeps).
consecutive_days is the run of study days ending at last_study_date; usage arriving for a day before
last_study_date counts its minutes but does not rebuild an earlier streak.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker.metering.tracking import HOUR_START
from worker.sqlarrays import array_literal, bare_array

AGGREGATE_BATCH = 5000  # hour rows per round

_ROLL_UP_HOURS = sa.text(
    f"""
    WITH due AS (
        SELECT t.id, t.user_id, t.aggregated_breakdown
        FROM usage_tracking t
        WHERE NOT t.is_aggregated AND t.date <= :today
          AND {HOUR_START} + INTERVAL '1 hour' <= :now
        ORDER BY t.user_id, t.date, t.hour
        LIMIT :batch
        FOR UPDATE SKIP LOCKED
    )
    UPDATE usage_tracking t
    SET aggregated_ms = t.microphone_ms,
        aggregated_breakdown = COALESCE(t.language_breakdown, '{{}}'::jsonb),
        is_aggregated = true
    FROM due d JOIN profiles p ON p.id = d.user_id
    WHERE t.id = d.id
    RETURNING t.user_id::text AS user_id,
              ({HOUR_START}
                  AT TIME ZONE worker_timezone(p.timezone))::date AS study_date,
              t.language_breakdown::text AS breakdown, d.aggregated_breakdown::text AS rolled_before
    """
)

# The new run of study days (run_days days ending at last_date) continues the stored streak when it
# reaches back to the day after last_study_date; otherwise it is the streak. weekly_achieved_minutes is
# recomputed from this week's rolled-up hours, so it is exact and starts again every local Monday.
_ADD_TO_PROGRESS = sa.text(
    f"""
    WITH studied AS (
        SELECT * FROM unnest(CAST(:user_ids AS uuid[]), CAST(:languages AS text[]), CAST(:ms AS bigint[]),
                             CAST(:last_dates AS date[]), CAST(:run_days AS int[]))
                 AS s(user_id, language_code, ms, last_date, run_days)
    ), weeks AS (
        SELECT s.user_id, s.language_code,
               date_trunc('week', CAST(:now AS timestamptz) AT TIME ZONE z.tz) AT TIME ZONE z.tz AS week_start,
               (date_trunc('week', CAST(:now AS timestamptz) AT TIME ZONE z.tz) + INTERVAL '7 days')
                   AT TIME ZONE z.tz AS week_end
        FROM studied s JOIN profiles p ON p.id = s.user_id
        CROSS JOIN LATERAL (SELECT worker_timezone(p.timezone) AS tz) z
    ), this_week AS (
        SELECT w.user_id, w.language_code,
               (COALESCE(sum((t.aggregated_breakdown ->> w.language_code)::numeric), 0) * 1000)::bigint AS ms
        FROM weeks w
        LEFT JOIN usage_tracking t
            ON t.user_id = w.user_id
           AND t.date BETWEEN (w.week_start AT TIME ZONE 'UTC')::date AND (w.week_end AT TIME ZONE 'UTC')::date
           AND {HOUR_START} >= w.week_start
           AND {HOUR_START} < w.week_end
        GROUP BY w.user_id, w.language_code
    )
    INSERT INTO learning_progress AS lp (user_id, language_code, total_study_ms, total_study_time_minutes,
                                         last_study_date, consecutive_days, weekly_achieved_minutes,
                                         created_at, updated_at)
    SELECT s.user_id, s.language_code, s.ms, s.ms / 60000, s.last_date, s.run_days, w.ms / 60000, :now, :now
    FROM studied s JOIN this_week w ON w.user_id = s.user_id AND w.language_code = s.language_code
    ORDER BY s.user_id, s.language_code
    ON CONFLICT (user_id, language_code) DO UPDATE SET
        total_study_ms = lp.total_study_ms + EXCLUDED.total_study_ms,
        total_study_time_minutes = COALESCE(lp.total_study_time_minutes, 0)
            + (lp.total_study_ms + EXCLUDED.total_study_ms) / 60000 - lp.total_study_ms / 60000,
        consecutive_days = CASE
            WHEN lp.last_study_date IS NULL THEN EXCLUDED.consecutive_days
            WHEN EXCLUDED.last_study_date <= lp.last_study_date THEN lp.consecutive_days
            WHEN EXCLUDED.last_study_date - EXCLUDED.consecutive_days <= lp.last_study_date
                THEN GREATEST(lp.consecutive_days, 1) + (EXCLUDED.last_study_date - lp.last_study_date)
            ELSE EXCLUDED.consecutive_days
        END,
        last_study_date = GREATEST(lp.last_study_date, EXCLUDED.last_study_date),
        weekly_achieved_minutes = EXCLUDED.weekly_achieved_minutes,
        updated_at = EXCLUDED.updated_at
    RETURNING lp.user_id::text AS user_id, lp.language_code, lp.total_study_ms, lp.consecutive_days
    """
)

# A language the user had no settings for starts at the level their profile names, else 'beginner'.
_ADD_TO_LANGUAGE_SETTINGS = sa.text(
    """
    INSERT INTO language_settings AS ls (user_id, language_code, proficiency_level, total_learning_minutes,
                                         created_at, updated_at)
    SELECT a.user_id, a.language_code,
           CASE WHEN p.proficiency_levels ->> a.language_code
                     IN ('beginner', 'elementary', 'intermediate', 'advanced', 'native')
                THEN p.proficiency_levels ->> a.language_code ELSE 'beginner' END,
           a.minutes, :now, :now
    FROM unnest(CAST(:user_ids AS uuid[]), CAST(:languages AS text[]), CAST(:minutes AS int[]))
         AS a(user_id, language_code, minutes)
    JOIN profiles p ON p.id = a.user_id
    ORDER BY a.user_id, a.language_code
    ON CONFLICT (user_id, language_code) DO UPDATE SET
        total_learning_minutes = COALESCE(ls.total_learning_minutes, 0) + EXCLUDED.total_learning_minutes,
        updated_at = EXCLUDED.updated_at
    WHERE EXCLUDED.total_learning_minutes > 0
    """
)

# As check_achievements() in schema.sql does for FIRST_CONV: earned once; a row prepared as not yet
# earned becomes earned.
_EARN_ACHIEVEMENTS = sa.text(
    """
    INSERT INTO achievements AS a (user_id, achievement_type, achievement_code, name, description, criteria,
                                   progress, category, tier, is_earned, earned_at, created_at)
    SELECT e.user_id, 'streak', e.code, e.name, e.description, e.criteria, 100.0, 'streak', e.tier, TRUE, :now, :now
    FROM unnest(CAST(:user_ids AS uuid[]), CAST(:codes AS text[]), CAST(:names AS jsonb[]),
                CAST(:descriptions AS jsonb[]), CAST(:criteria AS jsonb[]), CAST(:tiers AS text[]))
         AS e(user_id, code, name, description, criteria, tier)
    ORDER BY e.user_id, e.code
    ON CONFLICT (user_id, achievement_code) DO UPDATE SET
        is_earned = TRUE, earned_at = EXCLUDED.earned_at, progress = EXCLUDED.progress
    WHERE a.is_earned IS NOT TRUE
    RETURNING a.user_id
    """
)

# A learner who has not studied since the local week began achieved nothing in it yet.
_START_NEW_WEEKS = sa.text(
    """
    UPDATE learning_progress lp SET weekly_achieved_minutes = 0, updated_at = :now
    FROM profiles p
    WHERE p.id = lp.user_id AND lp.weekly_achieved_minutes <> 0
      AND lp.last_study_date
          < (date_trunc('week', CAST(:now AS timestamptz) AT TIME ZONE worker_timezone(p.timezone)))::date
    """
)


@dataclass(frozen=True)
class Streak:
    days: int
    code: str
    name: dict[str, str]
    description: dict[str, str]
    tier: str


STREAKS = (
    Streak(7, "STREAK_7", {"en": "7-Day Streak", "ja": "7日連続学習"},
           {"en": "Study 7 days in a row", "ja": "7日間連続で学習"}, "bronze"),
    Streak(30, "STREAK_30", {"en": "30-Day Streak", "ja": "30日連続学習"},
           {"en": "Study 30 days in a row", "ja": "30日間連続で学習"}, "silver"),
)  # fmt: skip


@dataclass
class Studied:
    """One user's new study time in one language: milliseconds and the local days they fell on."""

    ms: int = 0
    days: set[date] = field(default_factory=set)

    def run_days(self) -> int:
        """Length of the run of consecutive days ending at the last day."""
        last, length = max(self.days), 1
        while last - timedelta(days=length) in self.days:
            length += 1
        return length


@dataclass
class Aggregation:
    hours: int = 0
    users: set[str] = field(default_factory=set)
    minutes: int = 0
    achievements: int = 0


def _milliseconds(seconds: Any) -> int:
    """JSON seconds (at most three decimals, read as Decimal) as whole milliseconds."""
    return int(Decimal(seconds) * 1000)


def _breakdown(text: str | None) -> dict[str, Any]:
    value = json.loads(text, parse_float=Decimal) if text else {}
    return value if isinstance(value, dict) else {}


def _studied(rows: Iterable[sa.Row]) -> dict[tuple[str, str], Studied]:
    """Per (user, language): the milliseconds the rows hold beyond what was rolled up before."""
    studied: dict[tuple[str, str], Studied] = defaultdict(Studied)
    for row in rows:
        before = _breakdown(row.rolled_before)
        for language, seconds in _breakdown(row.breakdown).items():
            ms = _milliseconds(seconds) - _milliseconds(before.get(language, 0))
            if ms > 0:  # a rebuilt hour can hold less than was rolled up: nothing is taken back
                entry = studied[row.user_id, language]
                entry.ms += ms
                entry.days.add(row.study_date)
    return studied


def _add_to_progress(conn: Connection, studied: dict[tuple[str, str], Studied], now: datetime) -> Sequence[sa.Row[Any]]:
    keys = sorted(studied)
    return conn.execute(
        _ADD_TO_PROGRESS,
        {
            "now": now,
            "user_ids": bare_array([user_id for user_id, _ in keys]),
            "languages": array_literal(language for _, language in keys),
            "ms": bare_array([studied[key].ms for key in keys]),
            "last_dates": array_literal(max(studied[key].days).isoformat() for key in keys),
            "run_days": bare_array([studied[key].run_days() for key in keys]),
        },
    ).all()


def _add_to_language_settings(conn: Connection, minutes: dict[tuple[str, str], int], now: datetime) -> None:
    keys = sorted(minutes)
    conn.execute(
        _ADD_TO_LANGUAGE_SETTINGS,
        {
            "now": now,
            "user_ids": bare_array([user_id for user_id, _ in keys]),
            "languages": array_literal(language for _, language in keys),
            "minutes": bare_array([minutes[key] for key in keys]),
        },
    )


def _earn_streaks(conn: Connection, streaks: dict[str, int], now: datetime) -> int:
    earned = sorted(
        ((user_id, streak) for user_id, days in streaks.items() for streak in STREAKS if days >= streak.days),
        key=lambda pair: (pair[0], pair[1].code),
    )
    if not earned:
        return 0
    rows = conn.execute(
        _EARN_ACHIEVEMENTS,
        {
            "now": now,
            "user_ids": bare_array([user_id for user_id, _ in earned]),
            "codes": array_literal(streak.code for _, streak in earned),
            "names": array_literal(json.dumps(streak.name, ensure_ascii=False) for _, streak in earned),
            "descriptions": array_literal(json.dumps(streak.description, ensure_ascii=False) for _, streak in earned),
            "criteria": array_literal(json.dumps({"consecutive_days": streak.days}) for _, streak in earned),
            "tiers": array_literal(streak.tier for _, streak in earned),
        },
    ).all()
    return len(rows)


def _roll_up_batch(conn: Connection, now: datetime, result: Aggregation) -> int:
    """Roll up one batch of finished hours; returns how many hour rows it took."""
    hours = conn.execute(
        _ROLL_UP_HOURS, {"now": now, "today": now.astimezone(UTC).date(), "batch": AGGREGATE_BATCH}
    ).all()
    studied = _studied(hours)
    result.hours += len(hours)
    if not studied:
        return len(hours)
    progress = _add_to_progress(conn, studied, now)
    minutes: dict[tuple[str, str], int] = {}
    streaks: dict[str, int] = defaultdict(int)
    for row in progress:
        added_ms = studied[row.user_id, row.language_code].ms
        minutes[row.user_id, row.language_code] = row.total_study_ms // 60000 - (row.total_study_ms - added_ms) // 60000
        streaks[row.user_id] = max(streaks[row.user_id], row.consecutive_days)
    _add_to_language_settings(conn, minutes, now)
    result.achievements += _earn_streaks(conn, streaks, now)
    result.users.update(streaks)
    result.minutes += sum(minutes.values())
    return len(hours)


def aggregate_usage(conn: Connection, now: datetime) -> Aggregation:
    """Roll the usage of hours that ended by `now` into language_settings, learning_progress and streak
    achievements, and mark those hours aggregated, all in the caller's transaction. Hour rows locked by a
    metering batch are left for the next run (metering marks them unaggregated again anyway)."""
    result = Aggregation()
    while _roll_up_batch(conn, now, result) == AGGREGATE_BATCH:
        pass
    conn.execute(_START_NEW_WEEKS, {"now": now})
    return result
