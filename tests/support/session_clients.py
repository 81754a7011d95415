"""App servers running live sessions, for tests/test_sessions_concurrency.py: `python tests/session_clients.py`.

One process, one thread per session. Each session starts, then reports its total again and again as fast
as it is answered, using at most what it was granted (a few sessions use a little more, on purpose), and
ends. Over HTTP (--url) or through the Python API (worker.sessions, in this process). Every answer is
written as a JSON line to --out, with the monotonic clock (shared by the processes of a host) just before
the request was sent and just after the answer came.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

USE_PER_REPORT = 0.2  # seconds of microphone a well-behaved session uses between two reports
OVERSHOOT = 0.25  # seconds an overshooting session uses beyond its grant, once in a while


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--user", required=True)
    parser.add_argument("--sessions", type=int, required=True)
    parser.add_argument("--reports", type=int, required=True)
    parser.add_argument("--overshooting", type=int, default=0, help="how many of the sessions overshoot")
    parser.add_argument("--url", help="the web; without it, the Python API")
    parser.add_argument("--token", default="")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--go", type=Path, required=True, help="start once this file exists")
    return parser.parse_args()


class Api:
    """The three calls, over HTTP or in process; each answer as a dict like the HTTP answer."""

    def __init__(self, url: str | None, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        self.http = httpx.Client(base_url=url, timeout=30, headers=headers) if url else None

    def start(self, user: str) -> dict[str, Any]:
        if self.http:
            return self._post("/v1/sessions", {"user_id": user, "language": "en"}, 201)
        from worker import sessions

        now = datetime.now(UTC)
        return _grant(sessions.run(lambda conn: sessions.start(conn, user, "en", now)))

    def report(self, session_id: str, total: float, final: bool) -> dict[str, Any]:
        if self.http:
            return self._post(f"/v1/sessions/{session_id}/{'end' if final else 'heartbeat'}", {"used_seconds": total})
        from worker import sessions

        now = datetime.now(UTC)
        call = sessions.end if final else sessions.heartbeat
        return _grant(sessions.run(lambda conn: call(conn, session_id, total, now)))

    def _post(self, path: str, body: dict, expected: int = 200) -> dict[str, Any]:
        response = self.http.post(path, json=body)
        assert response.status_code == expected, (response.status_code, response.text)
        return response.json()


def _grant(answer: Any) -> dict[str, Any]:
    from worker import sessions

    if isinstance(answer, sessions.Closed):
        return {"session_id": answer.session_id, "recorded_seconds": answer.recorded_ms / 1000,
                "beyond_grant_seconds": answer.beyond_grant_ms / 1000}  # fmt: skip
    return {"session_id": answer.session_id, "granted_seconds": answer.granted_ms / 1000,
            "used_seconds": answer.used_ms / 1000, "beyond_grant_seconds": answer.beyond_grant_ms / 1000}  # fmt: skip


def run_session(api: Api, args: argparse.Namespace, overshoots: bool, lines: list[dict]) -> None:
    sent = time.monotonic()
    answer = api.start(args.user)
    lines.append({"kind": "start", "sent": sent, "received": time.monotonic(), **answer})
    session_id, total, granted, beyond = answer["session_id"], 0.0, answer["granted_seconds"], 0.0
    for report in range(args.reports + 1):
        final = report == args.reports
        use = min(granted, USE_PER_REPORT)
        if overshoots and report % 3 == 1:
            use = granted + OVERSHOOT
            beyond += OVERSHOOT
        total = round(total + use, 3)
        sent = time.monotonic()
        answer = api.report(session_id, total, final)
        lines.append({"kind": "end" if final else "beat", "sent": sent, "received": time.monotonic(),
                      "total": total, "expected_beyond": round(beyond, 3), **answer})  # fmt: skip
        granted = answer.get("granted_seconds", 0)


def main() -> None:
    args = parse_args()
    api = Api(args.url, args.token)
    if not args.url:
        import worker.sessions  # noqa: F401  (imported before the start, not by the first session)
    while not args.go.exists():  # every process starts its sessions at once
        time.sleep(0.005)
    lines: list[dict] = []
    failures: list[BaseException] = []

    def session(overshoots: bool) -> None:
        try:
            run_session(api, args, overshoots, lines)
        except BaseException as exc:
            failures.append(exc)
            raise

    threads = [threading.Thread(target=session, args=(index < args.overshooting,)) for index in range(args.sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    args.out.write_text("\n".join(json.dumps(line) for line in lines))
    if failures:
        raise SystemExit(f"{len(failures)} sessions failed, the first with {failures[0]!r}")


if __name__ == "__main__":
    main()
