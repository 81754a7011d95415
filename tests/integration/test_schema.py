"""schema.sql against the real PostgreSQL: seed fidelity, re-application, Supabase compatibility,
row-level security, triggers, partitions, the statistics view and the SQL helpers."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.types.json import Jsonb
from support.checks import SCHEMA_PATH, schema_dump

from worker.db import migrate

MakeUser = Callable[..., uuid.UUID]

# The seed design (shared/seed/database-design.ja.md): every table with every column and its type,
# written as information_schema spells it (see column_types below).
SEED_COLUMNS: dict[str, dict[str, str]] = {
    "profiles": {
        "id": "uuid", "email": "text", "full_name": "text", "avatar_url": "text",
        "native_language": "text", "target_languages": "text[]", "current_language_pair": "jsonb",
        "proficiency_levels": "jsonb", "timezone": "text", "preferred_learning_time": "jsonb",
        "learning_style": "text", "created_at": "timestamptz", "updated_at": "timestamptz",
        "last_active_at": "timestamptz", "is_active": "boolean", "preferences": "jsonb",
    },
    "language_settings": {
        "id": "uuid", "user_id": "uuid", "language_code": "text", "proficiency_level": "text",
        "learning_goals": "text[]", "daily_target_minutes": "integer", "preferred_voice_id": "text",
        "speech_rate": "numeric(2,1)", "total_learning_minutes": "integer", "total_conversations": "integer",
        "vocabulary_mastered": "integer", "created_at": "timestamptz", "updated_at": "timestamptz",
    },
    "conversations": {
        "id": "uuid", "user_id": "uuid", "title": "text", "language_pair": "jsonb", "scenario": "text",
        "specialization": "text", "difficulty_level": "integer", "script_id": "uuid", "script_enabled": "boolean",
        "script_adherence_score": "numeric(3,2)", "started_at": "timestamptz", "ended_at": "timestamptz",
        "duration_seconds": "integer", "actual_speaking_time": "integer", "message_count": "integer",
        "user_message_count": "integer", "ai_message_count": "integer", "words_spoken": "integer",
        "unique_words_used": "integer", "fluency_score": "numeric(3,2)", "accuracy_score": "numeric(3,2)",
        "pronunciation_score": "numeric(3,2)", "overall_score": "numeric(3,2)", "created_at": "timestamptz",
        "metadata": "jsonb",
    },
    "messages": {
        "id": "uuid", "conversation_id": "uuid", "user_id": "uuid", "content": "text", "language": "text",
        "translated_content": "jsonb", "is_ai": "boolean", "message_type": "text", "audio_url": "text",
        "audio_duration_ms": "integer", "pronunciation_analysis": "jsonb", "grammar_corrections": "jsonb",
        "vocabulary_highlights": "jsonb", "created_at": "timestamptz", "metadata": "jsonb",
    },
    "conversation_scripts": {
        "id": "uuid", "title": "text", "description": "text", "language_pair": "jsonb", "scenario": "text",
        "difficulty_level": "integer", "estimated_duration_minutes": "integer", "script_segments": "jsonb",
        "cultural_notes": "jsonb", "vocabulary_focus": "jsonb", "category": "text", "tags": "text[]",
        "specialization": "text", "usage_count": "integer", "average_rating": "numeric(2,1)",
        "completion_rate": "numeric(3,2)", "created_at": "timestamptz", "updated_at": "timestamptz",
        "created_by": "uuid", "is_premium": "boolean",
    },
    "subscriptions": {
        "id": "uuid", "user_id": "uuid", "plan_type": "text", "status": "text",
        "current_period_start": "timestamptz", "current_period_end": "timestamptz", "trial_end": "timestamptz",
        "cancel_at_period_end": "boolean", "canceled_at": "timestamptz", "monthly_minutes_limit": "integer",
        "monthly_minutes_used": "integer", "reset_date": "date", "stripe_customer_id": "text",
        "stripe_subscription_id": "text", "payment_method_id": "text", "monthly_price_cents": "integer",
        "currency": "text", "created_at": "timestamptz", "updated_at": "timestamptz", "metadata": "jsonb",
    },
    "usage_tracking": {
        "id": "uuid", "user_id": "uuid", "tracked_at": "timestamptz", "date": "date", "hour": "integer",
        "microphone_seconds": "integer", "conversation_count": "integer", "message_count": "integer",
        "language_breakdown": "jsonb", "feature_usage": "jsonb", "is_aggregated": "boolean",
    },
    "learning_progress": {
        "id": "uuid", "user_id": "uuid", "language_code": "text", "speaking_level": "numeric(3,2)",
        "listening_level": "numeric(3,2)", "vocabulary_size": "integer", "grammar_accuracy": "numeric(3,2)",
        "pronunciation_accuracy": "numeric(3,2)", "fluency_score": "numeric(3,2)",
        "total_study_time_minutes": "integer", "consecutive_days": "integer", "last_study_date": "date",
        "weekly_goal_minutes": "integer", "weekly_achieved_minutes": "integer", "topic_mastery": "jsonb",
        "created_at": "timestamptz", "updated_at": "timestamptz",
    },
    "achievements": {
        "id": "uuid", "user_id": "uuid", "achievement_type": "text", "achievement_code": "text", "name": "jsonb",
        "description": "jsonb", "icon_url": "text", "criteria": "jsonb", "progress": "numeric(5,2)",
        "earned_at": "timestamptz", "is_earned": "boolean", "reward_type": "text", "reward_value": "integer",
        "category": "text", "tier": "text", "display_order": "integer", "created_at": "timestamptz",
    },
    "audit_logs": {
        "id": "uuid", "user_id": "uuid", "action": "text", "table_name": "text", "record_id": "uuid",
        "old_values": "jsonb", "new_values": "jsonb", "ip_address": "inet", "user_agent": "text",
        "created_at": "timestamptz",
    },
}  # fmt: skip

ADDED_COLUMNS: dict[str, dict[str, str]] = {
    "usage_tracking": {"microphone_ms": "bigint", "aggregated_ms": "bigint"},
    "subscriptions": {
        "limit_reached_at": "timestamptz", "stripe_status": "text", "stripe_price_id": "text",
        "stripe_state_at": "timestamptz", "stripe_state_event_id": "text",
    },
    "audit_logs": {"actor": "text"},
}  # fmt: skip

SEED_INDEXES = {
    "idx_profiles_email", "idx_profiles_native_language", "idx_profiles_target_languages",
    "idx_profiles_last_active", "idx_profiles_preferences", "idx_language_settings_user_language",
    "idx_conversations_user_id", "idx_conversations_language_pair", "idx_conversations_created_at",
    "idx_conversations_scenario", "idx_conversations_ended_at", "idx_conversations_user_date",
    "idx_recent_conversations", "idx_messages_conversation_id", "idx_messages_created_at",
    "idx_messages_user_language", "idx_messages_type", "idx_messages_conv_created", "idx_messages_metadata",
    "idx_scripts_language_pair", "idx_scripts_scenario", "idx_scripts_category", "idx_scripts_tags",
    "idx_subscriptions_user_id", "idx_subscriptions_status", "idx_subscriptions_reset_date",
    "idx_subscriptions_stripe_customer", "idx_active_subscriptions", "idx_usage_tracking_user_date",
    "idx_usage_tracking_aggregation", "idx_learning_progress_user_language", "idx_learning_progress_streak",
    "idx_achievements_user_earned", "idx_achievements_category", "idx_user_statistics_user_id",
}  # fmt: skip

USER_TABLES = {  # user-facing table -> column naming the owner
    "profiles": "id",
    "language_settings": "user_id",
    "conversations": "user_id",
    "messages": "user_id",
    "conversation_scripts": "created_by",
    "subscriptions": "user_id",
    "usage_tracking": "user_id",
    "learning_progress": "user_id",
    "achievements": "user_id",
    "audit_logs": "user_id",
}
WORKER_TABLES = [
    "usage_events",
    "usage_hour_conversations",
    "stripe_events",
    "stripe_subscriptions",
    "stripe_reconcile_runs",
    "dead_letters",
    "usage_periods",
    "usage_alerts",
    "maintenance_runs",
    "live_sessions",
]
T0 = datetime(2030, 3, 10, 12, 0, tzinfo=UTC)


# --------------------------------------------------------------------------------------------------- helpers


def column_types(conn: psycopg.Connection, table: str) -> dict[str, str]:
    """{column: type} of a public table, from information_schema, in the spelling of SEED_COLUMNS."""
    rows = conn.execute(
        """
        SELECT column_name, data_type, udt_name, numeric_precision, numeric_scale
        FROM information_schema.columns WHERE table_schema = 'public' AND table_name = %s
        """,
        (table,),
    ).fetchall()
    types = {}
    for name, data_type, udt_name, precision, scale in rows:
        if data_type == "ARRAY":
            spelled = f"{udt_name.lstrip('_')}[]"
        elif data_type == "numeric":
            spelled = f"numeric({precision},{scale})"
        elif data_type == "timestamp with time zone":
            spelled = "timestamptz"
        else:
            spelled = data_type
        types[name] = spelled
    return types


@contextmanager
def acting_as(conn: psycopg.Connection, role: str, user_id: uuid.UUID | None = None) -> Iterator[None]:
    """Run as a Supabase role, with the JWT claims PostgREST would set for user_id."""
    claims = json.dumps({"sub": str(user_id), "role": role}) if user_id else ""
    conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
    conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (claims,))
    try:
        yield
    finally:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.INERROR:
            conn.execute("RESET ROLE")
            conn.execute("SELECT set_config('request.jwt.claims', '', true)")


def refused(conn: psycopg.Connection, query: str | sql.Composable, params: tuple[Any, ...] = ()) -> str:
    """The statement fails with insufficient_privilege (privilege or RLS WITH CHECK); its message."""
    with pytest.raises(errors.InsufficientPrivilege) as caught, conn.transaction():
        conn.execute(query, params)
    return str(caught.value)


def affected(conn: psycopg.Connection, query: str | sql.Composable, params: tuple[Any, ...] = ()) -> int:
    return conn.execute(query, params).rowcount


def owners(conn: psycopg.Connection, table: str) -> set[str | None]:
    column = USER_TABLES[table]
    query = sql.SQL("SELECT {}::text FROM {}").format(sql.Identifier(column), sql.Identifier(table))
    return {row[0] for row in conn.execute(query)}


def scalar(conn: psycopg.Connection, query: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def add_conversation(conn: psycopg.Connection, user_id: uuid.UUID, target: str = "en", **fields: Any) -> uuid.UUID:
    values = {
        "user_id": user_id,
        "language_pair": Jsonb({"native": "ja", "target": target}),
        "scenario": "cafe",
    }
    values.update(fields)
    query = sql.SQL("INSERT INTO conversations ({}) VALUES ({}) RETURNING id").format(
        sql.SQL(", ").join(map(sql.Identifier, values)), sql.SQL(", ").join(sql.Placeholder() * len(values))
    )
    return scalar(conn, query, tuple(values.values()))


def add_subscription(conn: psycopg.Connection, user_id: uuid.UUID, plan: str = "free") -> None:
    conn.execute(
        "INSERT INTO subscriptions (user_id, plan_type) VALUES (%s, %s)"
        " ON CONFLICT (user_id) DO UPDATE SET plan_type = EXCLUDED.plan_type",
        (user_id, plan),
    )


def give_rows(conn: psycopg.Connection, user_id: uuid.UUID) -> None:
    """One row of each user-facing table owned by user_id (audit_logs fill through the triggers)."""
    conversation = add_conversation(conn, user_id)
    conn.execute(
        "INSERT INTO language_settings (user_id, language_code, proficiency_level) VALUES (%s, 'en', 'beginner')",
        (user_id,),
    )
    conn.execute(
        "INSERT INTO messages (conversation_id, user_id, content, language) VALUES (%s, %s, 'hello', 'en')",
        (conversation, user_id),
    )
    conn.execute(
        "INSERT INTO conversation_scripts (title, language_pair, scenario, script_segments, category, created_by)"
        " VALUES ('At the cafe', '{\"native\": \"ja\", \"target\": \"en\"}', 'cafe', '[]', 'daily', %s)",
        (user_id,),
    )
    add_subscription(conn, user_id)
    conn.execute("INSERT INTO usage_tracking (user_id, date, hour) VALUES (%s, '2030-03-10', 12)", (user_id,))
    conn.execute("INSERT INTO learning_progress (user_id, language_code) VALUES (%s, 'en')", (user_id,))
    conn.execute(
        "INSERT INTO achievements (user_id, achievement_type, achievement_code, name, description, criteria,"
        " category) VALUES (%s, 'streak', 'STREAK_7', '{}', '{}', '{}', 'streak')",
        (user_id,),
    )


def code_only(text: str) -> str:
    """SQL without its -- comments (good enough for this file: no '--' inside string literals)."""
    return "\n".join(line.split("--", 1)[0] for line in text.splitlines())


# --------------------------------------------------------------------------------------------------- schema


def test_empty_database_gets_every_seed_table_and_reapplying_changes_nothing(empty_database_url: str) -> None:
    migrate(empty_database_url)
    with psycopg.connect(empty_database_url) as conn:
        for table, expected in SEED_COLUMNS.items():
            actual = column_types(conn, table)
            assert actual, f"table {table} is missing"
            wanted = {**expected, **ADDED_COLUMNS.get(table, {})}
            assert {column: actual.get(column) for column in wanted} == wanted, table
        indexes = {row[0] for row in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")}
        assert indexes >= SEED_INDEXES
        assert scalar(conn, "SELECT relkind FROM pg_class WHERE oid = 'messages'::regclass") == "p"
        assert scalar(conn, "SELECT to_regclass('messages_partitioned')") is None
        assert scalar(conn, "SELECT relispopulated FROM pg_class WHERE oid = 'user_statistics'::regclass")

    before = schema_dump(empty_database_url)
    migrate(empty_database_url)
    assert schema_dump(empty_database_url) == before


def test_schema_file_runs_in_one_transaction_and_leaves_operations_out() -> None:
    code = code_only(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert not re.search(r"^\s*(BEGIN|COMMIT|START\s+TRANSACTION|ROLLBACK)\s*;", code, re.I | re.M)
    assert not re.search(r"\b(INDEX|REINDEX\s+\w+)\s+CONCURRENTLY\b", code, re.I)
    assert not re.search(r"\bALTER\s+SYSTEM\b|\bVACUUM\b|uuid_generate_v4|messages_partitioned", code, re.I)
    assert not re.search(r"CREATE\s+(ROLE|USER)\s+backup", code, re.I)


# usage_tracking.microphone_seconds as schema.sql built it before it became a generated column: a plain
# column kept by a row trigger.
SECONDS_BY_TRIGGER = """
    ALTER TABLE usage_tracking DROP COLUMN microphone_seconds;
    ALTER TABLE usage_tracking ADD COLUMN microphone_seconds INTEGER NOT NULL DEFAULT 0;
    CREATE FUNCTION usage_tracking_sync_seconds() RETURNS TRIGGER LANGUAGE plpgsql
    SET search_path = pg_catalog, public, pg_temp AS $$
    BEGIN
        IF (TG_OP = 'INSERT' AND NEW.microphone_ms <> 0)
           OR (TG_OP = 'UPDATE' AND NEW.microphone_ms IS DISTINCT FROM OLD.microphone_ms) THEN
            NEW.microphone_seconds := (NEW.microphone_ms / 1000)::integer;
        END IF;
        RETURN NEW;
    END;
    $$;
    CREATE TRIGGER usage_tracking_sync_seconds BEFORE INSERT OR UPDATE ON usage_tracking
        FOR EACH ROW EXECUTE FUNCTION usage_tracking_sync_seconds();
