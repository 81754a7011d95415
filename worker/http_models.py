"""The HTTP API's bodies and answers as msgspec Structs, and the OpenAPI 3.1 document built from them.

msgspec rather than pydantic: it decodes and validates a body in one pass in C (several times faster than
pydantic 2 on small objects, and faster than `json.loads` alone for typed bodies), encodes answers the
same way, and writes JSON Schema 2020-12, which is what OpenAPI 3.1 uses, from the same types
(`msgspec.json.schema_components`). Validation errors name the field (`... - at $.used_seconds`), which
becomes the 400's reason. The usage-event model documents what `metering.parse_event` accepts (that
validation stays where it is: it also applies to events that arrive through the broker); a test checks
that events built from this schema pass it.

The web builds every JSON answer from these models, and `openapi_document` describes every route from the
same models, so the document cannot drift from the code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from worker.config import settings
from worker.metering import events


def whole(pattern: str) -> str:
    """A pattern anchored as JSON Schema reads it (ECMA-262: `$` only at the very end). The checks that
    decide are metering's own, which match the whole string in Python."""
    return f"^(?:{pattern})$"


UUID_TEXT = Annotated[str, Meta(extra_json_schema={"format": "uuid"})]
TIME_TEXT = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]  # RFC 3339, with an offset
SECONDS = Annotated[float, Meta(ge=0)]
LANGUAGE = Annotated[
    str,
    Meta(
        pattern=whole(events.LANGUAGE.pattern),
        max_length=35,
        description="Code of the language practised: `en`, `zh`, `pt-BR`.",
        examples=["en"],
    ),
]
FEATURE = Annotated[
    str,
    Meta(
        pattern=whole(events.FEATURE.pattern),
        max_length=64,
        description="Short lowercase name of what the microphone was used for.",
        examples=["conversation", "pronunciation_check"],
    ),
]


class Error(Struct):
    """Why a request was refused or could not be served."""

    error: str


# -- health ------------------------------------------------------------------------------------------------


class Readiness(Struct, omit_defaults=True):
    """Whether PostgreSQL and Redis answer; `down` names each one that does not, and why."""

    status: Literal["ready", "unavailable"]
    down: dict[str, str] = msgspec.field(default_factory=dict)


# -- usage events ------------------------------------------------------------------------------------------


MAX_EVENT_SECONDS = settings().usage_max_event_seconds  # as the running configuration limits events


class UsageEvent(Struct, forbid_unknown_fields=True):
    """One stretch of microphone use. Events that break a rule the schema cannot say (a time outside
    USAGE_MAX_LATENESS_DAYS / USAGE_MAX_FUTURE_SECONDS of now, an unknown user) are rejected alone, with a
    reason, in the 202 answer."""

    event_id: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=128,
            pattern="^[^\\x00]*$",
            description="The idempotency key: an id is counted once, forever.",
        ),
    ]
    user_id: Annotated[str, Meta(extra_json_schema={"format": "uuid"}, description="A `profiles` row.")]
    started_at: Annotated[
        str,
        Meta(
            extra_json_schema={"format": "date-time"},
            description="RFC 3339 time with an offset (`Z` or `+09:00`); kept to the millisecond.",
        ),
    ]
    seconds: Annotated[
        float,
        Meta(
            gt=0.0005,
            le=MAX_EVENT_SECONDS,
            description=(
                f"How long the microphone was open, at most {MAX_EVENT_SECONDS} (USAGE_MAX_EVENT_SECONDS); "
                "rounded to the millisecond, it must be at least 0.001."
            ),
        ),
    ]
    language: LANGUAGE
    conversation_id: UUID_TEXT | None = None
    feature: FEATURE | None = None


class UsageEventBatch(Struct, forbid_unknown_fields=True):
    """Up to 1000 events in one request."""

    events: Annotated[list[UsageEvent], Meta(min_length=1, max_length=events.MAX_BATCH_EVENTS)]


class Rejection(Struct):
    """An event that cannot be applied as it is (also kept in dead_letters, from where it replays)."""

    index: Annotated[int, Meta(ge=0, description="Its place in the request.")]
    event_id: str | None
    reason: str


class IngestAnswer(Struct):
    """What became of each event, committed before this answer: recorded, already known, or rejected."""

    accepted: Annotated[list[str], Meta(description="Event ids committed to the ledger by this request.")]
    duplicates: Annotated[list[str], Meta(description="Event ids repeated in the request or already recorded.")]
    rejected: list[Rejection]


# -- quota -------------------------------------------------------------------------------------------------


class QuotaAnswer(Struct):
    """The user's minutes of this period. `remaining_seconds` is neither used nor held by live sessions
    (`reserved_seconds`); `blocked` means usage reached the limit."""

    user_id: UUID_TEXT
    plan: Literal["free", "standard", "premium", "enterprise"]
    limit_seconds: SECONDS
    used_seconds: SECONDS
    remaining_seconds: SECONDS
    reserved_seconds: SECONDS
    blocked: bool
    period_start: TIME_TEXT
    period_end: TIME_TEXT


