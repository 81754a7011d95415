"""`python -m worker COMMAND` (also installed as `worldspeak-worker`): operators' commands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from uuid import UUID

import psycopg
from sqlalchemy.engine import make_url

from worker import db, dead_letters, demo, metrics, quota, rebuild, sessions
from worker.celery import app
from worker.clock import utcnow
from worker.config import ConfigError, settings
from worker.logs import configure_logging
from worker.maintenance import jobs
from worker.stripe import reconcile

Command = Callable[[argparse.Namespace], int]


def cmd_migrate(_args: argparse.Namespace) -> int:
    try:
        db.migrate(settings().database_url)
    except psycopg.errors.InsufficientPrivilege as exc:  # e.g. run as a role that does not own the schema
        print(f"migrate: {exc}", file=sys.stderr)
        return 1
    print(f"schema applied to {make_url(settings().database_url).database}")
    return 0


def cmd_web(_args: argparse.Namespace) -> int:
    import uvicorn

    config = settings()
    metrics.start_fleet()  # before uvicorn starts its worker processes
    uvicorn.run(
        "worker.web:app",
        host=config.web_host,
        port=config.web_port,
        workers=config.web_concurrency,
        log_config=None,  # keep the JSON logging configured above
        proxy_headers=True,
    )
    return 0


def cmd_quota(args: argparse.Namespace) -> int:
    try:
        user_id = UUID(args.user_id)
    except ValueError:
        print(f"not a UUID: {args.user_id!r}", file=sys.stderr)
        return 2
    try:
        answer = quota.check(user_id)
    except quota.UnknownUser as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(answer.as_dict(), indent=2))
    return 0


def cmd_dead_letters(args: argparse.Namespace) -> int:
    return _list_letters(args) if args.action == "list" else _replay_letters(args)


def _list_letters(args: argparse.Namespace) -> int:
    with db.engine().connect() as conn:
        letters = dead_letters.list_letters(conn, include_replayed=args.all, limit=args.limit)
    if not letters:
        print("no dead letters" if args.all else "no dead letters waiting")
        return 0
    print(f"{'id':>6}  {'created_at':<20} {'source':<8} {'replays':>7}  {'replayed_at':<20} {'ref':<40} reason")
    for letter in letters:
        replayed = f"{letter['replayed_at']:%Y-%m-%dT%H:%M:%SZ}" if letter["replayed_at"] else "-"
        print(
            f"{letter['id']:>6}  {letter['created_at']:%Y-%m-%dT%H:%M:%SZ} {letter['source']:<8}"
            f" {letter['replay_count']:>7}  {replayed:<20} {letter['ref'] or '-':<40} {letter['reason']}"
        )
    return 0


def _replay_letters(args: argparse.Namespace) -> int:
    app.loader.import_default_modules()  # the task modules register how each source is replayed
    if args.all:
        with db.engine().connect() as conn:
            letter_ids = dead_letters.pending_ids(conn)
    else:
        letter_ids = [args.letter_id]
    failed = 0
    for letter_id in letter_ids:
        outcome = _replay_one(letter_id)
        print(f"dead letter {letter_id}: {outcome or 'applied'}")
        failed += outcome is not None
    print(f"{len(letter_ids) - failed} of {len(letter_ids)} dead letters applied")
    return 1 if failed else 0


def _replay_one(letter_id: int) -> str | None:
    """Replay one letter in a transaction of its own (one that fails again keeps the others); None when
    applied, else what happened. Any failure is reported and the replay goes on with the next letter."""
    try:
        with db.transaction() as conn:
            reason = dead_letters.replay(conn, letter_id, utcnow())
    except LookupError as exc:
        return str(exc)
    except Exception as exc:
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (the letter stays)"
    return None if reason is None else f"failed again and stays: {reason}"


def _moment(text: str) -> datetime:
    """An argument's time: RFC 3339 with an offset, or a date (midnight UTC)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {text!r} (e.g. 2027-03-01T00:00:00Z or 2027-03-01)") from None
    if moment.tzinfo is not None:
        return moment
    if len(text) == len("2027-03-01"):
        return moment.replace(tzinfo=UTC)
    raise argparse.ArgumentTypeError(f"{text!r} has no UTC offset (add Z or +HH:MM)")


