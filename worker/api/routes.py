"""The management API, ``/api/v2``: its handlers and middlewares (routes: :mod:`.table`)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from schemas import api as models
from worker.api import urls
from worker.api.appkeys import ATTEMPTS, JWT_VERIFIER, METRICS, NOTIFIER, SETTINGS, STORE
from worker.api.jwt_tokens import InvalidJwtError, looks_like_jwt
from worker.api.ratelimit import RateLimiter
from worker.api.resources import webhook_resource, with_secret
from worker.store.records import Attempt, Token, Webhook

BASE = "/api/v2"
OPENAPI_PATH = f"{BASE}/openapi.json"
MAX_BODY_BYTES = 64 * 1024
REQUIRED_SCOPE = "webhooks:manage"
CHALLENGE_REALM = "sellfern-webhooks"
SECRET_ROTATION_OVERLAP = timedelta(hours=24)

TOKEN: web.RequestKey[Token] = web.RequestKey("token", Token)
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = structlog.get_logger("sellfern_webhooks.api")


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}``, a row of ``ERROR_CODES``."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        if models.ERRORS_BY_CODE[code].status != status:
            raise ValueError(f"{code} is answered with {models.ERRORS_BY_CODE[code].status}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(
    code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The error body of ``code``, with the status the error table gives it."""
    status = models.ERRORS_BY_CODE[code].status
    body = {"error": {"code": code, "message": message}}
    return web.json_response(body, status=status, headers=headers)


def _challenge(error: str | None = None) -> dict[str, str]:
    """RFC 6750's ``WWW-Authenticate`` for a refused bearer token; no error code when the
    request carried none, as the RFC asks."""
    value = f'Bearer realm="{CHALLENGE_REALM}"'
    if error == "insufficient_scope":
        value += f', error="insufficient_scope", scope="{REQUIRED_SCOPE}"'
    elif error is not None:
        value += f', error="{error}"'
    return {"WWW-Authenticate": value}


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(
        body=model.model_dump_json().encode(), status=status, content_type="application/json"
    )


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        # A bad dict key is located as (field, key, "[key]"): shown as field.key, as a value is.
        where = ".".join(str(p) for p in item["loc"] if p != "[key]") or "body"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


# --- middlewares ------------------------------------------------------------------------------


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes the documented JSON error body."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.code, exc.message, exc.headers)
    except web.HTTPRequestEntityTooLarge:
        return error_response("payload_too_large", f"request body is over {MAX_BODY_BYTES} bytes")
    except web.HTTPNotFound:
        return error_response("not_found", f"no route {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        return error_response(
            "method_not_allowed",
            f"{request.method} not allowed; use {sorted(exc.allowed_methods)}",
        )
    except web.HTTPException:
        raise
    except Exception:
        log.exception("request failed", method=request.method, path=request.path)
        return error_response("internal_error", "internal error; it has been logged")


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS]
    info = request.match_info
    route = info.route.resource.canonical if info.route.resource else "unmatched"
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        status = exc.status
        raise
    else:
        status = response.status
        return response
    finally:
        metrics.http_requests.labels(route, request.method, str(status)).inc()
        metrics.http_duration.labels(route, request.method).observe(time.perf_counter() - started)


