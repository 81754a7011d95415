-- =====================================================================================================
-- WorldSpeakAI database schema: the seed design (shared/seed/database-design.ja.md) with its defects
-- fixed, plus the tables of the metering and billing worker. This file is the single source of truth.
--
-- How it is applied: `python -m worker migrate` wraps the whole file in one transaction under an
-- advisory lock. So this file contains no BEGIN/COMMIT and nothing that refuses to run in a transaction
-- block (no CREATE INDEX CONCURRENTLY, no REINDEX CONCURRENTLY, no ALTER SYSTEM, no VACUUM). By hand, the
-- same: `psql -v ON_ERROR_STOP=1 --single-transaction -f schema.sql`. Always as the same role (section 0).
--
-- Re-appliable: running it again changes nothing (IF NOT EXISTS, CREATE OR REPLACE, policies dropped and
-- created again, DO blocks that look at the catalogs first).
--
-- Runs on plain PostgreSQL 15+ and unchanged on Supabase. On plain PostgreSQL it creates the small part
-- of Supabase it relies on (schema auth, auth.users, auth.uid(), roles anon / authenticated /
-- service_role); on Supabase those already exist, belong to other roles, and are left alone.
--
-- Moved out of the schema on purpose (they are operations, not schema; see docs/operations.md):
--   * the seed's backup role: it had a literal password in a versioned file, and roles are cluster-wide;
--   * the seed's ALTER SYSTEM settings (WAL archiving): they cannot run in a transaction block and
--     belong to server configuration (on Supabase they are not ours to change);
--   * ANALYZE / REINDEX TABLE CONCURRENTLY: periodic maintenance, and CONCURRENTLY cannot run here.
-- =====================================================================================================

-- Keep the "already exists, skipping" notices of a re-run quiet. A session setting, not SET LOCAL: psql -f
-- runs each statement in a transaction of its own, where SET LOCAL would only warn and last one statement.
SET client_min_messages = warning;


-- -----------------------------------------------------------------------------------------------------
-- 0. Who applies it
--    Only an object's owner may replace it (CREATE OR REPLACE, DROP POLICY, ALTER, REVOKE), so a re-run
--    must act as the role that created the objects of the first run. Applied on Supabase once as
--    supabase_admin (as Studio's SQL editor long did on self-hosted and local projects), then as
--    postgres, it used to fail half-way with "must be owner of function update_updated_at". Now, before
--    anything changes: a role that may act as the owner (a member of it, or a superuser) does so for the
--    rest of the session, so new objects get the same owner; any other role stops here, told which role
--    to use. The owners are read off the first function and the first table this file creates.
-- -----------------------------------------------------------------------------------------------------
DO $owner$
DECLARE
    v_owners TEXT[];
BEGIN
    SELECT array_agg(DISTINCT earlier.owner ORDER BY earlier.owner)
      INTO v_owners
    FROM (
        SELECT pg_catalog.pg_get_userbyid(proowner)::text
        FROM pg_catalog.pg_proc WHERE oid = pg_catalog.to_regprocedure('public.update_updated_at()')
        UNION ALL
        SELECT pg_catalog.pg_get_userbyid(relowner)::text
        FROM pg_catalog.pg_class WHERE oid = pg_catalog.to_regclass('public.profiles')
    ) AS earlier(owner);

    IF v_owners IS NULL OR v_owners = ARRAY[current_user::text] THEN
        RETURN;  -- the first run, or the owner itself
    END IF;
    IF cardinality(v_owners) = 1 THEN
        BEGIN
            EXECUTE format('SET ROLE %I', v_owners[1]);
            RETURN;
        EXCEPTION WHEN insufficient_privilege THEN
            NULL;  -- not a member of the owner: stop below
        END;
    END IF;

    RAISE EXCEPTION
            'schema.sql must be applied as the role that owns its objects (%); role % cannot act as it',
            array_to_string(v_owners, ', '), current_user
        USING ERRCODE = 'insufficient_privilege',
              DETAIL = 'Nothing was changed.',
              HINT = CASE
                  WHEN cardinality(v_owners) = 1 THEN format(
                      'Run migrate as %s: DATABASE_URL=postgresql://%s:<password>@<host>:<port>/%s'
                      ' python -m worker migrate',
                      v_owners[1], v_owners[1], current_database()
                  )
                  ELSE 'Give them a single owner first (ALTER ... OWNER TO), then run migrate as that role.'
              END;
END
$owner$;

-- pgcrypto: pgp_sym_encrypt/decrypt for audio URLs. Supabase already has it (in schema `extensions`);
-- plain PostgreSQL gets it in the first schema of the search path (public). Functions that use it set
-- `search_path = pg_catalog, public, extensions, pg_temp` so both places are found.
-- (uuid-ossp is not needed: the seed's uuid_generate_v4() is replaced by core gen_random_uuid().)
CREATE EXTENSION IF NOT EXISTS pgcrypto;


-- -----------------------------------------------------------------------------------------------------
-- 1. The Supabase part, created only where missing
-- -----------------------------------------------------------------------------------------------------

-- Roles as Supabase defines them. Roles are cluster-wide, so two migrations of two databases of one
-- cluster may race to create them: the loser's duplicate error is swallowed.
DO $roles$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = v_role) THEN
            BEGIN
                EXECUTE format(
                    'CREATE ROLE %I NOLOGIN NOINHERIT%s',
                    v_role,
                    CASE WHEN v_role = 'service_role' THEN ' BYPASSRLS' ELSE '' END  -- the backend's role
                );
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created meanwhile by a concurrent migration of another database
            END;
        END IF;
    END LOOP;
END
$roles$;

-- Schema auth, auth.users and auth.uid(). Checked in the catalogs rather than with CREATE ... IF NOT
-- EXISTS: on Supabase these belong to supabase_auth_admin, and CREATE ... IF NOT EXISTS checks the
-- CREATE privilege before it notices the object exists, so it could fail where nothing is to be done.
DO $auth$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = 'auth') THEN
        CREATE SCHEMA auth;
    END IF;

    IF NOT EXISTS (
        SELECT 1
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'auth' AND c.relname = 'users'
    ) THEN
        -- The columns of Supabase's auth.users that this schema reads (Supabase has many more).
        CREATE TABLE auth.users (
            id UUID PRIMARY KEY,
            email TEXT,
            raw_app_meta_data JSONB,   -- written by the service only: admin role lives here
            raw_user_meta_data JSONB   -- editable by the user: never trusted for authorization
        );
    END IF;

    IF NOT EXISTS (
        SELECT 1
        FROM pg_catalog.pg_proc p
        JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'auth' AND p.proname = 'uid' AND p.pronargs = 0
    ) THEN
        -- As Supabase does: the `sub` claim of the JWT that PostgREST puts in request.jwt.claims
        -- (older PostgREST versions set request.jwt.claim.sub). NULL when there is no JWT.
        CREATE FUNCTION auth.uid() RETURNS UUID
        LANGUAGE sql STABLE
        AS $uid$
            SELECT nullif(
                coalesce(
                    nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub',
                    current_setting('request.jwt.claim.sub', true)
                ),
                ''
            )::uuid
        $uid$;
    END IF;
END
$auth$;

-- Schema usage the way Supabase grants it; only where missing, because on Supabase the schema auth
-- belongs to another role (a GRANT there would only warn that nothing was granted).
DO $schema_usage$
DECLARE
    v_role text;
    v_schema text;
BEGIN
    FOREACH v_schema IN ARRAY ARRAY['auth', 'public'] LOOP
        FOREACH v_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
            IF NOT has_schema_privilege(v_role, v_schema, 'USAGE') THEN
                EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', v_schema, v_role);
            END IF;
        END LOOP;
    END LOOP;
END
$schema_usage$;


-- -----------------------------------------------------------------------------------------------------
-- 2. Helper functions
--    Every function fixes its search_path (defect of the seed: SECURITY DEFINER functions without one
--    can be hijacked by objects a caller puts earlier in the path). No function reads NOW() for
--    business logic: business times come from the worker (only the updated_at bookkeeping does).
-- -----------------------------------------------------------------------------------------------------

-- updated_at bookkeeping (seed). Changed from the seed: an UPDATE that sets updated_at explicitly keeps
-- that value, so the worker can stamp rows with its own clock (business time comes from Python).
CREATE OR REPLACE FUNCTION update_updated_at()
RETURNS TRIGGER
LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    IF NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END;
$$;

-- Schema private: what the policies call but no client may. PostgREST serves only its exposed schemas
-- (public and graphql_public by default), and Supabase advises never to put a SECURITY DEFINER function in
-- one: anyone who may execute it can call it as an RPC with its owner's rights.
CREATE SCHEMA IF NOT EXISTS private;
-- Policies run with the caller's privileges, so signed-in users need to reach what their policies call.
GRANT USAGE ON SCHEMA private TO authenticated, service_role;

-- Whether the caller is an admin. Reads raw_app_meta_data, which only the service can write. The seed's
-- policy read raw_user_meta_data, which every user can edit through the auth API (defect: anyone could
-- make themselves admin). SECURITY DEFINER because authenticated may not read auth.users.
CREATE OR REPLACE FUNCTION private.is_admin()
RETURNS BOOLEAN
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (
        SELECT 1
        FROM auth.users u
        WHERE u.id = auth.uid()
          AND u.raw_app_meta_data ->> 'role' = 'admin'
    )
$$;

-- The same answer for the app (RPC is_admin), with the caller's rights: the definer's rights stay in the
-- private function, which answers about the caller only.
CREATE OR REPLACE FUNCTION is_admin()
RETURNS BOOLEAN
LANGUAGE sql STABLE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT private.is_admin()
$$;

-- Adds two JSON objects of numbers key by key ({"en": 1.5} + {"en": 0.5, "ja": 2} = {"en": 2.0, "ja": 2});
-- NULL or a non-object counts as {}. numeric arithmetic, so decimals add exactly. For SQL callers
-- (reports, repairs by hand): the worker's usage_tracking upsert computes the same sum inline
-- (worker/metering/tracking.py), as a function with its own search_path cannot be inlined.
CREATE OR REPLACE FUNCTION jsonb_sum_merge(a JSONB, b JSONB)
RETURNS JSONB
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(jsonb_object_agg(key, total), '{}'::jsonb)
    FROM (
        SELECT e.key, sum(e.value::numeric) AS total
        FROM (
            SELECT * FROM jsonb_each(CASE WHEN jsonb_typeof(a) = 'object' THEN a ELSE '{}'::jsonb END)
            UNION ALL
            SELECT * FROM jsonb_each(CASE WHEN jsonb_typeof(b) = 'object' THEN b ELSE '{}'::jsonb END)
        ) AS e
        GROUP BY e.key
    ) AS sums
