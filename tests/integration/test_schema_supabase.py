"""schema.sql as Supabase's tooling expects it: what the API roles may execute, Supabase's linter (splinter),
re-applying under another role, and applying without warnings (issue 15)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url
from support.checks import SCHEMA_PATH, schema_dump
from support.run import PG_HOST, ROOT, RUN_ID, admin_connect, create_database, drop_database

from worker.db import migrate

# Supabase's own grants (supabase/postgres, migrations/db/init-scripts/00000000000000-initial-schema.sql): every
# table, function and sequence created in schema public is granted to the API roles. Schema private is not
# covered by them; the last line does that too, harsher than Supabase, in case a project adds such a grant.
SUPABASE_DEFAULT_PRIVILEGES = """
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO postgres, anon, authenticated, service_role;
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON FUNCTIONS TO postgres, anon, authenticated, service_role;
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO postgres, anon, authenticated, service_role;
    ALTER DEFAULT PRIVILEGES GRANT EXECUTE ON FUNCTIONS TO anon, authenticated;
"""

# What each API role may execute in the schemas schema.sql writes: auth.uid() (Supabase's, or its stand-in
# on plain PostgreSQL), which every policy calls as the caller, and for signed-in users the admin check.
# Extension members (pgcrypto sits in public on plain PostgreSQL) are not schema.sql's.
INTENDED_EXECUTE = {
    "public": {"auth.uid()"},
    "anon": {"auth.uid()"},
    "authenticated": {"auth.uid()", "private.is_admin()", "public.is_admin()"},
}
USER_TABLES = [
    "profiles", "language_settings", "conversations", "messages", "conversation_scripts", "subscriptions",
    "usage_tracking", "learning_progress", "achievements", "audit_logs",
]  # fmt: skip
NOT_EXTENSION_MEMBER = "NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = {oid} AND d.deptype = 'e')"


@pytest.fixture(params=["plain", "supabase_default_privileges"])
def applied_database(request: pytest.FixtureRequest, empty_database_url: str) -> str:
    """A database schema.sql was applied to, on plain PostgreSQL or with Supabase's default privileges."""
    if request.param == "supabase_default_privileges":
        with psycopg.connect(empty_database_url, autocommit=True) as conn:
            conn.execute(SUPABASE_DEFAULT_PRIVILEGES)
    migrate(empty_database_url)
    return empty_database_url


def test_api_roles_execute_only_the_intended_functions(applied_database: str) -> None:
    with psycopg.connect(applied_database) as conn:
        rows = conn.execute(
            f"""
            SELECT r.role, format('%s.%s(%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid))
            FROM pg_proc p
            JOIN pg_namespace n ON n.oid = p.pronamespace
            CROSS JOIN unnest(ARRAY['public', 'anon', 'authenticated']) AS r(role)
            WHERE n.nspname IN ('public', 'private', 'auth') AND {NOT_EXTENSION_MEMBER.format(oid="p.oid")}
              AND has_function_privilege(r.role, p.oid, 'EXECUTE')
            """
        ).fetchall()
        executable: dict[str, set[str]] = {role: set() for role in INTENDED_EXECUTE}
        for role, function in rows:
            executable[role].add(function)
        assert executable == INTENDED_EXECUTE

        # and the tables they reach are the user-facing ones, whatever the default privileges granted
        reachable = conn.execute(
            "SELECT DISTINCT c.relname FROM pg_class c CROSS JOIN unnest(ARRAY['anon', 'authenticated']) AS r(role)"
            " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm')"
            " AND has_table_privilege(r.role, c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE')"
        ).fetchall()
        assert {name for (name,) in reachable} == set(USER_TABLES)
        sequences = conn.execute(
            "SELECT c.relname FROM pg_class c CROSS JOIN unnest(ARRAY['anon', 'authenticated']) AS r(role)"
            " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'S'"
            " AND has_sequence_privilege(r.role, c.oid, 'USAGE, SELECT, UPDATE')"
        ).fetchall()
        assert sequences == []


# ----------------------------------------------------------------------------------------------- the linter

