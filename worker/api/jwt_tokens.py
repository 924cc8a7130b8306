"""Access tokens (JWTs) of the platform's identity provider, verified against its key set.

RS256 and ES256 only: a JWT names its own algorithm, and HMAC would let anyone sign with the
provider's *public* key as the secret, ``none`` with no key at all. The key set is cached; an
unknown ``kid`` refreshes it at most once per ``refresh_interval``, so made-up ``kid`` values
cannot flood the provider, and a failed refresh keeps the cached keys, so an outage of the
provider does not lock out the tokens it issued. Refusals carry fixed text, never a library's
message (which may quote key material).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp
import jwt
import structlog
from aiohttp import web

from schemas.events import ORGANIZATION_ID_PATTERN
from worker.pipeline.sender import ssl_context
from worker.settings import Settings
from worker.store.records import Token
from worker.store.tokens import TOKEN_PREFIX

ALGORITHMS = ("RS256", "ES256")
# Clocks of the provider and of this service drift apart; half a minute is the usual margin.
LEEWAY_SECONDS = 30.0
REFRESH_INTERVAL = 60.0
KEYS_MAX_AGE = 600.0
FETCH_TIMEOUT = 5.0
# A key set is a few kilobytes; a bound keeps a misbehaving server from filling memory.
MAX_JWKS_BYTES = 1024 * 1024

KeyFetch = Callable[[], Awaitable[Any]]

log = structlog.get_logger("sellfern_webhooks.api.jwt")


class InvalidJwtError(Exception):
    """A JWT that is not accepted; its message is safe to answer with."""


def looks_like_jwt(credentials: str) -> bool:
    """Three dot-separated parts, which a token of our own (``sfw_…``, url-safe) never has."""
    return credentials.count(".") == 2 and not credentials.startswith(TOKEN_PREFIX)


def token_scopes(claims: Mapping[str, Any]) -> tuple[str, ...]:
    """Scopes from ``scope`` (space-separated) and ``scp`` (a list, or a string as some send)."""
    found: list[str] = []
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            found.extend(value.split())
        elif isinstance(value, list):
            found.extend(item for item in value if isinstance(item, str))
    return tuple(dict.fromkeys(found))


def parse_key_set(document: object) -> dict[str, jwt.PyJWK]:
    """The signing keys of a JWKS document usable with :data:`ALGORITHMS`, by ``kid``.

    Keys of other types, for encryption or without a ``kid`` are skipped; a set with none left
    is an error, so that a broken answer never replaces keys that work.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise TypeError("the key set is not a JWKS document (an object with a keys list)")
    keys: dict[str, jwt.PyJWK] = {}
    for entry in document["keys"]:
        kid = entry.get("kid") if isinstance(entry, dict) else None
        if not isinstance(kid, str) or not kid or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            continue
        if key.algorithm_name in ALGORITHMS:
            keys[kid] = key
    if not keys:
        raise ValueError("the key set holds no RS256 or ES256 signing key with a kid")
    return keys


class JwksFetcher:
    """GETs the key set over HTTPS, trusting ``CA_BUNDLE`` too; its session lives as long as
    the API application (:meth:`session_context` is one of the app's ``cleanup_ctx``)."""

    def __init__(self, url: str, ca_bundle: str | None, timeout: float = FETCH_TIMEOUT) -> None:
        self.url = url
        self._ca_bundle = ca_bundle
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def session_context(self, _app: web.Application) -> AsyncIterator[None]:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_context(self._ca_bundle)),
            timeout=aiohttp.ClientTimeout(total=self._timeout),
        )
        try:
            yield
        finally:
            await self._session.close()
            self._session = None

    async def __call__(self) -> Any:  # noqa: ANN401 - a JSON document, checked by parse_key_set
        if self._session is None:
            raise RuntimeError("the key set fetcher is not open")
        # A redirect could leave https; the configured URL is the key set's address.
        async with self._session.get(self.url, allow_redirects=False) as response:
            if response.status != 200:
                raise ValueError(f"the key set server answered {response.status}")
            body = await response.content.read(MAX_JWKS_BYTES + 1)
        if len(body) > MAX_JWKS_BYTES:
            raise ValueError(f"the key set is over {MAX_JWKS_BYTES} bytes")
        return json.loads(body)


# Fixed answers for the library's refusals, most specific first.
_REFUSALS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet (nbf or iat in the future)"),
    (jwt.InvalidIssuerError, "the token's issuer is not accepted"),
    (jwt.InvalidAudienceError, "the token's audience is not accepted"),
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
    (jwt.DecodeError, "the token is not a well-formed JWT"),
)


