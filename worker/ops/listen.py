"""``listen``: a local receiver for trying the service out.

It binds 127.0.0.1 only, answers 200 to every request, and prints each webhook it gets: when,
its ``webhook-id`` and type, whether its Standard Webhooks signature verifies with the secret
given, and its JSON body, pretty and bounded. With ``--tls`` it serves https with a self-signed
certificate for ``127.0.0.1`` and ``localhost``: the service then delivers to it as to a
customer's endpoint, once started with ``SELLFERN_WEBHOOKS_CA_BUNDLE`` pointing at the
certificate and ``SELLFERN_WEBHOOKS_ALLOWED_PRIVATE_NETWORKS=127.0.0.0/8`` (loopback is otherwise
refused by the SSRF guard). Without ``--tls`` it serves plain http, which the API accepts only
for an IP address inside ``ALLOWED_PRIVATE_NETWORKS`` (``http://127.0.0.1:…``, not ``localhost``).

The certificate and its key are written to the current directory and reused while they are
valid: the service loads its CA bundle once, at start, so a restarted ``listen`` keeps being
trusted. The certificate is not a CA (``CA:FALSE``): trusting it trusts nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import ipaddress
import json
import os
import signal
import ssl
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from worker.pipeline import signing

# The API's default is 8080 and the worker's metrics 9090; 8000 is clear of both.
DEFAULT_PORT = 8000
HOST = "127.0.0.1"
CERT_FILE = "sellfern-webhooks-listen.pem"
KEY_FILE = "sellfern-webhooks-listen.key"
CERT_DAYS = 365
# Standard Webhooks libraries refuse a timestamp further than this from their clock.
TOLERANCE_SECONDS = 300
BODY_LINES = 60
BODY_CHARS = 4000
MAX_REQUEST_BYTES = 2 * 1024 * 1024


def port_arg(value: str) -> int:
    """An argparse type: a TCP port, 0 for any free one."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError("a port is 0 to 65535 (0: any free one)")
    return port


