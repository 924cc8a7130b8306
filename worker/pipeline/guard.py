"""The SSRF guard: which addresses a webhook may reach.

A URL is refused when its host is, or resolves to, any address in the deny list below (unless
``ALLOWED_PRIVATE_NETWORKS`` exempts it). The list is explicit because ``ipaddress``'s
``is_private``/``is_global`` flags miss several ranges, and IPv6 forms that embed an IPv4
address are unwrapped and checked as that address.

It is applied twice: when an endpoint is created or updated, and at every delivery through
:class:`GuardedResolver`, so the connection goes to the very address that was checked — there
is no second lookup for DNS rebinding to race. Through an egress proxy the connector reaches
only the proxy, so ``worker.pipeline.egress`` makes the delivery-time check instead.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DENIED_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
        "ff00::/8",
        "2001:db8::/32",
    )
)

_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
_TEREDO = ipaddress.ip_network("2001::/32")


class BlockedAddressError(OSError):
    """The destination is not publicly reachable. An ``OSError`` so aiohttp passes it through."""


class InvalidHostError(ValueError):
    """The host is no name DNS could ever resolve."""


# RFC 1035's bounds, on a name's ASCII (IDNA) form: 63 octets a label, 253 the whole name.
MAX_LABEL_LENGTH = 63
MAX_NAME_LENGTH = 253


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries, for the transition forms that carry one."""
    packed = address.packed
    if address in _MAPPED or address in _NAT64:
        return ipaddress.IPv4Address(packed[12:])
    if address in _COMPATIBLE and address not in (
        ipaddress.IPv6Address("::"),
        ipaddress.IPv6Address("::1"),
    ):
        return ipaddress.IPv4Address(packed[12:])
    if address in _NAT64_LOCAL:
        # RFC 8215 local-use prefixes place the IPv4 address in the last 32 bits as well.
        return ipaddress.IPv4Address(packed[12:])
    if address in _SIX_TO_FOUR:
        return ipaddress.IPv4Address(packed[2:6])
    if address in _TEREDO:
        # Teredo stores the client's address inverted in the last 32 bits.
        return ipaddress.IPv4Address(bytes(b ^ 0xFF for b in packed[12:]))
    return None