$$;

-- The time zone to use for a user's calendar (free-plan months): tz when PostgreSQL knows it, else 'UTC'
-- (profiles.timezone is free text and may be empty or misspelt). Tried on a fixed instant, not NOW().
CREATE OR REPLACE FUNCTION worker_timezone(tz TEXT)
RETURNS TEXT
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF tz IS NULL OR btrim(tz) = '' THEN
        RETURN 'UTC';
    END IF;
    PERFORM TIMESTAMPTZ '2000-01-01 00:00:00+00' AT TIME ZONE tz;
    RETURN tz;
EXCEPTION WHEN data_exception THEN  -- 22023 "time zone ... not recognized" and kin
    RETURN 'UTC';
END;
$$;

-- Billing-period arithmetic, in SQL so that the worker's set-based statements (worker/periods.py,
-- worker/quota.py) and any other caller agree. p_tz must be a zone PostgreSQL knows: pass
-- worker_timezone(profiles.timezone).
--   * Calendar periods (free plan, and any subscription without a Stripe subscription): months of the
--     user's zone. A boundary is local midnight of the 1st, as an instant. Where that local time does not
--     exist or happens twice (a DST change at midnight), PostgreSQL picks one instant; the comparisons
--     below keep the periods tiling time without gaps or empty periods all the same.
--   * Stripe periods: predicted one month at a time in UTC (Stripe's clock) until Stripe sends the real
--     bounds.
-- The period containing p_at starts at calendar_month_start(p_at, tz) (inclusive) and ends at
-- next_period_end(p_at, tz, true) (exclusive).
CREATE OR REPLACE FUNCTION calendar_month_start(p_at TIMESTAMPTZ, p_tz TEXT)
RETURNS TIMESTAMPTZ
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (CASE WHEN (m AT TIME ZONE p_tz) <= p_at THEN m ELSE m - INTERVAL '1 month' END) AT TIME ZONE p_tz
    FROM (SELECT date_trunc('month', p_at AT TIME ZONE p_tz) AS m) AS local_month
$$;

-- The end of the period that contains p_at (calendar), or that starts at p_at (Stripe prediction).
CREATE OR REPLACE FUNCTION next_period_end(p_at TIMESTAMPTZ, p_tz TEXT, p_calendar BOOLEAN)
RETURNS TIMESTAMPTZ
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN p_calendar THEN
            (CASE WHEN (m AT TIME ZONE p_tz) <= p_at THEN m ELSE m - INTERVAL '1 month' END
             + INTERVAL '1 month') AT TIME ZONE p_tz
        ELSE (p_at AT TIME ZONE 'UTC' + INTERVAL '1 month') AT TIME ZONE 'UTC'
    END
    FROM (SELECT date_trunc('month', p_at AT TIME ZONE p_tz) AS m) AS local_month
$$;

-- The start of the period that ends at p_end: the previous month start (calendar; when p_end is not a
-- month boundary, e.g. after the user changed zone, the start of its own month, a partial period), or
-- one month earlier (Stripe prediction).
CREATE OR REPLACE FUNCTION previous_period_start(
    p_end TIMESTAMPTZ, p_tz TEXT, p_calendar BOOLEAN DEFAULT TRUE
)
RETURNS TIMESTAMPTZ
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN p_calendar THEN
            (CASE WHEN (m AT TIME ZONE p_tz) < p_end THEN m ELSE m - INTERVAL '1 month' END) AT TIME ZONE p_tz
        ELSE (p_end AT TIME ZONE 'UTC' - INTERVAL '1 month') AT TIME ZONE 'UTC'
    END
    FROM (SELECT date_trunc('month', p_end AT TIME ZONE p_tz) AS m) AS local_month
$$;


-- Exact milliseconds of a user's ledger usage (usage_events, section 4) that overlap [p_start, p_end):
-- what a period row holds when it is created after its usage was recorded. p_longest is the longest an
-- event may last (USAGE_MAX_EVENT_SECONDS), which bounds the index scan on started_at. The ledger is
-- created below, so the body is checked when it first runs.
CREATE OR REPLACE FUNCTION ledger_ms(p_user UUID, p_start TIMESTAMPTZ, p_end TIMESTAMPTZ, p_longest INTERVAL)
RETURNS BIGINT
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, public, pg_temp
SET check_function_bodies = off
AS $$
    SELECT COALESCE(sum(round(extract(epoch FROM
               LEAST(p_end, e.started_at + e.duration_ms * INTERVAL '1 millisecond') - GREATEST(p_start, e.started_at)
           ) * 1000)), 0)::bigint
    FROM usage_events e
    WHERE e.user_id = p_user AND e.started_at < p_end AND e.started_at > p_start - p_longest
      AND e.started_at + e.duration_ms * INTERVAL '1 millisecond' > p_start
$$;


-- -----------------------------------------------------------------------------------------------------
-- 3. Seed tables (names, columns and types as in the seed; additions are marked "added")
--    uuid_generate_v4() (uuid-ossp) is replaced by core gen_random_uuid(): same kind of value, no
--    extension needed.
-- -----------------------------------------------------------------------------------------------------

-- 3.1 profiles
CREATE TABLE IF NOT EXISTS profiles (
    id UUID PRIMARY KEY REFERENCES auth.users (id) ON DELETE CASCADE,
    email TEXT UNIQUE NOT NULL,
    full_name TEXT NOT NULL,
    avatar_url TEXT,

    native_language TEXT NOT NULL,
    target_languages TEXT[] NOT NULL DEFAULT '{}',
    current_language_pair JSONB,                    -- {native: 'ja', target: 'en'}

    proficiency_levels JSONB DEFAULT '{}',          -- {en: 'intermediate', zh: 'beginner'}

    timezone TEXT DEFAULT 'UTC',                    -- free-plan months follow it (see worker_timezone)
    preferred_learning_time JSONB,                  -- {start: '09:00', end: '10:00'}
    learning_style TEXT CHECK (learning_style IN ('visual', 'auditory', 'kinesthetic')),

    created_at TIMESTAMPTZ DEFAULT NOW(),
    updated_at TIMESTAMPTZ DEFAULT NOW(),
    last_active_at TIMESTAMPTZ DEFAULT NOW(),
    is_active BOOLEAN DEFAULT TRUE,

    preferences JSONB DEFAULT '{
      "notifications": true,
      "email_updates": true,
      "show_pronunciation_guide": true,
      "auto_play_responses": true
    }'::jsonb
);

-- (the UNIQUE constraint already indexes email; the seed's index is kept under its name for fidelity)
CREATE INDEX IF NOT EXISTS idx_profiles_email ON profiles (email);
CREATE INDEX IF NOT EXISTS idx_profiles_native_language ON profiles (native_language);
CREATE INDEX IF NOT EXISTS idx_profiles_target_languages ON profiles USING GIN (target_languages);
CREATE INDEX IF NOT EXISTS idx_profiles_last_active ON profiles (last_active_at DESC);
CREATE INDEX IF NOT EXISTS idx_profiles_preferences ON profiles USING GIN (preferences);

-- 3.2 language_settings
CREATE TABLE IF NOT EXISTS language_settings (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id UUID NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,
    language_code TEXT NOT NULL,

    proficiency_level TEXT NOT NULL
        CHECK (proficiency_level IN ('beginner', 'elementary', 'intermediate', 'advanced', 'native')),
    learning_goals TEXT[],
    daily_target_minutes INTEGER DEFAULT 30,

    preferred_voice_id TEXT,
    speech_rate DECIMAL(2, 1) DEFAULT 1.0 CHECK (speech_rate BETWEEN 0.5 AND 2.0),

    total_learning_minutes INTEGER DEFAULT 0,
    total_conversations INTEGER DEFAULT 0,
    vocabulary_mastered INTEGER DEFAULT 0,

    created_at TIMESTAMPTZ DEFAULT NOW(),
    updated_at TIMESTAMPTZ DEFAULT NOW(),

    UNIQUE (user_id, language_code)
);

CREATE INDEX IF NOT EXISTS idx_language_settings_user_language ON language_settings (user_id, language_code);

-- 3.3 conversations
CREATE TABLE IF NOT EXISTS conversations (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id UUID NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,

    title TEXT,
    language_pair JSONB NOT NULL,                   -- {native: 'ja', target: 'en'}
    scenario TEXT NOT NULL,
    specialization TEXT,
    difficulty_level INTEGER CHECK (difficulty_level BETWEEN 1 AND 10),

    script_id UUID,
    script_enabled BOOLEAN DEFAULT TRUE,
    script_adherence_score DECIMAL(3, 2),

    started_at TIMESTAMPTZ DEFAULT NOW(),
    ended_at TIMESTAMPTZ,                           -- setting it fires the learning-progress triggers
    duration_seconds INTEGER,
    actual_speaking_time INTEGER,

    message_count INTEGER DEFAULT 0,
    user_message_count INTEGER DEFAULT 0,
    ai_message_count INTEGER DEFAULT 0,
    words_spoken INTEGER DEFAULT 0,
    unique_words_used INTEGER DEFAULT 0,

    fluency_score DECIMAL(3, 2),
    accuracy_score DECIMAL(3, 2),
    pronunciation_score DECIMAL(3, 2),
    overall_score DECIMAL(3, 2),

    created_at TIMESTAMPTZ DEFAULT NOW(),
    metadata JSONB DEFAULT '{}'::jsonb
);

CREATE INDEX IF NOT EXISTS idx_conversations_user_id ON conversations (user_id);
CREATE INDEX IF NOT EXISTS idx_conversations_language_pair ON conversations USING GIN (language_pair);
CREATE INDEX IF NOT EXISTS idx_conversations_created_at ON conversations (created_at DESC);
CREATE INDEX IF NOT EXISTS idx_conversations_scenario ON conversations (scenario);
CREATE INDEX IF NOT EXISTS idx_conversations_ended_at ON conversations (ended_at) WHERE ended_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_conversations_user_date ON conversations (user_id, created_at DESC);
-- Seed defect: `WHERE created_at > NOW() - INTERVAL '30 days'` is refused (functions in an index
-- predicate must be IMMUTABLE), and a moving window cannot be indexed anyway. The predicate is dropped:
-- the index serves "recent conversations of a user" queries with a range condition on created_at. (It
-- covers the same keys as idx_conversations_user_date; the seed's name is kept for queries and tools.)
CREATE INDEX IF NOT EXISTS idx_recent_conversations ON conversations (user_id, created_at);

ALTER TABLE conversations SET (autovacuum_vacuum_scale_factor = 0.1);  -- seed maintenance setting

-- 3.4 messages: partitioned by month of created_at (UTC months).
-- Seed defect: it built `messages_partitioned`, a copy of messages with no default partition, so rows of
-- a month without a partition failed to insert and nothing used the copy. Here messages itself is
-- partitioned. The primary key must contain the partition key, hence PRIMARY KEY (id, created_at) and
-- created_at NOT NULL (id alone stays unique in practice: it is a random UUID).
CREATE TABLE IF NOT EXISTS messages (
    id UUID NOT NULL DEFAULT gen_random_uuid(),
    conversation_id UUID NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id UUID NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,

    content TEXT NOT NULL,
    language TEXT NOT NULL,
    translated_content JSONB,                       -- {ja: '...', en: '...'}

    is_ai BOOLEAN DEFAULT FALSE,
    message_type TEXT CHECK (message_type IN ('user_speech', 'ai_response', 'script_suggestion', 'system')),

    audio_url TEXT,                                 -- encrypted with encrypt_audio_url()
    audio_duration_ms INTEGER,

    pronunciation_analysis JSONB,
    grammar_corrections JSONB,
    vocabulary_highlights JSONB,

    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),  -- NOT NULL added: it is the partition key

    metadata JSONB DEFAULT '{}'::jsonb,

    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);

-- Rows of months without their own partition land here instead of failing; create_monthly_partition()
-- moves them out when their month gets a partition. maintenance.ensure_partitions creates months ahead.
CREATE TABLE IF NOT EXISTS messages_default PARTITION OF messages DEFAULT;
-- The seed's autovacuum setting for messages; a partitioned table stores no rows and takes no storage
-- parameters, so it goes on every partition (create_monthly_partition sets it on new ones).
ALTER TABLE messages_default SET (autovacuum_vacuum_scale_factor = 0.05);

-- Indexes on the partitioned parent: every partition, present and future, gets them.
CREATE INDEX IF NOT EXISTS idx_messages_conversation_id ON messages (conversation_id);
CREATE INDEX IF NOT EXISTS idx_messages_created_at ON messages (created_at);
CREATE INDEX IF NOT EXISTS idx_messages_user_language ON messages (user_id, language);
CREATE INDEX IF NOT EXISTS idx_messages_type ON messages (message_type);
CREATE INDEX IF NOT EXISTS idx_messages_conv_created ON messages (conversation_id, created_at);
CREATE INDEX IF NOT EXISTS idx_messages_metadata ON messages USING GIN (metadata);

-- 3.5 conversation_scripts
CREATE TABLE IF NOT EXISTS conversation_scripts (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),

    title TEXT NOT NULL,
    description TEXT,
    language_pair JSONB NOT NULL,
    scenario TEXT NOT NULL,
    difficulty_level INTEGER CHECK (difficulty_level BETWEEN 1 AND 10),
    estimated_duration_minutes INTEGER,

    script_segments JSONB NOT NULL,                 -- [{order: 1, speaker: 'user', text: '...', ...}]
    cultural_notes JSONB,
    vocabulary_focus JSONB,

    category TEXT NOT NULL,
    tags TEXT[],
    specialization TEXT,

    usage_count INTEGER DEFAULT 0,
    average_rating DECIMAL(2, 1),
    completion_rate DECIMAL(3, 2),

    created_at TIMESTAMPTZ DEFAULT NOW(),
    updated_at TIMESTAMPTZ DEFAULT NOW(),
    -- ON DELETE SET NULL added: with the seed's default (NO ACTION) a user who once wrote a script
    -- could never be deleted; the script outlives its author.
    created_by UUID REFERENCES profiles (id) ON DELETE SET NULL,
    is_premium BOOLEAN DEFAULT FALSE
);

