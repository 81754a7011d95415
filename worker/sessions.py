"""Live sessions: microphone time granted before it is used, so a limit holds while the learner is talking.

An app server starts a session, then reports the session's total usage every few seconds (a heartbeat) and
once more at the end. Each answer is a grant: how many more seconds the session may use from now, at most
SESSION_GRANT_SECONDS. The seconds granted to all open sessions of a user never add up to more than the
user's remaining seconds (limit − used in the period of `now`), however many sessions start or beat at once
from however many processes. A session silent longer than SESSION_TTL_SECONDS expires and its grant returns.
(A prepaid phone line works alike: RFC 4006 reserves units, hears what was used, reserves again.)

Usage. What a call reports beyond the session's total so far is recorded in the call's transaction through
the metering path (`metering.pipeline.apply_events`), as ordinary usage events whose ids are the session and the
offset the report starts at (`session:<id>:<offset ms>`), so ledger, hours, periods and alerts stay exact
and a total recorded once is never recorded again. The events cover the time the usage happened: the
growth ends at `now`, or starts where the previous report's events ended if it would overlap them. The
session row is locked for the call, so heartbeats of one session serialise; a repeated or retried call
finds its total recorded and records nothing, and an older total arriving after a newer one changes
nothing. Usage beyond the grant the session held is recorded all the same, and counted on the session
(`beyond_grant_ms`, and `beyond_grant_seconds` in every answer). A total may grow by at most the time since
the previous report's events ended, plus USAGE_MAX_FUTURE_SECONDS for clocks that disagree.

The reservation. Each user has a hash in Redis (cache.live_grants_key): the period it counts for, the
limit, `used` (the highest usage of that period seen by any call), and one entry per open session (what it
holds); HELD is their sum. One Lua script (RESERVE) decides every grant atomically:

    grant = clamp(min(SESSION_GRANT_SECONDS, limit − used − own − others), 0)

where `own` is the part of this call's new usage in the period (RESERVE runs before the call writes it) and
`others` what the user's other sessions hold. PostgreSQL is the truth: each session row holds its committed
grant, and the hash is rebuilt from the rows when Redis loses it. Why the two never let a user be granted
more than remains:

1. The usage a call reads may be stale (another session's report committed just after the read). `used`
   in Redis only ever takes the maximum of what calls read (usage only grows within a period), and a
   call's new usage sits in its own entry until that usage is committed and `used` has absorbed it. So at
   every moment Redis counts every committed second of session usage in `used` or in an entry, and every
   granted second in an entry.
2. The window between RESERVE and the commit. RESERVE writes the entry as pending, worth
   max(own + grant, previous grant) (an end grants 0): enough if the transaction commits (its usage and
   the new grant) and if it rolls back (the grant the app still holds). After the commit, SETTLE (a
   compare-and-set on the call's token) brings the entry down to the grant and raises `used` by the
   usage. A lost SETTLE (the process died) leaves the larger pending value: conservative, and replaced at
   the session's next call; a closed session's entry goes at the user's next call, which drops the
   entries of sessions closed lately. A start that rolls back has its reservation removed again (best
   effort: a process killed at that instant leaves it behind until the user's next rebuild; it only ever
   holds back, never over-grants).
3. Redis flushed or restarted. Every call holds a shared per-user advisory lock in PostgreSQL from before
   RESERVE until its commit; a rebuild takes it exclusively, so it waits for calls in flight to commit or
   roll back and reads only settled truth: the committed grants of the open sessions and the usage of
   the period. RESERVE refuses to work on a hash that is missing (or marked stale, or holds less for a
   session than its committed grant: Redis restored from an older state): the call rolls back, the user's
   hash is rebuilt, and the call runs again. Each rebuild writes a new epoch; a SETTLE of a call that
   reserved before the rebuild finds another epoch (or token) and changes nothing, so a reservation is
   neither counted twice nor lost.
4. Plan and period changes. `quota.invalidate` (called after every Stripe plan change and usage
   correction) marks the hash stale, so the next call rebuilds it under the new limit: an upgrade grants
   more at the next heartbeat, a cancellation to free shrinks the grants (sessions already holding more
   than is left keep it until their next heartbeat, which grants what remains). A call whose period is
   later than the hash's (a reset, or `now` past the period's end) starts the new period's count with the
   entries carried over: what sessions were granted before the boundary may be used after it. A call that
   read an earlier period than the hash holds runs again.

Limits of the argument: usage sent as ordinary events while sessions are open is not reserved for (it
reaches `used` at the next call), and a Redis restored from an older state is caught only session by
session, at each session's next call. A start repeated after a lost answer opens a second session, whose
grant returns after the TTL.

Locks: a call takes the user's advisory lock (shared), then its session row, with every wait bounded by
lock_timeout. RESERVE, one Redis round trip (2 s socket timeout), runs while the call holds that row: the
price of reserving before committing; it comes before the usage is written, so the user's usage rows
(which metering batches also lock) are not held meanwhile. A Redis that does not answer fails the call,
which rolls back (HTTP 503).

All calls take a connection of `db.transaction()` and an explicit `now`; what follows their commit (the
settling of the reservation, quotas published) is registered with `db.after_commit`, and the undoing of a
reservation whose call rolls back with `db.after_rollback`. `run` runs a call in a transaction of its own,
rebuilding and retrying when Redis lost the reservation.
"""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker import db, quota
from worker.cache import HELD, live_grants_key, redis_client
from worker.config import settings
from worker.dead_letters import Rejected
from worker.errors import Invalid
from worker.logs import get_logger
from worker.metering import events, pipeline

