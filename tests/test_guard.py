"""The SSRF guard, table by table: every denied range, every IPv4-in-IPv6 form, IP literals.

The last test is DNS rebinding end to end: a name that is public when the endpoint is saved
and private when it is delivered to. DNS is the one thing faked here (a resolver handed to the
guard); the database, the API, the HTTP client and the attempt log are real.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from worker.pipeline import guard

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address

DENIED_V4 = (
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
)
DENIED_V6 = ("::/128", "::1/128", "fc00::/7", "fe80::/10", "ff00::/8", "2001:db8::/32")

# Just outside a denied range, and globally routable.
PUBLIC_V4 = (
    "1.1.1.1",
    "8.8.8.8",
    "9.255.255.255",
    "11.0.0.0",
    "100.63.255.255",
    "100.128.0.0",
    "126.255.255.255",
    "128.0.0.0",
    "169.253.255.255",
    "169.255.0.0",
    "172.15.255.255",
    "172.32.0.0",
    "192.0.1.255",
    "192.0.3.0",
    "192.167.255.255",
    "192.169.0.0",
    "198.17.255.255",
    "198.20.0.0",
    "198.51.99.255",
    "198.51.101.0",
    "203.0.112.255",
    "203.0.114.0",
    "223.255.255.255",
)
PUBLIC_V6 = (
    "2606:4700:4700::1111",
    "2a00:1450:4001:82a::200e",
    "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff",
    "2001:db9::",
    "fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    "fec0::1",
    "::2:0:0",  # just past ::/96, not an IPv4-compatible address
)


def _samples(cidr: str) -> Iterator[str]:
    """First, middle and last address of a range."""
    network = ipaddress.ip_network(cidr)
    for index in sorted({0, network.num_addresses // 2, network.num_addresses - 1}):
        yield str(network[index])


@pytest.mark.parametrize("address", [a for c in DENIED_V4 for a in _samples(c)])
def test_denied_ipv4(address: str) -> None:
    assert guard.is_denied(IPv4(address))


@pytest.mark.parametrize("address", [a for c in DENIED_V6 for a in _samples(c)])
def test_denied_ipv6(address: str) -> None:
    assert guard.is_denied(IPv6(address))


@pytest.mark.parametrize("address", [*PUBLIC_V4, *PUBLIC_V6])
def test_public_addresses_are_allowed(address: str) -> None:
    assert not guard.is_denied(ipaddress.ip_address(address))
    guard.check_addresses("example.com", [address], ())


# --- IPv4 carried inside IPv6 ----------------------------------------------------------------


def _mapped(v4: IPv4) -> IPv6:
    return IPv6(0xFFFF << 32 | int(v4))


def _compatible(v4: IPv4) -> IPv6:
    return IPv6(int(v4))


def _nat64(v4: IPv4) -> IPv6:
    return IPv6(int(IPv6("64:ff9b::")) | int(v4))


def _nat64_local(v4: IPv4) -> IPv6:
    return IPv6(int(IPv6("64:ff9b:1::")) | 0xABCD << 64 | int(v4))


def _six_to_four(v4: IPv4) -> IPv6:
    return IPv6(0x2002 << 112 | int(v4) << 80 | 0x1)


def _teredo(v4: IPv4) -> IPv6:
    # 2001:0::/32, then the Teredo server (a public address), flags, port, and the client's
    # address with every bit inverted.
    server = int(IPv4("65.54.227.120"))
    return IPv6(0x2001 << 112 | server << 64 | 0x8000 << 48 | 0xFFFF << 32 | int(v4) ^ 0xFFFFFFFF)


EMBEDDINGS = {
    "mapped ::ffff:0:0/96": _mapped,
    "compatible ::/96": _compatible,
    "NAT64 64:ff9b::/96": _nat64,
    "NAT64 local 64:ff9b:1::/48": _nat64_local,
    "6to4 2002::/16": _six_to_four,
    "Teredo 2001::/32": _teredo,
}
# One address from each denied IPv4 range (not the first: ::0.0.0.0 and ::0.0.0.1 are
# denied in their own right, which would hide a failure to unwrap).
EMBEDDED_DENIED = [str(ipaddress.ip_network(c)[5]) for c in DENIED_V4]


@pytest.mark.parametrize("form", EMBEDDINGS)
@pytest.mark.parametrize("inner", EMBEDDED_DENIED)
def test_denied_ipv4_inside_ipv6_is_denied(form: str, inner: str) -> None:
    address = EMBEDDINGS[form](IPv4(inner))
    assert guard.embedded_ipv4(address) == IPv4(inner), address
    assert guard.is_denied(address), address
    with pytest.raises(guard.BlockedAddressError):
        guard.check_addresses("rebind.example", [str(address)], ())


@pytest.mark.parametrize("form", EMBEDDINGS)
@pytest.mark.parametrize("inner", ["8.8.8.8", "93.184.216.34"])
def test_public_ipv4_inside_ipv6_is_allowed(form: str, inner: str) -> None:
    address = EMBEDDINGS[form](IPv4(inner))
    assert guard.embedded_ipv4(address) == IPv4(inner)
    assert not guard.is_denied(address), address


def test_zone_id_on_a_global_address_is_denied() -> None:
    assert guard.is_denied(IPv6("2606:4700::1%eth0"))


# --- ALLOWED_PRIVATE_NETWORKS ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "address", "denied"),
    [
        ("10.0.0.0/8", "10.1.2.3", False),
        ("10.0.0.0/8", "::ffff:10.1.2.3", False),  # the same address, mapped
        ("10.0.0.0/8", "64:ff9b::10.1.2.3", False),
        ("10.0.0.0/8", "11.0.0.1", False),
        ("10.0.0.0/8", "192.168.1.1", True),  # only the exempt range is exempt
        ("10.0.0.0/8", "127.0.0.1", True),
        ("127.0.0.1/32", "127.0.0.2", True),
        ("127.0.0.1/32", "127.0.0.1", False),
        ("fd00::/8", "fd12::1", False),
        ("fd00::/8", "fc00::1", True),
        ("fd00::/8", "::1", True),
    ],
)
def test_allowed_private_networks_exempt_only_themselves(
    allowed: str, address: str, denied: bool
) -> None:
    networks = (ipaddress.ip_network(allowed),)
    assert guard.is_denied(ipaddress.ip_address(address), networks) is denied
    if denied:
        with pytest.raises(guard.BlockedAddressError, match="not publicly reachable"):
            guard.check_addresses(address, [address], networks)
    else:
        guard.check_addresses(address, [address], networks)


# --- IP literals in every form a resolver accepts ----------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),  # one decimal number
        ("127.1", "127.0.0.1"),  # short form
        ("0x7f.1", "127.0.0.1"),  # hex, short
        ("0x7f000001", "127.0.0.1"),
        ("0x7F.0.0.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),  # octal
        ("017700000001", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("0", "0.0.0.0"),  # noqa: S104 - an address under test, not a bind
        ("3232235777", "192.168.1.1"),
        ("[::1]", "::1"),
        ("::ffff:127.0.0.1", "::ffff:7f00:1"),
        ("[fe80::1%eth0]", "fe80::1"),
        ("8.8.8.8", "8.8.8.8"),
    ],
)
def test_parse_ip_literal(host: str, expected: str) -> None:
    assert guard.parse_ip_literal(host) == ipaddress.ip_address(expected)


@pytest.mark.parametrize(
    "host",
    [
        "example.com",
        "localhost",
        "deadbeef",
        "face.b00c",
        "1.2.3.4.5",
        "0x",
        "",
        "127.0.0.1.nip.io",
    ],
)
def test_names_are_not_literals(host: str) -> None:
    assert guard.parse_ip_literal(host) is None


@pytest.mark.parametrize("host", ["2130706433", "127.1", "0x7f.1", "0177.0.0.1", "[::1]", "0"])
async def test_check_host_refuses_loopback_in_any_spelling(host: str) -> None:
    with pytest.raises(guard.BlockedAddressError):
        await guard.check_host(host, ())


# --- names, through a stand-in for DNS ---------------------------------------------------------


class StaticResolver(AbstractResolver):
    """Answers every name with ``answers``, which the test changes as it goes."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.asked: list[str] = []

    async def resolve(
        self,
        host: str,
        port: int = 0,
        family: socket.AddressFamily = socket.AF_INET,  # noqa: ARG002 - answers are fixed
    ) -> list[ResolveResult]:
        self.asked.append(host)
        if not self.answers:
            raise OSError(socket.EAI_NONAME, f"{host} does not resolve")
        return [
            ResolveResult(
                hostname=host,
                host=answer,
                port=port,
                family=socket.AF_INET6 if ":" in answer else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for answer in self.answers
        ]

    async def close(self) -> None:
        return None


@pytest.mark.parametrize(
    ("answers", "blocked"),
    [
        (["93.184.216.34"], False),
        (["2606:4700:4700::1111"], False),
        (["10.0.0.7"], True),
        (["93.184.216.34", "127.0.0.1"], True),  # one bad answer is enough
        (["::ffff:169.254.169.254"], True),
        ([], False),  # not resolvable now: accepted, checked again at delivery
    ],
)
async def test_check_host_checks_every_resolved_address(answers: list[str], blocked: bool) -> None:
    resolver = StaticResolver(*answers)
    if blocked:
        with pytest.raises(guard.BlockedAddressError, match="resolves to"):
            await guard.check_host("name.example", (), resolver=resolver)
    else:
        await guard.check_host("name.example", (), resolver=resolver)
    assert resolver.asked == ["name.example"]


async def test_guarded_resolver_refuses_denied_answers() -> None:
    inner = StaticResolver("93.184.216.34")
    resolver = guard.GuardedResolver((), inner)
    assert [r["host"] for r in await resolver.resolve("name.example", 443)] == ["93.184.216.34"]
    inner.answers = ["93.184.216.34", "fd00::1"]
    with pytest.raises(guard.BlockedAddressError):
        await resolver.resolve("name.example", 443)
    with pytest.raises(guard.BlockedAddressError):
        await resolver.resolve("2130706433", 443)


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST.",
        "api.localhost",
        "Printer.Local",
        "kubernetes.default.svc.cluster.local.",
        "metadata.google.internal",
        "METADATA.GOOGLE.INTERNAL.",
        "router.home.arpa",
        "1.0.0.127.in-addr.arpa",
        "kubernetes.default.svc",
        "metadata",
        "nothing.invalid",
        "hidden.onion",
        "box.localdomain",
    ],
)
async def test_special_use_names_are_refused_however_spelled(host: str) -> None:
    assert guard.special_use(host) is not None
    # Refused even when the name resolves to a public address today.
    with pytest.raises(guard.BlockedAddressError, match=r"special-use|single-label"):
        await guard.check_host(host, (), resolver=StaticResolver("93.184.216.34"))