CREATE INDEX IF NOT EXISTS idx_scripts_language_pair ON conversation_scripts USING GIN (language_pair);
CREATE INDEX IF NOT EXISTS idx_scripts_scenario ON conversation_scripts (scenario);
CREATE INDEX IF NOT EXISTS idx_scripts_category ON conversation_scripts (category);
CREATE INDEX IF NOT EXISTS idx_scripts_tags ON conversation_scripts USING GIN (tags);
-- added: the write policies filter on created_by, and deleting a profile sets its scripts' created_by NULL
CREATE INDEX IF NOT EXISTS idx_scripts_created_by ON conversation_scripts (created_by);

-- 3.6 subscriptions: one row per user (unique user_id), always holding the user's current period.
CREATE TABLE IF NOT EXISTS subscriptions (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id UUID NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,

    plan_type TEXT NOT NULL DEFAULT 'free' CHECK (plan_type IN ('free', 'standard', 'premium', 'enterprise')),
    status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'canceled', 'past_due', 'paused')),

    current_period_start TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    current_period_end TIMESTAMPTZ NOT NULL DEFAULT (NOW() + INTERVAL '30 days'),
    trial_end TIMESTAMPTZ,
    cancel_at_period_end BOOLEAN DEFAULT FALSE,
    canceled_at TIMESTAMPTZ,

    monthly_minutes_limit INTEGER NOT NULL DEFAULT 60,  -- Free: 60, Standard: 900, Premium: 3000
    -- Whole-minute view of the exact period total kept in usage_periods.used_ms (milliseconds). The seed
    -- trigger that fed it (integer seconds / 60 per row) is gone: see section 5.
    monthly_minutes_used INTEGER DEFAULT 0,
    -- Seed defect: the default truncated NOW() in the server's time zone; the month is now the UTC one.
    -- (The worker keeps reset_date = the end of the user's current period anyway.)
    reset_date DATE NOT NULL
        DEFAULT ((date_trunc('month', NOW() AT TIME ZONE 'UTC') + INTERVAL '1 month')::date),

    stripe_customer_id TEXT,
    stripe_subscription_id TEXT,
    payment_method_id TEXT,

    monthly_price_cents INTEGER,
    currency TEXT DEFAULT 'USD',

    created_at TIMESTAMPTZ DEFAULT NOW(),
    updated_at TIMESTAMPTZ DEFAULT NOW(),
    metadata JSONB DEFAULT '{}'::jsonb,

    -- added: when the period's usage reached 100 % of the limit (the quota answers "blocked"); NULL
    -- while under the limit. Usage past it is still recorded (as overage).
    limit_reached_at TIMESTAMPTZ,
    -- added: Stripe's own status (trialing, unpaid, incomplete...), which `status` maps to the seed's four.
    stripe_status TEXT,
    -- added: the Stripe price of the subscription, which decides plan_type and the limit.
    stripe_price_id TEXT,
    -- added: Stripe `created` time and id of the event whose state was last applied. Events arrive out
    -- of order; one older than stripe_state_at never overwrites the newer state.
    stripe_state_at TIMESTAMPTZ,
    stripe_state_event_id TEXT
);

CREATE UNIQUE INDEX IF NOT EXISTS idx_subscriptions_user_id ON subscriptions (user_id);
CREATE INDEX IF NOT EXISTS idx_subscriptions_status ON subscriptions (status);
CREATE INDEX IF NOT EXISTS idx_subscriptions_reset_date ON subscriptions (reset_date);
-- added: maintenance.reset_monthly_usage looks for periods that have ended every minute.
CREATE INDEX IF NOT EXISTS idx_subscriptions_period_end ON subscriptions (current_period_end);
CREATE INDEX IF NOT EXISTS idx_subscriptions_stripe_customer ON subscriptions (stripe_customer_id)
    WHERE stripe_customer_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_active_subscriptions ON subscriptions (user_id) WHERE status = 'active';
-- added: Stripe webhooks find the row by subscription id, and one Stripe subscription belongs to one user.
CREATE UNIQUE INDEX IF NOT EXISTS idx_subscriptions_stripe_subscription
    ON subscriptions (stripe_subscription_id)
    WHERE stripe_subscription_id IS NOT NULL;
-- added: room on every page for the new version of a row, so that metering's updates (none of an
-- indexed column) stay on the page (HOT) instead of writing an entry into each of the eight indexes.
ALTER TABLE subscriptions SET (fillfactor = 70);