def cmd_rebuild_usage(args: argparse.Namespace) -> int:
    if not args.start < args.end:
        print("--from must be before --to", file=sys.stderr)
        return 2
    with db.transaction(dry_run=args.dry_run) as conn:
        report = rebuild.rebuild(conn, args.start, args.end, utcnow())
    print(
        f"rebuild-usage {report.start.isoformat()} to {report.end.isoformat()} (whole UTC hours):"
        f" {report.events} ledger events, {report.hours_checked} hours and {report.periods_checked} periods checked"
    )
    for change in report.changes:
        print(f"  {change.table} {change.what}: {change.key}: {change.detail}")
    outcome = "nothing written (dry run)" if args.dry_run else "written"
    print(f"{len(report.changes)} changes, {outcome}" if report.changes else "nothing to change")
    return 0


def cmd_reset_due(args: argparse.Namespace) -> int:
    now = args.now or utcnow()
    run = jobs.run_reset_monthly_usage(now, wait=True)  # waits for a run in progress
    assert run.result is not None  # a run that waits for the lock always runs
    moved = run.result
    print(
        f"reset-due at {now.isoformat()}: {len(moved.users)} subscriptions moved to their next period,"
        f" {moved.periods_archived} periods archived"
    )
    if moved.busy:
        print(f"{len(moved.busy)} due subscriptions were held by another transaction; run it again to move them")
    return 0


def cmd_stripe_reconcile(args: argparse.Namespace) -> int:
    try:
        report = reconcile.run(args.since, utcnow(), dry_run=args.dry_run)
    except reconcile.ReconcileUnavailable as exc:
        print(f"stripe-reconcile: {exc}", file=sys.stderr)
        return 2
    if not report.ran:
        print("stripe-reconcile: another run is in progress; nothing done")
        return 1
    run = "dry run" if report.dry_run else f"run {report.run_id}" + (" (resumed)" if report.resumed else "")
    print(
        f"stripe-reconcile {run}, events since {report.since.isoformat()}: {report.events_listed} listed on"
        f" {report.pages} pages, {report.subscriptions_checked} subscriptions compared with Stripe"
    )
    for difference in report.differences:
        print(f"  {difference.kind}: {difference.subject}: {difference.detail}")
    if report.events_processed:
        taken = ", ".join(f"{count} {outcome}" for outcome, count in sorted(report.events_processed.items()))
        print(f"missing events taken through the inbox: {taken}")
    if not report.differences:
        print("nothing differs")
    elif report.dry_run:
        print(f"{len(report.differences)} differences, nothing changed (dry run)")
    else:
        print(f"{len(report.differences)} differences, {report.repaired} subscriptions repaired from Stripe")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    token = args.token or next(iter(settings().ingest_api_tokens), None)
    try:
        demo.run(args.url, token, args.events, args.timeout)
    except demo.DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_sessions(args: argparse.Namespace) -> int:
    now = utcnow()
    with db.engine().connect() as conn:
        open_sessions = sessions.list_open(conn, now, args.limit)
    if not open_sessions:
        print("no open live sessions")
        return 0
    print(f"{'session_id':<36}  {'user_id':<36}  {'lang':<5} {'started_at':<20} {'last report':<20}"
          f" {'used s':>9} {'granted s':>9} {'beyond s':>9}")  # fmt: skip
    for session in open_sessions:
        silent = "  silent: expires at the next sessions.expire" if session.silent else ""
        print(
            f"{session.session_id:<36}  {session.user_id:<36}  {session.language:<5}"
            f" {session.started_at:%Y-%m-%dT%H:%M:%SZ} {session.last_seen_at:%Y-%m-%dT%H:%M:%SZ}"
            f" {session.reported_ms / 1000:>9.3f} {session.granted_ms / 1000:>9.3f}"
            f" {session.beyond_grant_ms / 1000:>9.3f}{silent}"
        )
    users = len({session.user_id for session in open_sessions})
    more = f" (the first {args.limit}: --limit shows more)" if len(open_sessions) == args.limit else ""
    print(f"{len(open_sessions)} open sessions of {users} users{more}")
    return 0


