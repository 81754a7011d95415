"""`python -m worker COMMAND` (also installed as `worldspeak-worker`): operators' commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from worker import db
from worker.config import ConfigError, settings
from worker.logs import configure_logging

Command = Callable[[argparse.Namespace], int]


def cmd_migrate(_args: argparse.Namespace) -> int:
    db.migrate(settings().database_url)
    print(f"schema applied to {db.make_url(settings().database_url).database}")
    return 0


def cmd_web(_args: argparse.Namespace) -> int:
    import uvicorn

    config = settings()
    uvicorn.run(
        "worker.web:app",
        host=config.web_host,
        port=config.web_port,
        workers=config.web_concurrency,
        log_config=None,  # keep the JSON logging configured above
        proxy_headers=True,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worldspeak-worker", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("migrate", help="apply schema.sql (creates the database if missing; safe to repeat)")
    commands.add_parser("web", help="serve HTTP (WEB_HOST, PORT, WEB_CONCURRENCY)")
    return parser


COMMANDS: dict[str, Command] = {
    "migrate": cmd_migrate,
    "web": cmd_web,
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        configure_logging(settings().log_level)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)