-- 3.7 usage_tracking: one row per user and UTC hour, maintained by the worker from the usage_events
-- ledger (and rebuildable from it with `python -m worker rebuild-usage`).
CREATE TABLE IF NOT EXISTS usage_tracking (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id UUID NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,

    tracked_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    -- Seed defect: CURRENT_DATE and EXTRACT(HOUR FROM NOW()) follow the server's time zone, so the
    -- bucket of a row depended on the session. Buckets are UTC dates and hours.
    date DATE NOT NULL DEFAULT ((NOW() AT TIME ZONE 'UTC')::date),
    hour INTEGER NOT NULL DEFAULT (EXTRACT(HOUR FROM (NOW() AT TIME ZONE 'UTC'))::int)
        CHECK (hour BETWEEN 0 AND 23),

    -- Whole-second view of microphone_ms: floor(microphone_ms / 1000). Generated (section 5 turns the
    -- seed's plain column of an older database into this one), so it can never drift from microphone_ms.
    microphone_seconds INTEGER NOT NULL GENERATED ALWAYS AS ((microphone_ms / 1000)::integer) STORED,
    conversation_count INTEGER DEFAULT 0,
    message_count INTEGER DEFAULT 0,

    -- Language -> seconds in the hour, JSON numbers with up to 3 decimals (exact milliseconds).
    language_breakdown JSONB DEFAULT '{}'::jsonb,
    feature_usage JSONB DEFAULT '{}'::jsonb,        -- feature -> event count

    is_aggregated BOOLEAN DEFAULT FALSE,

    -- added: exact usage in the hour in milliseconds (integer seconds lost fractions: 120 events of 0.5 s
    -- must make exactly 60 s).
    microphone_ms BIGINT NOT NULL DEFAULT 0 CHECK (microphone_ms >= 0),
    -- added: how much of microphone_ms maintenance.aggregate_usage has already rolled into
    -- learning_progress, so usage arriving after an hour was aggregated is rolled up exactly once.
    aggregated_ms BIGINT NOT NULL DEFAULT 0 CHECK (aggregated_ms >= 0),
    -- added: the language_breakdown that aggregated_ms stands for, so late usage is rolled up per
    -- language by its difference only.
    aggregated_breakdown JSONB NOT NULL DEFAULT '{}'::jsonb,

    UNIQUE (user_id, date, hour)
);

CREATE INDEX IF NOT EXISTS idx_usage_tracking_user_date ON usage_tracking (user_id, date DESC);
CREATE INDEX IF NOT EXISTS idx_usage_tracking_aggregation ON usage_tracking (is_aggregated, date)
    WHERE NOT is_aggregated;
-- added: every metered batch updates the hours it adds to; room on the page keeps the update HOT.
ALTER TABLE usage_tracking SET (fillfactor = 70);

-- 3.8 learning_progress
CREATE TABLE IF NOT EXISTS learning_progress (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id UUID NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,
    language_code TEXT NOT NULL,

    speaking_level DECIMAL(3, 2) DEFAULT 0.0,
    listening_level DECIMAL(3, 2) DEFAULT 0.0,
    vocabulary_size INTEGER DEFAULT 0,
    grammar_accuracy DECIMAL(3, 2) DEFAULT 0.0,
    pronunciation_accuracy DECIMAL(3, 2) DEFAULT 0.0,
    fluency_score DECIMAL(3, 2) DEFAULT 0.0,

    -- Study time comes from metered microphone time (maintenance.aggregate_usage), not from conversations.
    total_study_time_minutes INTEGER DEFAULT 0,
    -- added: the exact milliseconds behind total_study_time_minutes, which grows by whole minutes of this
    -- total, so no fraction of a minute is ever lost to rounding.
    total_study_ms BIGINT NOT NULL DEFAULT 0 CHECK (total_study_ms >= 0),
    consecutive_days INTEGER DEFAULT 0,
    last_study_date DATE,

    weekly_goal_minutes INTEGER DEFAULT 210,        -- 30 minutes x 7 days
    weekly_achieved_minutes INTEGER DEFAULT 0,

    topic_mastery JSONB DEFAULT '{}'::jsonb,        -- {business: 0.7, travel: 0.5}

    created_at TIMESTAMPTZ DEFAULT NOW(),
    updated_at TIMESTAMPTZ DEFAULT NOW(),

    UNIQUE (user_id, language_code)
);

CREATE INDEX IF NOT EXISTS idx_learning_progress_user_language ON learning_progress (user_id, language_code);
CREATE INDEX IF NOT EXISTS idx_learning_progress_streak ON learning_progress (consecutive_days DESC);

-- 3.9 achievements
CREATE TABLE IF NOT EXISTS achievements (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id UUID NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,

    achievement_type TEXT NOT NULL,
    achievement_code TEXT NOT NULL,
    name JSONB NOT NULL,                            -- {en: 'First Conversation', ja: '初めての会話'}
    description JSONB NOT NULL,
    icon_url TEXT,

    criteria JSONB NOT NULL,
    progress DECIMAL(5, 2) DEFAULT 0.0,

    earned_at TIMESTAMPTZ,
    is_earned BOOLEAN DEFAULT FALSE,

    reward_type TEXT,
    reward_value INTEGER,

    category TEXT NOT NULL,
    tier TEXT CHECK (tier IN ('bronze', 'silver', 'gold', 'platinum')),
    display_order INTEGER,

    created_at TIMESTAMPTZ DEFAULT NOW(),

    UNIQUE (user_id, achievement_code)
);

CREATE INDEX IF NOT EXISTS idx_achievements_user_earned ON achievements (user_id, is_earned);
CREATE INDEX IF NOT EXISTS idx_achievements_category ON achievements (category);

-- 3.10 audit_logs (append-only; no foreign key on user_id: the trail outlives deleted users)
CREATE TABLE IF NOT EXISTS audit_logs (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id UUID,                                   -- whose row changed (subscriptions.user_id / profiles.id)
    action TEXT NOT NULL,                           -- INSERT / UPDATE / DELETE
    table_name TEXT NOT NULL,
    record_id UUID,
    old_values JSONB,
    new_values JSONB,
    ip_address INET,
    user_agent TEXT,
    created_at TIMESTAMPTZ DEFAULT NOW(),

    -- added: who caused the change. The setting app.actor when the worker set it (e.g. 'stripe:evt_123'),
    -- else 'user:<uid>' for a signed-in user, else the database role. The seed's user_id = auth.uid()
    -- was NULL for every change the backend made, so a Stripe-driven change named no cause.
    actor TEXT
);

-- added: users read their own trail (RLS filters on user_id), newest first.
CREATE INDEX IF NOT EXISTS idx_audit_logs_user_created ON audit_logs (user_id, created_at DESC);


-- -----------------------------------------------------------------------------------------------------
-- 4. Worker tables. Only the worker (table owner / service_role) touches them: RLS is enabled with no
--    policy and anon / authenticated have no privileges (section 8).
-- -----------------------------------------------------------------------------------------------------

-- The usage ledger: one row per accepted microphone-usage event, the source of truth for usage.
-- The primary key is the idempotency key: an event id counts once, forever.
-- user_id is a profile's id, kept so without a foreign key (as in usage_hour_conversations below): a
-- foreign key checks every inserted row on its own (a query and a row lock per event, a sixth of
-- PostgreSQL's work per metered event), where metering reads and locks the profiles of a whole batch
-- at once (FOR KEY SHARE, the lock those checks took) before it writes, so no profile goes while its
-- usage is being recorded. Deleting or truncating profiles deletes their usage, as ON DELETE CASCADE did
-- (section 5).
CREATE TABLE IF NOT EXISTS usage_events (
    -- COLLATE "C": an event id is an opaque key, compared byte by byte (every insert compares it a few dozen
    -- times on its way down the primary key; the database's collation compared it as language text).
    event_id TEXT COLLATE "C" PRIMARY KEY CHECK (char_length(event_id) BETWEEN 1 AND 128),
    user_id UUID NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    duration_ms BIGINT NOT NULL CHECK (duration_ms > 0),
    language TEXT NOT NULL,
    conversation_id UUID,                           -- no foreign key: usage outlives a deleted conversation
    feature TEXT,
    received_at TIMESTAMPTZ NOT NULL
);

ALTER TABLE usage_events DROP CONSTRAINT IF EXISTS usage_events_user_id_fkey;
-- A ledger created before event_id was COLLATE "C" gets it (its primary key is rebuilt, under a lock).
DO $event_id_collation$
BEGIN
    IF (SELECT attcollation FROM pg_attribute WHERE attrelid = 'public.usage_events'::regclass
        AND attname = 'event_id') <> 'pg_catalog."C"'::regcollation THEN
        ALTER TABLE usage_events ALTER COLUMN event_id TYPE TEXT COLLATE "C";
    END IF;
END
$event_id_collation$;

CREATE INDEX IF NOT EXISTS idx_usage_events_user_started ON usage_events (user_id, started_at);
-- Nothing reads by conversation (counts of distinct conversations per hour are kept in
-- usage_hour_conversations), and every event paid for an entry.
DROP INDEX IF EXISTS idx_usage_events_user_conversation;

-- Conversations already counted in a user's UTC hour: usage_tracking.conversation_count counts distinct
-- conversations per hour, and events of one conversation arrive in many batches. A batch inserts its
-- (user, hour, conversation) keys here and counts only the ones that were new (ON CONFLICT DO NOTHING
-- ... RETURNING), so a conversation is counted once per hour whatever the batching.
CREATE TABLE IF NOT EXISTS usage_hour_conversations (
    user_id UUID NOT NULL,                          -- a profile's id (no foreign key: see usage_events)
    hour_start TIMESTAMPTZ NOT NULL
        CHECK (date_trunc('hour', hour_start AT TIME ZONE 'UTC') = hour_start AT TIME ZONE 'UTC'),
    conversation_id UUID NOT NULL,
    PRIMARY KEY (user_id, hour_start, conversation_id)
);

ALTER TABLE usage_hour_conversations DROP CONSTRAINT IF EXISTS usage_hour_conversations_user_id_fkey;

-- Stripe webhook inbox: stored (id unique) before the webhook is answered, then processed by
-- stripe.process_event; processed_at/outcome record how it ended.
CREATE TABLE IF NOT EXISTS stripe_events (
    id TEXT PRIMARY KEY,                            -- Stripe's event id (evt_...)
    type TEXT NOT NULL,
    created TIMESTAMPTZ NOT NULL,                   -- Stripe's `created`: orders events of one object
    api_version TEXT,
    livemode BOOLEAN,
    payload JSONB NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    processed_at TIMESTAMPTZ,
    outcome TEXT CHECK (outcome IN ('applied', 'ignored', 'stale', 'dead_lettered')),
    attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error TEXT,
    last_attempt_at TIMESTAMPTZ
);

-- maintenance.sweep finds inbox rows left unprocessed
CREATE INDEX IF NOT EXISTS idx_stripe_events_unprocessed ON stripe_events (received_at)
    WHERE processed_at IS NULL;

-- Each Stripe subscription of a user, as its own events (or stripe.reconcile) last described it. A learner
-- can hold several at once (a second Checkout before the first subscription ends); the user's one
-- `subscriptions` row shows the one in force: the live one (active or trialing before past_due or unpaid
-- before paused) that pays most a month, then the one created last, then the greatest id.
-- subscriptions.stripe_subscription_id names it, so every audit_logs row of a change names the
-- subscription that decided it.
CREATE TABLE IF NOT EXISTS stripe_subscriptions (
    id TEXT PRIMARY KEY,                            -- Stripe's subscription id (sub_...)
    user_id UUID NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,
    customer_id TEXT,
    status TEXT,                                    -- Stripe's status; NULL: linked by a checkout, no state yet
    plan_type TEXT CHECK (plan_type IN ('free', 'standard', 'premium', 'enterprise')),
    monthly_minutes_limit INTEGER,
    price_id TEXT,                                  -- the price (or, before prices, the plan) of its first item
    price_cents INTEGER,                            -- that price's unit amount
    currency TEXT,
    monthly_amount_cents BIGINT,                    -- what it costs a month (amount x quantity per interval)
    current_period_start TIMESTAMPTZ,
    current_period_end TIMESTAMPTZ,
    cancel_at_period_end BOOLEAN NOT NULL DEFAULT FALSE,
    canceled_at TIMESTAMPTZ,
    trial_end TIMESTAMPTZ,
    created TIMESTAMPTZ,                            -- Stripe's `created` of the subscription (else first seen)
    -- Stripe `created` time and id of what last set this state: an event, or 'reconcile:<run id>'. An
    -- older event of this subscription never overwrites it.
    state_at TIMESTAMPTZ,
    state_event_id TEXT,
    linked_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    CHECK (current_period_end > current_period_start)
);

CREATE INDEX IF NOT EXISTS idx_stripe_subscriptions_user ON stripe_subscriptions (user_id);
CREATE INDEX IF NOT EXISTS idx_stripe_subscriptions_customer ON stripe_subscriptions (customer_id)
    WHERE customer_id IS NOT NULL;

-- Subscriptions linked before stripe_subscriptions existed: their state as the user's row holds it.
-- (Applying this file again finds them all there already.)
INSERT INTO stripe_subscriptions (
    id, user_id, customer_id, status, plan_type, monthly_minutes_limit, price_id, price_cents, currency,
    monthly_amount_cents, current_period_start, current_period_end, cancel_at_period_end, canceled_at, trial_end,
    state_at, state_event_id, linked_at, updated_at
)
SELECT s.stripe_subscription_id, s.user_id, s.stripe_customer_id, s.stripe_status, s.plan_type,
       s.monthly_minutes_limit, s.stripe_price_id, s.monthly_price_cents, s.currency, s.monthly_price_cents,
       s.current_period_start, s.current_period_end, coalesce(s.cancel_at_period_end, false), s.canceled_at,
       s.trial_end, s.stripe_state_at, s.stripe_state_event_id, coalesce(s.updated_at, s.current_period_start),
       coalesce(s.updated_at, s.current_period_start)
FROM subscriptions s
WHERE s.stripe_subscription_id IS NOT NULL AND s.stripe_status IS NOT NULL
ORDER BY s.stripe_subscription_id
ON CONFLICT (id) DO NOTHING;

-- stripe.reconcile runs: what each found, and where a run that stopped half-way resumes (the events page
-- after event_cursor, the subscriptions after subscription_cursor).
CREATE TABLE IF NOT EXISTS stripe_reconcile_runs (
    id TEXT PRIMARY KEY,                            -- 'rec_...': audit_logs.actor of its repairs is reconcile:<id>
    since_requested TIMESTAMPTZ,                    -- --since as asked; NULL: Stripe's 30-day event window
    since TIMESTAMPTZ NOT NULL,                     -- events created from then on are compared
    started_at TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ,
    phase TEXT NOT NULL CHECK (phase IN ('events', 'subscriptions', 'done', 'superseded')),
    event_cursor TEXT,
    subscription_cursor TEXT,
    pages INTEGER NOT NULL DEFAULT 0 CHECK (pages >= 0),
    events_listed INTEGER NOT NULL DEFAULT 0 CHECK (events_listed >= 0),
    subscriptions_checked INTEGER NOT NULL DEFAULT 0 CHECK (subscriptions_checked >= 0),
    drift JSONB NOT NULL DEFAULT '{}'::jsonb,       -- kind of difference -> how many were found
    last_error TEXT
);

-- a new run resumes the one left unfinished
CREATE INDEX IF NOT EXISTS idx_stripe_reconcile_runs_unfinished ON stripe_reconcile_runs (started_at)
    WHERE finished_at IS NULL;

-- Events that cannot be applied: kept with a readable reason, replayable.
CREATE TABLE IF NOT EXISTS dead_letters (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source TEXT NOT NULL,                           -- 'usage', 'stripe', ...
    ref TEXT,                                       -- usage event id or Stripe event id when known
    task_name TEXT,
    payload JSONB NOT NULL,
    reason TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    replayed_at TIMESTAMPTZ,
    replay_count INTEGER NOT NULL DEFAULT 0 CHECK (replay_count >= 0),
    last_replay_at TIMESTAMPTZ
);

CREATE INDEX IF NOT EXISTS idx_dead_letters_pending ON dead_letters (created_at) WHERE replayed_at IS NULL;
-- added beyond the contract: find the dead letters of one event (replays, operators' look-ups)
CREATE INDEX IF NOT EXISTS idx_dead_letters_ref ON dead_letters (source, ref) WHERE ref IS NOT NULL;

-- One row per user and period; the open row of the current period has archived_at NULL. At the period's
-- end it is archived (exactly once) and the next period's row starts.
CREATE TABLE IF NOT EXISTS usage_periods (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id UUID NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,
    period_start TIMESTAMPTZ NOT NULL,
    period_end TIMESTAMPTZ NOT NULL,
    plan_type TEXT NOT NULL,
    monthly_minutes_limit INTEGER NOT NULL,
    limit_ms BIGINT NOT NULL CHECK (limit_ms >= 0),
    used_ms BIGINT NOT NULL DEFAULT 0 CHECK (used_ms >= 0),
    overage_ms BIGINT GENERATED ALWAYS AS (GREATEST(used_ms - limit_ms, 0)) STORED,
    archived_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    CHECK (period_end > period_start),
    UNIQUE (user_id, period_start)
);

CREATE INDEX IF NOT EXISTS idx_usage_periods_user_end ON usage_periods (user_id, period_end);
-- every metered batch updates used_ms of its users' periods: room on the page keeps the update HOT
ALTER TABLE usage_periods SET (fillfactor = 70);

-- Limit alerts: at most one per user, period and threshold.
CREATE TABLE IF NOT EXISTS usage_alerts (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id UUID NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,
    period_start TIMESTAMPTZ NOT NULL,
    threshold_percent SMALLINT NOT NULL CHECK (threshold_percent IN (80, 100)),
    used_ms BIGINT NOT NULL,
    limit_ms BIGINT NOT NULL,
    triggered_at TIMESTAMPTZ NOT NULL,
    UNIQUE (user_id, period_start, threshold_percent)
);

-- Last run of each periodic job (operators and health checks read it).
CREATE TABLE IF NOT EXISTS maintenance_runs (
    job TEXT PRIMARY KEY,
    last_started_at TIMESTAMPTZ,
    last_succeeded_at TIMESTAMPTZ,
    last_duration_ms INTEGER,
    last_error TEXT
);

-- Live sessions (worker/sessions.py): a conversation that asks for microphone time before it is used.
-- The truth of every grant: Redis holds the atomic reservation of each user's open sessions, and when
-- Redis loses it, it is rebuilt from these rows. Reported usage goes through the metering path as
-- ordinary usage events (`session:<id>:<offset ms>`), in the transaction that updates the row.
CREATE TABLE IF NOT EXISTS live_sessions (
    session_id UUID PRIMARY KEY,
    user_id UUID NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,
    language TEXT NOT NULL,
    conversation_id UUID,                           -- copied onto the session's usage events
    feature TEXT,
    state TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'ended', 'expired')),
    started_at TIMESTAMPTZ NOT NULL,
    last_seen_at TIMESTAMPTZ NOT NULL,              -- last report; silent past SESSION_TTL_SECONDS: expired
    reported_ms BIGINT NOT NULL DEFAULT 0 CHECK (reported_ms >= 0),  -- the session's total, all recorded
    recorded_until TIMESTAMPTZ NOT NULL,            -- end of its last usage event: the next one starts here or later
    granted_ms BIGINT NOT NULL DEFAULT 0 CHECK (granted_ms >= 0),    -- may still use this much beyond reported_ms
    beyond_grant_ms BIGINT NOT NULL DEFAULT 0 CHECK (beyond_grant_ms >= 0),  -- reported past its grants (recorded)
    ended_at TIMESTAMPTZ,
    CHECK ((state = 'open') = (ended_at IS NULL)),
    CHECK (state = 'open' OR granted_ms = 0)        -- a closed session holds nothing
);

-- each user's open sessions (grants, rebuilds) and the silent ones (sessions.expire)
CREATE INDEX IF NOT EXISTS idx_live_sessions_user_open ON live_sessions (user_id) WHERE state = 'open';
CREATE INDEX IF NOT EXISTS idx_live_sessions_open_seen ON live_sessions (last_seen_at) WHERE state = 'open';
-- sessions closed lately, whose reservations a lost release may have left behind in Redis
CREATE INDEX IF NOT EXISTS idx_live_sessions_user_closed ON live_sessions (user_id, ended_at) WHERE state <> 'open';


-- -----------------------------------------------------------------------------------------------------
-- 5. Functions and triggers on the seed tables
-- -----------------------------------------------------------------------------------------------------

-- Seed defect, not carried over: the trigger `trigger_track_usage` / function track_microphone_usage()
-- on usage_tracking. It added NEW.microphone_seconds / 60 in integers (anything under a minute was lost),
-- read then wrote the subscription without a lock (concurrent inserts lost updates), and raised an
-- exception over the limit, which rolled the usage back (usage is a fact and must be kept). Usage is now
-- metered by the worker (metering.record_usage: usage_events ledger -> usage_tracking, usage_periods,
-- subscriptions.monthly_minutes_used, usage_alerts) in one transaction per event batch.

-- usage_tracking.microphone_seconds is the whole-second view of microphone_ms, a generated column. A
-- database built by an earlier version of this file has a plain column kept by a row trigger
-- (usage_tracking_sync_seconds, 1,600 PL/pgSQL calls per metered batch of 1,000 events): the column is
-- replaced by the generated one, once. Rows written with seconds only (as the seed's writers did, with
-- microphone_ms 0) keep their seconds, as milliseconds. The replacement rewrites the table under an
-- ACCESS EXCLUSIVE lock (see docs/operations.md).
DO $generated_seconds$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'public.usage_tracking'::regclass
               AND attname = 'microphone_seconds' AND attgenerated = '' AND NOT attisdropped) THEN
        UPDATE usage_tracking SET microphone_ms = microphone_seconds::bigint * 1000
        WHERE microphone_ms = 0 AND microphone_seconds > 0;
        ALTER TABLE usage_tracking DROP COLUMN microphone_seconds;
        ALTER TABLE usage_tracking
            ADD COLUMN microphone_seconds INTEGER NOT NULL GENERATED ALWAYS AS ((microphone_ms / 1000)::integer) STORED;
    END IF;
END
$generated_seconds$;
DROP TRIGGER IF EXISTS usage_tracking_sync_seconds ON usage_tracking;
DROP FUNCTION IF EXISTS usage_tracking_sync_seconds();

-- updated_at on every table that has one (the seed attached it to profiles and subscriptions only).
-- The WHEN clause is the function's own test, so an UPDATE that sets updated_at (the worker, with its own
-- clock) does not call PL/pgSQL per row at all.
CREATE OR REPLACE TRIGGER update_profiles_updated_at
    BEFORE UPDATE ON profiles FOR EACH ROW WHEN (NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at)
    EXECUTE FUNCTION update_updated_at();