# -- live sessions -----------------------------------------------------------------------------------------


class SessionStart(Struct, forbid_unknown_fields=True):
    """A live conversation about to use the microphone; its usage is recorded with these labels."""

    user_id: UUID_TEXT
    language: LANGUAGE
    conversation_id: UUID_TEXT | None = None
    feature: FEATURE | None = None


class SessionReport(Struct, forbid_unknown_fields=True):
    """The session's total microphone time so far (or, to `end`, in all): never decreasing."""

    used_seconds: Annotated[
        float, Meta(ge=0, le=10**9, description="Seconds, to the millisecond, since the session started.")
    ]


class SessionGrant(Struct):
    """A grant: the session may use `granted_seconds` more from now, and must report before then (and
    before `expires_at`, or it expires). 0: stop the microphone; report again to learn if more is granted."""

    session_id: UUID_TEXT
    granted_seconds: SECONDS
    expires_at: TIME_TEXT
    remaining_seconds: Annotated[
        float, Meta(ge=0, description="The user's seconds of the period neither used nor granted to any session.")
    ]
    blocked: Annotated[bool, Meta(description="The user's usage reached the limit.")]
    used_seconds: Annotated[float, Meta(ge=0, description="The session's total, recorded.")]
    beyond_grant_seconds: Annotated[
        float, Meta(ge=0, description="Of that total, what was reported past the grants (recorded all the same).")
    ]


class SessionEnded(Struct):
    """A session that is over: ended by its app, or expired after SESSION_TTL_SECONDS of silence."""

    session_id: UUID_TEXT
    state: Literal["ended", "expired"]
    recorded_seconds: SECONDS
    beyond_grant_seconds: SECONDS
    ended_at: TIME_TEXT


class SessionOver(Struct):
    """A heartbeat for a session that is over: nothing was recorded. Send its total to `end` (which records
    it) and start a new session."""

    error: str
    session: SessionEnded


# -- Stripe ------------------------------------------------------------------------------------------------


class StripeEventData(Struct):
    object: dict[str, Any]


class StripeEvent(Struct):
    """A Stripe event, as Stripe signs and sends it (fields beyond these are kept as they are)."""

    id: str
    type: str
    created: int
    data: StripeEventData


class StripeReceipt(Struct):
    """The event is stored; `duplicate` when it was stored before."""

    received: bool
    duplicate: bool


# -- the OpenAPI document ----------------------------------------------------------------------------------

TEXT = str  # an answer in text/plain
MODELS = (Error, Readiness, UsageEvent, UsageEventBatch, IngestAnswer, QuotaAnswer, SessionStart, SessionReport,
          SessionGrant, SessionEnded, SessionOver, StripeEvent, StripeReceipt)  # fmt: skip
SCHEMA_PREFIX = "#/components/schemas/"


def encode(model: Struct) -> bytes:
    return msgspec.json.encode(model)


@dataclass(frozen=True)
class Operation:
    """What one route takes and answers, for the OpenAPI document."""

    method: str
    path: str
    summary: str
    answers: dict[int, tuple[Any, str]]  # status -> (model, TEXT or dict for any JSON object; description)
    body: tuple[type[Struct], ...] = ()  # one of these
    secured: bool = False
    parameters: tuple[dict, ...] = ()
    description: str = ""


def _schema(model: Any) -> dict:
    if model is TEXT:
        return {"type": "string"}
    if model is dict:
        return {"type": "object"}
    return {"$ref": SCHEMA_PREFIX + model.__name__}


def _content(model: Any) -> dict:
    return {"text/plain" if model is TEXT else "application/json": {"schema": _schema(model)}}


def _operation(operation: Operation) -> dict:
    document: dict[str, Any] = {
        "operationId": re.sub(r"[^A-Za-z0-9]+", "_", f"{operation.method} {operation.path}").strip("_").lower(),
        "summary": operation.summary,
        "responses": {
            str(status): {"description": description, "content": _content(model)}
            for status, (model, description) in sorted(operation.answers.items())
        },
    }
    if operation.description:
        document["description"] = operation.description
    if operation.parameters:
        document["parameters"] = list(operation.parameters)
    if operation.body:
        schemas = [_schema(model) for model in operation.body]
        schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        document["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    if operation.secured:
        document["security"] = [{"bearer": []}]
    return document


def path_parameter(name: str, description: str) -> dict:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string", "format": "uuid"}}  # fmt: skip


def openapi_document(operations: list[Operation], title: str, version: str) -> dict:
    """The OpenAPI 3.1 document of these operations, its schemas generated from the models."""
    _, components = msgspec.json.schema_components(MODELS, ref_template=SCHEMA_PREFIX + "{name}")
    paths: dict[str, dict] = {}
    for operation in operations:
        paths.setdefault(operation.path, {})[operation.method.lower()] = _operation(operation)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "One of INGEST_API_TOKENS."}
            },
        },
    }