# Supabase's linter, supabase/splinter (lints/<name>.sql, read at commit 55db5b1), restated as catalog queries:
# each returns what its lint flags. The scope is splinter's: not Supabase's own schemas, not extension members.
# 0006 and 0007 also look at partitioned tables here (splinter: plain tables only, so it skips `messages`).
SUPABASE_SCHEMAS = [
    "auth", "cron", "extensions", "graphql", "graphql_public", "information_schema", "net", "pg_catalog",
    "pgbouncer", "pgsodium", "pgsodium_masks", "realtime", "storage", "supabase_functions", "supabase_migrations",
    "vault",
]  # fmt: skip
EXPOSED_SCHEMAS = ["public", "graphql_public"]  # what PostgREST serves on a new Supabase project
LINTS = {
    # a policy calls auth.<function>() or current_setting() without (SELECT ...): evaluated for each row
    "0003_auth_rls_initplan": """
        SELECT pol.schemaname || '.' || pol.tablename || ': ' || pol.policyname
        FROM pg_policies pol
        JOIN pg_class c ON c.oid = (quote_ident(pol.schemaname) || '.' || quote_ident(pol.tablename))::regclass
        WHERE c.relrowsecurity AND pol.schemaname <> ALL (%(supabase)s)
          AND EXISTS (
              SELECT 1
              FROM unnest(ARRAY[pol.qual, pol.with_check]) AS e(expression),
                   unnest(ARRAY['auth.uid()', 'auth.jwt()', 'auth.role()', 'auth.email()', 'current_setting('])
                       AS f(call)
              WHERE strpos(e.expression, f.call) > 0 AND strpos(lower(e.expression), 'select ' || f.call) = 0
          )
    """,
    # several permissive policies for one table, role and command: each is evaluated for every row
    "0006_multiple_permissive_policies": f"""
        SELECT n.nspname || '.' || c.relname || ' ' || r.rolname || ' ' || command
        FROM pg_policy p
        JOIN pg_class c ON c.oid = p.polrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_roles r ON r.oid = ANY (p.polroles) OR p.polroles = '{{0}}'
        CROSS JOIN LATERAL unnest(CASE p.polcmd
            WHEN 'r' THEN ARRAY['SELECT'] WHEN 'a' THEN ARRAY['INSERT'] WHEN 'w' THEN ARRAY['UPDATE']
            WHEN 'd' THEN ARRAY['DELETE'] ELSE ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']
        END) AS command
        WHERE p.polpermissive AND c.relkind IN ('r', 'p') AND n.nspname <> ALL (%(supabase)s)
          AND r.rolname NOT LIKE 'pg\\_%%' AND r.rolname NOT LIKE 'supabase%%admin' AND NOT r.rolbypassrls
          AND {NOT_EXTENSION_MEMBER.format(oid="c.oid")}
        GROUP BY n.nspname, c.relname, r.rolname, command
        HAVING count(*) > 1
    """,
    # policies that do nothing, because RLS is off
    "0007_policy_exists_rls_disabled": f"""
        SELECT DISTINCT n.nspname || '.' || c.relname
        FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND NOT c.relrowsecurity AND n.nspname <> ALL (%(supabase)s)
          AND {NOT_EXTENSION_MEMBER.format(oid="c.oid")}
    """,
    # RLS on and no policy: nothing reachable over the API (INFO; intended for the worker's tables)
    "0008_rls_enabled_no_policy": f"""
        SELECT n.nspname || '.' || c.relname
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r' AND c.relrowsecurity AND n.nspname <> ALL (%(supabase)s)
          AND NOT EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid)
          AND {NOT_EXTENSION_MEMBER.format(oid="c.oid")}
    """,
    "0011_function_search_path_mutable": f"""
        SELECT p.oid::regprocedure::text
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname <> ALL (%(supabase)s) AND {NOT_EXTENSION_MEMBER.format(oid="p.oid")}
          AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) AS setting WHERE setting LIKE 'search\\_path=%%')
    """,
    # a table the API serves, readable by anon or authenticated, without RLS
    "0013_rls_disabled_in_public": """
        SELECT n.nspname || '.' || c.relname
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r' AND NOT c.relrowsecurity AND n.nspname = ANY (%(exposed)s)
          AND (has_table_privilege('anon', c.oid, 'SELECT') OR has_table_privilege('authenticated', c.oid, 'SELECT'))
    """,
    # SECURITY DEFINER functions the API roles may call as RPC, with their owner's rights
    "0028_anon_security_definer_function_executable": """
        SELECT p.oid::regprocedure::text
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE p.prosecdef AND n.nspname = ANY (%(exposed)s) AND has_function_privilege('anon', p.oid, 'EXECUTE')
    """,
    "0029_authenticated_security_definer_function_executable": """
        SELECT p.oid::regprocedure::text
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE p.prosecdef AND n.nspname = ANY (%(exposed)s)
          AND has_function_privilege('authenticated', p.oid, 'EXECUTE')
    """,
}
# The worker's tables and the default partition: no privileges for the API roles, RLS on as a second lock.
INTENDED_FINDINGS = {
    "0008_rls_enabled_no_policy": {
        "public.usage_events", "public.usage_hour_conversations", "public.stripe_events", "public.dead_letters",
        "public.usage_periods", "public.usage_alerts", "public.maintenance_runs", "public.messages_default",
        "public.stripe_subscriptions", "public.stripe_reconcile_runs", "public.live_sessions",
    },
}  # fmt: skip