@pytest.mark.parametrize(
    "host",
    ["example.com", "hooks.example.com.", "localhost.example.com", "internal.example.org"],
)
def test_ordinary_names_are_not_special_use(host: str) -> None:
    assert guard.special_use(host) is None


async def test_a_special_use_name_inside_allowed_private_networks_is_accepted() -> None:
    allowed = (ipaddress.ip_network("127.0.0.0/8"),)
    await guard.check_host("localhost", allowed, resolver=StaticResolver("127.0.0.1"))
    with pytest.raises(guard.BlockedAddressError):
        await guard.check_host("localhost", allowed, resolver=StaticResolver("10.0.0.1"))
    with pytest.raises(guard.BlockedAddressError):
        await guard.check_host("db.internal", allowed, resolver=StaticResolver())


@pytest.mark.parametrize(
    "host",
    [
        "a..com",
        ".com",
        ".",
        "example.com..",
        "a" * 70 + ".com",  # a label over 63 characters
        "é" * 60 + ".com",  # under 63 characters, over once encoded
        "xn--",
        "xn--zz.example",  # not punycode
        ("a" * 60 + ".") * 5 + "com",  # over 253 characters in all
    ],
)
async def test_names_that_could_never_resolve_are_refused(host: str) -> None:
    with pytest.raises(guard.InvalidHostError, match="not a valid host name"):
        guard.check_host_name(host)
    # Refused before any lookup: the resolver's IDNA codec raises UnicodeError on them.
    resolver = StaticResolver("93.184.216.34")
    with pytest.raises(guard.InvalidHostError):
        await guard.check_host(host, (), resolver=resolver)
    assert resolver.asked == []


@pytest.mark.parametrize(
    "host",
    ["example.com", "example.com.", "bücher.example", "xn--bcher-kva.example",
     "_acme.example.com", "a" * 63 + ".com"],
)  # fmt: skip
def test_valid_names_pass_the_name_check(host: str) -> None:
    guard.check_host_name(host)
