"""A stream of usage events sent with `send_task` while the broker is SIGKILLed and restarted.

Producers behave as the README asks of them: a send that raised was not confirmed, so it is sent again
(the event ids make that safe) until it returns. What the broker then owes is every event whose send
returned, in the ledger. A mixed stream takes both paths: batches on `metering.record_usage_batch` and
single events on `metering.record_usage`, so one run covers both.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

BATCH_EVENTS = 50
SINGLE_RUN = 20  # single events sent in a row between two batches
RESEND_PAUSE = 0.2  # seconds between two tries of a send that raised
SEND_DEADLINE = 120.0  # seconds one send may keep failing before the stream gives up


class Killable(Protocol):
    def kill(self) -> None: ...
    def start(self) -> None: ...


@dataclass
class Unit:
    task: str
    args: list[Any]
    event_ids: list[str]


@dataclass
class StreamResult:
    kills: int
    confirmed: dict[str, set[str]] = field(default_factory=dict)  # task -> ids of events whose send returned
    failed_sends: int = 0  # tries that raised (each resent)
    stored: set[str] = field(default_factory=set)  # event ids in the ledger at the end
    in_flight_at_kills: list[int] = field(default_factory=list)  # events confirmed, not yet stored, at each kill

    def lost(self, task: str) -> list[str]:
        return sorted(self.confirmed.get(task, set()) - self.stored)

    @property
    def all_confirmed(self) -> set[str]:
        return set().union(*self.confirmed.values())


def mixed_units(events: list[dict]) -> list[Unit]:
    """Batches of BATCH_EVENTS, each followed by a run of SINGLE_RUN single events."""
    units: list[Unit] = []
    position = 0
    while position < len(events):
        batch = events[position : position + BATCH_EVENTS]
        units.append(Unit("metering.record_usage_batch", [batch], [item["event_id"] for item in batch]))
        position += len(batch)
        units += single_units(events[position : position + SINGLE_RUN])
        position += SINGLE_RUN
    return units


def single_units(events: list[dict]) -> list[Unit]:
    return [Unit("metering.record_usage", [item], [item["event_id"]]) for item in events]


def send_until_confirmed(producer: Any, unit: Unit) -> int:
    """Send until `send_task` returns; the number of tries that raised."""
    deadline = time.monotonic() + SEND_DEADLINE
    failures = 0
    while True:
        try:
            producer.send_task(unit.task, args=unit.args)
            return failures
        except Exception:
            failures += 1
            if time.monotonic() > deadline:
                raise
            time.sleep(RESEND_PAUSE)


def stream_through_kills(
    producer: Any,
    broker: Killable,
    units: list[Unit],
    kills: int,
    stored_ids: Callable[[], set[str]],
    settle: float,
    pause: float = 0.002,
) -> StreamResult:
    """Send `units` while killing and restarting `broker` `kills` times, evenly through the stream.

    Then wait until every confirmed event is stored, or until nothing new has been stored for `settle`
    seconds (the broker lost some), and return what was confirmed and what was stored.
    """
    result = StreamResult(kills=kills)
    sent_units = 0
    failure: list[BaseException] = []

    def produce() -> None:
        nonlocal sent_units
        try:
            for unit in units:
                result.failed_sends += send_until_confirmed(producer, unit)
                result.confirmed.setdefault(unit.task, set()).update(unit.event_ids)
                sent_units += 1
                time.sleep(pause)  # spread the stream over the kills
        except BaseException as exc:
            failure.append(exc)

    producer_thread = threading.Thread(target=produce, name="producer", daemon=True)
    producer_thread.start()
    for kill in range(kills):
        while sent_units < (kill + 1) * len(units) // (kills + 1) and producer_thread.is_alive():
            time.sleep(0.01)
        result.in_flight_at_kills.append(len(result.all_confirmed - stored_ids()))
        broker.kill()
        broker.start()
    producer_thread.join(timeout=SEND_DEADLINE * 2)
    if failure:
        raise failure[0]
    confirmed = result.all_confirmed
    last_change, last_count = time.monotonic(), -1
    while time.monotonic() - last_change < settle:
        result.stored = stored_ids()
        if confirmed <= result.stored:
            break
        if len(result.stored) != last_count:
            last_change, last_count = time.monotonic(), len(result.stored)
        time.sleep(0.5)
    return result