def test_supabase_lints_find_only_the_intended(applied_database: str) -> None:
    with psycopg.connect(applied_database) as conn:
        findings = {
            lint: {row[0] for row in conn.execute(query, {"supabase": SUPABASE_SCHEMAS, "exposed": EXPOSED_SCHEMAS})}
            for lint, query in LINTS.items()
        }
    assert findings == {lint: INTENDED_FINDINGS.get(lint, set()) for lint in LINTS}


def test_policies_evaluate_their_functions_once_per_statement(conn: psycopg.Connection) -> None:
    """Stricter than lint 0003, which passes a policy once one call is wrapped: every call without arguments
    (auth.uid(), private.is_admin(), anything else) stands alone in a scalar subquery, an InitPlan."""
    wrapped = re.compile(r"\( SELECT [\w.]+\(\) AS \w+\)")
    per_row = []
    for table, policy, *expressions in conn.execute(
        "SELECT tablename, policyname, qual, with_check FROM pg_policies WHERE schemaname = 'public'"
    ):
        for expression in filter(None, expressions):
            if re.search(r"\w\(\)", wrapped.sub("", expression)):
                per_row.append(f"{table}: {policy}: {expression}")
    assert per_row == []


@pytest.mark.skipif(not os.environ.get("SPLINTER_SQL"), reason="set SPLINTER_SQL to splinter.sql of supabase/splinter")
def test_splinter_itself_finds_only_the_intended(fresh_database_url: str) -> None:
    """splinter.sql (all of Supabase's lints in one query) runs on plain PostgreSQL 15 with the small auth
    schema of schema.sql. Not part of this repository (its licence is not stated); point SPLINTER_SQL at it."""
    lints = Path(os.environ["SPLINTER_SQL"]).read_text(encoding="utf-8")
    with psycopg.connect(fresh_database_url) as conn:
        conn.execute(sql.SQL("SET LOCAL pgrst.db_schemas = {}").format(sql.Literal(", ".join(EXPOSED_SCHEMAS))))
        results = conn.execute(lints)  # `set local search_path = ''`, then the lints' one query
        while results.description is None and results.nextset():
            pass
        findings = results.fetchall()
    flagged = {
        (name, f"{metadata['schema']}.{metadata['name']}")
        for name, *_, metadata, _cache_key in findings
        # a new database has used no index yet; pgcrypto sits in public only on plain PostgreSQL
        if name not in {"unused_index", "extension_in_public"}
    }
    intended = {("rls_enabled_no_policy", table) for table in INTENDED_FINDINGS["0008_rls_enabled_no_policy"]}
    assert flagged == intended


# ----------------------------------------------------------------------------------------------- warnings


def as_role(database_url: str, role: str | None) -> str:
    return make_url(database_url).set(username=role).render_as_string(hide_password=False) if role else database_url


