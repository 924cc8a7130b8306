"""Deliveries through an egress proxy: a real tinyproxy, started per test with its own config.

The proxy binds its outgoing connections to 127.0.0.2, so a request the receiver (on 127.0.0.1)
sees from 127.0.0.2 came through the tunnel; the proxy's log shows the CONNECT it was asked for.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from schemas.publish import publish_event
from tests.conftest import Receiver, Service, ServiceFactory, eventually
from worker.pipeline import egress, guard
from worker.settings import Settings, SettingsError

pytestmark = pytest.mark.timeout(90)

# Where the proxy's connections to endpoints come from (tinyproxy's `Bind`).
PROXY_SOURCE = "127.0.0.2"
_CONNECT_LINE = re.compile(r"Request \(file descriptor \d+\): CONNECT (\S+) HTTP/")


@dataclass
class Tinyproxy:
    url: str
    log: Path

    def connects(self) -> list[str]:
        """The ``host:port`` of every CONNECT the proxy was asked for, in order."""
        text = self.log.read_text() if self.log.exists() else ""
        return _CONNECT_LINE.findall(text)


ProxyFactory = Callable[..., Awaitable[Tinyproxy]]


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


async def _accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


@pytest.fixture
async def proxy_factory(tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    """Start tinyproxy instances (foreground, own config, own port); stop them afterwards."""
    binary = shutil.which("tinyproxy")
    if binary is None:
        pytest.fail(
            "tinyproxy not found: install it (apt-get install tinyproxy-bin), as .ci/run does"
        )
    processes: list[asyncio.subprocess.Process] = []

    async def start(*, listen: str = "127.0.0.1", refuse: bool = False) -> Tinyproxy:
        n = len(processes)
        port = _free_port(listen)
        log = tmp_path / f"tinyproxy-{n}.log"
        lines = [
            f"Port {port}",
            f"Listen {listen}",
            f"Bind {PROXY_SOURCE}",
            "Timeout 30",
            "MaxClients 100",
            f'LogFile "{log}"',
            "LogLevel Connect",
            f'PidFile "{tmp_path / f"tinyproxy-{n}.pid"}"',
        ]
        if refuse:
            # Tunnels only to 443: the receivers' ports are refused with 403, as a proxy's
            # policy refuses a destination. Without any ConnectPort every port is allowed.
            lines.append("ConnectPort 443")
        config = tmp_path / f"tinyproxy-{n}.conf"
        config.write_text("\n".join(lines) + "\n")
        process = await asyncio.create_subprocess_exec(
            binary,
            "-d",
            "-c",
            str(config),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        processes.append(process)

        async def listening() -> bool:
            assert process.returncode is None, f"tinyproxy exited: {log.read_text()}"
            return await _accepts(listen, port)

        await eventually(listening, timeout=10, what="tinyproxy listening")
        return Tinyproxy(f"http://{listen}:{port}", log)

    yield start
    for process in processes:
        if process.returncode is None:
            process.terminate()
        await process.wait()


def _from(sources: list[str], path: str) -> Callable[[web.Request, int], Awaitable[web.Response]]:
    """A behaviour that records where each request to ``path`` came from, and answers 200."""

    async def record(request: web.Request, _seen: int) -> web.Response:
        sources.append(f"{path} {request.remote}")
        return web.Response(text="ok")

    return record


async def _webhook(service: Service, url: str) -> dict[str, Any]:
    status, body = await service.call(
        "POST", "/webhooks", {"url": url, "events": ["order.created"]}
    )
    assert status == 201, body
    return body  # type: ignore[no-any-return]


def _receiver_address(receiver: Receiver) -> str:
    return receiver.base_url.removeprefix("https://")


# The proxy is about the HTTP edge, which is the same on both stores: SQLite is enough.
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@sqlite_only
async def test_pipeline_deliveries_and_their_retries_go_through_the_proxy(
    service_factory: ServiceFactory,
    receiver: Receiver,
    proxy_factory: ProxyFactory,
    broker: aio_pika.abc.AbstractRobustConnection,
) -> None:
    proxy = await proxy_factory()
    service = await service_factory(egress_proxy_url=proxy.url)
    sources: list[str] = []

    async def fail_first(request: web.Request, seen: int) -> web.Response:
        sources.append(f"/pipeline {request.remote}")
        return web.Response(status=503 if seen == 0 else 200, text="ok")

    receiver.behaviours["/pipeline"] = fail_first
    webhook = await _webhook(service, receiver.url("/pipeline"))
    event = await publish_event(broker, "order.created", service.org, {"order_id": "o1"})
    await receiver.wait_for(lambda _: len(receiver.at("/pipeline")) >= 2)

    # The first attempt and the scheduled retry both arrived from the proxy, not directly.
    assert sources == [f"/pipeline {PROXY_SOURCE}"] * 2
    assert {r.headers["webhook-id"] for r in receiver.at("/pipeline")} == {event.id}
    assert _receiver_address(receiver) in proxy.connects()

    async def settled() -> bool:
        state = await service.store.events.delivery_state(event.id, webhook["id"])
        return state == "succeeded"

    await eventually(settled, what="delivery succeeded")
    status, listing = await service.call("GET", f"/webhooks/{webhook['id']}/deliveries")
    assert status == 200
    assert [(a["attempt"], a["status_code"]) for a in listing["data"]] == [(2, 200), (1, 503)]


@sqlite_only
async def test_test_sends_and_manual_retries_go_through_the_proxy(
    service_factory: ServiceFactory, receiver: Receiver, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory()
    service = await service_factory(egress_proxy_url=proxy.url)
    sources: list[str] = []
    receiver.behaviours["/manual"] = _from(sources, "/manual")
    webhook = await _webhook(service, receiver.url("/manual"))

    status, attempt = await service.call("POST", f"/webhooks/{webhook['id']}/test")
    assert status == 200, attempt
    assert (attempt["success"], attempt["status_code"]) == (True, 200)
    assert proxy.connects() == [_receiver_address(receiver)]

    status, again = await service.call(
        "POST", f"/webhooks/{webhook['id']}/deliveries/{attempt['id']}/retry"
    )
    assert status == 200, again
    assert (again["success"], again["attempt"]) == (True, 2)
    # The retry may reuse the tunnel the test send opened; either way it came from the proxy.
    assert sources == [f"/manual {PROXY_SOURCE}"] * 2
    assert set(proxy.connects()) == {_receiver_address(receiver)}


@sqlite_only
async def test_a_connect_the_proxy_refuses_is_recorded_as_blocked_address(
    service_factory: ServiceFactory, receiver: Receiver, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(refuse=True)
    service = await service_factory(egress_proxy_url=proxy.url)
    webhook = await _webhook(service, receiver.url("/refused"))

    status, attempt = await service.call("POST", f"/webhooks/{webhook['id']}/test")
    assert status == 200, attempt
    assert (attempt["success"], attempt["status_code"]) == (False, None)
    assert attempt["error"]["kind"] == "blocked_address"
    message = attempt["error"]["message"]
    assert f"egress proxy {proxy.url.removeprefix('http://')} refused" in message
    assert "HTTP 403" in message
    assert proxy.connects() == [_receiver_address(receiver)]
    assert receiver.received == []


@sqlite_only
async def test_an_endpoint_the_proxy_cannot_reach_is_a_connection_error(
    service_factory: ServiceFactory, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory()
    service = await service_factory(egress_proxy_url=proxy.url)
    closed = f"127.0.0.1:{_free_port('127.0.0.1')}"
    webhook = await _webhook(service, f"https://{closed}/gone")

    status, attempt = await service.call("POST", f"/webhooks/{webhook['id']}/test")
    assert status == 200, attempt
    # Not a refusal: the proxy tried, and answered CONNECT with its own error status.
    assert attempt["error"]["kind"] == "connection_error", attempt["error"]
    address = proxy.url.removeprefix("http://")
    assert (
        f"egress proxy {address} could not reach {closed}: HTTP 500" in attempt["error"]["message"]
    )
    assert proxy.connects() == [closed]


@sqlite_only
async def test_an_unreachable_proxy_is_named_in_the_attempt(
    service_factory: ServiceFactory, receiver: Receiver
) -> None:
    closed = f"127.0.0.1:{_free_port('127.0.0.1')}"
    service = await service_factory(egress_proxy_url=f"http://{closed}")
    webhook = await _webhook(service, receiver.url("/no-proxy"))

    status, attempt = await service.call("POST", f"/webhooks/{webhook['id']}/test")
    assert status == 200, attempt
    assert attempt["error"]["kind"] == "connection_refused"
    assert f"cannot connect to the egress proxy {closed}" in attempt["error"]["message"]
    assert receiver.received == []


class MappedResolver(AbstractResolver):
    """A stand-in for DNS: fixed answers per name; IP literals answer themselves."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        address = host if guard.parse_ip_literal(host) else self.answers.get(host)
        if address is None:
            raise OSError(socket.EAI_NONAME, f"{host} does not resolve")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=family if family != socket.AF_UNSPEC else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        return None


