"""The HTTP edge of delivery: one signed POST, and what came back.

One ``aiohttp.ClientSession`` per process. Its connector resolves through the SSRF guard, so
the connection goes to the address that was checked; redirects are never followed; only a
bounded excerpt of the response is read.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from schemas.headers import reserved
from worker import __version__
from worker.pipeline import egress, guard, signing
from worker.pipeline.outcome import Response
from worker.settings import Settings
from worker.store.records import Webhook, utcnow

RESPONSE_EXCERPT_BYTES = 4096
USER_AGENT = f"Sellfern-Webhooks/{__version__}"
TARGET_CACHE_SIZE = 50_000


@dataclass(frozen=True, slots=True)
class Sent:
    response: Response
    duration_ms: int
    response_body: str | None


# What json.dumps(..., separators=(",", ":"), ensure_ascii=False) uses, made once: dumps
# builds a new encoder on every call that is given options, a third of a payload's cost.
_PAYLOAD_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def payload_body(event: dict[str, Any]) -> bytes:
    """The body every endpoint receives: ``{id, type, timestamp, data}``, compact JSON."""
    return _PAYLOAD_ENCODER.encode(
        {
            "id": event["id"],
            "type": event["type"],
            "timestamp": event["occurred_at"],
            "data": event["data"],
        }
    ).encode()


def ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    """The system trust store, plus ``CA_BUNDLE`` when set."""
    context = ssl.create_default_context()
    if ca_bundle:
        context.load_verify_locations(cafile=ca_bundle)
    return context


def create_session(settings: Settings) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        resolver=guard.GuardedResolver(
            settings.allowed_private_networks, trusted_hosts=egress.proxy_hosts(settings)
        ),
        ssl=ssl_context(settings.ca_bundle),
        # No pool-wide limit: the scheduler bounds the attempts under way (fan-out's up to
        # DELIVERY_CONCURRENCY, queued tasks by their prefetch, parked backlogs by half of it,
        # each endpoint by its cap). A pool limit beside those let hanging endpoints, each
        # within its own cap, hold every connection, and a healthy endpoint's request then
        # waited for one inside its own timeout: recorded as a timeout, the endpoint as slow.
        limit=0,
        ttl_dns_cache=10,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=settings.delivery_timeout),
        headers={"user-agent": USER_AGENT},
        # Never store customers' cookies between deliveries.
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def classify_error(exc: BaseException, proxy: egress.EgressProxy | None = None) -> tuple[str, str]:
    """A short machine-readable kind and a message for an attempt that got no response."""
    if proxy is not None and (at_proxy := proxy.classify(exc)) is not None:
        return at_proxy
    if isinstance(exc, guard.BlockedAddressError):
        return "blocked_address", str(exc)
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(
        exc.os_error, guard.BlockedAddressError
    ):
        return "blocked_address", str(exc.os_error)
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout", "no complete response within the delivery timeout"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return "tls_error", str(exc)
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "dns_error", str(exc)
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "connection_refused", str(exc)
        return "connection_error", str(exc)
    if isinstance(exc, aiohttp.InvalidURL):
        return "invalid_url", str(exc)
    return "connection_error", f"{type(exc).__name__}: {exc}"[:500]


class Sender:
    """Signs and POSTs payloads with the process's one session."""

    def __init__(self, session: aiohttp.ClientSession, settings: Settings) -> None:
        self._session = session
        self._allowed = settings.allowed_private_networks
        self._delivery_timeout = settings.delivery_timeout
        self._default_timeout = aiohttp.ClientTimeout(total=settings.delivery_timeout)
        # Set, every request tunnels through it, and the guard checks targets before sending.
        self._proxy = egress.EgressProxy.from_settings(settings)
        # Parsed, and for IP literals checked, endpoint URLs: both depend on the string alone.
        self._targets: dict[str, URL] = {}

    def _target(self, url: str) -> URL:
        target = self._targets.get(url)
        if target is None:
            target = URL(url)
            # aiohttp connects to IP literals without asking the resolver: check them here
            # (a blocked one raises, and is not remembered).
            literal = guard.parse_ip_literal(target.host or "")
            if literal is not None:
                guard.check_addresses(target.host or "", [str(literal)], self._allowed)
            if len(self._targets) >= TARGET_CACHE_SIZE:
                self._targets.clear()
            self._targets[url] = target
        return target

    async def send(
        self,
        url: str,
        secrets: Sequence[str],
        event: dict[str, Any],
        body: bytes | None = None,
        *,
        extra_headers: Mapping[str, str] | None = None,
        timeout_seconds: float | None = None,
        trace: Mapping[str, str] | None = None,
    ) -> Sent:
        """POST ``event`` signed with ``secrets``, with the endpoint's ``extra_headers``, within
        ``timeout_seconds`` (connect to last byte; never more than ``DELIVERY_TIMEOUT``)."""
        body = payload_body(event) if body is None else body
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": event["id"],
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signing.signature_header(secrets, event["id"], timestamp, body),
        }
        if extra_headers:
            # The API refuses the service's own names; skipping them here as well means no
            # stored row can ever override them.
            headers.update((k, v) for k, v in extra_headers.items() if not reserved(k))
        if trace:
            headers.update(trace)  # the attempt's W3C context (worker.ops.tracing)
        started = time.perf_counter()
        try:
            target = self._target(url)
            if self._proxy is not None:
                await self._proxy.check_target(target)
            async with self._session.post(
                target,
                data=body,
                headers=headers,
                allow_redirects=False,
                proxy=self._proxy.url if self._proxy is not None else None,
                timeout=self._timeout(timeout_seconds),
            ) as response:
                excerpt = await response.content.read(RESPONSE_EXCERPT_BYTES)
                if not response.content.at_eof():
                    # Do not drain a huge or endless body to reuse the connection: drop it.
                    response.close()
                sent_response = Response(
                    status=response.status, retry_after=response.headers.get("Retry-After")
                )
        except Exception as exc:  # every failure of one attempt is that attempt's result
            kind, message = classify_error(exc, self._proxy)
            return Sent(Response(None, kind, message[:1000]), _elapsed_ms(started), None)
        return Sent(
            sent_response, _elapsed_ms(started), excerpt.decode("utf-8", errors="replace") or None
        )

    async def send_to(
        self, webhook: Webhook, event: dict[str, Any], trace: Mapping[str, str] | None
    ) -> Sent:
        """:meth:`send` to the endpoint as it is now: its URL, the secrets that sign now, its
        own headers and timeout; ``trace`` is the attempt's W3C context."""
        return await self.send(
            webhook.url,
            webhook.signing_secrets(utcnow()),
            event,
            extra_headers=webhook.headers,
            timeout_seconds=webhook.timeout_seconds,
            trace=trace,
        )

    def _timeout(self, seconds: float | None) -> aiohttp.ClientTimeout:
        if seconds is None or seconds >= self._delivery_timeout:
            return self._default_timeout
        return aiohttp.ClientTimeout(total=seconds)


def _elapsed_ms(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)
