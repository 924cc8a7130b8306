"""``listen``: the local receiver, in-process over real sockets, and once as the CLI runs it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from io import StringIO
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import standardwebhooks

from tests.test_cli import run_cli
from worker.ops import listen

pytestmark = pytest.mark.timeout(60)

SECRET = "whsec_" + base64.b64encode(b"listen-test-key-" * 2).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"some-other-key--" * 2).decode()


@asynccontextmanager
async def _listening(
    tmp_path: Path,
    **options: Any,  # noqa: ANN401
) -> AsyncIterator[tuple[listen.Listening, StringIO]]:
    """Run ``listen.serve`` until the block ends; yield where it listens and what it printed."""
    out = StringIO()
    stop = asyncio.Event()
    started: asyncio.Future[listen.Listening] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        listen.serve(out, port=0, cert_dir=tmp_path, stop=stop, started=started.set_result,
                     handle_signals=False, **options)
    )  # fmt: skip
    try:
        waiting: list[asyncio.Future[Any]] = [task, started]
        await asyncio.wait(waiting, timeout=10, return_when="FIRST_COMPLETED")
        if task.done():
            task.result()
        yield started.result(), out
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def _signed(secret: str, payload: dict[str, Any], message_id: str) -> tuple[bytes, dict[str, str]]:
    """A webhook as the service sends it, signed by the reference Standard Webhooks library."""
    body = json.dumps(payload)
    when = datetime.now(UTC)
    signature = standardwebhooks.Webhook(secret).sign(message_id, when, body)
    headers = {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }
    return body.encode(), headers


EVENT = {
    "id": "evt_listen_1",
    "type": "order.created",
    "timestamp": "2026-01-01T00:00:00Z",
    "data": {"order_id": "ord_42", "total": "19.90"},
}


async def test_prints_each_webhook_with_its_signature_verdict_and_answers_200(
    tmp_path: Path,
) -> None:
    async with _listening(tmp_path, secret=SECRET) as (where, out), aiohttp.ClientSession() as http:
        assert where.url == f"http://127.0.0.1:{where.port}"
        assert f"listening on {where.url}/" in out.getvalue()
        body, headers = _signed(SECRET, EVENT, "evt_listen_1")
        async with http.post(f"{where.url}/webhooks", data=body, headers=headers) as response:
            assert response.status == 200
        good = out.getvalue().split("\n\n")[-2]
        summary, *pretty = good.splitlines()
        assert "POST /webhooks" in summary
        assert "webhook-id evt_listen_1" in summary
        assert "type order.created" in summary
        assert summary.endswith("signature verified")
        assert '    "order_id": "ord_42",' in pretty
        assert json.loads("\n".join(pretty)) == EVENT

        body, headers = _signed(OTHER_SECRET, {**EVENT, "id": "evt_forged"}, "evt_forged")
        async with http.post(f"{where.url}/webhooks", data=body, headers=headers) as response:
            assert response.status == 200
        forged = out.getvalue().split("\n\n")[-2]
        assert "webhook-id evt_forged" in forged
        assert "INVALID signature" in forged
        assert "signature verified" not in forged

        # The same body with a signature made over a changed one does not verify either.
        tampered = body.replace(b"19.90", b"0.01")
        _, headers = _signed(SECRET, {**EVENT, "id": "evt_forged"}, "evt_forged")
        async with http.post(f"{where.url}/x", data=tampered, headers=headers) as response:
            assert response.status == 200
        assert "INVALID signature" in out.getvalue().split("\n\n")[-2]


async def test_without_a_secret_nothing_is_verified(tmp_path: Path) -> None:
    async with _listening(tmp_path) as (where, out), aiohttp.ClientSession() as http:
        body, headers = _signed(SECRET, EVENT, "evt_listen_1")
        async with http.post(f"{where.url}/", data=body, headers=headers) as response:
            assert response.status == 200
        assert "unverified (no --secret)" in out.getvalue().split("\n\n")[-2]
        assert "signatures: not checked (no --secret)" in out.getvalue()


async def test_a_large_body_is_bounded_and_control_characters_escaped(tmp_path: Path) -> None:
    async with _listening(tmp_path) as (where, out), aiohttp.ClientSession() as http:
        data = {f"key_{n}": "v" * 50 for n in range(500)}
        payload = json.dumps({"type": "order.updated\x1b[2J", "data": data}).encode()
        async with http.post(f"{where.url}/big", data=payload) as response:
            assert response.status == 200
        printed = out.getvalue().split("\n\n")[-2]
        assert len(printed) < listen.BODY_CHARS + 500
        assert f"({len(payload)} bytes in all; the rest is not shown)" in printed
        assert "\x1b" not in printed
        assert "type order.updated\\x1b[2J" in printed


async def test_tls_with_the_printed_certificate(tmp_path: Path) -> None:
    async with _listening(tmp_path, secret=SECRET, tls=True) as (where, out):
        assert where.url == f"https://127.0.0.1:{where.port}"
        assert where.cert_path == tmp_path / listen.CERT_FILE
        banner = out.getvalue()
        assert f"SELLFERN_WEBHOOKS_CA_BUNDLE={where.cert_path}" in banner
        assert "SELLFERN_WEBHOOKS_ALLOWED_PRIVATE_NETWORKS=127.0.0.0/8" in banner
        assert (tmp_path / listen.KEY_FILE).stat().st_mode & 0o077 == 0

        # Trusting the printed certificate alone, as the service does with CA_BUNDLE, in the
        # strict mode newer Pythons default to.
        context = ssl.create_default_context(cafile=str(where.cert_path))
        context.verify_flags |= ssl.VERIFY_X509_STRICT
        body, headers = _signed(SECRET, EVENT, "evt_listen_1")
        async with aiohttp.ClientSession() as http:
            for host in ("127.0.0.1", "localhost"):
                url = f"https://{host}:{where.port}/webhooks"
                async with http.post(url, data=body, headers=headers, ssl=context) as response:
                    assert response.status == 200
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await http.post(
                    f"{where.url}/webhooks", data=body, ssl=ssl.create_default_context()
                )
        assert out.getvalue().count("signature verified") == 2
    cert = where.cert_path.read_bytes()

    # A restarted listener keeps its certificate, so a running service still trusts it.
    async with _listening(tmp_path, tls=True) as (again, _):
        assert again.cert_path is not None
        assert again.cert_path.read_bytes() == cert


def test_signature_verdicts() -> None:
    body = b'{"a": 1}'
    seconds = int(time.time())
    now = float(seconds)
    header = standardwebhooks.Webhook(SECRET).sign(
        "msg_1", datetime.fromtimestamp(seconds, UTC), body.decode()
    )
    ok = {"webhook-id": "msg_1", "webhook-timestamp": str(seconds), "webhook-signature": header}
    assert listen.signature_verdict(SECRET, ok, body, now) == "signature verified"
    rotation = {**ok, "webhook-signature": f"v1,b2xk {header}"}
    assert listen.signature_verdict(SECRET, rotation, body, now) == "signature verified"
    late = listen.signature_verdict(SECRET, ok, body, now + 600)
    assert late.startswith("signature verified, but the timestamp is 600s off")
    assert listen.signature_verdict(SECRET, ok, b'{"a": 2}', now).startswith("INVALID signature")
    assert listen.signature_verdict(SECRET, {}, body, now).startswith("INVALID: webhook-id")
    bad_time = {**ok, "webhook-timestamp": "soon"}
    assert "not Unix seconds" in listen.signature_verdict(SECRET, bad_time, body, now)
    assert listen.signature_verdict(None, ok, body, now) == "unverified (no --secret)"


def test_bad_secret_or_port_is_refused_by_the_command_line() -> None:
    result = run_cli("listen", "--secret", "not-a-secret")
    assert result.returncode == 2
    assert "whsec_" in result.stderr
    result = run_cli("listen", "--secret", "whsec_!!!")
    assert result.returncode == 2
    assert "base64" in result.stderr
    result = run_cli("listen", "--port", "70000")
    assert result.returncode == 2
    assert "65535" in result.stderr


async def test_the_command_prints_its_port_receives_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELLFERN_WEBHOOKS_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.cli", "listen", "--port", "0", "--tls", "--secret", SECRET,
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        first = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        port = int(first.split("(port ")[1].split(")")[0])
        context = ssl.create_default_context(cafile=str(tmp_path / listen.CERT_FILE))
        body, headers = _signed(SECRET, EVENT, "evt_listen_1")
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"https://127.0.0.1:{port}/webhooks", data=body, headers=headers, ssl=context
            ) as response,
        ):
            assert response.status == 200
        printed = b""
        while b"signature verified" not in printed:
            printed += await asyncio.wait_for(process.stdout.readline(), 10)
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 10)
    assert code == 0
    assert b"evt_listen_1" in printed
