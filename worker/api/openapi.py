"""The OpenAPI 3.1 document, generated from the route table and the pydantic models.

Nothing here names a path or a model of its own: the document is a rendering of
:data:`worker.api.table.ROUTES` and of :data:`schemas.api.ERROR_CODES`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from schemas import api as models
from schemas import api_events as event_models
from worker import __version__

if TYPE_CHECKING:
    from worker.api.table import Route

_REF = "#/components/schemas/{model}"
_PATH_PARAMETER = re.compile(r"{(\w+)}")
# Path parameters are resource ids, looked up as given; an unknown one is a 404.
_ID_SCHEMA: dict[str, Any] = {"type": "string", "maxLength": 40}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before the next request with this token.",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    }
}
# Request examples: documentation for readers, and the first cases a fuzzer tries.
_BODY_EXAMPLES: dict[type[BaseModel], dict[str, Any]] = {
    models.WebhookCreate: {
        "url": "https://example.com/webhooks",
        "events": ["order.created", "order.status_changed"],
        "description": "ERP",
        "headers": {"X-Api-Key": "k_live_1234"},
        "timeout_seconds": 5,
    },
    models.WebhookUpdate: {"events": ["order.created"], "enabled": False},
}
_Refs = dict[type[BaseModel], dict[str, Any]]
_BEARER_DESCRIPTION = (
    "A token from `sellfern-webhooks token create`, or, where the service is configured with "
    "the platform's identity provider (`JWT_JWKS_URL`), one of its access tokens: a JWT signed "
    "with RS256 or ES256, naming the organization in its organization claim (default `org_id`) "
    "and the scopes in `scope` or `scp`. Every call needs scope `webhooks:manage`."
)


def _content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _components(routes: Sequence[Route]) -> tuple[_Refs, dict[str, Any]]:
    """The ``$ref`` of each model, and the component schemas they point to."""
    wanted: dict[type[BaseModel], JsonSchemaMode] = {}
    for route in routes:
        if route.request_model is not None:
            wanted[route.request_model] = "validation"
    for route in routes:
        if route.response_model is not None:
            wanted.setdefault(route.response_model, "serialization")
    wanted.setdefault(models.ErrorResponse, "serialization")
    refs, schemas = models_json_schema(list(wanted.items()), ref_template=_REF)
    return {model: refs[(model, mode)] for model, mode in wanted.items()}, schemas["$defs"]


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema()
    required = set(schema.get("required", ()))
    parameters = []
    for name, field in schema["properties"].items():
        # A query parameter is absent rather than null; its default is the model's business.
        variants = [v for v in field.get("anyOf", [field]) if v.get("type") != "null"]
        (value,) = variants
        value = {k: v for k, v in value.items() if k not in ("title", "default")}
        parameters.append(
            {"name": name, "in": "query", "required": name in required, "schema": value}
        )
    return parameters


def _responses(route: Route, refs: _Refs) -> dict[str, Any]:
    success: dict[str, Any] = {"description": route.summary}
    if route.response_model is not None:
        success["content"] = _content(refs[route.response_model])
    responses: dict[str, Any] = {str(route.success_status): success}
    for error in models.ERROR_CODES:
        if error.every_call or error.code in route.error_codes:
            responses[str(error.status)] = {
                "description": f"{error.code}: {error.when}",
                "content": _content(refs[models.ErrorResponse]),
                **({"headers": _RETRY_AFTER} if error.code == "rate_limited" else {}),
            }
    return responses


def _recovery_example() -> dict[str, Any]:
    """A window that is valid when the document is built: the last hour."""
    since = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    return {"since": since.isoformat().replace("+00:00", "Z"), "status": "failed"}


def _body_example(model: type[BaseModel]) -> dict[str, Any] | None:
    if model is event_models.RecoveryCreate:
        return _recovery_example()
    return _BODY_EXAMPLES.get(model)


def _operation(route: Route, refs: _Refs) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": route.summary, "responses": _responses(route, refs)}
    if route.request_model is not None:
        content = _content(refs[route.request_model])
        example = _body_example(route.request_model)
        if example is not None:
            content["application/json"]["example"] = example
        operation["requestBody"] = {"required": True, "content": content}
    if route.query_model is not None:
        operation["parameters"] = _query_parameters(route.query_model)
    return operation


@functools.cache
def openapi_document(routes: tuple[Route, ...], base: str) -> dict[str, Any]:
    """The document of ``routes``, served below ``base``."""
    refs, schemas = _components(routes)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        item = paths.setdefault(route.path, {})
        names = _PATH_PARAMETER.findall(route.path)
        if names:
            item["parameters"] = [
                {"name": name, "in": "path", "required": True, "schema": dict(_ID_SCHEMA)}
                for name in names
            ]
        item[route.method.lower()] = _operation(route, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Sellfern Webhooks management API",
            "version": __version__,
            "description": "Register HTTPS endpoints for Sellfern events and inspect deliveries.",
        },
        "servers": [{"url": base}],
        "security": [{"bearer": []}],
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": _BEARER_DESCRIPTION,
                }
            },
        },
        "paths": paths,
    }
