"""50 live sessions of one user with 60 s left, started and beating at once from five processes (three
through the Python API, two over HTTP): what they are granted never adds up to more than remains.

The clients run on the real clock (the web's is), so the learner's 60 s are a free plan of one minute
(PLAN_MINUTES=free=1 in the clients' and the web's processes) in the current month."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from support.factories import insert_user
from support.http_server import serve_in_subprocess
from support.run import ROOT, TEST_ENV

from worker import db
from worker.cache import live_grants_key, redis_client

pytestmark = [pytest.mark.usefixtures("committed"), pytest.mark.slow]

PROCESSES = ("api", "api", "api", "http", "http")
SESSIONS_PER_PROCESS = 10
REPORTS = 12  # per session, then its end
GRANT_SECONDS = "5"  # so that the 60 s are shared by many sessions, not taken by the first
LEFT_MS = 60_000
CLIENT_ENV = {"SESSION_GRANT_SECONDS": GRANT_SECONDS, "PLAN_MINUTES": "free=1"}


@dataclass
class Sampler:
    """Reads the reservation in Redis and the sessions in PostgreSQL over and over while the clients run."""

    user: str
    samples: int = 0
    most_granted_ms: int = 0
    violations: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with psycopg.connect(TEST_ENV["DATABASE_URL"], autocommit=True) as conn:
            while not self._stop.is_set():
                self._sample_redis(conn)
                self._sample_postgresql(conn)
                self.samples += 1

    def _sample_redis(self, conn: psycopg.Connection) -> None:
        fields = redis_client().hgetall(live_grants_key(self.user))  # one atomic read
        if "epoch" not in fields:
            return
        grants = sum(int(value) for key, value in fields.items() if key.startswith("g:"))
        extras = sum(int(value.split(":")[1]) for key, value in fields.items() if key.startswith("p:"))
        if int(fields["held"]) != grants + extras:
            self.violations.append(f"held {fields['held']} is not the sum of the entries {grants} + {extras}")
        beyond = (
            conn.execute("SELECT sum(beyond_grant_ms) FROM live_sessions WHERE user_id = %s", (self.user,)).fetchone()[
                0
            ]
            or 0
        )  # fmt: skip  (read after: never smaller)
        if int(fields["used"]) + grants > int(fields["limit"]) + beyond:
            self.violations.append(f"Redis: used {fields['used']} + granted {grants} > {fields['limit']} + {beyond}")

    def _sample_postgresql(self, conn: psycopg.Connection) -> None:
        used, granted, beyond = conn.execute(  # one statement: one snapshot
            """
            SELECT (SELECT COALESCE(sum(used_ms), 0) FROM usage_periods WHERE user_id = %(u)s),
                   COALESCE(sum(granted_ms) FILTER (WHERE state = 'open'), 0), COALESCE(sum(beyond_grant_ms), 0)
            FROM live_sessions WHERE user_id = %(u)s
            """,
            {"u": self.user},
        ).fetchone()
        self.most_granted_ms = max(self.most_granted_ms, granted)
        if used + granted > LEFT_MS + beyond:
            self.violations.append(f"PostgreSQL: used {used} + granted {granted} > limit + beyond {beyond}")

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def most_granted_at_once(answers: list[dict]) -> int:
    """The largest sum of grants the apps certainly held at one moment: a grant counts from when its answer
    came until its session's next call was sent (its commit lies in between; so does the next one's)."""
    changes = []
    by_session: dict[str, list[dict]] = {}
    for answer in answers:
        by_session.setdefault(answer["session_id"], []).append(answer)
    for calls in by_session.values():
        calls.sort(key=lambda call: call["sent"])
        for call, following in itertools.pairwise(calls):
            granted = round(call.get("granted_seconds", 0) * 1000)
            if granted and following["sent"] > call["received"]:
                changes += [(call["received"], granted), (following["sent"], -granted)]
    held = most = 0
    for _, change in sorted(changes):
        held += change
        most = max(most, held)
    return most


def used_ms(user: str) -> int:
    with psycopg.connect(TEST_ENV["DATABASE_URL"]) as conn:
        return conn.execute("SELECT COALESCE(sum(used_ms), 0) FROM usage_periods WHERE user_id = %s",
                            (user,)).fetchone()[0]  # fmt: skip


def test_fifty_sessions_from_five_processes_are_never_granted_more_than_remains(tmp_path: Path) -> None:
    with db.transaction() as conn:
        user = str(insert_user(conn))
    env = {**os.environ, **CLIENT_ENV}
    go = tmp_path / "go"
    with serve_in_subprocess(**CLIENT_ENV) as url:
        clients = []
        for index, mode in enumerate(PROCESSES):
            command = [sys.executable, "tests/support/session_clients.py", "--user", user, "--sessions",
                       str(SESSIONS_PER_PROCESS), "--reports", str(REPORTS), "--overshooting", "1",
                       "--out", str(tmp_path / f"{index}.jsonl"), "--go", str(go)]  # fmt: skip
            if mode == "http":
                command += ["--url", url, "--token", "test-token-1"]
            clients.append(subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True))
        with Sampler(user) as sampler:
            time.sleep(2)  # the clients have imported what they need
            go.touch()
            for client in clients:
                _, errors = client.communicate(timeout=180)
                assert client.returncode == 0, errors[-3000:]
    answers = [json.loads(line) for index in range(len(PROCESSES))
               for line in (tmp_path / f"{index}.jsonl").read_text().splitlines()]  # fmt: skip

    assert len(answers) == len(PROCESSES) * SESSIONS_PER_PROCESS * (REPORTS + 2)
    assert sampler.samples > 50 and sampler.violations == []
    assert 0 < sampler.most_granted_ms <= LEFT_MS
    assert 0 < most_granted_at_once(answers) <= LEFT_MS
    starts = [answer for answer in answers if answer["kind"] == "start"]
    assert any(answer["granted_seconds"] == 0 for answer in starts)  # they did compete for the 60 s
    assert all(answer.get("granted_seconds", 0) <= int(GRANT_SECONDS) for answer in answers)

    ends = [answer for answer in answers if answer["kind"] == "end"]
    recorded = sum(round(answer["recorded_seconds"] * 1000) for answer in ends)
    beyond = sum(round(answer["beyond_grant_seconds"] * 1000) for answer in ends)
    assert recorded == sum(round(answer["total"] * 1000) for answer in ends)
    assert beyond == sum(round(answer["expected_beyond"] * 1000) for answer in ends) > 0
    with psycopg.connect(TEST_ENV["DATABASE_URL"]) as conn:
        ledger_ms = conn.execute(
            "SELECT sum(duration_ms) FROM usage_events WHERE user_id = %s AND event_id LIKE 'session:%%'", (user,)
        ).fetchone()[0]
        states = conn.execute("SELECT state, count(*), sum(granted_ms), sum(beyond_grant_ms) FROM live_sessions"
                              " WHERE user_id = %s GROUP BY state", (user,)).fetchall()  # fmt: skip
    assert ledger_ms == recorded == used_ms(user)  # each report recorded once
    assert states == [("ended", 50, 0, beyond)]
    assert used_ms(user) <= LEFT_MS + beyond  # past the limit only by what went beyond grants
    assert redis_client().hget(live_grants_key(user), "held") == "0"