CREATE OR REPLACE TRIGGER update_language_settings_updated_at
    BEFORE UPDATE ON language_settings FOR EACH ROW WHEN (NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at)
    EXECUTE FUNCTION update_updated_at();
CREATE OR REPLACE TRIGGER update_conversation_scripts_updated_at
    BEFORE UPDATE ON conversation_scripts FOR EACH ROW WHEN (NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at)
    EXECUTE FUNCTION update_updated_at();
CREATE OR REPLACE TRIGGER update_subscriptions_updated_at
    BEFORE UPDATE ON subscriptions FOR EACH ROW WHEN (NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at)
    EXECUTE FUNCTION update_updated_at();
CREATE OR REPLACE TRIGGER update_learning_progress_updated_at
    BEFORE UPDATE ON learning_progress FOR EACH ROW WHEN (NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at)
    EXECUTE FUNCTION update_updated_at();

-- Learning progress when a conversation ends (seed defect: the function was never attached to a trigger).
-- Fixed from the seed as well:
--   * the 30-day window ends at the conversation's ended_at, not NOW() (business time is the event's);
--   * an average that is NULL (no scored conversation in the window) keeps the earlier score instead of
--     wiping it;
--   * accuracy and pronunciation averages, computed but unused in the seed, feed grammar_accuracy and
--     pronunciation_accuracy;
--   * it does NOT add study time: study time comes from metered microphone seconds rolled up by the
--     worker's maintenance.aggregate_usage; adding duration_seconds here would double count.
-- SECURITY DEFINER so that ending one's own conversation updates progress whatever the caller may write.
CREATE OR REPLACE FUNCTION update_learning_progress()
RETURNS TRIGGER
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, extensions, pg_temp
AS $$
DECLARE
    v_language TEXT := NEW.language_pair ->> 'target';
    v_fluency NUMERIC;
    v_accuracy NUMERIC;
    v_pronunciation NUMERIC;