log = get_logger(__name__)

LOCK_CLASS = 0x77736C73  # first key of the per-user reservation advisory locks: "wsls"
LOCK_TIMEOUT_MS = 5000  # no call of a session waits longer than this for a lock
MAX_ATTEMPTS = 4  # a call rebuilt or re-read this often in a row gives up (Redis keeps losing the hash)
EXPIRE_BATCH = 1000  # silent sessions ended per sessions.expire transaction


class UnknownSession(LookupError):
    """No session has this id."""


class BadInput(Invalid):
    """A session's labels or a reported total that cannot be used as they are; `reason` says why."""


class ReservationLost(Exception):
    """Redis does not hold the user's reservation as PostgreSQL has it: rebuild, then run the call again."""

    def __init__(self, user_id: str, now: datetime) -> None:
        super().__init__(f"the live-session reservation of user {user_id} must be rebuilt")
        self.user_id = user_id
        self.now = now


@dataclass(frozen=True)
class Grant:
    """The answer to a start or a heartbeat of an open session."""

    session_id: str
    granted_ms: int  # may use this much more from now
    expires_at: datetime  # silent until then: expired
    remaining_ms: int  # of the user's period, neither used nor held by any session (this grant included)
    blocked: bool  # the user's usage has reached the limit
    used_ms: int  # the session's total, recorded
    beyond_grant_ms: int  # of that total, reported past the grants the session held


@dataclass(frozen=True)
class Closed:
    """The answer about a session that is over: to an end, or to a heartbeat that came too late (409)."""

    session_id: str
    state: str  # ended (by the app) or expired (silent longer than SESSION_TTL_SECONDS)
    recorded_ms: int  # the session's total, recorded
    beyond_grant_ms: int
    ended_at: datetime


Call = Callable[[Connection], "Grant | Closed"]  # one of the calls below with its arguments bound


# -- the reservation in Redis ------------------------------------------------------------------------------
#
# Hash fields: epoch, period (start, epoch ms), limit, used, held (ms); per session g:<id> (its grant) and,
# while a call on it is uncommitted, p:<id> = "<token>:<extra>" (the entry is worth grant + extra).

_LUA_ENTRY = """
local function entry(key, sid)
  local grant = tonumber(redis.call('HGET', key, 'g:' .. sid) or '-1')
  if grant < 0 then return nil, nil end
  local pending = redis.call('HGET', key, 'p:' .. sid)
  if not pending then return grant, nil end
  local colon = string.find(pending, ':', 1, true)
  return grant + tonumber(string.sub(pending, colon + 1)), string.sub(pending, 1, colon - 1)
end
local function drop(key, sid)
  local worth = entry(key, sid)
  if worth then
    redis.call('HINCRBY', key, 'held', 0 - worth)  -- not -worth: Redis refuses the -0 that makes
    redis.call('HDEL', key, 'g:' .. sid, 'p:' .. sid)
  end
end
"""

