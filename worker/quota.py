"""The quota: how much of this period's minutes a user has left, answered from Redis when fresh.

PostgreSQL is the truth; Redis holds each user's last answer, written after the commit that changed it.
A missing, expired or out-of-period answer falls back to PostgreSQL, so losing Redis costs speed, never
correctness. Writes carry the period start and the usage they describe, and a Lua check refuses to
replace a newer answer with an older one (two batches may commit in one order and publish in the other).

Usage only grows within a period, except when a plan or period changes or a rebuild corrects it: those
bump the user's generation (`invalidate`). Every answer carries the generation it was read under (read
from Redis before PostgreSQL), and the Lua check refuses an answer of an older generation, so an answer
read before such a change can never be published after it.

Live sessions (worker/sessions.py) hold seconds before they are used: `check` counts them as not remaining
and says how many are held (`reserved_seconds`). The cached answer stays usage-based; what the sessions
hold is read at answer time, from their reservation in Redis in the same round trip as the cached answer
(or from PostgreSQL's session rows when the answer itself comes from PostgreSQL). A user whose
reservation Redis lost reads 0 held from the cache until their next session call rebuilds it: the grants
themselves never depend on this answer. `invalidate` also marks the reservation stale, so the next
session call recomputes it under the new plan.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from dataclasses import field as dataclass_field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker import db, metrics
from worker.cache import HELD, STALE, live_grants_key, redis_client
from worker.config import settings
from worker.logs import get_logger
from worker.periods import CALENDAR_END, CALENDAR_START
from worker.sqlarrays import bare_array

log = get_logger(__name__)

KEY_PREFIX = "quota:"
GENERATION_PREFIX = "quota-generation:"
GENERATION_TTL = 7 * 86_400  # seconds: far longer than any answer is in flight


class UnknownUser(LookupError):
    """No profile has this id."""


@dataclass(frozen=True)
class Quota:
    user_id: str
    plan: str
    limit_seconds: float
    used_seconds: float
    remaining_seconds: float
    blocked: bool
    period_start: str
    period_end: str
    reserved_seconds: float = 0  # held by live sessions' grants; 0 in the usage-based cached answer
    generation: int = dataclass_field(default=0, compare=False)  # of the cache; not part of the answer

    @classmethod
    def from_ms(
        cls, user_id: str, plan: str, limit_ms: int, used_ms: int, start: datetime, end: datetime, generation: int = 0
    ) -> Quota:
        return cls(
            user_id=user_id,
            plan=plan,
            limit_seconds=seconds(limit_ms),
            used_seconds=seconds(used_ms),
            remaining_seconds=seconds(max(limit_ms - used_ms, 0)),
            blocked=used_ms >= limit_ms,
            period_start=_utc_iso(start),
            period_end=_utc_iso(end),
            generation=generation,
        )

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}  # dataclasses.asdict deep-copies: 20 µs

    def reserving(self, reserved_ms: int) -> Quota:
        """This answer with `reserved_ms` held by live sessions, which are then not remaining."""
        remaining_ms = round(self.limit_seconds * 1000) - round(self.used_seconds * 1000) - reserved_ms
        return replace(self, reserved_seconds=seconds(reserved_ms), remaining_seconds=seconds(max(remaining_ms, 0)))

    @property
    def ends_at(self) -> datetime:
        return datetime.fromisoformat(self.period_end)


FIELDS = tuple(field.name for field in fields(Quota) if field.name != "generation")  # the public answer
USAGE_FIELDS = tuple(name for name in FIELDS if name != "reserved_seconds")  # what the cache holds


@functools.lru_cache(maxsize=4096)
def _utc_iso(moment: datetime) -> str:
    """A period bound in UTC ISO 8601; a batch's users share a few bounds, so each is formatted once."""
    return moment.astimezone(UTC).isoformat()


def seconds(ms: int) -> float:
    """Milliseconds as seconds; whole seconds stay integers in JSON."""
    return ms // 1000 if ms % 1000 == 0 else ms / 1000


