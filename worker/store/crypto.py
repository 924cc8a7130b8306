"""Encryption at rest of endpoints' signing secrets.

Secrets are sealed with Fernet (AES-128-CBC + HMAC-SHA256) under ``SECRET_KEYS``, a list of
keys: the first seals, every one opens. Rotating keys is therefore: put a new key first, run
``sellfern-webhooks rotate-keys`` (which re-seals every stored secret with the first key),
then drop the old key.

Where the keys come from (:func:`load_box`):

- ``SECRET_KEYS`` when set;
- otherwise on SQLite, the single-machine default, a key generated once and kept beside the
  database file (``<db path>.key``, mode 0600), so that ``serve`` works with no settings;
- otherwise (PostgreSQL) start-up is refused, unless ``DEV_MODE`` is on: then a fixed,
  publicly known development key is used, with a warning at every start.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import structlog
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy.engine import make_url

from worker.settings import Settings, SettingsError

log = structlog.get_logger("sellfern_webhooks.crypto")

KEYS_VARIABLE = "SELLFERN_WEBHOOKS_SECRET_KEYS"
# Public by design: it protects nothing, and DEV_MODE says so at every start.
DEV_KEY = base64.urlsafe_b64encode(b"sellfern-webhooks-dev-mode-key!!").decode()
# Values written before encryption at rest existed; they are opened as they are and re-sealed
# by ``rotate-keys``.
_LEGACY_PREFIX = "whsec_"
# How many opened secrets a process remembers: one or two per endpoint it delivers to.
OPENED_CACHE_SIZE = 50_000


class SecretBoxError(Exception):
    """A stored secret cannot be opened with any of the configured keys."""


class SecretBox:
    """Seals and opens short secrets with a list of Fernet keys; the first one seals.

    Opened secrets are remembered by their sealed form: every delivery reads its endpoint
    afresh, and opening a Fernet token costs more than the rest of that read. A rotated secret
    or key gives a new sealed form, so nothing stale is ever served.
    """

    def __init__(self, keys: Sequence[str | bytes]) -> None:
        if not keys:
            raise ValueError("a SecretBox needs at least one key")
        fernets = [Fernet(key) for key in keys]
        self._current = fernets[0]
        self._all = MultiFernet(fernets)
        self._opened: dict[str, str] = {}

    def seal(self, plaintext: str) -> str:
        return self._all.encrypt(plaintext.encode()).decode("ascii")

    def open(self, sealed: str) -> str:
        if sealed.startswith(_LEGACY_PREFIX):
            return sealed
        opened = self._opened.get(sealed)
        if opened is not None:
            return opened
        try:
            opened = self._all.decrypt(sealed.encode("ascii")).decode()
        except (InvalidToken, UnicodeError):
            raise SecretBoxError(
                f"a stored secret opens with none of {KEYS_VARIABLE}: was a key dropped "
                "before `sellfern-webhooks rotate-keys` ran?"
            ) from None
        if len(self._opened) >= OPENED_CACHE_SIZE:
            self._opened.clear()  # crude, but bounded; a full cache is refilled in one pass
        self._opened[sealed] = opened
        return opened

    def needs_rotation(self, sealed: str) -> bool:
        """True when ``sealed`` is not sealed with the first key (or not sealed at all)."""
        if sealed.startswith(_LEGACY_PREFIX):
            return True
        try:
            self._current.decrypt(sealed.encode("ascii"))
        except (InvalidToken, UnicodeError):
            return True
        return False

    def reseal(self, sealed: str) -> str:
        """``sealed`` sealed again with the first key."""
        return self.seal(self.open(sealed))


def generate_key() -> str:
    return Fernet.generate_key().decode("ascii")


def key_file_for(database_url: str) -> Path | None:
    """``<db path>.key`` for a SQLite file database; None for an in-memory one."""
    database = make_url(database_url).database
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        return None
    return Path(f"{database}.key")


def _read_or_create_key_file(path: Path) -> tuple[str, bool]:
    """The key in ``path``, creating it (mode 0600) if absent; True if this call created it.

    The key is written to a private temporary file that is then hard-linked into place, so
    two processes starting at once never see a half-written file: one link wins and the
    other reads the winner's key.
    """
    try:
        return path.read_text().strip(), False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(generate_key() + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
            created = True
        except FileExistsError:
            created = False
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    return path.read_text().strip(), created


def load_box(settings: Settings) -> SecretBox:
    """The box for this process, by the policy in the module docstring.

    Raises :class:`SettingsError` (one line naming ``SELLFERN_WEBHOOKS_SECRET_KEYS``) when
    no key may be used.
    """
    if settings.secret_keys:
        return SecretBox([key.get_secret_value() for key in settings.secret_keys])
    if settings.is_sqlite:
        path = key_file_for(settings.database_url)
        if path is None:
            log.warning("in-memory database: signing secrets are sealed with a throwaway key")
            return SecretBox([generate_key()])
        try:
            key, created = _read_or_create_key_file(path)
            box = SecretBox([key])
        except (OSError, ValueError) as exc:
            raise SettingsError(
                f"{KEYS_VARIABLE}: unset, and the key file {path} cannot be used: {exc}"
            ) from None
        if created:
            log.info(
                "no SECRET_KEYS: generated the key that seals signing secrets; back it up "
                "with the database, or move it into SECRET_KEYS",
                key_file=str(path),
            )
        return box
    if settings.dev_mode:
        log.warning(
            "DEV_MODE: signing secrets are sealed with the PUBLIC development key; never use "
            "this database for real endpoints, set SECRET_KEYS instead",
            variable=KEYS_VARIABLE,
        )
        return SecretBox([DEV_KEY])
    raise SettingsError(
        f"{KEYS_VARIABLE}: required with PostgreSQL, comma-separated Fernet keys (make one with"
        " `python -c 'from cryptography.fernet import Fernet; "
        "print(Fernet.generate_key().decode())'`); for development only, set "
        "SELLFERN_WEBHOOKS_DEV_MODE=true instead"
    )