def _refusal(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the token lacks the {exc.claim} claim"
    for kind, message in _REFUSALS:
        if isinstance(exc, kind):
            return message
    return "the token is not valid"


class JwtVerifier:
    """Verifies the identity provider's JWTs; holds its key set, cached."""

    def __init__(
        self,
        fetch: KeyFetch,
        *,
        issuer: str,
        audience: str,
        org_claim: str = "org_id",
        clock: Callable[[], float] = time.monotonic,
        refresh_interval: float = REFRESH_INTERVAL,
        max_age: float = KEYS_MAX_AGE,
        leeway: float = LEEWAY_SECONDS,
    ) -> None:
        self._fetch = fetch
        self._issuer = issuer
        self._audience = audience
        self._org_claim = org_claim
        self._clock = clock
        self._refresh_interval = refresh_interval
        self._max_age = max_age
        self._leeway = leeway
        self._keys: dict[str, jwt.PyJWK] = {}
        self._loaded_at: float | None = None
        self._tried_at: float | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, fetch: KeyFetch) -> JwtVerifier:
        if not (settings.jwt_issuer and settings.jwt_audience):
            raise ValueError("JWT_ISSUER and JWT_AUDIENCE are needed with JWT_JWKS_URL")
        issuer, audience = settings.jwt_issuer, settings.jwt_audience
        return cls(fetch, issuer=issuer, audience=audience, org_claim=settings.jwt_org_claim)

    async def authenticate(self, token: str) -> Token:
        """The principal the token stands for, like a local token's; or InvalidJwtError."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidJwtError("the token is not a well-formed JWT") from None
        algorithm = header.get("alg")
        if algorithm not in ALGORITHMS:
            raise InvalidJwtError("the token's algorithm is not accepted; use RS256 or ES256")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidJwtError("the token names no signing key (kid)")
        key = await self._key(kid)
        if key is None:
            raise InvalidJwtError("the token's signing key is not one of the identity provider's")
        if key.algorithm_name != algorithm:
            raise InvalidJwtError("the token's algorithm does not match its signing key")
        try:
            claims = jwt.decode(
                token, key.key, algorithms=[algorithm], audience=self._audience,
                issuer=self._issuer, leeway=self._leeway,
                options={"require": ["exp", "iss", "aud"]},
            )  # fmt: skip
        except jwt.PyJWTError as exc:
            raise InvalidJwtError(_refusal(exc)) from None
        return self._principal(token, claims)

    def _principal(self, token: str, claims: Mapping[str, Any]) -> Token:
        org_id = claims.get(self._org_claim)
        if not isinstance(org_id, str) or not re.fullmatch(ORGANIZATION_ID_PATTERN, org_id):
            raise InvalidJwtError(f"the token has no valid {self._org_claim} claim")
        subject = claims.get("sub")
        # The id keys the rate limit and the logs: per subject, so that a client's fresh
        # tokens share one bucket.
        if isinstance(subject, str) and subject:
            token_id = f"jwt:{subject}"
        else:
            token_id = f"jwt:{hashlib.sha256(token.encode()).hexdigest()[:16]}"
        issued = claims.get("iat")
        try:
            created = datetime.fromtimestamp(
                issued if isinstance(issued, int | float) else time.time(), UTC
            )
        except (OverflowError, OSError, ValueError):
            # PyJWT refuses an iat in the future only; one far in the past is no datetime.
            raise InvalidJwtError("the token's iat claim is not a valid time") from None
        return Token(
            id=token_id, org_id=org_id, name=subject if isinstance(subject, str) else "",
            scopes=token_scopes(claims), created_at=created, revoked_at=None, last_used_at=None,
        )  # fmt: skip

    async def _key(self, kid: str) -> jwt.PyJWK | None:
        key = self._keys.get(kid)
        # While another request refreshes, a known key serves as it is.
        if key is not None and (not self._stale() or self._lock.locked()):
            return key
        async with self._lock:
            key = self._keys.get(kid)
            if (key is None or self._stale()) and self._may_refresh():
                await self._refresh()
            return self._keys.get(kid)

    def _stale(self) -> bool:
        return self._loaded_at is not None and self._clock() - self._loaded_at >= self._max_age

    def _may_refresh(self) -> bool:
        return self._tried_at is None or self._clock() - self._tried_at >= self._refresh_interval

    async def _refresh(self) -> None:
        self._tried_at = self._clock()
        try:
            keys = parse_key_set(await self._fetch())
        except Exception as exc:
            log.warning(
                "identity provider keys not refreshed; the cached ones keep serving",
                error=str(exc) or type(exc).__name__,
                cached_keys=len(self._keys),
            )
            return
        self._keys = keys
        self._loaded_at = self._tried_at
        log.info("identity provider keys loaded", kids=sorted(keys))