async def _authenticate(request: web.Request, credentials: str) -> Token:
    """The token's principal: the identity provider's JWT, or a token this service issued."""
    verifier = request.app.get(JWT_VERIFIER)
    if verifier is not None and looks_like_jwt(credentials):
        try:
            return await verifier.authenticate(credentials)
        except InvalidJwtError as exc:
            raise ApiError(401, "invalid_token", str(exc), _challenge("invalid_token")) from None
    token = await request.app[STORE].tokens.authenticate(credentials)
    if token is None:
        raise ApiError(
            401, "invalid_token", "the token is unknown or revoked", _challenge("invalid_token")
        )
    return token


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer-token auth with scope ``webhooks:manage`` on every ``/api/v2`` call but the spec.

    A token is one of ours or, with ``JWT_JWKS_URL`` set, the identity provider's JWT; both
    yield a :class:`Token`, so scope and organization rules are the same. Each token is rate
    limited (429 ``rate_limited`` with ``Retry-After``) once it is known.
    """
    if not request.path.startswith(BASE) or request.path == OPENAPI_PATH:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise ApiError(401, "invalid_token", "send Authorization: Bearer <token>", _challenge())
    token = await _authenticate(request, credentials.strip())
    wait = request.app[RATE_LIMITER].acquire(token.id)
    if wait > 0:
        response = error_response(
            "rate_limited", "too many requests for this token; retry after Retry-After"
        )
        response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return response
    if REQUIRED_SCOPE not in token.scopes:
        raise ApiError(
            403,
            "missing_scope",
            f"the token lacks scope {REQUIRED_SCOPE}",
            _challenge("insufficient_scope"),
        )
    request[TOKEN] = token
    structlog.contextvars.bind_contextvars(org_id=token.org_id, token_id=token.id)
    try:
        return await handler(request)
    finally:
        structlog.contextvars.unbind_contextvars("org_id", "token_id")


# --- request helpers --------------------------------------------------------------------------


async def _body(request: web.Request, model: type[M]) -> M:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(MAX_BODY_BYTES, request.content_length)
    raw = await request.read()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "validation_error", f"body is not valid JSON: {exc}") from None
    except RecursionError:
        # Deep nesting fits in the size limit and exhausts the parser's stack first.
        raise ApiError(400, "validation_error", "body is nested too deeply to parse") from None
    if not isinstance(data, dict):
        raise ApiError(400, "validation_error", "body must be a JSON object")
    try:
        # Some bounds are the service's settings (an endpoint's timeout_seconds).
        context = {"delivery_timeout": request.app[SETTINGS].delivery_timeout}
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise ApiError(400, "validation_error", _describe(exc)) from None


def _query(request: web.Request, model: type[M]) -> M:
    try:
        return model.model_validate(dict(request.query))
    except ValidationError as exc:
        raise ApiError(400, "validation_error", _describe(exc)) from None


def check_window(since: datetime | None, until: datetime | None) -> None:
    """400 unless ``until`` is absent or not before ``since``."""
    if since is not None and until is not None and until < since:
        raise ApiError(400, "validation_error", "until: must not be before since")


# The request helpers, for the handlers of the other modules (:mod:`.events`, :mod:`.recoveries`).
def json_response(model: BaseModel, status: int = 200) -> web.Response:
    return _json(model, status)


async def parse_body(request: web.Request, model: type[M]) -> M:
    return await _body(request, model)


def parse_query(request: web.Request, model: type[M]) -> M:
    return _query(request, model)


async def own_webhook(request: web.Request) -> Webhook:
    return await _own_webhook(request)


async def validate_url(request: web.Request, raw: str) -> str:
    """An https URL on a publicly reachable host (http only inside allowed private networks)."""
    try:
        return await urls.check_url(raw, request.app[SETTINGS].allowed_private_networks)
    except urls.InvalidUrlError as exc:
        raise ApiError(400, "validation_error", f"url: {exc}") from None


async def _notify_change(request: web.Request) -> None:
    """Tell workers to drop cached matches; a lost notice only delays them by the cache TTL."""
    try:
        await request.app[NOTIFIER].endpoints_changed(request[TOKEN].org_id)
    except Exception as exc:
        log.warning("change notice not published", error=str(exc))


async def _own_webhook(request: web.Request) -> Webhook:
    webhook = await request.app[STORE].endpoints.get(
        request.match_info["webhook_id"], request[TOKEN].org_id
    )
    if webhook is None:
        raise ApiError(404, "not_found", "no such webhook in this organization")
    return webhook


def attempt_resource(attempt: Attempt) -> models.Attempt:
    error = None
    if attempt.error_kind:
        error = models.AttemptError.model_validate(
            {"kind": attempt.error_kind, "message": attempt.error_message or ""}
        )
    return models.Attempt(
        id=attempt.id,
        webhook_id=attempt.webhook_id,
        event_id=attempt.event_id,
        event_type=attempt.event_type,
        attempt=attempt.attempt,
        success=attempt.success,
        status_code=attempt.status_code,
        error=error,
        duration_ms=attempt.duration_ms,
        response_body=attempt.response_body,
        created_at=attempt.created_at,
    )


# --- handlers ---------------------------------------------------------------------------------


async def create_webhook(request: web.Request) -> web.Response:
    body = await _body(request, models.WebhookCreate)
    url = await validate_url(request, body.url)
    webhook = await request.app[STORE].endpoints.create(
        request[TOKEN].org_id, url, body.events, body.description, enabled=body.enabled,
        headers=body.headers, rate_limit=body.rate_limit, timeout_seconds=body.timeout_seconds,
        ordered=body.ordered,
    )  # fmt: skip
    await _notify_change(request)
    log.info("webhook created", webhook_id=webhook.id)
    return _json(with_secret(webhook, request.app[SETTINGS]), 201)


async def list_webhooks(request: web.Request) -> web.Response:
    query = _query(request, models.ListQuery)
    page = await request.app[STORE].endpoints.list(request[TOKEN].org_id, query.limit, query.cursor)
    return _json(
        models.WebhookList(
            data=[webhook_resource(w, request.app[SETTINGS]) for w in page.data],
            has_more=page.has_more,
            next_cursor=page.next_cursor,
        )
    )


async def get_webhook(request: web.Request) -> web.Response:
    return _json(webhook_resource(await _own_webhook(request), request.app[SETTINGS]))


async def update_webhook(request: web.Request) -> web.Response:
    body = await _body(request, models.WebhookUpdate)
    changes = body.model_dump(exclude_unset=True)
    for field in ("url", "events", "enabled", "description", "ordered"):
        if field in changes and changes[field] is None:
            raise ApiError(400, "validation_error", f"{field}: may not be null")
    if "url" in changes:
        changes["url"] = await validate_url(request, changes["url"])
    webhook = await request.app[STORE].endpoints.update(
        request[TOKEN].org_id, request.match_info["webhook_id"], changes
    )
    if webhook is None:
        raise ApiError(404, "not_found", "no such webhook in this organization")
    await _notify_change(request)
    log.info("webhook updated", webhook_id=webhook.id, fields=sorted(changes))
    return _json(webhook_resource(webhook, request.app[SETTINGS]))


async def delete_webhook(request: web.Request) -> web.Response:
    webhook_id = request.match_info["webhook_id"]
    if not await request.app[STORE].endpoints.delete(request[TOKEN].org_id, webhook_id):
        raise ApiError(404, "not_found", "no such webhook in this organization")
    await _notify_change(request)
    log.info("webhook deleted", webhook_id=webhook_id)
    return web.Response(status=204)


async def rotate_secret(request: web.Request) -> web.Response:
    webhook = await request.app[STORE].endpoints.rotate_secret(
        request[TOKEN].org_id, request.match_info["webhook_id"], SECRET_ROTATION_OVERLAP
    )
    if webhook is None:
        raise ApiError(404, "not_found", "no such webhook in this organization")
    log.info("webhook secret rotated", webhook_id=webhook.id)
    return _json(with_secret(webhook, request.app[SETTINGS]))


async def list_deliveries(request: web.Request) -> web.Response:
    webhook = await _own_webhook(request)
    query = _query(request, models.AttemptListQuery)
    success = None if query.status is None else query.status == "succeeded"
    check_window(query.since, query.until)
    page = await request.app[STORE].attempts.list(
        webhook.id, query.limit, query.cursor, success, event_id=query.event_id,
        event_type=query.event_type, since=query.since, until=query.until,
    )  # fmt: skip
    return _json(
        models.AttemptList(
            data=[attempt_resource(a) for a in page.data],
            has_more=page.has_more,
            next_cursor=page.next_cursor,
        )
    )


async def test_webhook(request: web.Request) -> web.Response:
    webhook = await _own_webhook(request)
    attempt = await request.app[ATTEMPTS].send_test(webhook)
    return _json(attempt_resource(attempt))


async def retry_delivery(request: web.Request) -> web.Response:
    webhook = await _own_webhook(request)
    store = request.app[STORE]
    previous = await store.attempts.get(webhook.id, request.match_info["attempt_id"])
    if previous is None:
        raise ApiError(404, "not_found", "no such delivery attempt for this webhook")
    event = await store.events.get(previous.event_id)
    if event is None:
        raise ApiError(404, "not_found", "the event is no longer retained")
    attempt = await request.app[ATTEMPTS].redeliver(webhook, event)
    return _json(attempt_resource(attempt))


def api_middlewares() -> list[Any]:
    # Order: metrics sees the final status of everything; errors turn exceptions into JSON
    # bodies before metrics records them; auth runs innermost, next to the handlers.
    return [metrics_middleware, errors_middleware, auth_middleware]