BEGIN
    -- Fires only when a conversation ends: ended_at goes from NULL to a time (or a row arrives ended).
    IF NEW.ended_at IS NULL OR (TG_OP = 'UPDATE' AND OLD.ended_at IS NOT NULL) OR v_language IS NULL THEN
        RETURN NULL;
    END IF;

    SELECT avg(c.fluency_score), avg(c.accuracy_score), avg(c.pronunciation_score)
      INTO v_fluency, v_accuracy, v_pronunciation
    FROM conversations c
    WHERE c.user_id = NEW.user_id
      AND c.language_pair ->> 'target' = v_language
      AND c.ended_at > NEW.ended_at - INTERVAL '30 days'
      AND c.ended_at <= NEW.ended_at;

    INSERT INTO learning_progress AS lp
        (user_id, language_code, speaking_level, fluency_score, grammar_accuracy, pronunciation_accuracy)
    VALUES (
        NEW.user_id, v_language,
        coalesce(v_fluency, 0.0), coalesce(v_fluency, 0.0),
        coalesce(v_accuracy, 0.0), coalesce(v_pronunciation, 0.0)
    )
    ON CONFLICT (user_id, language_code) DO UPDATE SET
        speaking_level = coalesce(v_fluency, lp.speaking_level),
        fluency_score = coalesce(v_fluency, lp.fluency_score),
        grammar_accuracy = coalesce(v_accuracy, lp.grammar_accuracy),
        pronunciation_accuracy = coalesce(v_pronunciation, lp.pronunciation_accuracy);
    RETURN NULL;
END;
$$;

-- Achievements when a conversation ends (seed defect: never attached; its insert also omitted the
-- NOT NULL column `criteria`, and "COUNT(*) = 1 over all conversations" missed users whose first
-- conversation was not the one ending). Ending any conversation means at least one is completed, so
-- FIRST_CONV is earned here; the unique (user_id, achievement_code) makes it exactly once, also when two
-- conversations end at the same time. A row created beforehand as not yet earned becomes earned.
-- SECURITY DEFINER: users may only read achievements (RLS), yet ending their conversation earns one.
CREATE OR REPLACE FUNCTION check_achievements()
RETURNS TRIGGER
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, extensions, pg_temp
AS $$
BEGIN
    IF NEW.ended_at IS NULL OR (TG_OP = 'UPDATE' AND OLD.ended_at IS NOT NULL) THEN
        RETURN NULL;
    END IF;

    INSERT INTO achievements AS a
        (user_id, achievement_type, achievement_code, name, description, criteria, progress, category,
         is_earned, earned_at)
    VALUES (
        NEW.user_id,
        'first_conversation',
        'FIRST_CONV',
        '{"en": "First Conversation", "ja": "初めての会話"}'::jsonb,
        '{"en": "Complete your first conversation", "ja": "初めての会話を完了"}'::jsonb,
        '{"conversations_completed": 1}'::jsonb,
        100.0,
        'milestone',
        TRUE,
        NEW.ended_at                                 -- earned when the conversation ended
    )
    ON CONFLICT (user_id, achievement_code) DO UPDATE SET
        is_earned = TRUE,
        earned_at = EXCLUDED.earned_at,
        progress = EXCLUDED.progress
    WHERE a.is_earned IS NOT TRUE;

    -- Further achievements (streaks...) are added here.
    RETURN NULL;
END;
$$;

-- One trigger each for INSERT and UPDATE OF ended_at: a conversation "ends" when ended_at goes from NULL
-- to a time, or when it is inserted already ended (offline sessions synced later). The functions check
-- OLD/NEW themselves because a WHEN clause cannot read OLD on INSERT.
CREATE OR REPLACE TRIGGER update_learning_progress_on_end
    AFTER INSERT OR UPDATE OF ended_at ON conversations
    FOR EACH ROW EXECUTE FUNCTION update_learning_progress();
CREATE OR REPLACE TRIGGER check_achievements_on_end
    AFTER INSERT OR UPDATE OF ended_at ON conversations
    FOR EACH ROW EXECUTE FUNCTION check_achievements();

-- Audit trail. Fixed from the seed (which was never attached to any table):
--   * attached to subscriptions and profiles, AFTER INSERT OR UPDATE OR DELETE;
--   * user_id is the user whose row changed (the first trigger argument names the column), not the
--     caller, and `actor` records who caused it (app.actor, e.g. 'stripe:evt_123' set by the worker with
--     set_config(..., true); else 'user:<auth.uid()>'; else the database role);
--   * the remaining trigger arguments name columns whose changes alone are not audited: on
--     subscriptions monthly_minutes_used and updated_at change with every metered batch, and the usage
--     ledger (usage_events) is their audit trail; on profiles updated_at / last_active_at are activity.
-- SECURITY DEFINER: users update their own profile but may not write audit_logs.
CREATE OR REPLACE FUNCTION audit_trigger()
RETURNS TRIGGER
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, extensions, pg_temp
AS $$
DECLARE
    v_old JSONB := CASE WHEN TG_OP IN ('UPDATE', 'DELETE') THEN to_jsonb(OLD) END;
    v_new JSONB := CASE WHEN TG_OP IN ('INSERT', 'UPDATE') THEN to_jsonb(NEW) END;
    v_row JSONB;
    v_user_column TEXT := coalesce(TG_ARGV[0], 'user_id');
    v_unaudited TEXT[] := coalesce(TG_ARGV[1:TG_NARGS - 1], '{}');
    v_uid UUID;
    v_actor TEXT;
BEGIN
    IF TG_OP = 'UPDATE' AND (v_old - v_unaudited) = (v_new - v_unaudited) THEN
        RETURN NULL;
    END IF;
    v_row := coalesce(v_new, v_old);

    v_uid := auth.uid();
    v_actor := coalesce(
        nullif(current_setting('app.actor', true), ''),
        'user:' || v_uid::text,
        -- inside SECURITY DEFINER current_user is this function's owner; the SET ROLE of the session
        -- (or else the login role) is who acted
        nullif(current_setting('role', true), 'none'),
        session_user::text
    );

    INSERT INTO audit_logs (user_id, action, table_name, record_id, old_values, new_values, actor)
    VALUES (
        (v_row ->> v_user_column)::uuid,
        TG_OP,
        TG_TABLE_NAME,
        (v_row ->> 'id')::uuid,
        v_old,
        v_new,
        v_actor
    );
    RETURN NULL;
END;
$$;

-- Each table's audit is two triggers: inserts and deletes, and updates WHEN an audited column changed,
-- so an update of unaudited columns alone (every metered batch moves monthly_minutes_used) never calls
-- the function, which would build two JSON documents of the row to find nothing to record. The WHEN
-- clause lists the audited columns from the catalog, each time this file is applied, so a column added
-- to the table (in this file, above) is audited from then on.
DO $audit_triggers$
DECLARE
    v_table TEXT;
    v_arguments TEXT;
    v_unaudited TEXT[];
    v_old TEXT;
    v_new TEXT;
BEGIN
    FOR v_table, v_arguments, v_unaudited IN
        VALUES ('subscriptions', $$'user_id', 'monthly_minutes_used', 'updated_at'$$,
                ARRAY['monthly_minutes_used', 'updated_at']),
               ('profiles', $$'id', 'updated_at', 'last_active_at'$$, ARRAY['updated_at', 'last_active_at'])
    LOOP
        SELECT string_agg(format('OLD.%I', attname), ', ' ORDER BY attnum),
               string_agg(format('NEW.%I', attname), ', ' ORDER BY attnum)
          INTO v_old, v_new
        FROM pg_attribute
        WHERE attrelid = format('public.%I', v_table)::regclass AND attnum > 0 AND NOT attisdropped
          AND attname <> ALL (v_unaudited);
        EXECUTE format(
            'CREATE OR REPLACE TRIGGER %I AFTER INSERT OR DELETE ON public.%I'
            ' FOR EACH ROW EXECUTE FUNCTION audit_trigger(%s)',
            'audit_' || v_table, v_table, v_arguments);
        EXECUTE format(
            'CREATE OR REPLACE TRIGGER %I AFTER UPDATE ON public.%I'
            ' FOR EACH ROW WHEN ((%s) IS DISTINCT FROM (%s)) EXECUTE FUNCTION audit_trigger(%s)',
            'audit_' || v_table || '_update', v_table, v_old, v_new, v_arguments);
    END LOOP;
END
$audit_triggers$;

-- The usage of deleted profiles goes with them, as ON DELETE CASCADE took it (usage_events and
-- usage_hour_conversations keep user_id without a foreign key: section 4), in one statement per table for
-- all the profiles a statement deletes. SECURITY DEFINER, as the cascade of a foreign key: users may delete
-- their own profile, and have no privileges on the worker's tables.
CREATE OR REPLACE FUNCTION delete_usage_of_profiles()
RETURNS TRIGGER
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN  -- DELETE: the TRUNCATE that fired this may be truncating them too
        DELETE FROM usage_events;
        DELETE FROM usage_hour_conversations;
    ELSE
        DELETE FROM usage_events e USING deleted_profiles d WHERE e.user_id = d.id;
        DELETE FROM usage_hour_conversations c USING deleted_profiles d WHERE c.user_id = d.id;
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER delete_usage_of_profiles
    AFTER DELETE ON profiles REFERENCING OLD TABLE AS deleted_profiles
    FOR EACH STATEMENT EXECUTE FUNCTION delete_usage_of_profiles();