# KEYS[1]: the user's hash. ARGV: session id, token, mode (start, beat or end), period start, limit, base
# (committed usage of the period), own (this call's usage in the period), previous grant (committed), cap,
# ttl, count of closed sessions, their ids (closed for good: dropped now), then the ids of sessions this
# call expires (not counted: their release is final once the call commits).
# Returns {'ok', grant, others, epoch}, {'rebuild'} or {'stale'}.
_RESERVE = (
    _LUA_ENTRY
    + """
local key = KEYS[1]
local sid, token, mode = ARGV[1], ARGV[2], ARGV[3]
local period, limit, base, own = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local prev, cap, ttl, closed = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local epoch = redis.call('HGET', key, 'epoch')
if not epoch or redis.call('HEXISTS', key, 'stale') == 1 then return {'rebuild'} end
local known = tonumber(redis.call('HGET', key, 'period'))
if period < known then return {'stale'} end
if period > known then
  redis.call('HSET', key, 'period', period, 'limit', limit, 'used', base)
elseif tonumber(redis.call('HGET', key, 'limit')) ~= limit then
  return {'rebuild'}
end
for i = 12, 11 + closed do drop(key, ARGV[i]) end
local worth = entry(key, sid)
if mode == 'start' then
  if worth then return {'rebuild'} end
  worth = 0
elseif not worth or worth < prev then
  return {'rebuild'}
end
local expiring = 0
for i = 12 + closed, #ARGV do expiring = expiring + (entry(key, ARGV[i]) or 0) end
local used = math.max(tonumber(redis.call('HGET', key, 'used')), base)
local others = tonumber(redis.call('HGET', key, 'held')) - worth - expiring
local grant = 0
if mode ~= 'end' then grant = math.max(0, math.min(cap, limit - used - own - others)) end
local pending = math.max(own + grant, prev)
redis.call('HSET', key, 'used', used, 'g:' .. sid, grant, 'p:' .. sid, token .. ':' .. (pending - grant))
redis.call('HINCRBY', key, 'held', pending - worth)
redis.call('EXPIRE', key, ttl)
return {'ok', grant, others, epoch}
"""
)

# After the commit. KEYS[1]; ARGV: session id, token, epoch, period start, usage of the period after the
# call, 1 when the session is now closed, then the ids of sessions the call expired.
_SETTLE = (
    _LUA_ENTRY
    + """
local key = KEYS[1]
local sid, token, epoch = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HGET', key, 'epoch') ~= epoch then return 0 end
if tonumber(redis.call('HGET', key, 'period')) == tonumber(ARGV[4]) then
  redis.call('HSET', key, 'used', math.max(tonumber(redis.call('HGET', key, 'used')), tonumber(ARGV[5])))
end
for i = 7, #ARGV do drop(key, ARGV[i]) end
local worth, owner = entry(key, sid)
if ARGV[6] == '1' then
  drop(key, sid)
elseif owner == token then
  local grant = tonumber(redis.call('HGET', key, 'g:' .. sid))
  redis.call('HINCRBY', key, 'held', grant - worth)
  redis.call('HDEL', key, 'p:' .. sid)
end
return 1
"""
)

# Sessions closed for good (expired, or a start rolled back): KEYS[1]; ARGV: the token of the call that
# must own a pending entry for it to go ('' for any), then session ids.
_RELEASE = (
    _LUA_ENTRY
    + """
local key = KEYS[1]
for i = 2, #ARGV do
  local _, owner = entry(key, ARGV[i])
  if ARGV[1] == '' or owner == ARGV[1] then drop(key, ARGV[i]) end
end
return 1
"""
)

# KEYS[1]; ARGV: epoch, period start, limit, used, ttl, then (session id, grant) pairs.
_INSTALL = """
local key = KEYS[1]
redis.call('DEL', key)
local held = 0
for i = 6, #ARGV, 2 do
  redis.call('HSET', key, 'g:' .. ARGV[i], ARGV[i + 1])
  held = held + tonumber(ARGV[i + 1])
end
redis.call('HSET', key, 'epoch', ARGV[1], 'period', ARGV[2], 'limit', ARGV[3], 'used', ARGV[4], 'held', held)
redis.call('EXPIRE', key, tonumber(ARGV[5]))
return held
"""


def _script(source: str) -> Any:
    return redis_client().register_script(source)


def _hash_ttl() -> int:
    """Seconds a user's hash outlives their last call: by then every session of theirs is silent."""
    config = settings()
    return 2 * config.session_ttl_seconds + config.session_grant_seconds


def _ms(moment: datetime) -> int:
    return events.to_ms(moment)


# -- reading and locking -----------------------------------------------------------------------------------

_SET_LOCK_TIMEOUT = sa.text("SELECT set_config('lock_timeout', :value, true)")
_SHARED_LOCK = sa.text("SELECT pg_advisory_xact_lock_shared(:lock_class, hashtext(:user_id))")
_EXCLUSIVE_LOCK = sa.text("SELECT pg_advisory_xact_lock(:lock_class, hashtext(:user_id))")

