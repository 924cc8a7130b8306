"""The identity provider's JWTs as API tokens, beside the service's own tokens.

The key set is served by a real HTTPS server (a ``trustme`` certificate, trusted through
``CA_BUNDLE``) that the tests rotate, break and stop. The key cache's refresh limit is a unit
test with a fake clock; the integration tests move the verifier's clock on instead of waiting
a minute.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.conftest import Receiver, Service, ServiceFactory
from tests.test_cli import run_cli
from worker.api.appkeys import JWT_VERIFIER
from worker.api.jwt_tokens import InvalidJwtError, JwtVerifier, token_scopes
from worker.settings import Settings, SettingsError

pytestmark = pytest.mark.timeout(60)

ISSUER = "https://id.sellfern.test/"
AUDIENCE = "sellfern-webhooks"


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: a JWT never reaches the store, and the token and endpoint repositories
    are held to both backends by test_api.py and test_cli.py."""
    return f"sqlite+aiosqlite:///{tmp_path / 'webhooks.db'}"


# --- the identity provider ---------------------------------------------------------------------


@dataclass
class SigningKey:
    kid: str
    algorithm: str
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = field(repr=False)

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            data = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            data = ECAlgorithm.to_jwk(public, as_dict=True)
        return {**data, "kid": self.kid, "use": "sig", "alg": self.algorithm}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def new_key(algorithm: str, kid: str) -> SigningKey:
    if algorithm == "RS256":
        return SigningKey(kid, algorithm, rsa.generate_private_key(65537, 2048))
    return SigningKey(kid, algorithm, ec.generate_private_key(ec.SECP256R1()))


def claims_for(org: str, **overrides: Any) -> dict[str, Any]:  # noqa: ANN401
    """An access token's claims, valid now; an override of None leaves the claim out."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER, "aud": AUDIENCE, "sub": "client_billing", "org_id": org,
        "scope": "openid webhooks:manage", "iat": now, "nbf": now, "exp": now + 300,
    }  # fmt: skip
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def sign(key: SigningKey, claims: dict[str, Any]) -> str:
    return jwt.encode(claims, key.private, algorithm=key.algorithm, headers={"kid": key.kid})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_with_public_key(key: SigningKey, claims: dict[str, Any]) -> str:
    """The algorithm-confusion attack: HMAC keyed with the provider's public key, which anyone
    can read from the key set. Built by hand because PyJWT itself refuses to make it."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode())
    payload = _b64(json.dumps(claims).encode())
    signature = hmac.new(key.public_pem(), f"{header}.{payload}".encode(), hashlib.sha256)
    return f"{header}.{payload}.{_b64(signature.digest())}"


@dataclass
class IdentityProvider:
    """A JWKS server on 127.0.0.1 over HTTPS; ``published`` is what it serves right now."""

    published: list[SigningKey]
    base_url: str = ""
    hits: int = 0
    failing: bool = False
    _runner: web.AppRunner | None = None

    @property
    def jwks_url(self) -> str:
        return f"{self.base_url}/.well-known/jwks.json"

    async def handle(self, _request: web.Request) -> web.Response:
        self.hits += 1
        if self.failing:
            return web.Response(status=503, text="maintenance")
        return web.json_response({"keys": [key.jwk() for key in self.published]})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture(scope="session")
def rs_key() -> SigningKey:
    return new_key("RS256", "rsa-2026-01")


@pytest.fixture(scope="session")
def es_key() -> SigningKey:
    return new_key("ES256", "ec-2026-01")