def _add_dead_letters(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("dead-letters", help="list or replay inputs that could not be applied")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="dead letters waiting (oldest first)")
    listing.add_argument("--all", action="store_true", help="include the ones already replayed")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    replay = actions.add_parser("replay", help="apply letters again; one that fails again stays, with the new reason")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("letter_id", type=int, nargs="?", metavar="ID", help="the letter to replay")
    which.add_argument("--all", action="store_true", help="every letter waiting")


def _add_rebuild_usage(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "rebuild-usage", help="recompute usage_tracking and period totals from the ledger for a time range"
    )
    parser.add_argument("--from", dest="start", type=_moment, required=True, help="RFC 3339 time or date (UTC)")
    parser.add_argument("--to", dest="end", type=_moment, required=True, help="RFC 3339 time or date (UTC), excluded")
    parser.add_argument("--dry-run", action="store_true", help="report what would change, write nothing")


def _event_count(text: str) -> int:
    if not text.isdigit() or not 30 <= int(text) <= 100_000:
        raise argparse.ArgumentTypeError(f"--events must be a whole number from 30 to 100000, got {text!r}")
    return int(text)


def _add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("demo", help="demo learners on each plan, a live usage stream, then a summary")
    parser.add_argument("--url", default=demo.DEFAULT_URL, help=f"the web (default {demo.DEFAULT_URL})")
    parser.add_argument("--token", help="bearer token (default: the first of INGEST_API_TOKENS)")
    parser.add_argument("--events", type=_event_count, default=demo.DEFAULT_EVENTS, metavar="N",
                        help=f"microphone events to stream, 30 to 100000 (default {demo.DEFAULT_EVENTS})")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the worker (default 60)")


def _add_stripe_reconcile(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "stripe-reconcile", help="find and repair what missed Stripe webhooks left behind (stripe.reconcile)"
    )
    parser.add_argument(
        "--since", type=_moment, help="RFC 3339 time or date (UTC): events from then on (default: Stripe's 30 days)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print what differs, change nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worldspeak-worker", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("migrate", help="apply schema.sql (creates the database if missing; safe to repeat)")
    commands.add_parser("web", help="serve HTTP (WEB_HOST, PORT, WEB_CONCURRENCY)")
    commands.add_parser("quota", help="a user's quota, as GET /v1/quota answers it").add_argument("user_id")
    _add_dead_letters(commands)
    _add_rebuild_usage(commands)
    _add_demo(commands)
    _add_stripe_reconcile(commands)
    live = commands.add_parser("sessions", help="live sessions")
    actions = live.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="open sessions and their grants")
    listing.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    commands.add_parser(
        "reset-due", help="archive every period that has ended and start the next (maintenance.reset_monthly_usage)"
    ).add_argument("--now", type=_moment, help="RFC 3339 time or date (UTC) to reset for (default: now)")
    return parser


COMMANDS: dict[str, Command] = {
    "migrate": cmd_migrate,
    "web": cmd_web,
    "quota": cmd_quota,
    "dead-letters": cmd_dead_letters,
    "rebuild-usage": cmd_rebuild_usage,
    "demo": cmd_demo,
    "reset-due": cmd_reset_due,
    "stripe-reconcile": cmd_stripe_reconcile,
    "sessions": cmd_sessions,
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        configure_logging(settings().log_level)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)