_SESSION_USER = sa.text("SELECT user_id::text FROM live_sessions WHERE session_id = :session_id")
_LOCK_SESSION = sa.text(
    """
    SELECT session_id::text, user_id::text, language, conversation_id::text, feature, state, started_at,
           last_seen_at, reported_ms, recorded_until, granted_ms, beyond_grant_ms, ended_at
    FROM live_sessions WHERE session_id = :session_id FOR UPDATE
    """
)

# The user's other sessions silent longer than the TTL end now (rows another call holds are left to it);
# and the sessions that closed lately, whose reservations a lost release may have left behind in Redis.
_EXPIRE_SILENT_OF_USER = sa.text(
    """
    WITH expired AS (
        UPDATE live_sessions SET state = 'expired', granted_ms = 0, ended_at = :now
        WHERE session_id IN (
            SELECT session_id FROM live_sessions
            WHERE user_id = :user_id AND state = 'open' AND last_seen_at < :silent_before
              AND session_id IS DISTINCT FROM CAST(:session_id AS uuid)
            ORDER BY session_id FOR UPDATE SKIP LOCKED
        )
        RETURNING session_id
    )
    SELECT session_id::text, true AS now_expired FROM expired
    UNION ALL
    (SELECT session_id::text, false FROM live_sessions
     WHERE user_id = :user_id AND state <> 'open' AND ended_at >= :closed_since
     ORDER BY ended_at DESC LIMIT 100)
    """
)


def _begin(conn: Connection, user_id: str) -> None:
    """Bound this transaction's lock waits and take the user's reservation lock, shared."""
    conn.execute(_SET_LOCK_TIMEOUT, {"value": f"{LOCK_TIMEOUT_MS}ms"})
    conn.execute(_SHARED_LOCK, {"lock_class": LOCK_CLASS, "user_id": user_id})


@dataclass(frozen=True)
class _Neighbours:
    expired: list[str]  # silent sessions this call ends
    closed: list[str]  # sessions closed before this call


def _neighbours(conn: Connection, user_id: str, session_id: str | None, now: datetime) -> _Neighbours:
    """Read before the call reads the usage: RESERVE drops the entries of the sessions closed lately, and an
    entry still pending holds the closed session's last usage, which `used` must then already have (the
    usage read after it includes what every session closed before it recorded)."""
    config = settings()
    rows = conn.execute(
        _EXPIRE_SILENT_OF_USER,
        {
            "user_id": user_id,
            "session_id": session_id,
            "now": now,
            "silent_before": now - timedelta(seconds=config.session_ttl_seconds),
            "closed_since": now - timedelta(seconds=_hash_ttl()),
        },
    ).all()
    if any(row.now_expired for row in rows):
        log.info("live_sessions_expired", user_id=user_id, session_ids=[row[0] for row in rows if row.now_expired])
    return _Neighbours([row[0] for row in rows if row.now_expired], [row[0] for row in rows if not row.now_expired])


def _is_silent(row: Any, now: datetime) -> bool:
    return now - row.last_seen_at > timedelta(seconds=settings().session_ttl_seconds)


# -- the reservation calls ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PeriodUse:
    """The user's period at the call's `now`: its limit, its usage committed before the call, and what the
    call's own report adds to it."""

    start_ms: int
    limit_ms: int
    used_ms: int
    own_ms: int

    @property
    def after_ms(self) -> int:
        return self.used_ms + self.own_ms


def _period_use(conn: Connection, user_id: str, now: datetime, usage: _Usage | None = None) -> _PeriodUse | None:
    period = quota.usage_of(conn, user_id, now)
    if period is None:
        return None
    start_ms, end_ms = _ms(period.period_start), _ms(period.period_end)
    own = max(0, min(usage.end_ms, end_ms) - max(usage.start_ms, start_ms)) if usage else 0
    return _PeriodUse(start_ms, period.limit_ms, period.used_ms, own)


@dataclass(frozen=True)
class _Reserved:
    grant_ms: int
    others_ms: int
    epoch: str
    token: str


def _reserve(
    user_id: str, session_id: str, mode: str, use: _PeriodUse, previous_ms: int, neighbours: _Neighbours, now: datetime
) -> _Reserved:
    token = uuid.uuid4().hex
    args = [session_id, token, mode, use.start_ms, use.limit_ms, use.used_ms, use.own_ms, previous_ms,
            settings().session_grant_seconds * 1000, _hash_ttl(), len(neighbours.closed), *neighbours.closed,
            *neighbours.expired]  # fmt: skip
    answer = _script(_RESERVE)(keys=[live_grants_key(user_id)], args=args)
    if answer[0] == "rebuild":
        raise ReservationLost(user_id, now)
    if answer[0] == "stale":
        raise db.StaleRead(f"the period of user {user_id} moved while a session call was being applied")
    return _Reserved(int(answer[1]), int(answer[2]), answer[3], token)