async def serve_keys(provider: IdentityProvider, context: ssl.SSLContext | None) -> None:
    """Serve ``provider`` on a free port of 127.0.0.1, over TLS when ``context`` is given."""
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", provider.handle)
    provider._runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await provider._runner.setup()
    site = web.TCPSite(provider._runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    provider.base_url = f"{'https' if context else 'http'}://127.0.0.1:{port}"


@pytest.fixture
async def idp(
    tls_ca: trustme.CA, rs_key: SigningKey, es_key: SigningKey
) -> AsyncIterator[IdentityProvider]:
    provider = IdentityProvider([rs_key, es_key])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1").configure_cert(context)
    await serve_keys(provider, context)
    try:
        yield provider
    finally:
        await provider.stop()


@pytest.fixture
async def jwt_service(service_factory: ServiceFactory, idp: IdentityProvider) -> Service:
    return await service_factory(
        jwt_jwks_url=idp.jwks_url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE
    )


def advance_key_clock(service: Service, seconds: float) -> None:
    """Move the key cache's clock on, as if ``seconds`` had passed."""
    assert service.running.api_app is not None
    verifier = service.running.api_app[JWT_VERIFIER]
    previous = verifier._clock
    verifier._clock = lambda: previous() + seconds


async def create_webhook(service: Service, receiver: Receiver) -> str:
    """An endpoint of ``service.org``, made with the service's own token."""
    body = {"url": receiver.url("/hook"), "events": ["order.created"]}
    status, created = await service.call("POST", "/webhooks", body)
    assert status == 201, created
    return str(created["id"])


def assert_refused(status: int, body: Any, message: str) -> None:  # noqa: ANN401
    assert status == 401, body
    assert body["error"]["code"] == "invalid_token"
    assert message in body["error"]["message"], body


# --- accepted ----------------------------------------------------------------------------------


async def test_rs256_and_es256_tokens_open_their_organization(
    jwt_service: Service, idp: IdentityProvider, receiver: Receiver,
    rs_key: SigningKey, es_key: SigningKey,
) -> None:  # fmt: skip
    webhook_id = await create_webhook(jwt_service, receiver)  # local tokens keep working
    for key in (rs_key, es_key):
        token = sign(key, claims_for(jwt_service.org))
        status, body = await jwt_service.call("GET", f"/webhooks/{webhook_id}", token=token)
        assert status == 200, (key.algorithm, body)
        assert body["id"] == webhook_id
    # Within the leeway, an expired token still passes: clocks drift.
    token = sign(es_key, claims_for(jwt_service.org, exp=int(time.time()) - 10))
    status, listed = await jwt_service.call("GET", "/webhooks", token=token)
    assert status == 200, listed
    assert [w["id"] for w in listed["data"]] == [webhook_id]
    # A JWT creates in the organization its claim names.
    body = {"url": receiver.url("/by-jwt"), "events": ["ticket.created"]}
    status, created = await jwt_service.call("POST", "/webhooks", body, token=token)
    assert status == 201, created
    status, mine = await jwt_service.call("GET", f"/webhooks/{created['id']}")
    assert status == 200, mine
    assert idp.hits == 1  # one fetch, then the cache


async def test_keys_over_plain_http_from_an_allowed_private_address(
    service_factory: ServiceFactory, receiver: Receiver, es_key: SigningKey
) -> None:
    # The service's tests allow 127.0.0.0/8 (ALLOWED_PRIVATE_NETWORKS): a key server there,
    # as a cluster-internal identity provider may be, is fetched without TLS.
    provider = IdentityProvider([es_key])
    await serve_keys(provider, None)
    try:
        service = await service_factory(
            jwt_jwks_url=provider.jwks_url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE
        )
        webhook_id = await create_webhook(service, receiver)
        token = sign(es_key, claims_for(service.org))
        status, body = await service.call("GET", f"/webhooks/{webhook_id}", token=token)
        assert status == 200, body
        assert provider.base_url.startswith("http://")
        assert provider.hits == 1
    finally:
        await provider.stop()


async def test_scopes_come_from_scp_as_well(jwt_service: Service, rs_key: SigningKey) -> None:
    claims = claims_for(jwt_service.org, scope=None, scp=["orders:read", "webhooks:manage"])
    status, body = await jwt_service.call("GET", "/webhooks", token=sign(rs_key, claims))
    assert status == 200, body


# --- refused -----------------------------------------------------------------------------------


def _expired(key: SigningKey, org: str) -> str:
    now = int(time.time())
    return sign(key, claims_for(org, iat=now - 600, nbf=now - 600, exp=now - 120))


def _not_yet(key: SigningKey, org: str) -> str:
    return sign(key, claims_for(org, nbf=int(time.time()) + 120))


def _alg_none(key: SigningKey, org: str) -> str:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": key.kid}).encode())
    return f"{header}.{_b64(json.dumps(claims_for(org)).encode())}."


def _tampered(key: SigningKey, org: str) -> str:
    header, _, signature = sign(key, claims_for(org)).split(".")
    return f"{header}.{_b64(json.dumps(claims_for('org_victim')).encode())}.{signature}"


REFUSED: dict[str, tuple[Callable[[SigningKey, str], str], str]] = {
    "expired": (_expired, "the token has expired"),
    "wrong issuer": (
        lambda k, org: sign(k, claims_for(org, iss="https://evil.example/")),
        "the token's issuer is not accepted",
    ),
    "wrong audience": (
        lambda k, org: sign(k, claims_for(org, aud="another-service")),
        "the token's audience is not accepted",
    ),
    "nbf in the future": (_not_yet, "the token is not valid yet"),
    "alg none": (_alg_none, "algorithm is not accepted"),
    "hs256 keyed with the public key": (
        lambda k, org: hs256_with_public_key(k, claims_for(org)),
        "algorithm is not accepted",
    ),
    "key never published": (
        lambda _k, org: sign(new_key("ES256", "stranger"), claims_for(org)),
        "signing key is not one of the identity provider's",
    ),
    "another organization swapped in": (_tampered, "signature does not verify"),
    "no organization": (
        lambda k, org: sign(k, claims_for(org, org_id=None)),
        "the token has no valid org_id claim",
    ),
    "no exp": (lambda k, org: sign(k, claims_for(org, exp=None)), "lacks the exp claim"),
    "iat before year 1": (
        lambda k, org: sign(k, claims_for(org, iat=-(10**15))),
        "the token's iat claim is not a valid time",
    ),
    "iat far before year 1, as a float": (
        lambda k, org: sign(k, claims_for(org, iat=-1e300)),
        "the token's iat claim is not a valid time",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_refused_tokens_answer_401_without_key_material(
    case: str, jwt_service: Service, rs_key: SigningKey
) -> None:
    make, message = REFUSED[case]
    token = make(rs_key, jwt_service.org)
    async with jwt_service.http.get(
        f"{jwt_service.base}/api/v2/webhooks", headers={"Authorization": f"Bearer {token}"}
    ) as response:
        text = await response.text()
        status = response.status
    assert_refused(status, json.loads(text), message)
    jwk = rs_key.jwk()
    signature = token.split(".")[2]
    for material in (jwk["n"][:24], "BEGIN", signature[:24] or "no signature"):
        assert material not in text


# --- the key set: rotation, outage -------------------------------------------------------------


async def test_unknown_kid_is_answered_after_the_keys_rotate(
    jwt_service: Service, idp: IdentityProvider, rs_key: SigningKey
) -> None:
    first = sign(rs_key, claims_for(jwt_service.org))
    status, _ = await jwt_service.call("GET", "/webhooks", token=first)
    assert status == 200
    rotated = new_key("RS256", "rsa-2026-02")
    idp.published = [rotated]
    new_token = sign(rotated, claims_for(jwt_service.org))
    # Right after a fetch, an unknown kid does not make another one...
    status, body = await jwt_service.call("GET", "/webhooks", token=new_token)
    assert_refused(status, body, "signing key is not one of the identity provider's")
    assert idp.hits == 1
    # ...a minute later it does, and the new key verifies.
    advance_key_clock(jwt_service, 61)
    status, body = await jwt_service.call("GET", "/webhooks", token=new_token)
    assert status == 200, body
    assert idp.hits == 2
    # The withdrawn key is gone with the refresh.
    old_token = sign(rs_key, claims_for(jwt_service.org))
    status, body = await jwt_service.call("GET", "/webhooks", token=old_token)
    assert_refused(status, body, "signing key is not one of the identity provider's")


async def test_cached_keys_serve_while_the_key_server_is_down(
    jwt_service: Service, idp: IdentityProvider, rs_key: SigningKey, es_key: SigningKey
) -> None:
    token = sign(rs_key, claims_for(jwt_service.org))
    status, _ = await jwt_service.call("GET", "/webhooks", token=token)
    assert status == 200
    stranger = sign(new_key("ES256", "stranger"), claims_for(jwt_service.org))

    idp.failing = True  # answers 503
    advance_key_clock(jwt_service, 61)
    status, body = await jwt_service.call("GET", "/webhooks", token=stranger)
    assert_refused(status, body, "signing key is not one of the identity provider's")
    assert idp.hits == 2  # the refresh was tried, and failed
    status, body = await jwt_service.call("GET", "/webhooks", token=token)
    assert status == 200, body

    await idp.stop()  # connection refused from now on
    advance_key_clock(jwt_service, 61)
    status, body = await jwt_service.call("GET", "/webhooks", token=stranger)
    assert_refused(status, body, "signing key is not one of the identity provider's")
    # Past the cache's age a known key triggers a refresh too; it fails, and the key serves.
    advance_key_clock(jwt_service, 3600)
    for key in (rs_key, es_key):
        token = sign(key, claims_for(jwt_service.org))
        status, body = await jwt_service.call("GET", "/webhooks", token=token)
        assert status == 200, (key.algorithm, body)
    assert idp.hits == 2


# --- the same rules as local tokens ------------------------------------------------------------


async def test_token_without_webhooks_manage_is_403(
    jwt_service: Service, es_key: SigningKey
) -> None:
    for claims in (
        claims_for(jwt_service.org, scope="openid orders:read"),
        claims_for(jwt_service.org, scope=None, scp=["orders:read"]),
        claims_for(jwt_service.org, scope=None),
    ):
        status, body = await jwt_service.call("GET", "/webhooks", token=sign(es_key, claims))
        assert status == 403, body
        assert body["error"]["code"] == "missing_scope"


async def test_another_organizations_endpoint_is_404(
    jwt_service: Service, receiver: Receiver, rs_key: SigningKey
) -> None:
    webhook_id = await create_webhook(jwt_service, receiver)
    other = sign(rs_key, claims_for("org_someone_else"))
    _, missing = await jwt_service.call("GET", "/webhooks/wh_doesnotexist", token=other)
    for method, path, body in (
        ("GET", f"/webhooks/{webhook_id}", None),
        ("PATCH", f"/webhooks/{webhook_id}", {"enabled": False}),
        ("GET", f"/webhooks/{webhook_id}/deliveries", None),
        ("DELETE", f"/webhooks/{webhook_id}", None),
    ):
        status, answer = await jwt_service.call(method, path, body, token=other)
        assert status == 404, (method, path, answer)
        assert answer["error"]["code"] == missing["error"]["code"] == "not_found"
    status, listed = await jwt_service.call("GET", "/webhooks", token=other)
    assert status == 200
    assert listed["data"] == []
    status, mine = await jwt_service.call("GET", f"/webhooks/{webhook_id}")
    assert status == 200
    assert mine["enabled"] is True


async def test_without_jwt_settings_a_jwt_is_an_unknown_token(
    service: Service, idp: IdentityProvider, rs_key: SigningKey
) -> None:
    token = sign(rs_key, claims_for(service.org))
    status, body = await service.call("GET", "/webhooks", token=token)
    assert_refused(status, body, "the token is unknown or revoked")
    assert idp.hits == 0


async def test_cli_token_with_repeated_scopes_and_one_without_manage(
    service: Service, database_url: str
) -> None:
    env = {"SELLFERN_WEBHOOKS_DATABASE_URL": database_url}
    both = await asyncio.to_thread(
        run_cli, "token", "create", "--org", service.org, "--scope", "orders:read",
        "--scope", "webhooks:manage", "--name", "erp", env=env,
    )  # fmt: skip
    assert both.returncode == 0, both.stderr
    assert "with scopes orders:read webhooks:manage" in both.stdout
    status, body = await service.call("GET", "/webhooks", token=both.stdout.splitlines()[-1])
    assert status == 200, body

    read_only = await asyncio.to_thread(
        run_cli, "token", "create", "--org", service.org, "--scope", "orders:read",
        "--scope", "tickets:read", env=env,
    )  # fmt: skip
    assert read_only.returncode == 0, read_only.stderr
    assert "403 missing_scope" in read_only.stderr
    token = read_only.stdout.splitlines()[-1]
    assert token.startswith("sfw_")
    authenticated = await service.store.tokens.authenticate(token)
    assert authenticated is not None
    assert authenticated.scopes == ("orders:read", "tickets:read")
    status, body = await service.call("GET", "/webhooks", token=token)
    assert status == 403, body
    assert body["error"]["code"] == "missing_scope"


# --- unit: the key cache and the claims, no services -------------------------------------------


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeKeySet:
    """Stands in for the HTTPS fetch: the provider's current keys, and how often it was asked."""

    published: list[SigningKey]
    calls: int = 0
    failing: bool = False

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        await asyncio.sleep(0)  # a real fetch yields to other requests
        if self.failing:
            raise ConnectionError("key server unreachable")
        return {"keys": [key.jwk() for key in self.published]}


def unit_verifier(keys: FakeKeySet, clock: FakeClock) -> JwtVerifier:
    return JwtVerifier(keys, issuer=ISSUER, audience=AUDIENCE, clock=clock)


@pytest.mark.unit
async def test_unknown_kid_refreshes_at_most_once_a_minute(rs_key: SigningKey) -> None:
    keys, clock = FakeKeySet([rs_key]), FakeClock()
    verifier = unit_verifier(keys, clock)
    principal = await verifier.authenticate(sign(rs_key, claims_for("org_a")))
    assert (principal.org_id, principal.scopes) == ("org_a", ("openid", "webhooks:manage"))
    assert keys.calls == 1

    rotated = new_key("ES256", "ec-next")
    keys.published = [rs_key, rotated]
    token = sign(rotated, claims_for("org_a"))
    for elapsed in (1, 30, 59.9):
        clock.now = 1000 + elapsed
        with pytest.raises(InvalidJwtError, match="signing key is not one"):
            await verifier.authenticate(token)
    assert keys.calls == 1

    clock.now = 1060
    assert (await verifier.authenticate(token)).org_id == "org_a"
    assert keys.calls == 2

    # Many unknown kids at once, a minute later: one fetch between them.
    clock.now = 1130
    strangers = [sign(new_key("ES256", f"s{n}"), claims_for("org_a")) for n in range(5)]
    results = await asyncio.gather(
        *(verifier.authenticate(t) for t in strangers), return_exceptions=True
    )
    assert all(isinstance(r, InvalidJwtError) for r in results)
    assert keys.calls == 3


@pytest.mark.unit
async def test_a_failed_refresh_keeps_the_cached_keys(rs_key: SigningKey) -> None:
    keys, clock = FakeKeySet([rs_key]), FakeClock()
    verifier = unit_verifier(keys, clock)
    token = sign(rs_key, claims_for("org_a"))
    await verifier.authenticate(token)
    keys.failing = True
    clock.now += 3600  # past the cache's age: the known key asks for a refresh
    assert (await verifier.authenticate(token)).org_id == "org_a"
    assert keys.calls == 2
    # A set with no usable key is a failure too, not an empty cache.
    keys.failing, keys.published = False, []
    clock.now += 61
    assert (await verifier.authenticate(token)).org_id == "org_a"
    assert keys.calls == 3


@pytest.mark.unit
@pytest.mark.parametrize(
    ("claims", "scopes"),
    [
        ({"scope": "webhooks:manage orders:read"}, ("webhooks:manage", "orders:read")),
        ({"scp": ["webhooks:manage", 7, "a:b"]}, ("webhooks:manage", "a:b")),
        ({"scp": "x:y z:w"}, ("x:y", "z:w")),
        ({"scope": "a:b", "scp": ["a:b", "c:d"]}, ("a:b", "c:d")),
        ({"scope": 5}, ()),
        ({}, ()),
    ],
)
def test_scopes_from_scope_or_scp(claims: dict[str, Any], scopes: tuple[str, ...]) -> None:
    assert token_scopes(claims) == scopes


@pytest.mark.unit
def test_jwt_settings_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELLFERN_WEBHOOKS_JWT_JWKS_URL", "http://id.example.com/jwks.json")
    with pytest.raises(SettingsError, match=r"SELLFERN_WEBHOOKS_JWT_JWKS_URL: must be an https://"):
        Settings.load()
    monkeypatch.setenv("SELLFERN_WEBHOOKS_JWT_JWKS_URL", "https://id.example.com/jwks.json")
    with pytest.raises(SettingsError) as raised:
        Settings.load()
    assert "SELLFERN_WEBHOOKS_JWT_ISSUER: must be set" in str(raised.value)
    assert "SELLFERN_WEBHOOKS_JWT_AUDIENCE: must be set" in str(raised.value)
    monkeypatch.setenv("SELLFERN_WEBHOOKS_JWT_ISSUER", ISSUER)
    monkeypatch.setenv("SELLFERN_WEBHOOKS_JWT_AUDIENCE", AUDIENCE)
    settings = Settings.load()
    assert (settings.jwt_issuer, settings.jwt_audience, settings.jwt_org_claim) == (
        ISSUER, AUDIENCE, "org_id",
    )  # fmt: skip
    monkeypatch.setenv("SELLFERN_WEBHOOKS_JWT_JWKS_URL", "")
    assert Settings.load().jwt_jwks_url is None  # empty, as a ConfigMap leaves it: unset


@pytest.mark.unit
@pytest.mark.parametrize(
    ("url", "networks", "accepted"),
    [
        ("http://127.0.0.1:8081/jwks.json", "127.0.0.0/8", True),
        ("http://[::1]:8081/jwks.json", "::1/128", True),
        ("http://127.0.0.1:8081/jwks.json", "", False),
        ("http://10.0.0.7/jwks.json", "127.0.0.0/8", False),
        # A name could resolve anywhere: only an address is known to be inside.
        ("http://localhost:8081/jwks.json", "127.0.0.0/8", False),
        ("https://localhost:8081/jwks.json", "", True),
    ],
)
def test_plain_http_keys_only_from_an_allowed_private_address(
    monkeypatch: pytest.MonkeyPatch, url: str, networks: str, accepted: bool
) -> None:
    monkeypatch.setenv("SELLFERN_WEBHOOKS_JWT_JWKS_URL", url)
    monkeypatch.setenv("SELLFERN_WEBHOOKS_ALLOWED_PRIVATE_NETWORKS", networks)
    monkeypatch.setenv("SELLFERN_WEBHOOKS_JWT_ISSUER", ISSUER)
    monkeypatch.setenv("SELLFERN_WEBHOOKS_JWT_AUDIENCE", AUDIENCE)
    if accepted:
        assert Settings.load().jwt_jwks_url == url
    else:
        with pytest.raises(SettingsError, match="ALLOWED_PRIVATE_NETWORKS"):
            Settings.load()
