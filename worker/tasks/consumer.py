"""The worker's consumer: a message it cannot decode, route or hand to its pool is dead-lettered and
acknowledged, and the worker lives on (a poison message must never crash-loop the workers).

Celery's own consumer logs such messages and rejects them, which drops them silently, and an exception
it does not expect while handing a message to the pool (a RecursionError pickling an event nested a few
hundred levels deep) kills the main process; the message is then delivered to the next worker, which dies
the same way. Here every such message becomes a dead letter with its reason (source `message`, or the
task's own source, so the usual replay applies) before it is acknowledged.

Usage events nested deeper than MAX_MESSAGE_DEPTH are taken out of their message one by one, each with
its own letter, and the rest of the message goes on: a bad event never takes a good one with it.
"""

from __future__ import annotations

import json
import time
from typing import Any

from celery.worker.consumer import Consumer
from kombu.message import Message

from worker.dead_letters import Letter, escaped_text, nesting_depth, storable_text
from worker.logs import get_logger
from worker.tasks.base import write_letters

log = get_logger(__name__)

MAX_MESSAGE_DEPTH = 32  # a usage event is 2 levels deep inside its message; pickling for the pool recurses
USAGE_TASKS = {"metering.record_usage": "event", "metering.record_usage_batch": "events"}
UNWRITABLE_PAUSE = 1.0  # seconds: a letter that cannot be written (PostgreSQL down) sends the message back


def depth(value: Any) -> int:
    """Nesting depth of a decoded message or event, counted up to one past MAX_MESSAGE_DEPTH."""
    return nesting_depth(value, MAX_MESSAGE_DEPTH)


def _task_name(message: Message) -> str | None:
    headers = message.headers if isinstance(message.headers, dict) else {}
    name = headers.get("task")
    return name if isinstance(name, str) else None


def _body_excerpt(message: Message) -> dict[str, str]:
    body = message.body
    text = body.decode("utf-8", "backslashreplace") if isinstance(body, bytes) else str(body)
    return {"content_type": escaped_text(str(message.content_type)), "body": escaped_text(text[:4000])}


class DeadLetteringConsumer(Consumer):
    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Message) -> Any:
            try:
                if not self._take_out_deep_events(message):
                    return None
                return handle(message)
            except Exception as exc:  # anything that would otherwise end the main process
                log.exception("message_not_handled", task=_task_name(message))
                return self._dead_letter(
                    message, f"the worker could not take this message: {type(exc).__name__}: {exc}"
                )

        return on_task_received

    def _take_out_deep_events(self, message: Message) -> bool:
        """Dead-letter what is nested too deeply to be handed to the pool. Returns whether anything of the
        message is left to run."""
        try:
            decoded = message.decode()
        except Exception as exc:  # RecursionError, a body that is not JSON, a content type not accepted
            self._dead_letter(message, f"message cannot be decoded: {type(exc).__name__}: {str(exc)[:200]}")
            return False
        if depth(decoded) <= MAX_MESSAGE_DEPTH:
            return True
        name = _task_name(message)
        events = _usage_events(decoded, name)
        if events is None:
            self._dead_letter(message, f"message nested deeper than {MAX_MESSAGE_DEPTH} levels")
            return False
        too_deep = [depth(event) > MAX_MESSAGE_DEPTH - 2 for event in events]
        kept = [event for event, deep in zip(events, too_deep, strict=True) if not deep]
        letters = [
            Letter("usage", event, f"event nested deeper than {MAX_MESSAGE_DEPTH - 2} levels", _ref(event), name)
            for event, deep in zip(events, too_deep, strict=True)
            if deep
        ]
        if not self._write(message, letters):
            return False
        if not kept or name == "metering.record_usage":
            message.ack()
            return False
        args, kwargs, embed = decoded
        if kwargs.get("events") is not None:
            kwargs = {**kwargs, "events": kept}
        else:
            args = [kept, *args[1:]]
        message.body = json.dumps([args, kwargs, embed]).encode("utf-8")
        message._decoded_cache = None
        return True

    def _write(self, message: Message, letters: list[Letter]) -> bool:
        try:
            write_letters(letters)
        except Exception:
            log.exception("dead_letter_write_failed", task=_task_name(message))
            time.sleep(UNWRITABLE_PAUSE)  # PostgreSQL is down: the message comes back; do not spin on it
            message.reject(requeue=True)
            return False
        return True

    def _dead_letter(self, message: Message, reason: str) -> None:
        name = _task_name(message)
        source = "usage" if name in USAGE_TASKS else "message"
        letter = Letter(source, _body_excerpt(message), reason, storable_text(_header(message, "id")), name)
        if self._write(message, [letter]):
            message.ack()

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        self._dead_letter(message, f"message cannot be decoded: {type(exc).__name__}: {str(exc)[:200]}")

    def on_unknown_message(self, body: Any, message: Message) -> None:
        self._dead_letter(message, "not a Celery task message (no task header)")

    def on_unknown_task(self, body: Any, message: Message, exc: Exception) -> None:
        self._dead_letter(message, f"no task named {escaped_text(repr(_task_name(message)))[:200]} in this worker")

    def on_invalid_task(self, body: Any, message: Message, exc: Exception) -> None:
        self._dead_letter(message, f"invalid task message: {type(exc).__name__}: {escaped_text(str(exc))[:200]}")


def _header(message: Message, key: str) -> Any:
    return message.headers.get(key) if isinstance(message.headers, dict) else None


def _usage_events(decoded: Any, name: str | None) -> list[Any] | None:
    """The events of a usage task message (protocol 2: [args, kwargs, embed]), else None."""
    if name not in USAGE_TASKS or not (isinstance(decoded, (list, tuple)) and len(decoded) == 3):
        return None
    args, kwargs, _ = decoded
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        return None
    value = kwargs.get(USAGE_TASKS[name], args[0] if args else None)
    if name == "metering.record_usage":
        return [value]
    return value if isinstance(value, list) else None


def _ref(event: Any) -> str | None:
    return storable_text(event.get("event_id")) if isinstance(event, dict) else None