def _settle(
    user_id: str, session_id: str, reserved: _Reserved, use: _PeriodUse, closed: bool, expired: list[str]
) -> None:
    args = [session_id, reserved.token, reserved.epoch, use.start_ms, use.after_ms, int(closed), *expired]
    try:
        _script(_SETTLE)(keys=[live_grants_key(user_id)], args=args)
    except redis.RedisError as exc:  # the pending entry stays: it holds back more than needed, never less
        log.warning("live_session_settle_failed", user_id=user_id, session_id=session_id, error=str(exc))


def _release(user_id: str, session_ids: list[str], token: str = "") -> None:
    if not session_ids:
        return
    try:
        _script(_RELEASE)(keys=[live_grants_key(user_id)], args=[token, *session_ids])
    except redis.RedisError as exc:  # cleared by the user's next call (closed sessions are dropped there)
        log.warning("live_session_release_failed", user_id=user_id, session_ids=session_ids, error=str(exc))


_OPEN_GRANTS = sa.text(
    """
    SELECT session_id::text, granted_ms FROM live_sessions
    WHERE user_id = :user_id AND state = 'open' ORDER BY session_id
    """
)


def rebuild(user_id: str, now: datetime) -> int:
    """Write the user's reservation afresh from PostgreSQL: the committed grants of their open sessions and
    their usage in the period of `now`, under the user's reservation lock taken exclusively (so no call is
    between its reservation and its commit). Returns the milliseconds held."""
    with db.transaction() as conn:
        conn.execute(_SET_LOCK_TIMEOUT, {"value": f"{LOCK_TIMEOUT_MS}ms"})
        conn.execute(_EXCLUSIVE_LOCK, {"lock_class": LOCK_CLASS, "user_id": user_id})
        usage = quota.usage_of(conn, user_id, now)
        if usage is None:
            return 0
        grants = conn.execute(_OPEN_GRANTS, {"user_id": user_id}).all()
        args = [uuid.uuid4().hex, _ms(usage.period_start), usage.limit_ms, usage.used_ms, _hash_ttl()]
        for session_id, granted_ms in grants:
            args += [session_id, granted_ms]
        held = _script(_INSTALL)(keys=[live_grants_key(user_id)], args=args)
    log.info("live_grants_rebuilt", user_id=user_id, sessions=len(grants), held_ms=held)
    return int(held)


def held_ms(user_id: str) -> int | None:
    """What Redis says the user's open sessions hold (None when it holds no reservation for them)."""
    value = redis_client().hget(live_grants_key(user_id), HELD)
    return None if value is None else int(value)


# -- reports -----------------------------------------------------------------------------------------------


def total_ms(used_seconds: Any) -> int:
    """A reported total in milliseconds (a JSON number of seconds, >= 0); BadInput otherwise."""
    if isinstance(used_seconds, bool) or not isinstance(used_seconds, (int, float)):
        raise BadInput(f"used_seconds must be a number, got {type(used_seconds).__name__}")
    if not math.isfinite(used_seconds) or used_seconds < 0:
        raise BadInput(f"used_seconds must be a finite number >= 0, got {used_seconds}")
    return round(used_seconds * 1000)


@dataclass(frozen=True)
class _Usage:
    events: list[dict]
    start_ms: int
    end_ms: int


def _usage_events(row: Any, growth_ms: int, now: datetime) -> _Usage:
    """The session's growth as usage events: ending at `now`, or starting where its last events ended if it
    would overlap them; split in events of at most USAGE_MAX_EVENT_SECONDS."""
    config = settings()
    now_ms, recorded_ms = _ms(now), _ms(row.recorded_until)
    start_ms = max(now_ms - growth_ms, recorded_ms)
    if start_ms + growth_ms > now_ms + config.usage_max_future_seconds * 1000:
        elapsed = (now_ms - recorded_ms) / 1000
        raise BadInput(
            f"used_seconds grew by {growth_ms / 1000} s, more than the {elapsed} s since the session's last "
            f"report ended allow (plus USAGE_MAX_FUTURE_SECONDS={config.usage_max_future_seconds} s)"
        )
    pieces: list[dict[str, Any]] = []
    at, offset, left = start_ms, row.reported_ms, growth_ms
    while left:
        piece = min(left, config.usage_max_event_seconds * 1000)
        pieces.append({
            "event_id": f"session:{row.session_id}:{offset}",
            "user_id": row.user_id,
            "started_at": events.to_datetime(at).isoformat(),
            "seconds": piece / 1000,
            "language": row.language,
            "conversation_id": row.conversation_id,
            "feature": row.feature,
        })  # fmt: skip
        at, offset, left = at + piece, offset + piece, left - piece
    return _Usage(pieces, start_ms, at)