CREATE OR REPLACE TRIGGER truncate_usage_of_profiles
    AFTER TRUNCATE ON profiles FOR EACH STATEMENT EXECUTE FUNCTION delete_usage_of_profiles();

-- Audio URL encryption (seed), with the key from the setting app.encryption_key.
-- Fixed from the seed: the ciphertext is stored as base64 text (compact, and independent of the
-- bytea_output setting that the seed's bytea::text round trip relied on); a missing key is a clear
-- error instead of "unrecognized configuration parameter"; search_path is fixed; SECURITY INVOKER,
-- because the key is the caller's setting and definer rights would add nothing but risk.
CREATE OR REPLACE FUNCTION encrypt_audio_url(url TEXT)
RETURNS TEXT
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, public, extensions, pg_temp
AS $$
DECLARE
    v_key TEXT := current_setting('app.encryption_key', true);
BEGIN
    IF url IS NULL THEN
        RETURN NULL;
    END IF;
    IF v_key IS NULL OR v_key = '' THEN
        RAISE EXCEPTION 'app.encryption_key is not set'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Call set_config(''app.encryption_key'', <key>, true) first.';
    END IF;
    RETURN encode(pgp_sym_encrypt(url, v_key), 'base64');
END;
$$;

CREATE OR REPLACE FUNCTION decrypt_audio_url(encrypted_url TEXT)
RETURNS TEXT
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, public, extensions, pg_temp
AS $$
DECLARE
    v_key TEXT := current_setting('app.encryption_key', true);
BEGIN
    IF encrypted_url IS NULL THEN
        RETURN NULL;
    END IF;
    IF v_key IS NULL OR v_key = '' THEN
        RAISE EXCEPTION 'app.encryption_key is not set'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Call set_config(''app.encryption_key'', <key>, true) first.';
    END IF;
    RETURN pgp_sym_decrypt(decode(encrypted_url, 'base64'), v_key);
END;
$$;

-- Monthly partitions of messages (seed defects: it partitioned the unused copy messages_partitioned,
-- computed the month from NOW() and raised on any month whose rows already sat in a default partition).
-- create_monthly_partition('2027-03-17') makes messages_2027_03 for [2027-03-01, 2027-04-01) UTC and
-- returns its name. The month is passed in (maintenance.ensure_partitions passes now + n months).
--   * A transaction-level advisory lock serialises concurrent calls (two beats, manual runs).
--   * Already attached: nothing happens (repeating it changes nothing).
--   * Rows of that month in messages_default: CREATE TABLE ... PARTITION OF would fail ("updated partition
--     constraint for default partition would be violated"), so the table is created standalone, the
--     rows move into it (DELETE ... RETURNING), and it is attached. Attaching copies the parent's indexes,
--     foreign keys and constraints onto it.
--   * Bounds are written with an explicit +00 offset: a bare date would be read in the session's time
--     zone and the months would shift with it.
-- SECURITY DEFINER so that partitions always belong to the owner of messages (ATTACH needs it), also
-- when the backend runs as service_role on Supabase; EXECUTE is for the backend only (section 8).
CREATE OR REPLACE FUNCTION create_monthly_partition(p_month DATE)
RETURNS TEXT
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_start DATE := date_trunc('month', p_month)::date;
    v_end DATE := (date_trunc('month', p_month) + INTERVAL '1 month')::date;
    v_name TEXT := 'messages_' || to_char(p_month, 'YYYY_MM');
    v_from TEXT := to_char(v_start, 'YYYY-MM-DD') || ' 00:00:00+00';
    v_to TEXT := to_char(v_end, 'YYYY-MM-DD') || ' 00:00:00+00';
    v_table REGCLASS;
    v_columns TEXT;
BEGIN
    IF p_month IS NULL THEN
        RAISE EXCEPTION 'create_monthly_partition: p_month must not be NULL';
    END IF;

    PERFORM pg_advisory_xact_lock(hashtext('worldspeak:create_monthly_partition'));
    -- The lock ATTACH PARTITION takes on the parent anyway, taken now: acquiring a relation lock makes this
    -- backend read the catalog changes committed while it waited (an advisory lock does not), so a partition
    -- that a concurrent call has just created is found below instead of failing CREATE TABLE.
    LOCK TABLE public.messages IN SHARE UPDATE EXCLUSIVE MODE;

    v_table := to_regclass(format('public.%I', v_name));
    IF v_table IS NOT NULL THEN
        IF EXISTS (
            SELECT 1 FROM pg_inherits WHERE inhrelid = v_table AND inhparent = 'public.messages'::regclass
        ) THEN
            RETURN v_name;  -- already there
        END IF;
        RAISE EXCEPTION 'create_monthly_partition: % exists but is not a partition of messages', v_name;
    END IF;

    EXECUTE format(
        'CREATE TABLE public.%I (LIKE public.messages INCLUDING DEFAULTS INCLUDING CONSTRAINTS)'
        ' WITH (autovacuum_vacuum_scale_factor = 0.05)',
        v_name
    );

    SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum)
      INTO v_columns
    FROM pg_attribute
    WHERE attrelid = 'public.messages'::regclass AND attnum > 0 AND NOT attisdropped;

    EXECUTE format(
        'WITH moved AS (DELETE FROM public.messages_default WHERE created_at >= %L AND created_at < %L'
        ' RETURNING %s) INSERT INTO public.%I (%s) SELECT %s FROM moved',
        v_from, v_to, v_columns, v_name, v_columns, v_columns
    );

    EXECUTE format(
        'ALTER TABLE public.messages ATTACH PARTITION public.%I FOR VALUES FROM (%L) TO (%L)',
        v_name, v_from, v_to
    );

    -- A partition is a table of its own: read directly it does not apply the parent's policies. Nobody
    -- but the owner should, so RLS is on (without policy) and end-user roles get nothing (on Supabase
    -- default privileges would otherwise grant them everything on a new table).
    EXECUTE format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', v_name);
    EXECUTE format('REVOKE ALL ON public.%I FROM anon, authenticated', v_name);
    EXECUTE format('GRANT ALL ON public.%I TO service_role', v_name);
    RETURN v_name;
END;
$$;


-- -----------------------------------------------------------------------------------------------------
-- 6. user_statistics (materialized view, seed)
-- Fixed from the seed: the UNIQUE index on user_id that REFRESH ... CONCURRENTLY requires (the seed's
-- was not unique, so its own refresh function failed); active days are UTC dates (DATE(timestamptz)
-- followed the refreshing session's time zone). Created WITH DATA so that the first concurrent refresh
-- works (CONCURRENTLY refuses an unpopulated view). IF NOT EXISTS: a changed definition needs a DROP first.
-- -----------------------------------------------------------------------------------------------------
CREATE MATERIALIZED VIEW IF NOT EXISTS user_statistics AS
SELECT
    p.id AS user_id,
    p.full_name,
    COUNT(DISTINCT c.id) AS total_conversations,
    SUM(c.duration_seconds) / 60 AS total_minutes,
    COUNT(DISTINCT (c.created_at AT TIME ZONE 'UTC')::date) AS active_days,
    MAX(c.created_at) AS last_active,
    COALESCE(s.plan_type, 'free') AS plan_type
FROM profiles p
LEFT JOIN conversations c ON p.id = c.user_id
LEFT JOIN subscriptions s ON p.id = s.user_id
GROUP BY p.id, p.full_name, s.plan_type
WITH DATA;

CREATE UNIQUE INDEX IF NOT EXISTS idx_user_statistics_user_id ON user_statistics (user_id);

-- Refresh without blocking readers (maintenance.refresh_materialized_views). Populates normally the one
-- time the view is unpopulated (e.g. restored WITH NO DATA), which CONCURRENTLY refuses.
-- SECURITY DEFINER because only the owner may refresh; EXECUTE is limited to the backend (section 8).
CREATE OR REPLACE FUNCTION refresh_user_statistics()
RETURNS VOID
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    IF (SELECT relispopulated FROM pg_class WHERE oid = 'public.user_statistics'::regclass) THEN
        REFRESH MATERIALIZED VIEW CONCURRENTLY public.user_statistics;
    ELSE
        REFRESH MATERIALIZED VIEW public.user_statistics;
    END IF;
END;
$$;


-- -----------------------------------------------------------------------------------------------------
-- 7. Row-level security
-- Seed defects: RLS was enabled on tables without any policy, and off for language_settings,
-- conversation_scripts and audit_logs; the admin policy trusted raw_user_meta_data; policies had no
-- WITH CHECK, so USING was the only guard. Now: RLS on every table; each user-facing table has
-- policies for role `authenticated` limited to the caller's rows, with WITH CHECK so nobody can write
-- rows owned by someone else; admins (private.is_admin(), from raw_app_meta_data) reach all rows; `anon`
-- has no policy and sees nothing.
-- As Supabase's linter (splinter) asks: one permissive policy per table, role and command, the caller's
-- rows OR an admin in one expression (lint multiple_permissive_policies: every permissive policy that
-- applies is evaluated for every row); auth.uid() and private.is_admin() wrapped in (SELECT ...), so each
-- is evaluated once per statement, not per row (lint auth_rls_initplan).
-- The worker connects as the tables' owner (or service_role, which has BYPASSRLS) and is not filtered.
-- -----------------------------------------------------------------------------------------------------
ALTER TABLE profiles ENABLE ROW LEVEL SECURITY;
ALTER TABLE language_settings ENABLE ROW LEVEL SECURITY;
ALTER TABLE conversations ENABLE ROW LEVEL SECURITY;
ALTER TABLE messages ENABLE ROW LEVEL SECURITY;
-- a partition read directly skips the parent's policies: RLS on, no policy, no privileges
ALTER TABLE messages_default ENABLE ROW LEVEL SECURITY;
ALTER TABLE conversation_scripts ENABLE ROW LEVEL SECURITY;
ALTER TABLE subscriptions ENABLE ROW LEVEL SECURITY;
ALTER TABLE usage_tracking ENABLE ROW LEVEL SECURITY;
ALTER TABLE learning_progress ENABLE ROW LEVEL SECURITY;
ALTER TABLE achievements ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_logs ENABLE ROW LEVEL SECURITY;
-- Worker tables: RLS on and no policy at all (deny by default, on top of the revoked privileges).
ALTER TABLE usage_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE usage_hour_conversations ENABLE ROW LEVEL SECURITY;
ALTER TABLE stripe_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE stripe_subscriptions ENABLE ROW LEVEL SECURITY;
ALTER TABLE stripe_reconcile_runs ENABLE ROW LEVEL SECURITY;
ALTER TABLE dead_letters ENABLE ROW LEVEL SECURITY;
ALTER TABLE usage_periods ENABLE ROW LEVEL SECURITY;
ALTER TABLE usage_alerts ENABLE ROW LEVEL SECURITY;
ALTER TABLE maintenance_runs ENABLE ROW LEVEL SECURITY;
ALTER TABLE live_sessions ENABLE ROW LEVEL SECURITY;

-- The policies of the user-facing tables are this file's alone: all of them are dropped and created
-- again, so a re-run also removes those of earlier versions (e.g. the separate admin policies).
DO $drop_policies$
DECLARE
    v_policy RECORD;
BEGIN
    FOR v_policy IN
        SELECT policyname, tablename FROM pg_catalog.pg_policies
        WHERE schemaname = 'public' AND tablename = ANY (ARRAY[
            'profiles', 'language_settings', 'conversations', 'messages', 'conversation_scripts',
            'subscriptions', 'usage_tracking', 'learning_progress', 'achievements', 'audit_logs'
        ])
    LOOP
        EXECUTE format('DROP POLICY %I ON public.%I', v_policy.policyname, v_policy.tablename);
    END LOOP;
END
$drop_policies$;

-- profiles: own profile (seed policy, now with WITH CHECK and only for signed-in users)
CREATE POLICY "Users can CRUD own profile, admins all" ON profiles
    FOR ALL TO authenticated
    USING (id = (SELECT auth.uid()) OR (SELECT private.is_admin()))
    WITH CHECK (id = (SELECT auth.uid()) OR (SELECT private.is_admin()));

-- language_settings (seed: RLS off)
CREATE POLICY "Users can CRUD own language settings, admins all" ON language_settings
    FOR ALL TO authenticated
    USING (user_id = (SELECT auth.uid()) OR (SELECT private.is_admin()))
    WITH CHECK (user_id = (SELECT auth.uid()) OR (SELECT private.is_admin()));

CREATE POLICY "Users can CRUD own conversations, admins all" ON conversations
    FOR ALL TO authenticated
    USING (user_id = (SELECT auth.uid()) OR (SELECT private.is_admin()))
    WITH CHECK (user_id = (SELECT auth.uid()) OR (SELECT private.is_admin()));

-- messages: the row is the caller's AND so is its conversation. The seed checked the conversation only,
-- so a user could write messages in their conversation in someone else's name (user_id).
CREATE POLICY "Users can CRUD own messages, admins all" ON messages
    FOR ALL TO authenticated
    USING (
        (
            user_id = (SELECT auth.uid())
            AND EXISTS (
                SELECT 1 FROM conversations c
                WHERE c.id = messages.conversation_id AND c.user_id = (SELECT auth.uid())
            )
        )
        OR (SELECT private.is_admin())
    )
    WITH CHECK (
        (
            user_id = (SELECT auth.uid())
            AND EXISTS (
                SELECT 1 FROM conversations c
                WHERE c.id = messages.conversation_id AND c.user_id = (SELECT auth.uid())
            )
        )
        OR (SELECT private.is_admin())
    );

CREATE POLICY "Users can CRUD own learning progress, admins all" ON learning_progress
    FOR ALL TO authenticated
    USING (user_id = (SELECT auth.uid()) OR (SELECT private.is_admin()))
    WITH CHECK (user_id = (SELECT auth.uid()) OR (SELECT private.is_admin()));

-- conversation_scripts (seed: RLS off): the shared catalogue is readable by every signed-in user; only
-- its author (created_by = caller) or an admin writes a script.
CREATE POLICY "Authenticated users can read scripts" ON conversation_scripts
    FOR SELECT TO authenticated
    USING (true);
CREATE POLICY "Users can create own scripts, admins all" ON conversation_scripts
    FOR INSERT TO authenticated
    WITH CHECK (created_by = (SELECT auth.uid()) OR (SELECT private.is_admin()));
CREATE POLICY "Users can update own scripts, admins all" ON conversation_scripts
    FOR UPDATE TO authenticated
    USING (created_by = (SELECT auth.uid()) OR (SELECT private.is_admin()))
    WITH CHECK (created_by = (SELECT auth.uid()) OR (SELECT private.is_admin()));
CREATE POLICY "Users can delete own scripts, admins all" ON conversation_scripts
    FOR DELETE TO authenticated
    USING (created_by = (SELECT auth.uid()) OR (SELECT private.is_admin()));

-- Read-only for users: written by the worker (billing, metering) or by SECURITY DEFINER triggers.
-- Admins read and write every row.
CREATE POLICY "Users can view own subscription, admins all" ON subscriptions
    FOR SELECT TO authenticated
    USING (user_id = (SELECT auth.uid()) OR (SELECT private.is_admin()));

CREATE POLICY "Users can view own usage, admins all" ON usage_tracking
    FOR SELECT TO authenticated
    USING (user_id = (SELECT auth.uid()) OR (SELECT private.is_admin()));

CREATE POLICY "Users can view own achievements, admins all" ON achievements
    FOR SELECT TO authenticated
    USING (user_id = (SELECT auth.uid()) OR (SELECT private.is_admin()));

DO $admin_writes$
DECLARE
    v_table TEXT;
BEGIN
    FOREACH v_table IN ARRAY ARRAY['subscriptions', 'usage_tracking', 'achievements'] LOOP
        EXECUTE format(
            'CREATE POLICY "Admins can insert" ON public.%I FOR INSERT TO authenticated'
            ' WITH CHECK ((SELECT private.is_admin()))',
            v_table
        );
        EXECUTE format(
            'CREATE POLICY "Admins can update" ON public.%I FOR UPDATE TO authenticated'
            ' USING ((SELECT private.is_admin())) WITH CHECK ((SELECT private.is_admin()))',
            v_table
        );
        EXECUTE format(
            'CREATE POLICY "Admins can delete" ON public.%I FOR DELETE TO authenticated'
            ' USING ((SELECT private.is_admin()))',
            v_table
        );
    END LOOP;
END
$admin_writes$;

-- audit_logs (seed: RLS off, so every user read everyone's trail). Read-only even for admins: a trail
-- that its readers can edit is no trail.
CREATE POLICY "Users can view own audit logs, admins all" ON audit_logs
    FOR SELECT TO authenticated
    USING (user_id = (SELECT auth.uid()) OR (SELECT private.is_admin()));


-- -----------------------------------------------------------------------------------------------------
-- 8. Privileges, the way Supabase sets them up
-- User-facing tables: anon and authenticated get the table privileges and RLS does the filtering
-- (Supabase's default privileges grant them anyway). TRUNCATE, REFERENCES and TRIGGER are taken away:
-- TRUNCATE ignores RLS and would let any user empty a table.
-- Worker tables, partitions and the statistics view: nothing for anon and authenticated (a materialized
-- view has no RLS, and user_statistics holds every user's name and totals).
-- service_role (the backend's key on Supabase, BYPASSRLS) gets everything.
-- -----------------------------------------------------------------------------------------------------
GRANT SELECT, INSERT, UPDATE, DELETE ON
    profiles, language_settings, conversations, messages, conversation_scripts, subscriptions,
    usage_tracking, learning_progress, achievements, audit_logs
    TO anon, authenticated;
REVOKE TRUNCATE, REFERENCES, TRIGGER ON
    profiles, language_settings, conversations, messages, conversation_scripts, subscriptions,
    usage_tracking, learning_progress, achievements, audit_logs
    FROM anon, authenticated;

REVOKE ALL ON
    messages_default, usage_events, usage_hour_conversations, stripe_events, stripe_subscriptions,
    stripe_reconcile_runs, dead_letters, usage_periods, usage_alerts, maintenance_runs, live_sessions,
    user_statistics
    FROM anon, authenticated;

GRANT ALL ON
    profiles, language_settings, conversations, messages, messages_default, conversation_scripts,
    subscriptions, usage_tracking, learning_progress, achievements, audit_logs,
    usage_events, usage_hour_conversations, stripe_events, stripe_subscriptions, stripe_reconcile_runs,
    dead_letters, usage_periods, usage_alerts, maintenance_runs, live_sessions
    TO service_role;
GRANT SELECT ON user_statistics TO service_role;

-- Identity sequences of the worker tables (Supabase's default privileges grant sequences to end users).
REVOKE ALL ON SEQUENCE dead_letters_id_seq, usage_periods_id_seq, usage_alerts_id_seq
    FROM anon, authenticated;
GRANT ALL ON SEQUENCE dead_letters_id_seq, usage_periods_id_seq, usage_alerts_id_seq TO service_role;

-- Functions: PostgreSQL grants EXECUTE on a new function to PUBLIC, Supabase's default privileges grant it
-- to anon and authenticated too (in schema public), and PostgREST serves whatever they may execute as an
-- RPC (/rest/v1/rpc/<name>). So EXECUTE is taken from all three on every function of this file, after it
-- is created, and given back only where needed. Trigger functions need no EXECUTE to fire (it is checked
-- when a trigger is created), so no client gets it: calling them directly only fails, and the SECURITY
-- DEFINER ones would be RPC endpoints with their owner's rights. The backend (service_role) gets them all.
DO $function_privileges$
DECLARE
    v_function REGPROCEDURE;
BEGIN
    FOREACH v_function IN ARRAY ARRAY[
        'update_updated_at()', 'private.is_admin()', 'is_admin()', 'jsonb_sum_merge(JSONB, JSONB)',
        'worker_timezone(TEXT)', 'calendar_month_start(TIMESTAMPTZ, TEXT)',
        'next_period_end(TIMESTAMPTZ, TEXT, BOOLEAN)', 'previous_period_start(TIMESTAMPTZ, TEXT, BOOLEAN)',
        'ledger_ms(UUID, TIMESTAMPTZ, TIMESTAMPTZ, INTERVAL)',
        'update_learning_progress()', 'check_achievements()',
        'audit_trigger()', 'delete_usage_of_profiles()', 'encrypt_audio_url(TEXT)', 'decrypt_audio_url(TEXT)',
        'create_monthly_partition(DATE)', 'refresh_user_statistics()'
    ]::REGPROCEDURE[] LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC, anon, authenticated', v_function);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', v_function);
    END LOOP;
END
$function_privileges$;
-- Signed-in users: their policies call private.is_admin() with their privileges, and the app may ask
-- is_admin() whether the user is an admin.
GRANT EXECUTE ON FUNCTION private.is_admin(), is_admin() TO authenticated;