def run_psql(database_url: str, *, role: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(SCHEMA_PATH), as_role(database_url, role)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def run_migrate(database_url: str, *, role: str | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m worker migrate` as an operator runs it (its log lines go to stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "worker", "migrate"],
        cwd=ROOT, env={**os.environ, "DATABASE_URL": as_role(database_url, role), "LOG_LEVEL": "WARNING"},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.fixture
def two_empty_databases() -> Iterator[tuple[str, str]]:
    names = [f"ws_test_{RUN_ID}_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    first, second = (create_database(name) for name in names)
    yield first, second
    for name in names:
        drop_database(name)


def test_applying_twice_prints_no_warning(two_empty_databases: tuple[str, str]) -> None:
    by_psql, by_migrate = two_empty_databases
    for _ in range(2):  # the first run creates, the second finds everything in place
        psql = run_psql(by_psql)
        assert (psql.returncode, psql.stderr) == (0, "")
        migrated = run_migrate(by_migrate)
        assert (migrated.returncode, migrated.stderr) == (0, "")

    # both would show a warning the server sends: here an event trigger's, raised at every DDL command
    for database_url in two_empty_databases:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "CREATE FUNCTION public.warn_ddl() RETURNS event_trigger LANGUAGE plpgsql AS"
                " $$ BEGIN RAISE WARNING 'ddl seen'; END $$;"
                " CREATE EVENT TRIGGER warn_ddl ON ddl_command_end EXECUTE FUNCTION public.warn_ddl()"
            )
    psql = run_psql(by_psql)
    assert psql.returncode == 0 and "WARNING:  ddl seen" in psql.stderr
    migrated = run_migrate(by_migrate)
    assert migrated.returncode == 0 and "migrate_server_message" in migrated.stderr and "ddl seen" in migrated.stderr


# ----------------------------------------------------------------------------------------------- ownership


@pytest.fixture
def roles_and_database() -> Iterator[tuple[dict[str, str], str]]:
    """Roles as on Supabase, cluster-wide, so named for this run and dropped afterwards: `owner` created the
    objects (like supabase_admin through Studio), `other` may not act as it (like postgres then), `member`
    may (GRANT owner TO member). The database belongs to `owner`, who may create schemas and extensions."""
    roles = {kind: f"ws_test_{RUN_ID}_{kind}" for kind in ("owner", "other", "member")}
    database = f"ws_test_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    with admin_connect() as conn:
        for role in roles.values():
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(roles["owner"]), sql.Identifier(roles["member"])))
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), sql.Identifier(roles["owner"]))
        )
    try:
        yield roles, f"{PG_HOST}/{database}"
    finally:
        drop_database(database)
        with admin_connect() as conn:
            for role in roles.values():
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_reapplying_as_a_role_that_cannot_act_as_the_owner_stops_at_once(
    roles_and_database: tuple[dict[str, str], str],
) -> None:
    roles, database_url = roles_and_database
    assert run_migrate(database_url, role=roles["owner"]).returncode == 0
    before = schema_dump(database_url)

    migrated = run_migrate(database_url, role=roles["other"])
    assert migrated.returncode == 1 and "Traceback" not in migrated.stderr
    owner = roles["owner"]
    assert f"owns its objects ({owner}); role {roles['other']} cannot act as it" in migrated.stderr
    assert f"Run migrate as {owner}: DATABASE_URL=postgresql://{owner}:<password>@" in migrated.stderr

    psql = run_psql(database_url, role=roles["other"])  # psql stops at the first statement that changes anything
    assert psql.returncode == 3
    assert [line for line in psql.stderr.splitlines() if "ERROR" in line] == [
        f"psql:{SCHEMA_PATH}:{error_line()}: ERROR:  schema.sql must be applied as the role that owns its objects"
        f" ({owner}); role {roles['other']} cannot act as it"
    ]
    assert schema_dump(database_url) == before


def test_reapplying_as_a_member_of_the_owner_or_a_superuser_keeps_the_owner(
    roles_and_database: tuple[dict[str, str], str],
) -> None:
    roles, database_url = roles_and_database
    migrate(as_role(database_url, roles["owner"]))
    before = schema_dump(database_url)  # pg_dump writes every object's owner
    with psycopg.connect(database_url, autocommit=True) as conn:  # as if a newer schema.sql added an index
        conn.execute("DROP INDEX idx_scripts_created_by")

    assert run_migrate(database_url, role=roles["member"]).returncode == 0
    assert schema_dump(database_url) == before  # the index is back, and it belongs to the owner
    assert run_psql(database_url).returncode == 0  # as the superuser postgres
    assert schema_dump(database_url) == before


def error_line() -> int:
    """The line psql names for an error of the ownership check: where its DO statement ends."""
    lines = SCHEMA_PATH.read_text(encoding="utf-8").splitlines()
    return next(number for number, line in enumerate(lines, start=1) if line == "$owner$;")
