"""An endpoint's URL, its form alone (``worker.api.urls.parse_url``): no DNS, no service."""

from __future__ import annotations

import ipaddress

import pytest

from worker.api import urls

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("https://example.com/x\n", "whitespace"),
        (" https://example.com/x", "whitespace"),
        ("https://example.com/x\x00y", "control"),
        ("https://example.com/x\ty", "'\\t'"),
        ("https://exa mple.com/x", "whitespace"),
        ("https://example.com/\u00a0", "whitespace"),
        ("https://example.com/x\x7f", "control"),
        ("https://example.com:0/x", "port 0"),
        ("https://example.com:65536/x", "not a valid URL"),
        ("https://xn--/x", "not a valid host name"),
        ("https://xn--zz.example/x", "not a valid host name"),
        ("https://a..example/x", "empty label"),
        ("http://example.com/x", "https"),
        ("https://u:p@example.com/x", "credentials"),
    ],
)
def test_refused(raw: str, fragment: str) -> None:
    with pytest.raises(urls.InvalidUrlError) as refused:
        urls.parse_url(raw, LOOPBACK)
    assert fragment in str(refused.value)


@pytest.mark.parametrize(
    "raw",
    [
        "https://example.com/x",
        "https://example.com:8443/x?y=1&z=%20",
        "https://bücher.example/x",
        "https://xn--bcher-kva.example/x",
        "https://example.com./x",
        "https://[2606:4700::1]/x",
        "http://127.0.0.1:8000/webhooks",
    ],
)
def test_accepted(raw: str) -> None:
    assert urls.parse_url(raw, LOOPBACK)
