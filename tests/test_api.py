"""The management API over real HTTP, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import base64

import pytest

from schemas.api import ERRORS_BY_CODE
from schemas.events import EVENT_TYPES
from tests.conftest import Receiver, Service
from worker.api.routes import BASE, OPENAPI_PATH

pytestmark = pytest.mark.timeout(60)


async def _create(service: Service, receiver: Receiver, **fields: object) -> dict[str, object]:
    body = {"url": receiver.url("/hook"), "events": ["order.created"], **fields}
    status, created = await service.call("POST", "/webhooks", body)
    assert status == 201, created
    return created  # type: ignore[no-any-return]


async def test_create_returns_endpoint_with_secret_once(
    service: Service, receiver: Receiver
) -> None:
    created = await _create(
        service, receiver, events=["order.created", "ticket.updated", "order.created"],
        description="orders to ERP",
    )  # fmt: skip
    assert str(created["id"]).startswith("wh_")
    assert created["events"] == ["order.created", "ticket.updated"]  # duplicates removed
    assert created["enabled"] is True
    assert created["description"] == "orders to ERP"
    assert created["disabled_reason"] is None
    secret = str(created["secret"])
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) >= 24

    status, fetched = await service.call("GET", f"/webhooks/{created['id']}")
    assert status == 200
    assert "secret" not in fetched
    assert fetched == {k: v for k, v in created.items() if k != "secret"}


async def test_list_paginates_newest_first_and_stays_stable(
    service: Service, receiver: Receiver
) -> None:
    ids = [str((await _create(service, receiver))["id"]) for _ in range(5)]
    status, page1 = await service.call("GET", "/webhooks?limit=2")
    assert status == 200
    assert [w["id"] for w in page1["data"]] == ids[::-1][:2]
    assert page1["has_more"] is True
    # An insert between pages must not shift or repeat what the cursor has not reached.
    await _create(service, receiver)
    seen = [w["id"] for w in page1["data"]]
    cursor = page1["next_cursor"]
    while cursor:
        status, page = await service.call("GET", f"/webhooks?limit=2&cursor={cursor}")
        assert status == 200
        seen += [w["id"] for w in page["data"]]
        cursor = page["next_cursor"]
        assert page["has_more"] is bool(cursor)
    assert seen == ids[::-1]


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=abc", "bogus=1"])
async def test_list_rejects_bad_query(service: Service, query: str) -> None:
    status, body = await service.call("GET", f"/webhooks?{query}")
    assert status == 400
    assert body["error"]["code"] == "validation_error"


async def test_patch_replaces_events_and_pauses(service: Service, receiver: Receiver) -> None:
    created = await _create(service, receiver, events=["order.created", "order.updated"])
    status, updated = await service.call(
        "PATCH", f"/webhooks/{created['id']}", {"events": ["ticket.created"], "enabled": False}
    )
    assert status == 200, updated
    assert updated["events"] == ["ticket.created"]
    assert updated["enabled"] is False
    assert updated["updated_at"] >= created["updated_at"]
    assert updated["url"] == created["url"]
    assert await service.store.endpoints.subscribed_ids(service.org, "order.created") == []
    assert await service.store.endpoints.subscribed_ids(service.org, "ticket.created") == []
    status, resumed = await service.call("PATCH", f"/webhooks/{created['id']}", {"enabled": True})
    assert status == 200
    assert resumed["enabled"] is True
    assert await service.store.endpoints.subscribed_ids(service.org, "ticket.created") == [
        created["id"]
    ]


async def test_delete_then_gone(service: Service, receiver: Receiver) -> None:
    created = await _create(service, receiver)
    status, _ = await service.call("DELETE", f"/webhooks/{created['id']}")
    assert status == 204
    for method in ("GET", "DELETE"):
        status, body = await service.call(method, f"/webhooks/{created['id']}")
        assert status == 404
        assert body["error"]["code"] == "not_found"


async def test_deliveries_of_new_endpoint_is_empty_page(
    service: Service, receiver: Receiver
) -> None:
    created = await _create(service, receiver)
    status, body = await service.call("GET", f"/webhooks/{created['id']}/deliveries")
    assert status == 200
    assert body == {"data": [], "has_more": False, "next_cursor": None}
    status, body = await service.call("GET", f"/webhooks/{created['id']}/deliveries?status=maybe")
    assert status == 400


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"url": "http://example.com/h", "events": ["order.created"]}, "https"),
        ({"url": "ftp://example.com/h", "events": ["order.created"]}, "https"),
        ({"url": "not a url", "events": ["order.created"]}, "url"),
        ({"url": "https://10.1.2.3/h", "events": ["order.created"]}, "not publicly reachable"),
        ({"url": "https://169.254.169.254/latest", "events": ["order.created"]}, "not publicly"),
        ({"url": "https://[::1]/h", "events": ["order.created"]}, "not publicly reachable"),
        ({"url": "https://[::ffff:10.0.0.1]/h", "events": ["order.created"]}, "not publicly"),
        ({"url": "https://example.com/" + "a" * 2048, "events": ["order.created"]}, "url"),
        ({"url": "https://example.com/h", "events": ["order.deleted"]}, "events"),
        ({"url": "https://example.com/h", "events": []}, "events"),
        ({"url": "https://example.com/h", "events": "order.created"}, "events"),
        ({"url": "https://example.com/h"}, "events"),
        ({"url": "https://example.com/h", "events": ["order.created"], "colour": "red"}, "colour"),
        ({"url": "https://u:p@example.com/h", "events": ["order.created"]}, "credentials"),
        # Host names that no resolver could even encode, and an xn-- label that is no punycode.
        ({"url": "https://a..com/x", "events": ["order.created"]}, "url: 'a..com' is not a"),
        ({"url": "https://.com/x", "events": ["order.created"]}, "url: '.com' is not a valid"),
        ({"url": f"https://{'a' * 70}.com/x", "events": ["order.created"]}, "url: 'aaa"),
        ({"url": "https://xn--/x", "events": ["order.created"]}, "url: 'xn--' is not a valid"),
        # Whitespace and control characters, which would be stored but not sent as given.
        ({"url": "https://example.com/x\n", "events": ["order.created"]}, "url: whitespace"),
        ({"url": " https://example.com/x", "events": ["order.created"]}, "url: whitespace"),
        ({"url": "https://example.com/x\u0000y", "events": ["order.created"]}, "url: white"),
        ({"url": "https://example.com/x\ty", "events": ["order.created"]}, "url: whitespace"),
        ({"url": "https://exa mple.com/x", "events": ["order.created"]}, "url: whitespace"),
        ({"url": "https://example.com:0/x", "events": ["order.created"]}, "url: port 0"),
    ],
)
async def test_create_rejects_invalid_input(
    service_factory: object, body: dict[str, object], fragment: str
) -> None:
    # Here only 127.0.0.1 itself is exempt, so the other private ranges are refused.
    service = await service_factory(allowed_private_networks="127.0.0.1/32")  # type: ignore[operator]
    status, answer = await service.call("POST", "/webhooks", body)
    assert status == 400, answer
    assert answer["error"]["code"] == "validation_error"
    assert fragment in answer["error"]["message"]


async def test_create_rejects_bad_json(service: Service) -> None:
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        status, body = await service.call("POST", "/webhooks", data=raw)
        assert status == 400
        assert body["error"]["code"] == "validation_error"


async def test_deep_nesting_within_the_size_limit_is_a_400(service: Service) -> None:
    headers = '{"a": ' * 5_000 + "1" + "}" * 5_000
    for raw in (
        b"[" * 30_000 + b"]" * 30_000,
        b'{"url": "https://example.com/h", "events": ["order.created"], "headers": '
        + headers.encode()
        + b"}",
    ):
        status, body = await service.call("POST", "/webhooks", data=raw)
        assert status == 400, body
        assert body["error"] == {
            "code": "validation_error",
            "message": "body is nested too deeply to parse",
        }


async def test_patch_rejects_null_and_unknown(service: Service, receiver: Receiver) -> None:
    created = await _create(service, receiver)
    changes: list[dict[str, object]] = [
        {"events": None},
        {"enabled": None},
        {"secret": "x"},
        {"events": []},
        {"url": "https://a..com/x"},
        {"url": "https://xn--/x"},
        {"url": "https://example.com/x\n"},
    ]
    for change in changes:
        status, body = await service.call("PATCH", f"/webhooks/{created['id']}", change)
        assert status == 400, change
        assert body["error"]["code"] == "validation_error"


async def test_enabled_is_a_json_boolean_only(service: Service, receiver: Receiver) -> None:
    created = await _create(service, receiver)
    for value in ("yes", "no", "true", 1, 0):
        body = {"url": receiver.url("/hook"), "events": ["order.created"], "enabled": value}
        for method, path in (("POST", "/webhooks"), ("PATCH", f"/webhooks/{created['id']}")):
            status, answer = await service.call(method, path, body)
            assert status == 400, (method, value, answer)
            assert answer["error"]["code"] == "validation_error"
            assert answer["error"]["message"].startswith("enabled: Input should be a valid bool")
    status, listing = await service.call("GET", "/webhooks")
    assert [(w["id"], w["enabled"]) for w in listing["data"]] == [(created["id"], True)]


async def test_oversized_body_is_413(service: Service) -> None:
    status, body = await service.call(
        "POST", "/webhooks", {"url": "https://example.com", "events": ["order.created"],
                              "description": "x" * 70_000},
    )  # fmt: skip
    assert status == 413
    assert body["error"]["code"] == "payload_too_large"


async def test_auth_errors(service: Service) -> None:
    async with service.http.get(f"{service.base}/api/v2/webhooks") as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "invalid_token"
    status, body = await service.call("GET", "/webhooks", token="sfw_unknown")
    assert (status, body["error"]["code"]) == (401, "invalid_token")

    no_scope = await service.token_for(service.org, scopes=("webhooks:read",))
    status, body = await service.call("GET", "/webhooks", token=no_scope)
    assert (status, body["error"]["code"]) == (403, "missing_scope")

    revocable, plaintext = await service.store.tokens.create(service.org, ["webhooks:manage"], "x")
    status, _ = await service.call("GET", "/webhooks", token=plaintext)
    assert status == 200
    assert await service.store.tokens.revoke(revocable.id)
    status, body = await service.call("GET", "/webhooks", token=plaintext)
    assert (status, body["error"]["code"]) == (401, "invalid_token")


async def test_refusals_carry_the_bearer_challenge(service: Service) -> None:
    """RFC 6750: a 401 or 403 names the scheme, and for a token that was sent, what was wrong
    with it, so that a client library knows to fetch a new token or ask for the scope."""
    realm = 'Bearer realm="sellfern-webhooks"'
    no_scope = await service.token_for(service.org, scopes=("webhooks:read",))
    for token, status, challenge in (
        (None, 401, realm),
        ("sfw_unknown", 401, f'{realm}, error="invalid_token"'),
        (no_scope, 403, f'{realm}, error="insufficient_scope", scope="webhooks:manage"'),
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        url = f"{service.base}/api/v2/webhooks"
        async with service.http.get(url, headers=headers) as response:
            assert response.status == status
            assert response.headers["WWW-Authenticate"] == challenge
    async with service.http.get(
        f"{service.base}/api/v2/webhooks", headers={"Authorization": f"Bearer {service.token}"}
    ) as response:
        assert response.status == 200
        assert "WWW-Authenticate" not in response.headers


async def test_other_organization_sees_nothing(service: Service, receiver: Receiver) -> None:
    created = await _create(service, receiver)
    other = await service.token_for("org_other_" + str(created["id"])[-6:])
    webhook = f"/webhooks/{created['id']}"
    for method, path, body in (
        ("GET", webhook, None),
        ("PATCH", webhook, {"enabled": False}),
        ("DELETE", webhook, None),
        ("GET", f"{webhook}/deliveries", None),
        ("POST", f"{webhook}/test", None),
        ("POST", f"{webhook}/rotate-secret", None),
    ):
        status, answer = await service.call(method, path, body, token=other)
        assert (status, answer["error"]["code"]) == (404, "not_found"), (method, path)
    status, listing = await service.call("GET", "/webhooks", token=other)
    assert listing["data"] == []
    status, mine = await service.call("GET", webhook)
    assert mine["enabled"] is True  # untouched by the other organization's PATCH


async def test_unknown_route_and_method(service: Service) -> None:
    status, body = await service.call("GET", "/nothing-here")
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body = await service.call("PUT", "/webhooks")
    assert status == 405


async def test_openapi_document_lists_routes_and_models(service: Service) -> None:
    async with service.http.get(f"{service.base}/api/v2/openapi.json") as response:
        assert response.status == 200
        document = await response.json()
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) >= {"/webhooks", "/webhooks/{webhook_id}",
                                      "/webhooks/{webhook_id}/deliveries"}  # fmt: skip
    create = document["components"]["schemas"]["WebhookCreate"]
    assert create["additionalProperties"] is False
    assert set(create["properties"]["events"]["items"]["enum"]) == set(EVENT_TYPES)
    code = document["components"]["schemas"]["ErrorBody"]["properties"]["code"]
    assert set(code["enum"]) == set(ERRORS_BY_CODE)
    # Every reference resolves to a component of the document.
    refs = _refs(document)
    assert refs
    assert {ref.removeprefix("#/components/schemas/") for ref in refs} <= set(
        document["components"]["schemas"]
    )


def _refs(node: object) -> set[str]:
    if isinstance(node, dict):
        own = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return own.union(*(_refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(value) for value in node))
    return set()


async def test_every_served_route_is_documented_and_back(service: Service) -> None:
    """What the running app's router serves below /api/v2 is what its document lists."""
    app = service.running.api_app
    assert app is not None
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.resource.canonical.startswith(f"{BASE}/")
    }
    assert ("GET", OPENAPI_PATH) in served
    served.discard(("GET", OPENAPI_PATH))
    served.discard(("HEAD", OPENAPI_PATH))
    # aiohttp answers HEAD wherever there is a GET, as HTTP asks; the document lists the GET.
    served -= {("HEAD", path) for method, path in served if method == "GET"}
    async with service.http.get(f"{service.base}{OPENAPI_PATH}") as response:
        document = await response.json()
    assert [server["url"] for server in document["servers"]] == [BASE]
    documented = {
        (method.upper(), f"{BASE}{path}")
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert served == documented
    assert ("POST", f"{BASE}/webhooks/{{webhook_id}}/deliveries/{{attempt_id}}/retry") in served


async def test_health_endpoints(service: Service) -> None:
    for path in ("/healthz", "/readyz"):
        async with service.http.get(f"{service.base}{path}") as response:
            assert response.status == 200, await response.text()
    async with service.http.get(f"{service.base}/metrics") as response:
        text = await response.text()
    assert "sellfern_webhooks_http_requests_total" in text


async def test_concurrent_creates_all_listed(service: Service, receiver: Receiver) -> None:
    created = await asyncio.gather(*(_create(service, receiver) for _ in range(12)))
    status, listing = await service.call("GET", "/webhooks?limit=100")
    assert status == 200
    assert {w["id"] for w in listing["data"]} == {c["id"] for c in created}
