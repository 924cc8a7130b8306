"""Deliveries through the operator's HTTP egress proxy (``EGRESS_PROXY_URL``).

With a proxy set, aiohttp connects to the proxy and asks it with ``CONNECT`` for a tunnel to
the endpoint; TLS to the endpoint runs inside that tunnel, so the proxy sees where a delivery
goes but not what it carries. The connector's guarded resolver then only ever resolves the
proxy's own name, so the SSRF guard's delivery-time check of the endpoint's host is made here,
before every attempt, against the same deny list: a blocked host is refused without a byte sent
to the proxy. The proxy looks the name up again when it connects; one made for this job
(smokescreen) applies its own deny list at that point, which also covers a record that changes
between the two lookups.

The proxy is the operator's choice and usually sits on a private address, so it is exempt
from the guard (``GuardedResolver``'s ``trusted_hosts``).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Sequence

import aiohttp
from yarl import URL

from worker.pipeline import guard
from worker.settings import Settings

# A host that passed the check is not looked up again for this long: without a proxy the
# connector's DNS cache (``ttl_dns_cache`` in ``sender.create_session``) keeps answers as long.
CHECK_TTL_SECONDS = 10.0
CHECK_CACHE_SIZE = 50_000
# Answers to CONNECT by which a proxy says "not to this destination": 403 from most proxies
# (tinyproxy, Squid), 407 from smokescreen when its policy denies the host.
REFUSALS = frozenset({403, 407})


class TargetLookupError(OSError):
    """The endpoint's host did not resolve when it was checked, before any tunnel was asked for."""


def proxy_hosts(settings: Settings) -> tuple[str, ...]:
    """The names the delivery connector may resolve without the guard: the proxy's, if set."""
    if settings.egress_proxy_url is None:
        return ()
    return (URL(settings.egress_proxy_url).host or "",)


class EgressProxy:
    """The proxy every delivery goes through, and the guard's check of each endpoint's host."""

    def __init__(
        self,
        url: str,
        allowed: Sequence[guard.IPNetwork],
        lookup_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = URL(url)
        # What messages name: host and port, never credentials the URL may carry.
        self.address = f"{self.url.host}:{self.url.port}"
        self._resolver = guard.GuardedResolver(allowed)
        # A lookup that hangs must not outlast the attempt it belongs to.
        self._lookup_timeout = lookup_timeout
        self._clock = clock
        self._checked: dict[str, float] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> EgressProxy | None:
        if settings.egress_proxy_url is None:
            return None
        return cls(
            settings.egress_proxy_url, settings.allowed_private_networks, settings.delivery_timeout
        )

    async def check_target(self, target: URL) -> None:
        """Resolve ``target``'s host and check every address, as the connector would.

        Raises :class:`guard.BlockedAddressError` for a host that is not publicly reachable,
        :class:`TargetLookupError` for one that does not resolve.
        """
        host = target.host or ""
        now = self._clock()
        if self._checked.get(host, 0.0) > now:
            return
        try:
            async with asyncio.timeout(self._lookup_timeout):
                await self._resolver.resolve(host, target.port or 443, socket.AF_UNSPEC)
        except (guard.BlockedAddressError, TimeoutError):
            raise
        except OSError as exc:
            raise TargetLookupError(f"{host} does not resolve: {exc.strerror or exc}") from exc
        if len(self._checked) >= CHECK_CACHE_SIZE:
            self._checked.clear()
        self._checked[host] = now + CHECK_TTL_SECONDS

    def classify(self, exc: BaseException) -> tuple[str, str] | None:
        """The error kind and message of a failure at the proxy; None for any other failure."""
        if isinstance(exc, aiohttp.ClientHttpProxyError):
            target = exc.request_info.url
            answer = f"{target.host}:{target.port}: HTTP {exc.status} {exc.message}".rstrip()
            if exc.status in REFUSALS:
                return "blocked_address", f"the egress proxy {self.address} refused {answer}"
            return "connection_error", f"the egress proxy {self.address} could not reach {answer}"
        if isinstance(exc, aiohttp.ClientProxyConnectionError):
            reason = exc.os_error.strerror or str(exc.os_error)
            message = f"cannot connect to the egress proxy {self.address}: {reason}"
            if isinstance(exc.os_error, ConnectionRefusedError):
                return "connection_refused", message
            return "connection_error", message
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            # Only the proxy's name is resolved by the connector once a proxy is set.
            return "dns_error", f"the egress proxy's name {self.url.host} does not resolve: {exc}"
        if isinstance(exc, TargetLookupError):
            return "dns_error", str(exc)
        return None