def secret_arg(value: str) -> str:
    """An argparse type: a ``whsec_`` secret whose key part is base64."""
    if not value.startswith(signing.SECRET_PREFIX):
        raise argparse.ArgumentTypeError("expected a whsec_… secret, as POST /webhooks returns")
    try:
        key = base64.b64decode(value.removeprefix(signing.SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise argparse.ArgumentTypeError("the part after whsec_ is not base64") from None
    if not key:
        raise argparse.ArgumentTypeError("the secret is empty after whsec_")
    return value


# --- what is printed (pure) ----------------------------------------------------------------


def _printable(text: str) -> str:
    """Control characters escaped except newlines: a request may carry terminal escapes."""
    return "".join(
        ch.encode("unicode_escape").decode()
        if ch != "\n" and unicodedata.category(ch).startswith("C")
        else ch
        for ch in text
    )


def signature_verdict(
    secret: str | None, headers: Mapping[str, str], body: bytes, now: float
) -> str:
    """Whether the request is signed with ``secret``, per Standard Webhooks."""
    if secret is None:
        return "unverified (no --secret)"
    message_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    header = headers.get("webhook-signature")
    if not message_id or not timestamp or not header:
        return "INVALID: webhook-id, webhook-timestamp or webhook-signature header missing"
    try:
        seconds = int(timestamp)
    except ValueError:
        return "INVALID: webhook-timestamp is not Unix seconds"
    if not signing.verify(secret, message_id, seconds, body, header):
        return "INVALID signature: not made with --secret over this body"
    skew = round(now - seconds)
    if abs(skew) > TOLERANCE_SECONDS:
        return f"signature verified, but the timestamp is {skew}s off (receivers refuse > 5 min)"
    return "signature verified"


def _body_text(body: bytes) -> tuple[str, str | None]:
    """The body as printed, bounded, and the event type if it is a JSON object with one."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        excerpt = body[:BODY_CHARS].decode("utf-8", "replace")
        return f"(not JSON, {len(body)} bytes) {excerpt}", None
    text = json.dumps(value, indent=2, ensure_ascii=False)
    lines = text.splitlines()
    if len(lines) > BODY_LINES or len(text) > BODY_CHARS:
        kept = "\n".join(lines[:BODY_LINES])[:BODY_CHARS]
        text = f"{kept}\n… ({len(body)} bytes in all; the rest is not shown)"
    kind = value.get("type") if isinstance(value, dict) else None
    return text, kind if isinstance(kind, str) else None


def describe_request(
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    secret: str | None,
    now: float,
) -> str:
    """The block printed for one request: a summary line, then the body."""
    text, kind = _body_text(body)
    when = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    summary = (
        f"{when}  {method} {path}  webhook-id {headers.get('webhook-id', '-')}  "
        f"type {kind or '-'}  {signature_verdict(secret, headers, body, now)}"
    )
    return _printable(f"{summary}\n{text}\n") + "\n"


# --- the certificate -------------------------------------------------------------------------


def _usable(cert_path: Path, key_path: Path, now: datetime) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    return (
        cert.not_valid_after_utc > now + timedelta(days=1)
        and ipaddress.ip_address(HOST) in names.get_values_for_type(x509.IPAddress)
        and cert.public_key() == key.public_key()
    )


def ensure_certificate(directory: Path, now: datetime | None = None) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key, in ``directory``:
    the ones there if still valid for a day, else new ones. Returns (cert, key) paths."""
    now = now or datetime.now(UTC)
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    if _usable(cert_path, key_path, now):
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sellfern-webhooks listen")])
    subject_key = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=CERT_DAYS))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(subject_key, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(subject_key),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # The key is readable by its owner only, from the moment it exists.
    key_path.unlink(missing_ok=True)
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


# --- the server ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listening:
    url: str
    port: int
    cert_path: Path | None


class _Printer:
    def __init__(self, out: TextIO, secret: str | None, clock: Callable[[], float]) -> None:
        self._out = out
        self._secret = secret
        self._clock = clock

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        block = describe_request(
            request.method, request.path_qs, request.headers, body, self._secret, self._clock()
        )
        self._out.write(block)
        self._out.flush()
        return web.Response(text="ok\n")


def _banner(listening: Listening, secret: str | None) -> str:
    lines = [f"listening on {listening.url}/ (port {listening.port}); Ctrl-C stops"]
    if listening.cert_path is not None:
        lines += [
            f"TLS with a self-signed certificate for {HOST} and localhost: {listening.cert_path}",
            "to receive from a local service, start it with",
            f"  SELLFERN_WEBHOOKS_CA_BUNDLE={listening.cert_path}",
            "  SELLFERN_WEBHOOKS_ALLOWED_PRIVATE_NETWORKS=127.0.0.0/8",
            f"and register an endpoint with url {listening.url}/webhooks",
        ]
    else:
        lines += [
            "plain http, which the service delivers to only inside ALLOWED_PRIVATE_NETWORKS:",
            "  start it with SELLFERN_WEBHOOKS_ALLOWED_PRIVATE_NETWORKS=127.0.0.0/8 and register",
            f"  {listening.url}/webhooks (an IP address, not localhost); --tls for https",
        ]
    checked = "checked with --secret" if secret else "not checked (no --secret)"
    lines.append(f"signatures: {checked}")
    return "\n".join(lines) + "\n\n"


async def serve(
    out: TextIO,
    *,
    port: int = DEFAULT_PORT,
    secret: str | None = None,
    tls: bool = False,
    cert_dir: Path | None = None,
    stop: asyncio.Event | None = None,
    started: Callable[[Listening], None] | None = None,
    handle_signals: bool = True,
    clock: Callable[[], float] = time.time,
) -> None:
    """Receive and print webhooks on 127.0.0.1 until ``stop`` is set or SIGTERM/SIGINT."""
    stop = stop or asyncio.Event()
    if handle_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    context = cert_path = None
    if tls:
        cert_path, key_path = ensure_certificate((cert_dir or Path.cwd()).resolve())
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_path, key_path)
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app.router.add_route("*", "/{tail:.*}", _Printer(out, secret, clock).handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    try:
        await web.TCPSite(runner, HOST, port, ssl_context=context).start()
        bound = runner.addresses[0][1]
        scheme = "https" if tls else "http"
        listening = Listening(f"{scheme}://{HOST}:{bound}", bound, cert_path)
        out.write(_banner(listening, secret))
        out.flush()
        if started is not None:
            started(listening)
        await stop.wait()
    finally:
        await runner.cleanup()
