"""The quota (worker.quota): answers from Redis when current, from PostgreSQL otherwise; never an older
answer over a newer one, and never an answer read before a plan change published after it."""

from __future__ import annotations

import json
from datetime import timedelta

import sqlalchemy as sa
from support.factories import NOW, event, insert_user
from support.run import flush_redis

from worker import quota
from worker.metering import pipeline


def test_quota_survives_a_redis_flush(connection: sa.Connection) -> None:
    user = insert_user(connection)
    outcome = pipeline.apply_events(connection, [event(user, "q", NOW - timedelta(minutes=1), 90)], NOW)
    quota.publish(outcome.quotas.values())
    assert quota.cached(str(user), NOW) == outcome.quotas[str(user)]
    flush_redis()
    assert quota.cached(str(user), NOW) is None
    answers = quota.read(connection, [str(user)], NOW)
    assert answers == outcome.quotas
    assert json.loads(json.dumps(answers[str(user)].as_dict()))["used_seconds"] == 90


def test_an_older_quota_answer_never_replaces_a_newer_one(connection: sa.Connection) -> None:
    user = insert_user(connection)
    first = pipeline.apply_events(connection, [event(user, "1", NOW - timedelta(minutes=2), 10)], NOW).quotas
    second = pipeline.apply_events(connection, [event(user, "2", NOW - timedelta(minutes=1), 10)], NOW).quotas
    quota.publish(second.values())
    quota.publish(first.values())
    assert quota.cached(str(user), NOW).used_seconds == 20


def test_an_answer_read_before_a_plan_change_is_never_published_after_it(connection) -> None:
    user = insert_user(connection)
    before = pipeline.apply_events(connection, [event(user, "1", NOW - timedelta(minutes=2), 10)], NOW).quotas
    quota.invalidate([str(user)])  # a plan change (or a rebuild) committed after that read
    quota.publish(before.values())
    assert quota.cached(str(user), NOW) is None
    corrected = quota.read(connection, [str(user)], NOW)
    quota.publish(corrected.values())
    assert quota.cached(str(user), NOW) == corrected[str(user)]
    assert quota.cached(str(user), NOW).generation == 1