"""


def test_an_older_database_gets_the_generated_seconds_and_byte_ordered_event_ids(
    fresh_database_url: str, make_user: MakeUser
) -> None:
    with psycopg.connect(fresh_database_url) as conn:
        conn.execute(SECONDS_BY_TRIGGER)
        conn.execute('ALTER TABLE usage_events ALTER COLUMN event_id TYPE text COLLATE "default"')
        metered, seed_style = make_user(conn), make_user(conn)
        conn.execute("INSERT INTO usage_tracking (user_id, microphone_ms) VALUES (%s, 61999)", (metered,))
        conn.execute("INSERT INTO usage_tracking (user_id, microphone_seconds) VALUES (%s, 42)", (seed_style,))
    migrate(fresh_database_url)
    with psycopg.connect(fresh_database_url) as conn:
        rows = conn.execute("SELECT user_id, microphone_ms, microphone_seconds FROM usage_tracking").fetchall()
        assert sorted(rows) == sorted([(metered, 61999, 61), (seed_style, 42000, 42)])
        assert scalar(conn, "SELECT attgenerated FROM pg_attribute WHERE attrelid = 'usage_tracking'::regclass"
                            " AND attname = 'microphone_seconds'") == "s"  # fmt: skip
        assert scalar(conn, "SELECT to_regprocedure('usage_tracking_sync_seconds()')") is None
        assert scalar(conn, "SELECT attcollation::regcollation::text FROM pg_attribute"
                            " WHERE attrelid = 'usage_events'::regclass AND attname = 'event_id'") == '"C"'  # fmt: skip
    before = schema_dump(fresh_database_url)
    migrate(fresh_database_url)
    assert schema_dump(fresh_database_url) == before


def test_existing_supabase_objects_are_left_alone(empty_database_url: str) -> None:
    """On Supabase auth.users has more columns, auth.uid() is theirs and pgcrypto lives in `extensions`."""
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(
            """
            CREATE SCHEMA auth;
            CREATE TABLE auth.users (id uuid PRIMARY KEY, email text, raw_app_meta_data jsonb,
                                     raw_user_meta_data jsonb, aud varchar(255), is_sso_user boolean);
            CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
                SELECT /* supabase's own */ nullif(coalesce(current_setting('request.jwt.claim.sub', true),
                       (current_setting('request.jwt.claims', true)::jsonb ->> 'sub')), '')::uuid $$;
            CREATE SCHEMA extensions;
            CREATE EXTENSION pgcrypto WITH SCHEMA extensions;
            """
        )
    migrate(empty_database_url)
    migrate(empty_database_url)
    with psycopg.connect(empty_database_url) as conn:
        assert "supabase's own" in scalar(conn, "SELECT prosrc FROM pg_proc WHERE oid = 'auth.uid()'::regprocedure")
        assert scalar(conn, "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'auth'") == 6
        assert scalar(conn, "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'pgcrypto'") == (
            "extensions"
        )
        conn.execute("SELECT set_config('app.encryption_key', 'k', true)")
        assert scalar(conn, "SELECT decrypt_audio_url(encrypt_audio_url('https://a/b.ogg'))") == "https://a/b.ogg"


def test_catalog_rules(conn: psycopg.Connection) -> None:
    tables = conn.execute(
        "SELECT relname, relrowsecurity FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        " AND relkind IN ('r', 'p')"
    ).fetchall()
    assert {name for name, _ in tables} >= set(USER_TABLES) | set(WORKER_TABLES)
    assert [name for name, secured in tables if not secured] == []
    policed = {row[0] for row in conn.execute("SELECT DISTINCT tablename FROM pg_policies WHERE schemaname = 'public'")}
    assert policed == set(USER_TABLES)

    # every function fixes its search_path (SECURITY DEFINER ones above all)
    loose = conn.execute(
        "SELECT oid::regprocedure::text, prosecdef FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
        " AND prokind = 'f' AND NOT EXISTS (SELECT 1 FROM unnest(proconfig) c WHERE c LIKE 'search_path=%')"
        " AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = pg_proc.oid AND d.deptype = 'e')"
    ).fetchall()
    assert loose == []

    # business times come from the worker: no clock in function bodies (updated_at bookkeeping aside)
    clock = re.compile(
        r"\b(now|clock_timestamp|statement_timestamp|transaction_timestamp)\s*\(|\bcurrent_(date|timestamp)\b",
        re.I,
    )
    bodies = conn.execute(
        "SELECT proname, prosrc FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
        " AND proname <> 'update_updated_at' AND prolang <> 13"  # 13: C functions of pgcrypto
    ).fetchall()
    assert [name for name, body in bodies if clock.search(body)] == []

    assert scalar(conn, "SELECT rolbypassrls FROM pg_roles WHERE rolname = 'service_role'")
    assert scalar(conn, "SELECT count(*) FROM pg_roles WHERE rolname IN ('anon', 'authenticated')") == 2
    assert scalar(conn, "SELECT count(*) FROM pg_roles WHERE rolname = 'backup_user'") == 0
    assert scalar(conn, "SELECT count(*) FROM pg_proc WHERE proname = 'track_microphone_usage'") == 0
    triggers = {row[0] for row in conn.execute("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")}
    assert "trigger_track_usage" not in triggers
    assert {
        "update_profiles_updated_at", "update_language_settings_updated_at", "update_conversation_scripts_updated_at",
        "update_subscriptions_updated_at", "update_learning_progress_updated_at", "audit_subscriptions",
        "audit_profiles", "update_learning_progress_on_end", "check_achievements_on_end",
    } <= triggers  # fmt: skip


# --------------------------------------------------------------------------------------------------- RLS


def test_rls_users_reach_only_their_own_rows(conn: psycopg.Connection, make_user: MakeUser) -> None:
    alice, bob = make_user(conn), make_user(conn)
    give_rows(conn, alice)
    give_rows(conn, bob)
    bob_conversation = scalar(conn, "SELECT id FROM conversations WHERE user_id = %s", (bob,))
    alice_conversation = scalar(conn, "SELECT id FROM conversations WHERE user_id = %s", (alice,))

    with acting_as(conn, "authenticated", alice):
        assert scalar(conn, "SELECT auth.uid()") == alice
        for table in USER_TABLES:
            if table == "conversation_scripts":  # the shared catalogue: every script is readable
                assert owners(conn, table) == {str(alice), str(bob)}
            else:
                assert owners(conn, table) == {str(alice)}, table

        # own rows are writable
        assert affected(conn, "UPDATE profiles SET full_name = 'Alice' WHERE id = %s", (alice,)) == 1
        assert affected(conn, "UPDATE conversations SET title = 'mine' WHERE id = %s", (alice_conversation,)) == 1
        conn.execute(
            "INSERT INTO language_settings (user_id, language_code, proficiency_level) VALUES (%s, 'fr', 'beginner')",
            (alice,),
        )
        conn.execute(
            "INSERT INTO messages (conversation_id, user_id, content, language) VALUES (%s, %s, 'hi', 'en')",
            (alice_conversation, alice),
        )
        conn.execute("UPDATE learning_progress SET vocabulary_size = 10 WHERE user_id = %s", (alice,))
        assert affected(conn, "UPDATE conversation_scripts SET title = 'x' WHERE created_by = %s", (alice,)) == 1

        # other users' rows are invisible to UPDATE and DELETE ...
        for table, column in USER_TABLES.items():
            query = sql.SQL("DELETE FROM {} WHERE {} = %s").format(sql.Identifier(table), sql.Identifier(column))
            assert affected(conn, query, (bob,)) == 0, table
        assert affected(conn, "UPDATE conversations SET title = 'x' WHERE user_id = %s", (bob,)) == 0

        # ... and rows owned by someone else cannot be created (WITH CHECK)
        assert "row-level security" in refused(
            conn,
            "INSERT INTO profiles (id, email, full_name, native_language) VALUES (%s, 'x@example.com', 'X', 'ja')",
            (uuid.uuid4(),),
        )
        refused(
            conn,
            "INSERT INTO language_settings (user_id, language_code, proficiency_level) VALUES (%s, 'de', 'beginner')",
            (bob,),
        )
        refused(
            conn,
            "INSERT INTO conversations (user_id, language_pair, scenario) VALUES (%s, '{}', 'x')",
            (bob,),
        )
        refused(
            conn,
            "INSERT INTO messages (conversation_id, user_id, content, language) VALUES (%s, %s, 'hi', 'en')",
            (bob_conversation, bob),
        )
        refused(
            conn,
            "INSERT INTO messages (conversation_id, user_id, content, language)"  # own name, Bob's chat
            " VALUES (%s, %s, 'hi', 'en')",
            (bob_conversation, alice),
        )
        refused(
            conn,
            "INSERT INTO messages (conversation_id, user_id, content, language)"  # Bob's name, own chat
            " VALUES (%s, %s, 'hi', 'en')",
            (alice_conversation, bob),
        )
        refused(conn, "UPDATE conversations SET user_id = %s WHERE id = %s", (bob, alice_conversation))
        refused(conn, "INSERT INTO learning_progress (user_id, language_code) VALUES (%s, 'de')", (bob,))
        refused(
            conn,
            "INSERT INTO conversation_scripts (title, language_pair, scenario, script_segments, category,"
            " created_by) VALUES ('t', '{}', 's', '[]', 'c', %s)",
            (bob,),
        )
        # read-only tables: not even own rows can be created or changed
        refused(conn, "INSERT INTO subscriptions (user_id) VALUES (%s)", (alice,))
        refused(conn, "INSERT INTO usage_tracking (user_id, date, hour) VALUES (%s, '2030-01-01', 1)", (alice,))
        refused(
            conn,
            "INSERT INTO achievements (user_id, achievement_type, achievement_code, name, description,"
            " criteria, category) VALUES (%s, 'x', 'FREE', '{}', '{}', '{}', 'x')",
            (alice,),
        )
        refused(conn, "INSERT INTO audit_logs (user_id, action, table_name) VALUES (%s, 'x', 'x')", (alice,))
        assert affected(conn, "UPDATE subscriptions SET plan_type = 'premium' WHERE user_id = %s", (alice,)) == 0
        assert affected(conn, "UPDATE usage_tracking SET microphone_ms = 1 WHERE user_id = %s", (alice,)) == 0
        refused(conn, "TRUNCATE conversations")

        # the worker's tables, partitions, statistics and operational functions are out of reach
        for table in [*WORKER_TABLES, "messages_default", "user_statistics"]:
            refused(conn, sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))
        refused(conn, "SELECT create_monthly_partition('2031-01-01')")
        refused(conn, "SELECT refresh_user_statistics()")
        refused(conn, "SELECT decrypt_audio_url('x')")
        refused(conn, "SELECT * FROM auth.users")  # app metadata (admin roles) stays private
    assert scalar(conn, "SELECT full_name FROM profiles WHERE id = %s", (bob,)) == "Test Learner"


def test_rls_anon_sees_nothing(conn: psycopg.Connection, make_user: MakeUser) -> None:
    alice = make_user(conn)
    give_rows(conn, alice)
    with acting_as(conn, "anon"):
        assert scalar(conn, "SELECT auth.uid()") is None
        for table in USER_TABLES:
            assert owners(conn, table) == set(), table
        refused(
            conn,
            "INSERT INTO conversation_scripts (title, language_pair, scenario, script_segments, category)"
            " VALUES ('t', '{}', 's', '[]', 'c')",
        )
        for table in WORKER_TABLES:
            refused(conn, sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))


def test_rls_admin_comes_from_app_metadata_only(conn: psycopg.Connection, make_user: MakeUser) -> None:
    alice, bob, pretender, admin = (make_user(conn) for _ in range(4))
    give_rows(conn, alice)
    give_rows(conn, bob)
    conn.execute('UPDATE auth.users SET raw_user_meta_data = \'{"role": "admin"}\' WHERE id = %s', (pretender,))
    conn.execute('UPDATE auth.users SET raw_app_meta_data = \'{"role": "admin"}\' WHERE id = %s', (admin,))

    with acting_as(conn, "authenticated", pretender):  # raw_user_meta_data is editable by its user
        assert scalar(conn, "SELECT is_admin()") is False
        for table in USER_TABLES:
            if table != "conversation_scripts":
                assert owners(conn, table) <= {str(pretender)}, table
        assert affected(conn, "UPDATE conversations SET title = 'x' WHERE user_id = %s", (bob,)) == 0

    with acting_as(conn, "authenticated", admin):
        assert scalar(conn, "SELECT is_admin()") is True
        for table in USER_TABLES:
            assert owners(conn, table) >= {str(alice), str(bob)}, table
        assert affected(conn, "UPDATE conversations SET title = 'checked' WHERE user_id = %s", (bob,)) == 1
        assert affected(conn, "UPDATE subscriptions SET plan_type = 'premium' WHERE user_id = %s", (bob,)) == 1
        refused(conn, "INSERT INTO audit_logs (user_id, action, table_name) VALUES (%s, 'x', 'x')", (bob,))
        assert affected(conn, "DELETE FROM audit_logs") == 0  # the trail stays, even for admins
        refused(conn, "SELECT * FROM usage_events")


# --------------------------------------------------------------------------------------------------- triggers


def test_ending_a_conversation_updates_learning_progress(conn: psycopg.Connection, make_user: MakeUser) -> None:
    user = make_user(conn)

    def progress() -> tuple[Any, ...]:
        row = conn.execute(
            "SELECT speaking_level, fluency_score, grammar_accuracy, pronunciation_accuracy,"
            " total_study_time_minutes FROM learning_progress WHERE user_id = %s AND language_code = 'en'",
            (user,),
        ).fetchone()
        assert row is not None
        return tuple(row)

    def end(conversation: uuid.UUID, at: datetime) -> None:
        conn.execute("UPDATE conversations SET ended_at = %s WHERE id = %s", (at, conversation))

    first = add_conversation(
        conn, user, fluency_score=Decimal("0.80"), accuracy_score=Decimal("0.60"),
        pronunciation_score=Decimal("0.70"), duration_seconds=1800,
    )  # fmt: skip
    assert conn.execute("SELECT 1 FROM learning_progress WHERE user_id = %s", (user,)).fetchone() is None
    end(first, T0)
    assert progress() == (Decimal("0.80"), Decimal("0.80"), Decimal("0.60"), Decimal("0.70"), 0)

    # no scores in the 30 days before it ended: earlier scores stay
    unscored = add_conversation(conn, user, duration_seconds=3600)
    end(unscored, T0 + timedelta(days=40))
    assert progress() == (Decimal("0.80"), Decimal("0.80"), Decimal("0.60"), Decimal("0.70"), 0)

    # averages over the conversations that ended within 30 days before this one, scores one by one
    end(add_conversation(conn, user, fluency_score=Decimal("0.40")), T0 + timedelta(days=50))
    assert progress() == (Decimal("0.40"), Decimal("0.40"), Decimal("0.60"), Decimal("0.70"), 0)
    end(add_conversation(conn, user, fluency_score=Decimal("0.60"), accuracy_score=Decimal("0.90")),
        T0 + timedelta(days=55))  # fmt: skip
    assert progress() == (Decimal("0.50"), Decimal("0.50"), Decimal("0.90"), Decimal("0.70"), 0)

    # another target language has its own row; ending again (ended_at already set) recomputes nothing
    end(add_conversation(conn, user, target="zh", fluency_score=Decimal("0.10")), T0)
    conn.execute(
        "UPDATE conversations SET fluency_score = 0.99, ended_at = %s WHERE id = %s",
        (T0 + timedelta(days=1), first),
    )
    assert progress() == (Decimal("0.50"), Decimal("0.50"), Decimal("0.90"), Decimal("0.70"), 0)
    assert scalar(conn, "SELECT fluency_score FROM learning_progress WHERE user_id = %s AND language_code = 'zh'",
                  (user,)) == Decimal("0.10")  # fmt: skip

    # a conversation inserted already ended counts as ending
    add_conversation(conn, user, fluency_score=Decimal("0.70"), ended_at=T0 + timedelta(days=56))
    assert progress()[1] == Decimal("0.57")  # (0.40 + 0.60 + 0.70) / 3


def test_first_ended_conversation_earns_first_conv_once(conn: psycopg.Connection, make_user: MakeUser) -> None:
    user, idle = make_user(conn), make_user(conn)
    add_conversation(conn, idle)  # started, never ended: nothing earned
    first, second = add_conversation(conn, user), add_conversation(conn, user)

    def earned() -> list[tuple[Any, ...]]:
        return conn.execute(
            "SELECT user_id, is_earned, earned_at, criteria, name ->> 'ja', description ->> 'en', category"
            " FROM achievements WHERE achievement_code = 'FIRST_CONV'"
        ).fetchall()

    conn.execute("UPDATE conversations SET title = 'still going' WHERE id = %s", (first,))
    assert earned() == []
    conn.execute("UPDATE conversations SET ended_at = %s WHERE id = %s", (T0, first))
    expected = [(user, True, T0, {"conversations_completed": 1}, "初めての会話", "Complete your first conversation",
                 "milestone")]  # fmt: skip
    assert earned() == expected
    conn.execute("UPDATE conversations SET ended_at = %s WHERE id = %s", (T0 + timedelta(hours=1), second))
    assert earned() == expected


def test_subscription_changes_are_audited_with_actor(conn: psycopg.Connection, make_user: MakeUser) -> None:
    user = make_user(conn)

    def trail() -> list[tuple[Any, ...]]:
        return conn.execute(
            "SELECT action, old_values, new_values, actor, record_id FROM audit_logs"
            " WHERE table_name = 'subscriptions' AND user_id = %s ORDER BY created_at, ctid",  # one transaction
            (user,),
        ).fetchall()

    conn.execute("SELECT set_config('app.actor', 'stripe:evt_123', true)")
    add_subscription(conn, user)
    subscription = scalar(conn, "SELECT id FROM subscriptions WHERE user_id = %s", (user,))
    conn.execute("UPDATE subscriptions SET plan_type = 'premium', monthly_minutes_limit = 3000 WHERE user_id = %s",
                 (user,))  # fmt: skip
    (inserted, old, new, actor, record), (updated, old2, new2, actor2, _) = trail()
    assert (inserted, old, new["plan_type"], actor, record) == (
        "INSERT",
        None,
        "free",
        "stripe:evt_123",
        subscription,
    )
    assert (updated, actor2) == ("UPDATE", "stripe:evt_123")
    assert (old2["plan_type"], old2["monthly_minutes_limit"]) == ("free", 60)
    assert (new2["plan_type"], new2["monthly_minutes_limit"]) == ("premium", 3000)

    # usage counters move with every metered batch: the usage ledger is their trail, not audit_logs
    conn.execute("UPDATE subscriptions SET monthly_minutes_used = 12 WHERE user_id = %s", (user,))
    conn.execute("UPDATE subscriptions SET monthly_minutes_used = 13, updated_at = %s WHERE user_id = %s", (T0, user))
    assert len(trail()) == 2

    conn.execute("SELECT set_config('app.actor', '', true)")  # no actor set: the database role
    conn.execute("UPDATE subscriptions SET status = 'past_due', monthly_minutes_used = 14 WHERE user_id = %s", (user,))
    assert trail()[-1][3] == scalar(conn, "SELECT current_user")
    assert trail()[-1][2]["monthly_minutes_used"] == 14

    with acting_as(conn, "authenticated", user):  # a signed-in user editing their profile
        conn.execute("UPDATE profiles SET full_name = 'Renamed' WHERE id = %s", (user,))
    action, old, new, actor = (
        conn.execute(
            "SELECT action, old_values ->> 'full_name', new_values ->> 'full_name', actor FROM audit_logs"
            " WHERE table_name = 'profiles' AND user_id = %s AND action = 'UPDATE'",
            (user,),
        ).fetchone()
        or ()
    )
    assert (action, old, new, actor) == ("UPDATE", "Test Learner", "Renamed", f"user:{user}")

    conn.execute("DELETE FROM subscriptions WHERE user_id = %s", (user,))
    action, old, new, _, _ = trail()[-1]
    assert (action, old["status"], new) == ("DELETE", "past_due", None)


def test_audio_urls_round_trip_through_encryption(conn: psycopg.Connection) -> None:
    url = "https://storage.example/audio/日本語 1.ogg?token=abc"
    with pytest.raises(errors.InvalidParameterValue, match=r"app\.encryption_key"), conn.transaction():
        conn.execute("SELECT encrypt_audio_url(%s)", (url,))
    conn.execute("SELECT set_config('app.encryption_key', 'correct horse battery staple', true)")
    first, second = (scalar(conn, "SELECT encrypt_audio_url(%s)", (url,)) for _ in range(2))
    assert url not in first and first != second  # salted
    assert scalar(conn, "SELECT decrypt_audio_url(%s)", (first,)) == url
    assert scalar(conn, "SELECT decrypt_audio_url(encrypt_audio_url(NULL))") is None
    conn.execute("SELECT set_config('app.encryption_key', 'another key', true)")
    with pytest.raises(psycopg.Error, match=r"(?i)wrong key"), conn.transaction():
        conn.execute("SELECT decrypt_audio_url(%s)", (first,))


def test_usage_tracking_defaults_and_whole_seconds(conn: psycopg.Connection, make_user: MakeUser) -> None:
    user = make_user(conn)
    conn.execute("SET LOCAL TimeZone = 'Pacific/Kiritimati'")  # UTC+14: a different date most of the day
    row = conn.execute(
        "INSERT INTO usage_tracking (user_id, microphone_ms) VALUES (%s, 61999)"
        " RETURNING date = (now() AT TIME ZONE 'UTC')::date, hour = extract(hour FROM now() AT TIME ZONE 'UTC'),"
        " microphone_seconds",
        (user,),
    ).fetchone()
    assert row == (True, True, 61)
    assert scalar(conn, "UPDATE usage_tracking SET microphone_ms = microphone_ms + 63501 WHERE user_id = %s"
                        " RETURNING microphone_seconds", (user,)) == 125  # fmt: skip
    with pytest.raises(errors.CheckViolation), conn.transaction():
        conn.execute("INSERT INTO usage_tracking (user_id, date, hour) VALUES (%s, '2030-01-01', 24)", (user,))
    add_subscription(conn, user)
    assert scalar(
        conn,
        "SELECT reset_date = (date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 month')::date"
        " FROM subscriptions WHERE user_id = %s",
        (user,),
    )
    assert (
        scalar(
            conn,
            "INSERT INTO usage_periods (user_id, period_start, period_end, plan_type, monthly_minutes_limit, limit_ms,"
            " used_ms) VALUES (%s, %s, %s, 'free', 60, 3600000, 3600250) RETURNING overage_ms",
            (user, T0, T0 + timedelta(days=30)),
        )
        == 250
    )


# --------------------------------------------------------------------------------------------------- partitions


def test_messages_partitions(conn: psycopg.Connection, make_user: MakeUser) -> None:
    user = make_user(conn)
    conversation = add_conversation(conn, user)
    conn.execute("SET LOCAL TimeZone = 'America/New_York'")  # months are UTC months whatever the session says

    def insert(created_at: str) -> str:
        return scalar(
            conn,
            "INSERT INTO messages (conversation_id, user_id, content, language, created_at)"
            " VALUES (%s, %s, %s, 'en', %s) RETURNING tableoid::regclass::text",
            (conversation, user, created_at, created_at),
        )

    def placement() -> dict[str, str]:
        rows = conn.execute("SELECT content, tableoid::regclass::text FROM messages WHERE user_id = %s", (user,))
        return dict(rows.fetchall())

    may = ["2031-04-30 22:30:00-02", "2031-05-17 12:00:00+00", "2031-05-31 23:59:59+00"]
    assert {insert(at) for at in [*may, "2031-06-01 00:00:00+00"]} == {"messages_default"}

    assert scalar(conn, "SELECT create_monthly_partition('2031-05-20')") == "messages_2031_05"
    assert placement() == {
        **dict.fromkeys(may, "messages_2031_05"),
        "2031-06-01 00:00:00+00": "messages_default",
    }
    assert insert("2031-05-01 00:00:00+00") == "messages_2031_05"
    assert insert("2031-04-30 23:59:59.999+00") == "messages_default"

    def catalog() -> list[tuple[Any, ...]]:
        return conn.execute(
            "SELECT c.relname, c.relrowsecurity, (SELECT count(*) FROM pg_index i WHERE i.indrelid = c.oid),"
            " (SELECT count(*) FROM messages_2031_05) FROM pg_inherits JOIN pg_class c ON c.oid = inhrelid"
            " WHERE inhparent = 'messages'::regclass ORDER BY 1"
        ).fetchall()

    parent_indexes = scalar(conn, "SELECT count(*) FROM pg_index WHERE indrelid = 'messages'::regclass")
    before = catalog()
    assert [(name, secured, indexes) for name, secured, indexes, _ in before] == [
        ("messages_2031_05", True, parent_indexes),
        ("messages_default", True, parent_indexes),
    ]
    assert scalar(conn, "SELECT create_monthly_partition('2031-05-01')") == "messages_2031_05"
    assert catalog() == before
    assert scalar(conn, "SELECT create_monthly_partition('2031-07-01')") == "messages_2031_07"  # an empty month


# --------------------------------------------------------------------------------------------------- view


def test_user_statistics_refreshes_concurrently(fresh_database_url: str, make_user: MakeUser) -> None:
    with (
        psycopg.connect(fresh_database_url, autocommit=True) as conn,
        psycopg.connect(fresh_database_url) as reader,
    ):
        user = make_user(conn)
        add_subscription(conn, user, plan="premium")
        add_conversation(conn, user, duration_seconds=120, created_at=datetime(2030, 3, 1, 23, 30, tzinfo=UTC))
        add_conversation(conn, user, duration_seconds=300, created_at=datetime(2030, 3, 2, 0, 30, tzinfo=UTC))
        conn.execute("SELECT refresh_user_statistics()")

        def stats() -> tuple[Any, ...]:
            return tuple(conn.execute(
                "SELECT total_conversations, total_minutes, active_days, plan_type FROM user_statistics"
                " WHERE user_id = %s", (user,),
            ).fetchone() or ())  # fmt: skip

        assert stats() == (2, 7, 2, "premium")

        # a reader in an open transaction does not block a concurrent refresh (a plain one would wait)
        reader.execute("SELECT count(*) FROM user_statistics")
        add_conversation(conn, user, duration_seconds=60, created_at=datetime(2030, 3, 2, 8, 0, tzinfo=UTC))
        conn.execute("SET lock_timeout = '3s'")
        conn.execute("SELECT refresh_user_statistics()")
        conn.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY user_statistics")
        assert stats() == (3, 8, 2, "premium")
        with pytest.raises(errors.LockNotAvailable):
            conn.execute("SET lock_timeout = '100ms'; REFRESH MATERIALIZED VIEW user_statistics")
        reader.rollback()


# --------------------------------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ('{"en": 1.5}', '{"en": 0.5, "ja": 2}', '{"en": 2.0, "ja": 2}'),
        ('{"en": 0.001}', '{"en": 0.002}', '{"en": 0.003}'),
        (None, '{"conversation": 3}', '{"conversation": 3}'),
        ('{"conversation": 3}', None, '{"conversation": 3}'),
        (None, None, "{}"),
        ("{}", "{}", "{}"),
        ("null", '{"en": 1}', '{"en": 1}'),
    ],
)
def test_jsonb_sum_merge(conn: psycopg.Connection, a: str | None, b: str | None, expected: str) -> None:
    merged = scalar(conn, "SELECT jsonb_sum_merge(%s::jsonb, %s::jsonb)::text", (a, b))
    assert scalar(conn, "SELECT %s::jsonb = %s::jsonb", (merged, expected)), merged


def test_jsonb_sum_merge_adds_exactly(conn: psycopg.Connection) -> None:
    total = "{}"
    for _ in range(120):
        total = scalar(conn, """SELECT jsonb_sum_merge(%s::jsonb, '{"en": 0.5, "zh": 0.001}')::text""", (total,))
    assert json.loads(total) == {"en": 60, "zh": 0.12}
    assert scalar(conn, "SELECT (%s::jsonb ->> 'zh')::numeric = 0.12", (total,))


@pytest.mark.parametrize(
    ("zone", "expected"),
    [
        ("Asia/Tokyo", "Asia/Tokyo"),
        ("America/Sao_Paulo", "America/Sao_Paulo"),
        ("UTC", "UTC"),
        ("Mars/Olympus_Mons", "UTC"),
        ("not a zone at all", "UTC"),
        ("", "UTC"),
        (None, "UTC"),
    ],
)
def test_worker_timezone(conn: psycopg.Connection, zone: str | None, expected: str) -> None:
    assert scalar(conn, "SELECT worker_timezone(%s)", (zone,)) == expected


def test_calendar_periods_tile_time_in_every_zone(conn: psycopg.Connection) -> None:
    """Around month ends, DST changes at local midnight (Asuncion 2017-10-01 has no midnight, Havana
    2020-11-01 has two) and half-hour zones: each instant lies in exactly one period, and the three
    functions agree about it."""
    broken = conn.execute(
        """
        WITH instants AS (
            SELECT t FROM generate_series('2017-09-29'::timestamptz, '2017-10-03', '17 minutes') t
            UNION ALL SELECT t FROM generate_series('2020-10-30'::timestamptz, '2020-11-03', '17 minutes') t
            UNION ALL SELECT t FROM generate_series('2030-03-30'::timestamptz, '2030-04-02', '17 minutes') t
        ), zones(tz) AS (
            VALUES ('UTC'), ('Asia/Tokyo'), ('America/New_York'), ('America/Asuncion'), ('America/Havana'),
                   ('Australia/Lord_Howe'), ('Asia/Kathmandu')
        ), periods AS (
            SELECT tz, t, calendar_month_start(t, tz) AS s, next_period_end(t, tz, true) AS e FROM instants, zones
        )
        SELECT tz, t, s, e FROM periods
        WHERE NOT (s <= t AND t < e)
           OR previous_period_start(e, tz) <> s
           OR next_period_end(s, tz, true) <> e
           OR e - s NOT BETWEEN interval '27 days' AND interval '32 days'
        """
    ).fetchall()
    assert broken == []


def test_period_boundaries(conn: psycopg.Connection) -> None:
    def at(query: str, *params: Any) -> datetime:
        return scalar(conn, f"SELECT {query}", params)

    march_end_tokyo = datetime(2030, 3, 31, 15, 0, tzinfo=UTC)  # 2030-04-01 00:00 in Tokyo
    assert at("calendar_month_start(%s, 'Asia/Tokyo')", march_end_tokyo) == march_end_tokyo
    assert at("calendar_month_start(%s, 'Asia/Tokyo')", march_end_tokyo - timedelta(microseconds=1)) == (
        datetime(2030, 2, 28, 15, 0, tzinfo=UTC)
    )
    assert at("next_period_end(%s, 'Asia/Tokyo', true)", march_end_tokyo) == datetime(2030, 4, 30, 15, tzinfo=UTC)
    assert at("previous_period_start(%s, worker_timezone('Nowhere/Special'))", march_end_tokyo) == (
        datetime(2030, 3, 1, tzinfo=UTC)  # an unknown zone is UTC
    )
    # Stripe periods are predicted a month at a time in UTC, whatever the user's zone
    stripe_end = datetime(2030, 1, 31, 10, 0, tzinfo=UTC)
    assert at("next_period_end(%s, 'Asia/Tokyo', false)", stripe_end) == datetime(2030, 2, 28, 10, tzinfo=UTC)
    assert at("previous_period_start(%s, 'Asia/Tokyo', false)", stripe_end) == datetime(2029, 12, 31, 10, tzinfo=UTC)