def in_networks(address: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    """Whether ``address`` lies in one of ``networks`` (of its own IP version)."""
    return any(address in network for network in networks if network.version == address.version)


def is_denied(address: IPAddress, allowed: Sequence[IPNetwork] = ()) -> bool:
    """True when ``address`` may not be reached (after unwrapping any embedded IPv4)."""
    if in_networks(address, allowed):
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is None and address.scope_id:
            return True  # a zone id only makes sense for link-local destinations
        inner = embedded_ipv4(address)
        if inner is not None and is_denied(inner, allowed):
            return True
    return in_networks(address, DENIED_NETWORKS)


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address if ``host`` is an IP literal, in any form a resolver would accept.

    Besides dotted quads this covers the legacy IPv4 forms ``inet_aton`` takes (``127.1``,
    ``2130706433``, ``0x7f.0.0.1``), which some HTTP stacks pass straight to ``connect``.
    """
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host.split("%", 1)[0] if ":" in host else host)
    except ValueError:
        pass
    if ":" in host or not host or not all(c in "0123456789abcdefxABCDEFX." for c in host):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def check_addresses(host: str, addresses: Iterable[str], allowed: Sequence[IPNetwork]) -> None:
    """Raise :class:`BlockedAddressError` if any of ``addresses`` is denied."""
    for raw in addresses:
        address = ipaddress.ip_address(raw.split("%", 1)[0])
        if is_denied(address, allowed):
            where = f"{host} is" if host.strip("[]") == str(address) else f"{host} resolves to"
            raise BlockedAddressError(f"{where} {address}, which is not publicly reachable")


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that refuses names with any denied address.

    ``trusted_hosts`` are resolved unchecked: the operator's egress proxy, which usually sits
    on a private address, and is the only name the connector resolves once it is set.
    """

    def __init__(
        self,
        allowed: Sequence[IPNetwork],
        inner: AbstractResolver | None = None,
        *,
        trusted_hosts: Iterable[str] = (),
    ) -> None:
        self._allowed = tuple(allowed)
        self._inner = inner or DefaultResolver()
        self._trusted = frozenset(_normal_name(h) for h in trusted_hosts)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._trusted and _normal_name(host) in self._trusted:
            return await self._inner.resolve(host, port, family)
        literal = parse_ip_literal(host)
        if literal is not None:
            check_addresses(host, [str(literal)], self._allowed)
        results = await self._inner.resolve(host, port, family)
        check_addresses(host, [r["host"] for r in results], self._allowed)
        return results

    async def close(self) -> None:
        await self._inner.close()


def _normal_name(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


# Names that never denote a public host, whatever DNS says of them today: loopback and
# link-local names, private-use and cluster-internal suffixes, reverse-lookup zones.
SPECIAL_USE_NAMES = frozenset({"localhost"})
SPECIAL_USE_SUFFIXES = (
    ".localhost",  # RFC 6761
    ".local",  # mDNS (RFC 6762), and Kubernetes' cluster.local
    ".localdomain",
    ".internal",  # private use (ICANN 2024), metadata.google.internal
    ".home.arpa",  # RFC 8375
    ".arpa",  # reverse-lookup zones
    ".svc",  # Kubernetes services through the search path
    ".invalid",  # RFC 6761
    ".onion",  # RFC 7686
)


def special_use(host: str) -> str | None:
    """Why ``host`` is a special-use name, or None. Any letter case, with or without the
    trailing dot of a fully qualified name; a single label (``metadata``, ``kubernetes``) is
    one too, since the resolver's search path makes it a local name."""
    name = host.lower().rstrip(".")
    if parse_ip_literal(name) is not None:
        return None
    if name in SPECIAL_USE_NAMES:
        return f"{name} is a special-use name"
    for suffix in SPECIAL_USE_SUFFIXES:
        if name.endswith(suffix):
            return f"names under {suffix} are special-use"
    if "." not in name:
        return "a single-label name resolves through the local search path"
    return None


def check_host_name(host: str) -> None:
    """Raise :class:`InvalidHostError` unless ``host`` could be resolved at all: no empty
    label, each label valid IDNA of at most 63 characters once encoded (an ``xn--`` label must
    decode too), 253 characters in all; one trailing dot is the root's and allowed.

    The resolver encodes a name with the same IDNA codec and raises ``UnicodeError``, not
    ``OSError``, for a name it cannot encode: checked first, such a name is a plain refusal.
    """
    shown = repr(host) if len(host) <= 80 else repr(host[:60]) + "…"
    encoded_length = -1  # no dot before the first label
    for label in host.removesuffix(".").split("."):
        if not label:
            raise InvalidHostError(f"{shown} is not a valid host name: it has an empty label")
        try:
            encoded = label.encode("idna")
            encoded.decode("idna")
        except UnicodeError:
            raise InvalidHostError(
                f"{shown} is not a valid host name: a label is not valid IDNA, or longer than "
                f"{MAX_LABEL_LENGTH} characters once encoded"
            ) from None
        encoded_length += len(encoded) + 1
    if encoded_length > MAX_NAME_LENGTH:
        raise InvalidHostError(
            f"{shown} is not a valid host name: longer than {MAX_NAME_LENGTH} characters"
        )


async def check_host(
    host: str,
    allowed: Sequence[IPNetwork],
    *,
    resolve_timeout: float = 3.0,
    resolver: AbstractResolver | None = None,
) -> None:
    """Check a URL's host when an endpoint is saved.

    IP literals are checked as they are; names are resolved (by the system, or by
    ``resolver`` when one is given: tests use that to stand in for DNS) and every address
    checked. A name that does not resolve now is accepted (DNS may be briefly unavailable):
    the delivery-time check still applies to whatever it resolves to later. A name that never
    could is :class:`InvalidHostError` (see :func:`check_host_name`).
    """
    literal = parse_ip_literal(host)
    if literal is not None:
        check_addresses(host, [str(literal)], allowed)
        return
    check_host_name(host)
    reason = special_use(host)
    if reason is not None:
        await _check_special_use(host, reason, allowed, resolve_timeout, resolver)
        return
    try:
        addresses = await _resolve(host, resolve_timeout, resolver)
    except (OSError, TimeoutError):
        return
    check_addresses(host, addresses, allowed)


async def _resolve(
    host: str, resolve_timeout: float, resolver: AbstractResolver | None
) -> list[str]:
    if resolver is not None:
        results = await asyncio.wait_for(
            resolver.resolve(host, 443, socket.AF_UNSPEC), resolve_timeout
        )
        return [r["host"] for r in results]
    loop = asyncio.get_running_loop()
    infos: list[Any] = await asyncio.wait_for(
        loop.getaddrinfo(host, 443, type=socket.SOCK_STREAM), resolve_timeout
    )
    return [str(info[4][0]) for info in infos]


async def _check_special_use(
    host: str,
    reason: str,
    allowed: Sequence[IPNetwork],
    resolve_timeout: float,
    resolver: AbstractResolver | None,
) -> None:
    """A special-use name is refused, unless every address it resolves to lies in
    ``ALLOWED_PRIVATE_NETWORKS`` (a private deployment naming its own hosts)."""
    if allowed:
        try:
            addresses = await _resolve(host, resolve_timeout, resolver)
        except (OSError, TimeoutError):
            addresses = []
        if addresses and all(
            in_networks(ip, allowed) for ip in map(ipaddress.ip_address, addresses)
        ):
            return
    raise BlockedAddressError(f"{host}: {reason}")