# The period containing :now: the usage_periods row that covers it, else the subscription's period, else
# the calendar month in the user's zone (a user never metered, or a period not yet reached by a reset).
_READ = sa.text(
    f"""
    SELECT p.id::text AS user_id,
           COALESCE(s.plan_type, 'free') AS plan,
           COALESCE(u.limit_ms, s.monthly_minutes_limit::bigint * 60000, :free_limit_ms) AS limit_ms,
           COALESCE(u.used_ms, 0) AS used_ms,
           COALESCE(u.period_start, CASE WHEN s.current_period_start <= :now AND :now < s.current_period_end
                                         THEN s.current_period_start END,
                    {CALENDAR_START}) AS period_start,
           COALESCE(u.period_end, CASE WHEN s.current_period_start <= :now AND :now < s.current_period_end
                                       THEN s.current_period_end END,
                    {CALENDAR_END}) AS period_end
    FROM profiles p
    LEFT JOIN subscriptions s ON s.user_id = p.id
    LEFT JOIN usage_periods u ON u.user_id = p.id AND u.period_start <= :now AND :now < u.period_end
    WHERE p.id = ANY(CAST(:user_ids AS uuid[]))
    """
)


def generations(user_ids: list[str]) -> dict[str, int]:
    """Each user's cache generation; -1 when Redis cannot say, which no publish accepts. Read it before
    the rows an answer is made of: a change committed after that bumps it."""
    try:
        values = redis_client().mget([GENERATION_PREFIX + user_id for user_id in user_ids]) if user_ids else []
    except redis.RedisError:
        return dict.fromkeys(user_ids, -1)
    return {user_id: int(value or 0) for user_id, value in zip(user_ids, values, strict=True)}


def _usage_rows(conn: Connection, user_ids: list[str], now: datetime) -> sa.CursorResult[Any]:
    return conn.execute(
        _READ,
        {"user_ids": bare_array(user_ids), "now": now, "free_limit_ms": settings().plan_minutes["free"] * 60_000},
    )


def usage_of(conn: Connection, user_id: str, now: datetime) -> sa.Row[Any] | None:
    """The user's plan, limit_ms, used_ms, period_start and period_end at `now`, from PostgreSQL (None for
    an unknown user): what `read` answers from, in milliseconds and without the cache's generation."""
    return _usage_rows(conn, [user_id], now).first()


_RESERVED = sa.text(
    "SELECT COALESCE(sum(granted_ms), 0)::bigint FROM live_sessions WHERE user_id = :user_id AND state = 'open'"
)


def reserved_ms(conn: Connection, user_id: str) -> int:
    """What the user's open live sessions hold as committed in PostgreSQL, in milliseconds."""
    return int(conn.execute(_RESERVED, {"user_id": user_id}).scalar_one())


def read(conn: Connection, user_ids: Iterable[str], now: datetime) -> dict[str, Quota]:
    """The quota of each user, from PostgreSQL. Unknown users are absent from the answer."""
    user_ids = sorted(set(user_ids))
    known = generations(user_ids)  # before PostgreSQL: a change committed after this bumps it
    rows = _usage_rows(conn, user_ids, now)
    return {
        row.user_id: Quota.from_ms(
            row.user_id,
            row.plan,
            row.limit_ms,
            row.used_ms,
            row.period_start,
            row.period_end,
            known.get(row.user_id, -1),
        )
        for row in rows
    }


# One call for a whole batch of answers. KEYS: answer key and generation key of each user, in pairs;
# ARGV: the TTL, then each user's answer as stored, which begins with its version (generation, period
# start, usage): read with string.match, not a JSON decoder (an answer stored in another layout, by an
# older worker, is decoded).
_PUBLISH = """
local function version(answer)
  local g, s, u = string.match(answer, '^{"v_generation": (%-?%d+), "v_start": (%-?%d+), "v_used": (%d+),')
  if g then return tonumber(g), tonumber(s), tonumber(u) end
  local c = cjson.decode(answer)
  return c.v_generation, c.v_start, c.v_used
end
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS / 2 do
  local key, generation_key = KEYS[2 * i - 1], KEYS[2 * i]
  local answer = ARGV[i + 1]
  local generation, start, used = version(answer)
  local stale = generation < tonumber(redis.call('GET', generation_key) or '0')
  if not stale then
    local current = redis.call('GET', key)
    if current then
      local g, s, u = version(current)
      stale = g > generation or (g == generation and (s > start or (s == start and u > used)))
    end
  end
  if not stale then redis.call('SET', key, answer, 'EX', ttl) end
end
"""
PUBLISH_CHUNK = 1000  # answers per script call: one batch's users, without holding Redis for long
_PLAIN_TEXT = re.compile(r"[A-Za-z0-9_.:+ -]*")  # what a JSON string holds without escapes, and more


