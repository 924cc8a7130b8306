"""Persistence: :class:`Store` bundles the repositories of the service's records.

``Store`` is imported on first use, so that importing a light module of this package (the
records, the ids) does not load SQLAlchemy and the database drivers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.store.store import Store

__all__ = ["Store"]


def __getattr__(name: str) -> object:
    if name == "Store":
        from worker.store.store import Store  # noqa: PLC0415 - deferred on purpose, see above

        return Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
