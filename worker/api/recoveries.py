"""Handlers of recoveries: an endpoint's deliveries of a window sent again (routes: :mod:`.table`).

``POST /webhooks/{id}/recover`` only records the recovery (:mod:`worker.store.recoveries`);
workers park its deliveries batch by batch, and the parking sweeper sends them at the
endpoint's pace. Starting the same window (endpoint, since, until, status) while one runs
answers the running one, with the same 202.
"""

from __future__ import annotations

from datetime import timedelta

from aiohttp import web

from schemas import api_events as models
from worker.api.appkeys import SETTINGS, STORE
from worker.api.routes import TOKEN, ApiError, json_response, own_webhook, parse_body
from worker.store.records import Recovery, utcnow
from worker.store.recoveries import RecoveryTooLargeError


def recovery_resource(recovery: Recovery) -> models.Recovery:
    return models.Recovery(
        id=recovery.id,
        webhook_id=recovery.webhook_id,
        since=recovery.since,
        until=recovery.until,
        status=recovery.status,
        state=recovery.state,
        total=recovery.total,
        queued=recovery.queued,
        created_at=recovery.created_at,
        finished_at=recovery.finished_at,
    )


async def start_recovery(request: web.Request) -> web.Response:
    webhook = await own_webhook(request)
    body = await parse_body(request, models.RecoveryCreate)
    now = utcnow()
    days = request.app[SETTINGS].retention_days
    if body.since < now - timedelta(days=days):
        raise ApiError(
            400, "validation_error", f"since: may go back at most the retention, {days:g} days"
        )
    if body.since > now:
        raise ApiError(400, "validation_error", "since: must not be in the future")
    if body.until is not None and body.until < body.since:
        raise ApiError(400, "validation_error", "until: must not be before since")
    if not webhook.enabled:
        raise ApiError(400, "validation_error", "the webhook is disabled; enable it first")
    try:
        recovery = await request.app[STORE].recoveries.create(
            request[TOKEN].org_id, webhook.id, body.since, body.until, body.status
        )
    except RecoveryTooLargeError as exc:
        until = body.until.isoformat() if body.until else "now"
        raise ApiError(
            400,
            "validation_error",
            f"window too large: more than {exc.limit} deliveries from {body.since.isoformat()} "
            f"to {until}; recover a shorter window (since, until)",
        ) from None
    return json_response(recovery_resource(recovery), 202)


async def get_recovery(request: web.Request) -> web.Response:
    webhook = await own_webhook(request)
    recovery = await request.app[STORE].recoveries.get(
        request[TOKEN].org_id, webhook.id, request.match_info["recovery_id"]
    )
    if recovery is None:
        raise ApiError(404, "not_found", "no such recovery for this webhook")
    return json_response(recovery_resource(recovery))
