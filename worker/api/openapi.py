"""The OpenAPI 3.1 document, generated from the pydantic models that validate requests."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from schemas import api as models
from worker import __version__

_REF = "#/components/schemas/{model}"
_MODELS: tuple[type[BaseModel], ...] = (
    models.WebhookCreate,
    models.WebhookUpdate,
    models.Webhook,
    models.WebhookWithSecret,
    models.WebhookList,
    models.Attempt,
    models.AttemptList,
    models.ErrorResponse,
)
_ERRORS = {
    "400": "validation_error: the request is malformed or names something unknown.",
    "401": "invalid_token: no token, or an unknown or revoked one.",
    "403": "missing_scope: the token lacks webhooks:manage.",
    "405": "method_not_allowed",
    "413": "payload_too_large: the body is over 64 KiB.",
    "429": "rate_limited: too many requests for this token; see Retry-After.",
    "500": "internal_error",
}


# Request examples: documentation for readers, and the first cases a fuzzer tries.
_BODY_EXAMPLES: dict[str, dict[str, Any]] = {
    "WebhookCreate": {
        "url": "https://example.com/webhooks",
        "events": ["order.created", "order.status_changed"],
        "description": "ERP",
    },
    "WebhookUpdate": {"events": ["order.created"], "enabled": False},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _content(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


def _operation(
    summary: str,
    status: str,
    response: str | None,
    *,
    body: str | None = None,
    params: list[dict[str, Any]] | None = None,
    not_found: bool = True,
) -> dict[str, Any]:
    responses: dict[str, Any] = {
        status: {"description": summary, **({"content": _content(response)} if response else {})}
    }
    for code, text in _ERRORS.items():
        if code == "413" and body is None:
            continue
        responses[code] = {"description": text, "content": _content("Error")}
        if code == "429":
            responses[code]["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before the next request with this token.",
                    "required": True,
                    "schema": {"type": "integer", "minimum": 1},
                }
            }
    if not_found:
        responses["404"] = {"description": "not_found", "content": _content("Error")}
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if body:
        content = _content(body)
        if body in _BODY_EXAMPLES:
            content["application/json"]["example"] = _BODY_EXAMPLES[body]
        operation["requestBody"] = {"required": True, "content": content}
    if params:
        operation["parameters"] = params
    return operation


def _param(name: str, where: str, schema: dict[str, Any], *, required: bool) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "schema": schema}


_WEBHOOK_ID = _param("webhook_id", "path", {"type": "string", "maxLength": 40}, required=True)
_PAGING = [
    _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 100}, required=False),
    _param("cursor", "query", {"type": "string", "maxLength": 100}, required=False),
]


@functools.cache
def openapi_document() -> dict[str, Any]:
    _, schemas = models_json_schema(
        [
            (
                m,
                "serialization"
                if "Create" not in m.__name__ and "Update" not in m.__name__
                else "validation",
            )
            for m in _MODELS
        ],
        ref_template=_REF,
    )
    status_param = _param(
        "status", "query", {"type": "string", "enum": ["succeeded", "failed"]}, required=False
    )
    attempt_id = _param("attempt_id", "path", {"type": "string", "maxLength": 40}, required=True)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Sellfern Webhooks management API",
            "version": __version__,
            "description": "Register HTTPS endpoints for Sellfern events and inspect deliveries.",
        },
        "servers": [{"url": "/api/v2"}],
        "security": [{"bearer": []}],
        "components": {
            "schemas": schemas["$defs"],
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/webhooks": {
                "post": _operation(
                    "Register an endpoint",
                    "201",
                    "WebhookWithSecret",
                    body="WebhookCreate",
                    not_found=False,
                ),
                "get": _operation(
                    "List endpoints, newest first",
                    "200",
                    "WebhookList",
                    params=_PAGING,
                    not_found=False,
                ),
            },
            "/webhooks/{webhook_id}": {
                "parameters": [_WEBHOOK_ID],
                "get": _operation("Get an endpoint", "200", "Webhook"),
                "patch": _operation("Update an endpoint", "200", "Webhook", body="WebhookUpdate"),
                "delete": _operation("Delete an endpoint; deliveries stop at once", "204", None),
            },
            "/webhooks/{webhook_id}/test": {
                "parameters": [_WEBHOOK_ID],
                "post": _operation("Send a signed webhook.test event now", "200", "Attempt"),
            },
            "/webhooks/{webhook_id}/rotate-secret": {
                "parameters": [_WEBHOOK_ID],
                "post": _operation(
                    "Issue a new secret; the old one signs for 24 more hours",
                    "200",
                    "WebhookWithSecret",
                ),
            },
            "/webhooks/{webhook_id}/deliveries": {
                "parameters": [_WEBHOOK_ID],
                "get": _operation(
                    "Delivery attempts, newest first",
                    "200",
                    "AttemptList",
                    params=[*_PAGING, status_param],
                ),
            },
            "/webhooks/{webhook_id}/deliveries/{attempt_id}/retry": {
                "parameters": [_WEBHOOK_ID, attempt_id],
                "post": _operation("Redeliver that attempt's event now", "200", "Attempt"),
            },
        },
    }