@sqlite_only
async def test_the_guard_still_checks_targets_and_trusts_the_proxy(
    service_factory: ServiceFactory,
    receiver: Receiver,
    proxy_factory: ProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The proxy by name, on an address the guard would refuse, is reached; an endpoint on
    a private address is refused before the proxy hears of it."""
    proxy = await proxy_factory(listen="127.0.0.3")
    port = proxy.url.rsplit(":", 1)[1]
    dns = MappedResolver({"egress-proxy.internal": "127.0.0.3", "private.example": "10.0.0.7"})
    # Both the connector's resolver and the target check build on guard.DefaultResolver.
    monkeypatch.setattr(guard, "DefaultResolver", lambda: dns)
    service = await service_factory(
        egress_proxy_url=f"http://egress-proxy.internal:{port}",
        # The receiver only: the proxy's 127.0.0.3 is not allowed, and need not be.
        allowed_private_networks="127.0.0.1/32",
    )

    allowed = await _webhook(service, receiver.url("/allowed"))
    status, attempt = await service.call("POST", f"/webhooks/{allowed['id']}/test")
    assert status == 200, attempt
    assert (attempt["success"], attempt["status_code"]) == (True, 200)
    assert "egress-proxy.internal" in dns.asked
    assert proxy.connects() == [_receiver_address(receiver)]

    for url in ("https://private.example/hook", "https://10.0.0.7/hook"):
        # Saved straight to the store: the API's own check would refuse them at creation.
        webhook = await service.store.endpoints.create(
            service.org, url, ["order.created"], "", enabled=True
        )
        status, attempt = await service.call("POST", f"/webhooks/{webhook.id}/test")
        assert status == 200, attempt
        assert (attempt["success"], attempt["status_code"]) == (False, None)
        assert attempt["error"]["kind"] == "blocked_address", attempt["error"]
        assert "10.0.0.7" in attempt["error"]["message"]
    assert "private.example" in dns.asked
    # Nothing but the allowed endpoint was asked of the proxy.
    assert proxy.connects() == [_receiver_address(receiver)]


@pytest.mark.unit
async def test_a_checked_host_is_looked_up_again_once_its_check_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dns = MappedResolver({"hooks.example": "93.184.216.34"})
    monkeypatch.setattr(guard, "DefaultResolver", lambda: dns)
    now = [1000.0]
    proxy = egress.EgressProxy("http://proxy:3128", (), lookup_timeout=5, clock=lambda: now[0])
    target = URL("https://hooks.example/h")

    await proxy.check_target(target)
    dns.answers["hooks.example"] = "10.0.0.7"  # the record changes
    now[0] += egress.CHECK_TTL_SECONDS - 1
    await proxy.check_target(target)  # still within the check's lifetime, as a DNS cache is
    assert dns.asked == ["hooks.example"]
    now[0] += 2
    with pytest.raises(guard.BlockedAddressError, match=r"10\.0\.0\.7"):
        await proxy.check_target(target)
    with pytest.raises(egress.TargetLookupError, match=r"nowhere\.example does not resolve"):
        await proxy.check_target(URL("https://nowhere.example/h"))
    assert dns.asked == ["hooks.example", "hooks.example", "nowhere.example"]


# --- the setting -----------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "value",
    ["http://proxy:3128", "http://10.0.0.5:4750/", "http://user:pw@proxy.corp.example:8080"],
)
def test_proxy_url_accepts_an_http_address(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELLFERN_WEBHOOKS_EGRESS_PROXY_URL", value)
    assert Settings.load().egress_proxy_url == value


@pytest.mark.unit
def test_proxy_url_is_unset_by_default_and_when_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SELLFERN_WEBHOOKS_EGRESS_PROXY_URL", raising=False)
    assert Settings.load().egress_proxy_url is None
    monkeypatch.setenv("SELLFERN_WEBHOOKS_EGRESS_PROXY_URL", "")
    assert Settings.load().egress_proxy_url is None


@pytest.mark.unit
@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("https://proxy:3128", "must be an http:// URL"),
        ("socks5://proxy:1080", "must be an http:// URL"),
        ("proxy:3128", "must be an http:// URL"),
        ("http://proxy", "host and port"),
        ("http://:3128", "host and port"),
        ("http://proxy:port", "host and port"),
        ("http://proxy:3128/path", "only the proxy's address"),
    ],
)
def test_a_bad_proxy_url_names_the_variable(
    value: str, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SELLFERN_WEBHOOKS_EGRESS_PROXY_URL", value)
    with pytest.raises(SettingsError) as caught:
        Settings.load()
    assert str(caught.value).startswith("SELLFERN_WEBHOOKS_EGRESS_PROXY_URL: ")
    assert reason in str(caught.value)
    # The value may hold credentials: the message never repeats it.
    assert value not in str(caught.value)
