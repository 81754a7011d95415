"""Events lost per broker kill: `python -m bench.broker_kills [--kills 10] [--events 20000]` (a few minutes).

For each broker configuration a private broker (tests/support/servers.py) carries a mixed stream of
batches and single events, sent with `send_task` by a producer that resends every send that raised,
to two worker processes, while the broker is SIGKILLed and restarted `--kills` times. Lost: events whose
send returned and that never reached the ledger (waiting out the visibility timeout). It creates its own
database and claims a Redis database (for the quota cache), prints a table and drops what it created;
docs/operations.md keeps the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

VISIBILITY_TIMEOUT = 10  # seconds: how soon Redis hands abandoned messages to another worker


@dataclass(frozen=True)
class Configuration:
    name: str
    server: Callable[[], AbstractContextManager[Any]]
    stock_kombu: bool = False


def configurations() -> list[Configuration]:
    from tests.support.servers import private_rabbitmq, private_redis

    return [
        Configuration("Redis, no persistence", lambda: private_redis(appendonly=False)),
        Configuration("Redis, AOF everysec", lambda: private_redis(appendonly=True, appendfsync="everysec")),
        Configuration("Redis, AOF always", lambda: private_redis(appendonly=True, appendfsync="always")),
        Configuration(
            "Redis, AOF always, kombu's stock transport",
            lambda: private_redis(appendonly=True, appendfsync="always"),
            stock_kombu=True,
        ),
        Configuration("RabbitMQ, quorum queues, confirms", private_rabbitmq),
    ]


@contextmanager
def producer_for(broker_url: str, stock_kombu: bool) -> Iterator[Any]:
    from worker.celery import app, create_app
    from worker.config import settings

    os.environ["CELERY_BROKER_URL"] = broker_url
    settings.cache_clear()
    try:
        producer = create_app()
    finally:
        del os.environ["CELERY_BROKER_URL"]
        settings.cache_clear()
    app.set_current()
    if stock_kombu:
        producer.conf.broker_transport = "redis"
    try:
        yield producer
    finally:
        producer.close()


def stored_ids(tag: str) -> Callable[[], set[str]]:
    import sqlalchemy as sa

    from worker import db

    def stored() -> set[str]:
        with db.engine().connect() as conn:
            query = sa.text("SELECT event_id FROM usage_events WHERE event_id LIKE :pattern")
            return set(conn.execute(query, {"pattern": f"%.{tag}.%"}).scalars())

    return stored


def measure(
    configuration: Configuration, number: int, args: argparse.Namespace, users: list[str], log_dir: Path
) -> dict:
    from bench import harness
    from bench.data import make_stream
    from tests.support.kill_streams import mixed_units, stream_through_kills

    tag = f"kills{number}"
    stream = make_stream(tag, args.events, users, datetime.now(UTC), duplicates=0.0, seed=number)
    with configuration.server() as server, producer_for(server.url, configuration.stock_kombu) as producer:
        env = {**os.environ, "CELERY_BROKER_URL": server.url, "CELERY_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT)}
        app = "bench.stock_kombu" if configuration.stock_kombu else "worker"
        workers = [harness.start_worker(f"{tag}-{n}", env, log_dir, concurrency=1, app=app) for n in range(2)]
        began = time.monotonic()
        try:
            result = stream_through_kills(
                producer, server, mixed_units(stream.events), args.kills, stored_ids(tag), settle=VISIBILITY_TIMEOUT * 3
            )
        finally:
            for worker in workers:
                worker.stop()
    lost = set(result.lost("metering.record_usage_batch")) | set(result.lost("metering.record_usage"))
    return {
        "configuration": configuration.name,
        "kills": args.kills,
        "events": len(stream.events),
        "confirmed": len(result.all_confirmed),
        "lost": len(lost),
        "lost_batch": len(result.lost("metering.record_usage_batch")),
        "lost_single": len(result.lost("metering.record_usage")),
        "failed_sends": result.failed_sends,
        "in_flight": sum(result.in_flight_at_kills) / max(1, len(result.in_flight_at_kills)),
        "seconds": time.monotonic() - began,
    }


def print_table(rows: list[dict]) -> None:
    print(
        "| configuration | kills | events confirmed | lost (batch + single) | lost per kill | sends resent"
        " | in flight at a kill | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['configuration']} | {row['kills']} | {row['confirmed']:,} | {row['lost']:,} "
            f"({row['lost_batch']:,} + {row['lost_single']:,}) | {row['lost'] / row['kills']:.1f} | "
            f"{row['failed_sends']:,} | {row['in_flight']:,.0f} | {row['seconds']:.0f} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.broker_kills", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--only", help="run the configurations whose name contains this")
    args = parser.parse_args(argv)
    from bench import harness

    run_id = f"kills_{os.getpid()}"
    redis_db = harness.claim_redis_db(run_id)
    database = f"ws_bench_{run_id}"
    os.environ.update(
        {
            "DATABASE_URL": harness.database_url(database),
            "REDIS_URL": f"{harness.REDIS_BASE}/{redis_db}",
            "LOG_LEVEL": "INFO",
            "USAGE_FLUSH_INTERVAL": "0.05",
            "PROMETHEUS_MULTIPROC_DIR": str(Path(tempfile.gettempdir()) / f"ws_bench_metrics_{run_id}"),
        }
    )
    log_dir = Path(tempfile.mkdtemp(prefix=f"ws_bench_{run_id}_"))
    from bench.data import create_users
    from worker import db

    rows = []
    try:
        db.migrate(os.environ["DATABASE_URL"])
        users = create_users(50, datetime.now(UTC))
        for number, configuration in enumerate(configurations()):
            if args.only and args.only not in configuration.name:
                continue
            rows.append(measure(configuration, number, args, users, log_dir))
            print_table(rows[-1:])
    finally:
        db.engine().dispose()
        harness.drop_database(database)
        harness.release_redis(os.environ["REDIS_URL"])
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    print()
    print_table(rows)
    shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
