"""Generated input: the API against its own OpenAPI document, and the event parser.

The API runs in a thread with its own event loop (schemathesis calls it synchronously through
``requests``), on SQLite and the session's RabbitMQ virtual host, with a real token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from schemas.events import EVENT_TYPES, EventEnvelope
from tests.conftest import make_settings
from worker import runtime
from worker.api.routes import MAX_BODY_BYTES
from worker.pipeline.fanout import MAX_NESTING, RejectedEventError, parse_event
from worker.pipeline.sender import payload_body

pytestmark = pytest.mark.timeout(120)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES_PER_OPERATION = 30
REJECT_REASONS = {
    "oversize",
    "invalid_encoding",
    "invalid_json",
    "too_deep",
    "invalid_envelope",
    "unknown_type",
}


_Started = tuple[asyncio.AbstractEventLoop, asyncio.Event, runtime.Running]


@dataclass
class ThreadedApi:
    base: str
    token: str


@pytest.fixture(scope="module")
def api(
    amqp_url: str, ca_bundle: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ThreadedApi]:
    """The API process, in a thread with its own loop; stopped as SIGTERM would."""
    database_url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('fuzz') / 'fuzz.db'}"
    # The fuzzer sends far more than a client may; the limit has its own test.
    settings = make_settings(database_url, amqp_url, ca_bundle, rate_limit_per_second=100_000,
                             rate_limit_burst=100_000)  # fmt: skip
    ready: concurrent.futures.Future[_Started] = concurrent.futures.Future()

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            await runtime.run(
                settings,
                "api",
                stop=stop,
                started=lambda running: ready.set_result((loop, stop, running)),
                handle_signals=False,
            )
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    # asyncio.run: the loop is closed in its own thread, after its last task has ended.
    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    loop, stop, running = ready.result(timeout=30)
    try:
        create = running.store.tokens.create("org_fuzz", ["webhooks:manage"], "fuzz")
        _, token = asyncio.run_coroutine_threadsafe(create, loop).result(10)
        yield ThreadedApi(f"http://127.0.0.1:{running.api_port}", token)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)


def _real_ids(session: requests.Session, api: ThreadedApi) -> dict[str, str]:
    """A fresh endpoint with one attempt, so that cases also reach past the 404."""
    base = f"{api.base}/api/v2/webhooks"
    body = {"url": "https://127.0.0.1:9/fuzz", "events": ["order.created"]}
    created = session.post(base, json=body, timeout=10)
    assert created.status_code == 201, created.text
    webhook_id = created.json()["id"]
    attempt = session.post(f"{base}/{webhook_id}/test", timeout=10)
    assert attempt.status_code == 200, attempt.text
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    recovery = session.post(f"{base}/{webhook_id}/recover", json={"since": since}, timeout=10)
    assert recovery.status_code == 202, recovery.text
    return {
        "webhook_id": webhook_id,
        "attempt_id": attempt.json()["id"],
        "event_id": attempt.json()["event_id"],  # the test event, stored like any other
        "recovery_id": recovery.json()["id"],
    }


def test_api_conforms_to_its_openapi_document(api: ThreadedApi) -> None:
    """Every operation, with valid and invalid input, on unknown and on real ids.

    Negative cases also break the Authorization header on purpose: 401 is documented too.
    """
    schema = schemathesis.openapi.from_url(f"{api.base}/api/v2/openapi.json")
    failures: list[str] = []
    statuses: set[tuple[str, int]] = set()
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    started = time.monotonic()
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {api.token}"
        for operation in operations:
            real = _real_ids(session, api)
            path_parameters = {k: v for k, v in real.items() if f"{{{k}}}" in operation.path}
            runs = [
                ("positive", operation.as_strategy(GenerationMode.POSITIVE)),
                ("negative", operation.as_strategy(GenerationMode.NEGATIVE)),
            ]
            if path_parameters:
                strategy = operation.as_strategy(
                    GenerationMode.POSITIVE, path_parameters=path_parameters
                )
                runs.append(("positive, real ids", strategy))
            for label, strategy in runs:

                @hypothesis.settings(
                    max_examples=EXAMPLES_PER_OPERATION,
                    deadline=None,
                    database=None,
                    derandomize=True,
                    suppress_health_check=list(hypothesis.HealthCheck),
                    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                )
                @hypothesis.given(case=strategy)
                def call(case: schemathesis.Case[Any]) -> None:
                    response = case.call_and_validate(
                        base_url=f"{api.base}/api/v2", session=session, checks=CHECKS, timeout=10
                    )
                    statuses.add((case.operation.label, response.status_code))

                try:
                    call()
                except Exception as exc:
                    failures.append(f"{operation.label} ({label}): {exc}")
    assert not failures, "\n\n".join(failures)
    assert time.monotonic() - started < 60
    # The fuzzer got past validation on every operation, not only into its error answers.
    succeeded = {label for label, status in statuses if status < 300}
    assert succeeded == {operation.label for operation in operations}, statuses


def test_oversized_body_is_refused_before_it_is_read(api: ThreadedApi) -> None:
    """413 on the declared length alone, and on a chunked body once it passes the limit."""
    host, port = api.base.removeprefix("http://").split(":")
    head = (
        "POST /api/v2/webhooks HTTP/1.1\r\n"
        f"Host: {host}\r\nAuthorization: Bearer {api.token}\r\n"
        "Content-Type: application/json\r\n"
    )
    # A gigabyte is announced and ten bytes are sent: answering at all proves it was not awaited.
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(f"{head}Content-Length: {2**30}\r\n\r\n".encode() + b'{"url": "h')
        status, body = _read_response(connection)
    assert status == 413
    assert json.loads(body)["error"]["code"] == "payload_too_large"

    # Chunked, no length: refused once past the limit, though the body never ends.
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"x" * 8192
        try:
            for _ in range(2 * MAX_BODY_BYTES // len(chunk)):
                connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close while we are still sending
        status, body = _read_response(connection)
    assert status == 413
    assert json.loads(body)["error"]["code"] == "payload_too_large"


def _read_response(connection: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        received = connection.recv(65536)
        assert received, f"connection closed without an answer: {data!r}"
        data += received
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(
        int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")
    )
    while len(rest) < length:
        received = connection.recv(65536)
        assert received
        rest += received
    return int(lines[0].split()[1]), rest[:length]


# --- the event parser ------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_ENVELOPE = st.fixed_dictionaries(
    {},
    optional={
        "id": st.sampled_from(["evt_1", "evt_01JDQ3V8J6W9E5X1T0M2ZC4R7K", "", "x" * 300]) | _JSON,
        "type": st.sampled_from([*EVENT_TYPES, "order.deleted", ""]) | _JSON,
        "organization_id": st.sampled_from(["org_acme", "", "org_" + "x" * 200]) | _JSON,
        "occurred_at": st.sampled_from(["2026-11-28T10:00:00Z", "2026-11-28", "yesterday"])
        | st.datetimes().map(lambda d: d.isoformat())
        | _JSON,
        "data": st.dictionaries(st.text(max_size=8), _JSON, max_size=4) | _JSON,
        "extra": _JSON,
    },
)


# Valid envelopes, so that the accepting branch is exercised as much as the rejecting ones.
_VALID = st.fixed_dictionaries(
    {
        "id": st.from_regex(r"\Aevt_[A-Za-z0-9_-]{1,96}\Z"),
        "type": st.sampled_from(EVENT_TYPES),
        "organization_id": st.from_regex(r"\Aorg_[A-Za-z0-9_-]{1,60}\Z"),
        "occurred_at": st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
        "data": st.dictionaries(st.text(max_size=8), _JSON, max_size=4),
    }
)


def _nested(depth: int) -> Any:  # noqa: ANN401 - any JSON value
    value: Any = {}
    for _ in range(depth):
        value = {"a": [value]}
    return value


_BODIES = (
    st.binary(max_size=512)
    | _VALID.map(lambda v: json.dumps(v).encode())
    | _JSON.map(lambda v: json.dumps(v).encode())
    | _ENVELOPE.map(lambda v: json.dumps(v).encode())
    | _ENVELOPE.map(lambda v: json.dumps(v).encode("utf-16"))
    | st.integers(0, 3 * MAX_NESTING).map(
        lambda d: json.dumps(
            {
                "id": "evt_1",
                "type": "order.created",
                "organization_id": "org_a",
                "occurred_at": "2026-11-28T10:00:00Z",
                "data": _nested(d),
            }
        ).encode()
    )
    | st.integers(1, 200_000).map(lambda n: b"[" * n)
)


def _check_rejection(exc: RejectedEventError) -> None:
    assert exc.reason in REJECT_REASONS
    assert exc.detail


@hypothesis.settings(max_examples=400, deadline=None, database=None)
@hypothesis.given(body=_BODIES, max_bytes=st.sampled_from([64, 4096, 256 * 1024]))
def test_parse_event_accepts_or_rejects_with_a_known_reason(body: bytes, max_bytes: int) -> None:
    """Either a valid envelope or RejectedEventError with a known reason: nothing else."""
    try:
        envelope, raw = parse_event(body, max_bytes)
    except RejectedEventError as exc:
        _check_rejection(exc)
        return
    assert isinstance(envelope, EventEnvelope)
    assert envelope.type in EVENT_TYPES
    assert len(body) <= max_bytes
    assert raw == json.loads(body)
    assert raw["id"] == envelope.id
    assert payload_body(raw)  # whatever is accepted can be sent


@pytest.mark.parametrize(
    ("text", "accepted"),
    [
        ('"\\ud83d\\ude00"', True),  # a pair, as an ASCII-only encoder writes an emoji
        ('"\\ud800"', False),
        ('"x\\uDC00"', False),
        ('"\\\\ud800"', True),  # an escaped backslash, then plain letters
    ],
)
def test_parse_event_refuses_a_lone_surrogate(text: str, accepted: bool) -> None:
    body = (
        '{"id": "evt_1", "type": "order.created", "organization_id": "org_a", '
        f'"occurred_at": "2026-11-28T10:00:00Z", "data": {{"name": {text}}}}}'
    ).encode()
    if accepted:
        _, raw = parse_event(body, 4096)
        assert payload_body(raw)
    else:
        with pytest.raises(RejectedEventError) as refused:
            parse_event(body, 4096)
        assert refused.value.reason == "invalid_json"
        assert "surrogate" in refused.value.detail


def test_parse_event_accepts_a_valid_envelope() -> None:
    envelope_fields = {"id": "evt_1", "type": "order.created", "organization_id": "org_a",
                       "occurred_at": "2026-11-28T10:00:00Z", "data": {"n": 1}}  # fmt: skip
    body = json.dumps(envelope_fields).encode()
    envelope, raw = parse_event(body, 4096)
    assert (envelope.id, raw["data"]) == ("evt_1", {"n": 1})
