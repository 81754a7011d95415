"""Operators' commands against the session database: quota, dead-letters list / replay, rebuild-usage."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import sqlalchemy as sa
from support.factories import event, insert_user
from support.run import TEST_ENV

from worker import cli, db, quota
from worker.dead_letters import Letter, write
from worker.metering import pipeline

pytestmark = pytest.mark.usefixtures("committed")


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def query(sql: str, *params: object) -> list[tuple]:
    with psycopg.connect(TEST_ENV["DATABASE_URL"]) as conn:
        return conn.execute(sql, params).fetchall()


def test_quota_prints_the_answer_or_says_why_not(capsys) -> None:
    with db.transaction() as conn:
        user = insert_user(conn)
    status, out, _ = run(capsys, "quota", str(user))
    assert status == 0
    assert json.loads(out) | {"period_start": None, "period_end": None} == {
        "user_id": str(user), "plan": "free", "limit_seconds": 3600, "used_seconds": 0, "remaining_seconds": 3600,
        "reserved_seconds": 0, "blocked": False, "period_start": None, "period_end": None,
    }  # fmt: skip
    unknown = uuid.uuid4()
    assert run(capsys, "quota", str(unknown)) == (1, "", f"no user with id {unknown}\n")
    assert run(capsys, "quota", "nope") == (2, "", "not a UUID: 'nope'\n")


def test_a_dead_letter_is_replayed_once_its_cause_is_fixed(capsys) -> None:
    now = datetime.now(UTC)
    newcomer = uuid.uuid4()  # the app sent usage before the profile existed
    with db.transaction() as conn:
        known = str(insert_user(conn))
        pipeline.apply_events(conn, [event(newcomer, "early", now - timedelta(minutes=3), 30)], now)
        later = event(known, "bad-later", now, 0)
        write(conn, [Letter("usage", later, "gave up after 11 attempts: OperationalError: gone", "bad-later"),
                      Letter("mystery", {"x": 1}, "from an older release")], now)  # fmt: skip
    status, out, _ = run(capsys, "dead-letters", "list")
    assert status == 0
    lines = out.splitlines()
    assert len(lines) == 4 and lines[0].split()[:3] == ["id", "created_at", "source"]
    assert f"unknown user_id {newcomer}" in lines[1] and "early" in lines[1]
    early_id, later_id, mystery_id = (int(line.split()[0]) for line in lines[1:])

    with db.transaction() as conn:
        insert_user(conn, id=newcomer)
    status, out, _ = run(capsys, "dead-letters", "replay", "--all")

    assert status == 1
    assert out.splitlines() == [
        f"dead letter {early_id}: applied",
        f"dead letter {later_id}: failed again and stays: seconds must be > 0, got 0",
        f"dead letter {mystery_id}: failed again and stays: no replay handler for source 'mystery'",
        "1 of 3 dead letters applied",
    ]
    assert query("SELECT user_id, duration_ms FROM usage_events") == [(newcomer, 30_000)]
    assert quota.cached(str(newcomer), datetime.now(UTC)).used_seconds == 30  # published after the commit
    letters = query("SELECT id, reason, replay_count, replayed_at IS NOT NULL FROM dead_letters ORDER BY id")
    assert [(row[0], row[2], row[3]) for row in letters] == [(early_id, 1, True), (later_id, 1, False),
                                                             (mystery_id, 1, False)]  # fmt: skip
    assert letters[1][1] == "seconds must be > 0, got 0"  # the new reason replaces the old one

    status, out, _ = run(capsys, "dead-letters", "replay", str(early_id))
    assert status == 1 and f"dead letter {early_id} was already replayed at" in out
    status, out, _ = run(capsys, "dead-letters", "replay", "999999")
    assert status == 1 and "dead letter 999999 does not exist" in out
    assert len(run(capsys, "dead-letters", "list")[1].splitlines()) == 3
    assert len(run(capsys, "dead-letters", "list", "--all")[1].splitlines()) == 4


def test_dead_letters_list_when_there_are_none(capsys) -> None:
    assert run(capsys, "dead-letters", "list") == (0, "no dead letters waiting\n", "")


def test_replay_needs_an_id_or_all(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["dead-letters", "replay"])
    assert exit_info.value.code == 2


def tracking(user: uuid.UUID) -> list[tuple]:
    return query("SELECT date, hour, microphone_ms, message_count FROM usage_tracking WHERE user_id = %s ORDER BY 1, 2",
                 user)  # fmt: skip


def test_rebuild_usage_restores_corrupted_rows_and_reports_them(capsys, redis_client) -> None:
    now = datetime.now(UTC)
    hour = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    with db.transaction() as conn:
        user = insert_user(conn)
        pipeline.apply_events(conn, [event(user, "a", hour + timedelta(minutes=50), 1200),
                                     event(user, "b", hour + timedelta(minutes=70), 30)], now)  # fmt: skip
    good = tracking(user)
    with db.transaction() as conn:
        conn.execute(sa.text("UPDATE usage_tracking SET microphone_ms = 7 WHERE user_id = :u"), {"u": user})
        conn.execute(sa.text("UPDATE usage_periods SET used_ms = 7 WHERE user_id = :u"), {"u": user})
    redis_client.set(f"{quota.KEY_PREFIX}{user}", "{}")  # an answer cached before the rebuild
    window = ["--from", (hour + timedelta(minutes=30)).isoformat(), "--to", (hour + timedelta(hours=2)).isoformat()]

    status, out, _ = run(capsys, "rebuild-usage", *window, "--dry-run")
    assert status == 0 and out.endswith("3 changes, nothing written (dry run)\n")
    assert tracking(user) != good

    status, out, _ = run(capsys, "rebuild-usage", *window)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"rebuild-usage {hour.isoformat()} to {(hour + timedelta(hours=2)).isoformat()}")
    assert "2 ledger events, 2 hours and 1 periods checked" in lines[0]
    assert lines[1] == (
        f"  usage_tracking corrected: user {user} hour {hour:%Y-%m-%d %H}:00Z:"
        " microphone_ms 7 -> 600000, microphone_seconds 0 -> 600"
    )
    assert lines[-1] == "3 changes, written"
    assert tracking(user) == good
    assert query("SELECT used_ms FROM usage_periods WHERE user_id = %s", user) == [(1_230_000,)]
    assert redis_client.get(f"{quota.KEY_PREFIX}{user}") is None
    assert run(capsys, "rebuild-usage", *window)[1].endswith("nothing to change\n")


def test_rebuild_usage_refuses_times_without_an_offset_and_empty_ranges(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["rebuild-usage", "--from", "2027-01-01T10:00", "--to", "2027-01-02"])
    assert exit_info.value.code == 2
    assert "has no UTC offset" in capsys.readouterr().err
    assert run(capsys, "rebuild-usage", "--from", "2027-01-02", "--to", "2027-01-01T00:00Z")[0] == 2


def test_replay_all_goes_on_past_a_letter_whose_replay_raises(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replayer failing with something else than a rejection (a bug, a constraint) is reported for its
    letter, which stays; the letters after it are still replayed."""
    from worker import dead_letters

    now = datetime.now(UTC)
    with db.transaction() as conn:
        user = insert_user(conn)
        write(conn, [Letter("broken", {"n": 1}, "first"), Letter("usage", event(user, "fine", now, 5), "later")], now)

    def explode(_conn: object, _payload: object, _now: datetime) -> None:
        raise RuntimeError("the replayer has a bug")

    monkeypatch.setitem(dead_letters._replayers, "broken", explode)
    status, out, _ = run(capsys, "dead-letters", "replay", "--all")

    first, second, total = out.splitlines()
    assert status == 1
    assert first.endswith("failed: RuntimeError: the replayer has a bug (the letter stays)")
    assert second.endswith(": applied") and total == "1 of 2 dead letters applied"
    assert query("SELECT source FROM dead_letters WHERE replayed_at IS NULL") == [("broken",)]
    assert query("SELECT event_id FROM usage_events") == [("fine",)]