def _record_usage(conn: Connection, usage: _Usage, now: datetime) -> None:
    """The usage as ordinary events, through the metering path (which publishes the quota after the commit)."""
    outcome = pipeline.apply_events(conn, usage.events, now, dead_letter=False)
    if outcome.rejected:  # e.g. a total that an app ends with long after its session's last report
        raise BadInput(f"the session's usage cannot be recorded: {outcome.rejected[0].reason}")


# -- the calls ---------------------------------------------------------------------------------------------

_INSERT = sa.text(
    """
    INSERT INTO live_sessions (session_id, user_id, language, conversation_id, feature, started_at,
                               last_seen_at, recorded_until, granted_ms)
    VALUES (:session_id, :user_id, :language, :conversation_id, :feature, :now, :now, :now, :granted_ms)
    """
)


def _check_labels(user_id: str, language: str, conversation_id: str | None, feature: str | None, now: datetime) -> str:
    """The session's labels checked as metering checks them on its events (the canonical user id)."""
    probe = {"event_id": "session", "user_id": user_id, "started_at": now.isoformat(), "seconds": 1,
             "language": language, "conversation_id": conversation_id, "feature": feature}  # fmt: skip
    try:
        event = events.parse_event(probe, now)
    except Rejected as exc:
        raise BadInput(exc.reason) from None
    return event.user_id


def start(
    conn: Connection,
    user_id: str,
    language: str,
    now: datetime,
    conversation_id: str | None = None,
    feature: str | None = None,
) -> Grant:
    """Open a session for the user and grant its first seconds. quota.UnknownUser for an unknown user."""
    user_id = _check_labels(user_id, language, conversation_id, feature, now)
    conversation_id = str(uuid.UUID(conversation_id)) if conversation_id is not None else None
    _begin(conn, user_id)
    neighbours = _neighbours(conn, user_id, None, now)
    use = _period_use(conn, user_id, now)
    if use is None:
        raise quota.UnknownUser(f"no user with id {user_id}")
    session_id = str(uuid.uuid4())
    reserved = _reserve(user_id, session_id, "start", use, 0, neighbours, now)
    try:
        conn.execute(
            _INSERT,
            {"session_id": session_id, "user_id": user_id, "language": language, "conversation_id": conversation_id,
             "feature": feature, "now": now, "granted_ms": reserved.grant_ms},
        )  # fmt: skip
    except Exception:
        _release(user_id, [session_id], reserved.token)
        raise
    log.info("live_session_started", user_id=user_id, session_id=session_id, granted_ms=reserved.grant_ms)
    db.after_commit(conn, lambda: _settle(user_id, session_id, reserved, use, False, neighbours.expired))
    db.after_rollback(conn, lambda: _release(user_id, [session_id], reserved.token))  # no such session now
    return _grant(session_id, reserved, use, 0, 0, now)


def _grant(session_id: str, reserved: _Reserved, use: _PeriodUse, used_ms: int, beyond_ms: int, now: datetime) -> Grant:
    remaining = use.limit_ms - use.after_ms - reserved.others_ms - reserved.grant_ms
    return Grant(
        session_id=session_id,
        granted_ms=reserved.grant_ms,
        expires_at=now + timedelta(seconds=settings().session_ttl_seconds),
        remaining_ms=max(remaining, 0),
        blocked=use.after_ms >= use.limit_ms,
        used_ms=used_ms,
        beyond_grant_ms=beyond_ms,
    )


def _closed(row: Any) -> Closed:
    return Closed(row.session_id, row.state, row.reported_ms, row.beyond_grant_ms, row.ended_at)


_CLOSE = sa.text(
    """
    UPDATE live_sessions SET state = :state, granted_ms = 0, ended_at = :now
    WHERE session_id = :session_id
    RETURNING session_id::text, state, reported_ms, beyond_grant_ms, ended_at
    """
)


