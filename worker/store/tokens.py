"""API tokens: created once, stored only as SHA-256 hashes, looked up by hash."""

from __future__ import annotations

import builtins
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.store.ids import new_id
from worker.store.records import Token, utcnow
from worker.store.tables import api_tokens

TOKEN_PREFIX = "sfw_"  # noqa: S105 - a prefix, not a secret
# Writing last_used_at on every request would make every read a write; a minute is precise
# enough for "is this token still in use?".
LAST_USED_RESOLUTION = timedelta(minutes=1)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _token(row: sa.Row[Any]) -> Token:
    return Token(
        id=row.id,
        org_id=row.org_id,
        name=row.name,
        scopes=tuple(row.scopes),
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )


class TokenRepository:
    """The ``api_tokens`` table. Needs no signing-secret key, so the token commands run
    without one."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def create(self, org_id: str, scopes: Sequence[str], name: str) -> tuple[Token, str]:
        """Create a token; return it and its plaintext, which is stored nowhere."""
        plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token = Token(
            id=new_id("tok"),
            org_id=org_id,
            name=name,
            scopes=tuple(dict.fromkeys(scopes)),
            created_at=utcnow(),
            revoked_at=None,
            last_used_at=None,
        )
        async with self._engine.begin() as connection:
            await connection.execute(
                api_tokens.insert().values(
                    id=token.id,
                    org_id=org_id,
                    name=name,
                    scopes=builtins.list(token.scopes),
                    token_hash=hash_token(plaintext),
                    created_at=token.created_at,
                )
            )
        return token, plaintext

    async def list(self) -> builtins.list[Token]:
        """Every token, revoked ones included, by organization."""
        async with self._engine.connect() as connection:
            rows = await connection.execute(
                sa.select(api_tokens).order_by(api_tokens.c.org_id, api_tokens.c.id)
            )
            return [_token(row) for row in rows]

    async def revoke(self, token_id: str) -> bool:
        """Revoke a live token; True if this call revoked it."""
        async with self._engine.begin() as connection:
            result = await connection.execute(
                api_tokens.update()
                .where(api_tokens.c.id == token_id, api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
            return result.rowcount > 0

    async def authenticate(self, plaintext: str) -> Token | None:
        """The live token whose hash matches, or None. Revocation counts from the next call."""
        digest = hash_token(plaintext)
        async with self._engine.connect() as connection:
            row = (
                await connection.execute(
                    sa.select(api_tokens, api_tokens.c.token_hash).where(
                        api_tokens.c.token_hash == digest
                    )
                )
            ).first()
        # The index lookup finds the row; the constant-time compare keeps the final check free
        # of timing differences.
        if row is None or not hmac.compare_digest(row.token_hash, digest) or row.revoked_at:
            return None
        token = _token(row)
        now = utcnow()
        if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
            async with self._engine.begin() as connection:
                await connection.execute(
                    api_tokens.update().where(api_tokens.c.id == token.id).values(last_used_at=now)
                )
        return token
