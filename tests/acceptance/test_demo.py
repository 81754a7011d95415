"""`python -m worker demo` to completion against the test services: a real web and a real worker."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from support.http_server import free_port, serve_in_thread
from support.run import TEST_ENV

from worker import cli
from worker.web import app

pytestmark = pytest.mark.usefixtures("committed", "thread_worker")


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_in_thread(app) as url:
        yield url


def table(out: str) -> dict[str, list[str]]:
    header, *rows = out.strip().splitlines()[-4:]
    assert header.split() == ["learner", "plan", "used", "min", "limit", "min", "left", "min", "quota", "alerts"]
    return {row.split()[0]: row.split(maxsplit=6)[1:] for row in rows}


EXPECTED = {
    "demo-free@worldspeak.example": ["free", "60.0", "60", "0.0", "blocked", "80%, 100%"],
    "demo-standard@worldspeak.example": ["standard", "450.0", "900", "450.0", "open", "-"],
    "demo-premium@worldspeak.example": ["premium", "300.0", "3000", "2700.0", "open", "-"],
}


LIVE_SESSION = [  # 57 minutes used before: 180 s left, granted 60 s at a time
    "live session of demo-free@worldspeak.example, 180 s left, its app reporting every 20 s:",
    *[f"  +{t:>3} s  used {t:6.1f} s  granted {min(60, 180 - t):5.1f} s" for t in range(0, 180, 20)],
    "  +180 s  used  180.0 s  granted   0.0 s  cut: the limit is reached",
    "  ended: 180.0 s recorded, 0.0 s of it beyond the grants",
]


def test_demo_streams_through_the_web_and_shows_the_free_learner_at_the_limit(base_url: str, capsys) -> None:
    assert cli.main(["demo", "--url", base_url, "--events", "150", "--timeout", "60"]) == 0
    captured = capsys.readouterr()
    assert table(captured.out) == EXPECTED
    assert captured.out.splitlines()[: len(LIVE_SESSION)] == LIVE_SESSION
    assert f"sent through {base_url}/v1/usage-events" in captured.err
    assert "151/151 events" in captured.err.replace("\r", "\n")  # about 150: each learner's share, rounded


def test_demo_reruns_and_falls_back_to_the_broker_when_the_web_is_not_there(capsys) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    for _ in range(2):
        assert cli.main(["demo", "--url", closed, "--events", "60"]) == 0
        captured = capsys.readouterr()
        assert table(captured.out) == EXPECTED
        assert "sending to the broker instead" in captured.err
    with psycopg.connect(TEST_ENV["DATABASE_URL"]) as conn:
        demo_users = conn.execute("SELECT count(*) FROM auth.users WHERE email LIKE 'demo-%'").fetchone()[0]
    assert demo_users == 3