def _expire_row(conn: Connection, row: Any, now: datetime) -> Any:
    closed = conn.execute(_CLOSE, {"session_id": row.session_id, "state": "expired", "now": now}).one()
    log.info("live_sessions_expired", user_id=row.user_id, session_ids=[row.session_id])
    db.after_commit(conn, lambda: _release(row.user_id, [row.session_id]))
    return closed


def _locked_session(conn: Connection, session_id: str) -> Any:
    try:
        session_id = str(uuid.UUID(str(session_id)))
    except ValueError:
        raise UnknownSession(f"no session with id {str(session_id)[:64]!r}") from None
    user_id = conn.execute(_SESSION_USER, {"session_id": session_id}).scalar()
    if user_id is None:
        raise UnknownSession(f"no session with id {session_id}")
    _begin(conn, user_id)
    row = conn.execute(_LOCK_SESSION, {"session_id": session_id}).first()
    if row is None:  # its user was deleted meanwhile, and with them their sessions
        raise UnknownSession(f"no session with id {session_id}")
    return row


_REPORT = sa.text(
    """
    UPDATE live_sessions
    SET last_seen_at = :now, reported_ms = :reported_ms, recorded_until = :recorded_until,
        granted_ms = :granted_ms, beyond_grant_ms = :beyond_grant_ms
    WHERE session_id = :session_id
    """
)


def heartbeat(conn: Connection, session_id: str, used_seconds: Any, now: datetime) -> Grant | Closed:
    """Record the growth of the session's total and grant again. A session that is over (or silent longer
    than the TTL, which ends it now) gets a Closed answer and nothing recorded: its app sends the total to
    `end`, which records it, and starts a new session. An older total than the one recorded changes nothing."""
    reported = total_ms(used_seconds)
    row = _locked_session(conn, session_id)
    if row.state != "open":
        return _closed(row)
    if _is_silent(row, now):
        return _closed(_expire_row(conn, row, now))
    if reported < row.reported_ms:
        return _current(conn, row, now)
    return _report(conn, row, reported, now, closing=False)


def end(conn: Connection, session_id: str, used_seconds: Any, now: datetime) -> Closed:
    """Record the growth of the session's final total and close it, releasing its grant. Ending a session
    that is over records only a total larger than the one recorded (never lost; beyond any grant)."""
    reported = total_ms(used_seconds)
    row = _locked_session(conn, session_id)
    if row.state == "open" and _is_silent(row, now):
        row = _expire_row(conn, row, now)
        row = conn.execute(_LOCK_SESSION, {"session_id": row.session_id}).one()
    if row.state == "open":
        closed = _report(conn, row, reported, now, closing=True)
        assert isinstance(closed, Closed)
        return closed
    if reported > row.reported_ms:
        usage = _usage_events(row, reported - row.reported_ms, now)
        _record_usage(conn, usage, now)
        beyond = row.beyond_grant_ms + reported - row.reported_ms
        conn.execute(_REPORT, {"session_id": row.session_id, "now": row.last_seen_at, "reported_ms": reported,
                               "recorded_until": events.to_datetime(usage.end_ms), "granted_ms": 0,
                               "beyond_grant_ms": beyond})  # fmt: skip
        log.info("live_session_late_total", session_id=row.session_id, recorded_ms=reported, beyond_grant_ms=beyond)
        return Closed(row.session_id, row.state, reported, beyond, row.ended_at)
    return _closed(row)


def _report(conn: Connection, row: Any, reported: int, now: datetime, closing: bool) -> Grant | Closed:
    """Grant again (or close), then record the session's growth, if any. The reservation is made before the
    usage is written, so the call holds only its session row (not the user's usage rows, which metering
    batches write too) while it waits for Redis."""
    growth = max(reported - row.reported_ms, 0)
    reported = row.reported_ms + growth
    usage = _usage_events(row, growth, now) if growth else None
    neighbours = _neighbours(conn, row.user_id, row.session_id, now)
    use = _period_use(conn, row.user_id, now, usage)
    assert use is not None  # the session's user exists: its row is locked
    reserved = _reserve(row.user_id, row.session_id, "end" if closing else "beat", use, row.granted_ms, neighbours, now)
    if usage is not None:
        _record_usage(conn, usage, now)
    beyond = row.beyond_grant_ms + max(growth - row.granted_ms, 0)
    recorded_until = events.to_datetime(usage.end_ms) if usage else row.recorded_until
    conn.execute(_REPORT, {"session_id": row.session_id, "now": now, "reported_ms": reported,
                           "recorded_until": recorded_until, "granted_ms": reserved.grant_ms,
                           "beyond_grant_ms": beyond})  # fmt: skip
    if beyond > row.beyond_grant_ms:
        log.warning("live_session_beyond_grant", session_id=row.session_id, beyond_grant_ms=beyond)
    db.after_commit(conn, lambda: _settle(row.user_id, row.session_id, reserved, use, closing, neighbours.expired))
    if closing:
        closed = conn.execute(_CLOSE, {"session_id": row.session_id, "state": "ended", "now": now}).one()
        log.info("live_session_ended", user_id=row.user_id, session_id=row.session_id, recorded_ms=reported)
        return _closed(closed)
    return _grant(row.session_id, reserved, use, reported, beyond, now)


