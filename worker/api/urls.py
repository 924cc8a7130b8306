"""An endpoint's URL, as the API takes it: its form here, its addresses in the SSRF guard.

The URL is stored as sent, and what is sent is what the endpoint's owner reads back, so a
URL is refused rather than repaired: yarl, like a browser, would strip surrounding
whitespace and drop tabs and newlines, and the stored text would not be the URL requested.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from yarl import URL

from worker.pipeline import guard


class InvalidUrlError(ValueError):
    """Why a URL is refused, phrased to follow ``url: ``."""


def _stray_character(raw: str) -> str | None:
    """The first whitespace or control character of ``raw``, if any."""
    for character in raw:
        if character.isspace() or unicodedata.category(character) == "Cc":
            return character
    return None


def parse_url(raw: str, allowed: Sequence[guard.IPNetwork]) -> URL:
    """``raw`` parsed, if it has the form of an endpoint's URL: absolute https (http only to
    an address inside ``allowed``), a host that could resolve, a port from 1, and no
    credentials, fragment, whitespace or control character. Else :class:`InvalidUrlError`.

    Where the host leads is :func:`check_url`'s to check.
    """
    stray = _stray_character(raw)
    if stray is not None:
        raise InvalidUrlError(
            f"whitespace and control characters are not allowed (found {stray!r}); "
            "percent-encode them"
        )
    try:
        url = URL(raw)
    except (ValueError, TypeError):
        raise InvalidUrlError(f"not a valid URL: {raw!r}") from None
    if url.scheme not in ("https", "http") or not url.raw_host or not url.is_absolute():
        raise InvalidUrlError("must be an absolute https:// URL")
    literal = guard.parse_ip_literal(url.raw_host)
    if literal is None:
        try:
            # Before ``url.host``, which decodes each xn-- label and fails on a bad one.
            guard.check_host_name(url.raw_host)
        except guard.InvalidHostError as exc:
            raise InvalidUrlError(str(exc)) from None
    if url.user or url.password:
        raise InvalidUrlError("credentials in the URL are not allowed")
    if url.fragment:
        raise InvalidUrlError("a fragment is never sent; remove it")
    if url.explicit_port == 0:
        raise InvalidUrlError("port 0 cannot be connected to; use a port from 1 to 65535")
    if url.scheme == "http" and not (literal is not None and guard.in_networks(literal, allowed)):
        raise InvalidUrlError("must use https")
    return url


async def check_url(raw: str, allowed: Sequence[guard.IPNetwork]) -> str:
    """``raw``, if it is an https URL (:func:`parse_url`) on a publicly reachable host (http
    only inside ``allowed``, the private networks allowed); else :class:`InvalidUrlError`."""
    url = parse_url(raw, allowed)
    try:
        await guard.check_host(url.host or "", allowed)
    except guard.BlockedAddressError as exc:
        raise InvalidUrlError(f"not publicly reachable: {exc}") from None
    except guard.InvalidHostError as exc:
        raise InvalidUrlError(str(exc)) from None
    return raw