@functools.lru_cache(maxsize=4096)
def _epoch_ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def stored_answer(quota: Quota) -> str:
    """The answer as Redis keeps it: its public fields and its version (v_generation, v_start, v_used), in
    that order, version first. Written by hand: json.dumps of a dict built for it cost three times as
    much, twice per metered event; text that would need escapes (none of these fields has any) takes
    json.dumps."""
    start, used = _epoch_ms(quota.period_start), round(quota.used_seconds * 1000)
    if not _PLAIN_TEXT.fullmatch(quota.user_id + quota.plan + quota.period_start + quota.period_end):
        usage = {name: getattr(quota, name) for name in USAGE_FIELDS}
        return json.dumps({"v_generation": quota.generation, "v_start": start, "v_used": used, **usage})
    return (
        f'{{"v_generation": {quota.generation}, "v_start": {start}, "v_used": {used}, "user_id": "{quota.user_id}", '
        f'"plan": "{quota.plan}", "limit_seconds": {quota.limit_seconds!r}, "used_seconds": {quota.used_seconds!r}, '
        f'"remaining_seconds": {quota.remaining_seconds!r}, "blocked": {"true" if quota.blocked else "false"}, '
        f'"period_start": "{quota.period_start}", "period_end": "{quota.period_end}"}}'
    )


def publish(quotas: Iterable[Quota]) -> None:
    """Write answers to Redis after their commit. A Redis failure is logged: readers fall back to PostgreSQL."""
    quotas = list(quotas)
    if not quotas:
        return
    ttl = settings().quota_cache_ttl
    try:
        script = redis_client().register_script(_PUBLISH)
        for first in range(0, len(quotas), PUBLISH_CHUNK):
            chunk = quotas[first : first + PUBLISH_CHUNK]
            keys = [key for quota in chunk for key in (KEY_PREFIX + quota.user_id, GENERATION_PREFIX + quota.user_id)]
            script(keys=keys, args=[ttl, *map(stored_answer, chunk)])
    except redis.RedisError as exc:
        log.warning("quota_publish_failed", users=len(quotas), error=str(exc))


def invalidate(user_ids: Iterable[str]) -> None:
    """Forget cached answers and refuse any read before now (after a plan, period or usage correction
    commits); the users' live-session reservations are recomputed at their next session call."""
    user_ids = [str(user_id) for user_id in user_ids]
    if not user_ids:
        return
    try:
        with redis_client().pipeline(transaction=True) as pipe:
            for user_id in user_ids:
                pipe.incr(GENERATION_PREFIX + user_id)
                pipe.expire(GENERATION_PREFIX + user_id, GENERATION_TTL)
                pipe.delete(KEY_PREFIX + user_id)
                pipe.hset(live_grants_key(user_id), STALE, 1)
                pipe.expire(live_grants_key(user_id), GENERATION_TTL, nx=True)  # a hash it created: gone in a week
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("quota_invalidate_failed", users=len(user_ids), error=str(exc))


def cached(user_id: str, now: datetime) -> Quota | None:
    """The cached (usage-based) answer when it still describes the period containing `now`."""
    return _lookup(user_id, now)[0]


def _lookup(user_id: str, now: datetime) -> tuple[Quota | None, int | None]:
    """In one round trip: the cached answer (when it describes `now`'s period) and the milliseconds the
    user's live sessions hold; (None, None) when Redis does not answer."""
    try:
        with redis_client().pipeline(transaction=False) as pipe:
            pipe.get(KEY_PREFIX + user_id)
            pipe.hget(live_grants_key(user_id), HELD)
            raw, held = pipe.execute()
    except redis.RedisError as exc:
        log.warning("quota_cache_unavailable", error=str(exc))
        metrics.quota_cache_lookup(hit=False)
        return None, None
    quota = None
    if raw is not None:
        fields = json.loads(raw)
        quota = Quota(**{name: fields[name] for name in USAGE_FIELDS}, generation=fields["v_generation"])
        if not datetime.fromisoformat(quota.period_start) <= now < quota.ends_at:
            quota = None
    metrics.quota_cache_lookup(hit=quota is not None)
    return quota, int(held or 0)


def check(user_id: str | UUID, now: datetime | None = None) -> Quota:
    """The user's quota: Redis when fresh, else PostgreSQL (and the answer is cached again), with the
    seconds held by live sessions counted as not remaining."""
    now = now or datetime.now(UTC)
    user_id = str(UUID(str(user_id)))
    quota, held_ms = _lookup(user_id, now)
    if quota is not None and held_ms is not None:
        return quota.reserving(held_ms)
    with db.engine().connect() as conn:
        answers = read(conn, [user_id], now)
        if user_id not in answers:
            raise UnknownUser(f"no user with id {user_id}")
        held_ms = reserved_ms(conn, user_id)
    publish(answers.values())
    return answers[user_id].reserving(held_ms)
