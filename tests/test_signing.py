"""Standard Webhooks signing: a known-answer test and a cross-check with the reference library."""

from __future__ import annotations

import base64
import time

import pytest
import standardwebhooks

from worker.pipeline import signing
from worker.pipeline.sender import payload_body

pytestmark = pytest.mark.unit

# The published test vector of the Standard Webhooks reference libraries.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_known_answer() -> None:
    assert signing.sign(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE


def test_secret_key_is_base64_decoded_after_prefix() -> None:
    assert signing.secret_key(SPEC_SECRET) == base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")


def test_reference_library_verifies_every_signature_of_a_rotation() -> None:
    old, new = SPEC_SECRET, "whsec_" + base64.b64encode(b"k" * 32).decode()
    timestamp = int(time.time())  # the reference library refuses stale timestamps
    header = signing.signature_header([new, old], SPEC_ID, timestamp, SPEC_BODY)
    assert len(header.split()) == 2
    headers = {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": header,
    }
    for secret in (old, new):
        assert standardwebhooks.Webhook(secret).verify(SPEC_BODY, headers) == {"test": 2432232314}


@pytest.mark.parametrize(
    ("header", "valid"),
    [
        (SPEC_SIGNATURE, True),
        (f"v1,bm9wZQ== {SPEC_SIGNATURE}", True),
        ("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE", False),
        ("v1,h0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=", False),
        ("", False),
    ],
)
def test_verify(header: str, valid: bool) -> None:
    assert signing.verify(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY, header) is valid


def test_body_change_breaks_signature() -> None:
    assert not signing.verify(
        SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY + b" ", SPEC_SIGNATURE
    )


def test_payload_body_is_compact_utf8_json_of_id_type_timestamp_and_data() -> None:
    event = {
        "id": "evt_1",
        "type": "order.created",
        "organization_id": "org_a",
        "occurred_at": "2026-01-01T00:00:00+01:00",
        "data": {"name": "Zoë ✓", "total": 12.5, "lines": [{"sku": "A", "n": 2}], "x": None},
    }
    body = payload_body(event)
    assert (
        body
        == (
            '{"id":"evt_1","type":"order.created","timestamp":"2026-01-01T00:00:00+01:00",'
            '"data":{"name":"Zoë ✓","total":12.5,"lines":[{"sku":"A","n":2}],"x":null}}'
        ).encode()
    )
    # Every call alike: the encoder made once keeps no state between payloads.
    assert payload_body(event) == body


def test_signing_leaves_each_secrets_key_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    other = "whsec_" + base64.b64encode(b"another key of 24 bytes!").decode()
    # Interleaved, and across a full cache being cleared: every signature as the spec's.
    monkeypatch.setattr(signing, "KEYED_CACHE_SIZE", 2)
    for _ in range(3):
        assert signing.sign(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE
        signing.sign(other, SPEC_ID, SPEC_TIMESTAMP, b"a different body")
        signing.sign(f"whsec_{base64.b64encode(b'a third').decode()}", "x", 1, b"")
    wh = standardwebhooks.Webhook(other)
    headers = {"webhook-id": SPEC_ID, "webhook-timestamp": str(int(time.time()))}
    body = b'{"n":1}'
    headers["webhook-signature"] = signing.sign(
        other, SPEC_ID, int(headers["webhook-timestamp"]), body
    )
    wh.verify(body, headers)  # raises if the signature is wrong
