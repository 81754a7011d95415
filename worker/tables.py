"""SQLAlchemy Core definitions of the tables the worker's code reads and writes.

schema.sql is the source of truth; these mirror the columns the code uses, and
tests/test_tables.py checks that they agree with the database that schema.sql builds.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, UUID

metadata = sa.MetaData()

TZ = sa.DateTime(timezone=True)

profiles = sa.Table(
    "profiles",
    metadata,
    sa.Column("id", UUID, primary_key=True),
    sa.Column("email", sa.Text, nullable=False),
    sa.Column("full_name", sa.Text, nullable=False),
    sa.Column("native_language", sa.Text, nullable=False),
    sa.Column("target_languages", sa.ARRAY(sa.Text), nullable=False),
    sa.Column("timezone", sa.Text),
)

subscriptions = sa.Table(
    "subscriptions",
    metadata,
    sa.Column("id", UUID, primary_key=True),
    sa.Column("user_id", UUID, nullable=False),
    sa.Column("plan_type", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("current_period_start", TZ, nullable=False),
    sa.Column("current_period_end", TZ, nullable=False),
    sa.Column("trial_end", TZ),
    sa.Column("cancel_at_period_end", sa.Boolean),
    sa.Column("canceled_at", TZ),
    sa.Column("monthly_minutes_limit", sa.Integer, nullable=False),
    sa.Column("monthly_minutes_used", sa.Integer),
    sa.Column("reset_date", sa.Date, nullable=False),
    sa.Column("stripe_customer_id", sa.Text),
    sa.Column("stripe_subscription_id", sa.Text),
    sa.Column("monthly_price_cents", sa.Integer),
    sa.Column("currency", sa.Text),
    sa.Column("metadata", JSONB),
    sa.Column("limit_reached_at", TZ),
    sa.Column("stripe_status", sa.Text),
    sa.Column("stripe_price_id", sa.Text),
    sa.Column("stripe_state_at", TZ),
    sa.Column("stripe_state_event_id", sa.Text),
)

usage_events = sa.Table(
    "usage_events",
    metadata,
    sa.Column("event_id", sa.Text(collation="C"), primary_key=True),
    sa.Column("user_id", UUID, nullable=False),
    sa.Column("started_at", TZ, nullable=False),
    sa.Column("duration_ms", sa.BigInteger, nullable=False),
    sa.Column("language", sa.Text, nullable=False),
    sa.Column("conversation_id", UUID),
    sa.Column("feature", sa.Text),
    sa.Column("received_at", TZ, nullable=False),
)

usage_tracking = sa.Table(
    "usage_tracking",
    metadata,
    sa.Column("id", UUID, primary_key=True),
    sa.Column("user_id", UUID, nullable=False),
    sa.Column("tracked_at", TZ, nullable=False),
    sa.Column("date", sa.Date, nullable=False),
    sa.Column("hour", sa.Integer, nullable=False),
    sa.Column("microphone_seconds", sa.Integer, nullable=False),
    sa.Column("microphone_ms", sa.BigInteger, nullable=False),
    sa.Column("conversation_count", sa.Integer),
    sa.Column("message_count", sa.Integer),
    sa.Column("language_breakdown", JSONB),
    sa.Column("feature_usage", JSONB),
    sa.Column("is_aggregated", sa.Boolean),
    sa.Column("aggregated_ms", sa.BigInteger, nullable=False),
    sa.Column("aggregated_breakdown", JSONB, nullable=False),
)

usage_periods = sa.Table(
    "usage_periods",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True),
    sa.Column("user_id", UUID, nullable=False),
    sa.Column("period_start", TZ, nullable=False),
    sa.Column("period_end", TZ, nullable=False),
    sa.Column("plan_type", sa.Text, nullable=False),
    sa.Column("monthly_minutes_limit", sa.Integer, nullable=False),
    sa.Column("limit_ms", sa.BigInteger, nullable=False),
    sa.Column("used_ms", sa.BigInteger, nullable=False),
    sa.Column("overage_ms", sa.BigInteger),
    sa.Column("archived_at", TZ),
    sa.Column("created_at", TZ, nullable=False),
)

usage_alerts = sa.Table(
    "usage_alerts",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True),
    sa.Column("user_id", UUID, nullable=False),
    sa.Column("period_start", TZ, nullable=False),
    sa.Column("threshold_percent", sa.SmallInteger, nullable=False),
    sa.Column("used_ms", sa.BigInteger, nullable=False),
    sa.Column("limit_ms", sa.BigInteger, nullable=False),
    sa.Column("triggered_at", TZ, nullable=False),
)

stripe_events = sa.Table(
    "stripe_events",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("created", TZ, nullable=False),
    sa.Column("api_version", sa.Text),
    sa.Column("livemode", sa.Boolean),
    sa.Column("payload", JSONB, nullable=False),
    sa.Column("received_at", TZ, nullable=False),
    sa.Column("processed_at", TZ),
    sa.Column("outcome", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("last_error", sa.Text),
    sa.Column("last_attempt_at", TZ),
)

stripe_subscriptions = sa.Table(
    "stripe_subscriptions",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("user_id", UUID, nullable=False),
    sa.Column("customer_id", sa.Text),
    sa.Column("status", sa.Text),
    sa.Column("plan_type", sa.Text),
    sa.Column("monthly_minutes_limit", sa.Integer),
    sa.Column("price_id", sa.Text),
    sa.Column("price_cents", sa.Integer),
    sa.Column("currency", sa.Text),
    sa.Column("monthly_amount_cents", sa.BigInteger),
    sa.Column("current_period_start", TZ),
    sa.Column("current_period_end", TZ),
    sa.Column("cancel_at_period_end", sa.Boolean, nullable=False),
    sa.Column("canceled_at", TZ),
    sa.Column("trial_end", TZ),
    sa.Column("created", TZ),
    sa.Column("state_at", TZ),
    sa.Column("state_event_id", sa.Text),
    sa.Column("linked_at", TZ, nullable=False),
    sa.Column("updated_at", TZ, nullable=False),
)

stripe_reconcile_runs = sa.Table(
    "stripe_reconcile_runs",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("since_requested", TZ),
    sa.Column("since", TZ, nullable=False),
    sa.Column("started_at", TZ, nullable=False),
    sa.Column("finished_at", TZ),
    sa.Column("phase", sa.Text, nullable=False),
    sa.Column("event_cursor", sa.Text),
    sa.Column("subscription_cursor", sa.Text),
    sa.Column("pages", sa.Integer, nullable=False),
    sa.Column("events_listed", sa.Integer, nullable=False),
    sa.Column("subscriptions_checked", sa.Integer, nullable=False),
    sa.Column("drift", JSONB, nullable=False),
    sa.Column("last_error", sa.Text),
)

dead_letters = sa.Table(
    "dead_letters",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("ref", sa.Text),
    sa.Column("task_name", sa.Text),
    sa.Column("payload", JSONB, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
    sa.Column("replayed_at", TZ),
    sa.Column("replay_count", sa.Integer, nullable=False),
    sa.Column("last_replay_at", TZ),
)

maintenance_runs = sa.Table(
    "maintenance_runs",
    metadata,
    sa.Column("job", sa.Text, primary_key=True),
    sa.Column("last_started_at", TZ),
    sa.Column("last_succeeded_at", TZ),
    sa.Column("last_duration_ms", sa.Integer),
    sa.Column("last_error", sa.Text),
)

audit_logs = sa.Table(
    "audit_logs",
    metadata,
    sa.Column("id", UUID, primary_key=True),
    sa.Column("user_id", UUID),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("table_name", sa.Text, nullable=False),
    sa.Column("record_id", UUID),
    sa.Column("old_values", JSONB),
    sa.Column("new_values", JSONB),
    sa.Column("actor", sa.Text),
    sa.Column("created_at", TZ),
)

live_sessions = sa.Table(
    "live_sessions",
    metadata,
    sa.Column("session_id", UUID, primary_key=True),
    sa.Column("user_id", UUID, nullable=False),
    sa.Column("language", sa.Text, nullable=False),
    sa.Column("conversation_id", UUID),
    sa.Column("feature", sa.Text),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("started_at", TZ, nullable=False),
    sa.Column("last_seen_at", TZ, nullable=False),
    sa.Column("reported_ms", sa.BigInteger, nullable=False),
    sa.Column("recorded_until", TZ, nullable=False),
    sa.Column("granted_ms", sa.BigInteger, nullable=False),
    sa.Column("beyond_grant_ms", sa.BigInteger, nullable=False),
    sa.Column("ended_at", TZ),
)