def _current(conn: Connection, row: Any, now: datetime) -> Grant:
    """The session's standing answer, for a report older than what it recorded (nothing changes)."""
    usage = quota.usage_of(conn, row.user_id, now)
    assert usage is not None  # the session's user exists: its row is locked
    held = held_ms(row.user_id)
    if held is None:
        held = quota.reserved_ms(conn, row.user_id)
    remaining = usage.limit_ms - usage.used_ms - held
    return Grant(
        session_id=row.session_id,
        granted_ms=row.granted_ms,
        expires_at=row.last_seen_at + timedelta(seconds=settings().session_ttl_seconds),
        remaining_ms=max(remaining, 0),
        blocked=usage.used_ms >= usage.limit_ms,
        used_ms=row.reported_ms,
        beyond_grant_ms=row.beyond_grant_ms,
    )


# -- silence -----------------------------------------------------------------------------------------------

_EXPIRE_SILENT = sa.text(
    """
    UPDATE live_sessions SET state = 'expired', granted_ms = 0, ended_at = :now
    WHERE session_id IN (
        SELECT session_id FROM live_sessions
        WHERE state = 'open' AND last_seen_at < :silent_before
        ORDER BY session_id FOR UPDATE SKIP LOCKED LIMIT :batch
    )
    RETURNING user_id::text, session_id::text
    """
)


@dataclass
class Expired:
    by_user: dict[str, list[str]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(map(len, self.by_user.values()))


def expire(conn: Connection, now: datetime) -> Expired:
    """End every open session silent longer than SESSION_TTL_SECONDS at `now` (sessions.expire). What they
    reported is already recorded (each report is, in its own call); their grants return once this commits.
    Rows held by a call in progress are skipped: that call meets the silence itself."""
    silent_before = now - timedelta(seconds=settings().session_ttl_seconds)
    expired = Expired()
    while True:
        rows = conn.execute(_EXPIRE_SILENT, {"now": now, "silent_before": silent_before, "batch": EXPIRE_BATCH}).all()
        for user_id, session_id in rows:
            expired.by_user.setdefault(user_id, []).append(session_id)
        if len(rows) < EXPIRE_BATCH:
            for user_id, session_ids in expired.by_user.items():
                db.after_commit(conn, functools.partial(_release, user_id, session_ids))
            return expired


# -- listing -----------------------------------------------------------------------------------------------

_OPEN = sa.text(
    """
    SELECT session_id::text, user_id::text, language, started_at, last_seen_at, reported_ms, granted_ms,
           beyond_grant_ms
    FROM live_sessions WHERE state = 'open' ORDER BY user_id, started_at, session_id LIMIT :limit
    """
)


@dataclass(frozen=True)
class OpenSession:
    session_id: str
    user_id: str
    language: str
    started_at: datetime
    last_seen_at: datetime
    reported_ms: int
    granted_ms: int
    beyond_grant_ms: int
    silent: bool  # past its TTL at `now`: the next sessions.expire ends it


def list_open(conn: Connection, now: datetime, limit: int = 1000) -> list[OpenSession]:
    """Open sessions and their grants (as committed), oldest first per user."""
    return [OpenSession(**row._mapping, silent=_is_silent(row, now)) for row in conn.execute(_OPEN, {"limit": limit})]


# -- running a call ----------------------------------------------------------------------------------------


def run(call: Call) -> Grant | Closed:
    """Run a call in its own transaction and its after-commit work once it committed. When Redis lost the
    user's reservation, it is rebuilt and the call runs again; likewise when the user's period moved."""
    for _ in range(MAX_ATTEMPTS - 1):
        try:
            return _once(call)
        except ReservationLost as lost:
            rebuild(lost.user_id, lost.now)
        except db.StaleRead as exc:
            log.info("live_session_call_again", reason=str(exc))
    return _once(call)


def _once(call: Call) -> Grant | Closed:
    with db.transaction() as conn:
        return call(conn)
