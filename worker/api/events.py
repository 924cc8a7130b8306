"""Handlers of the event calls and of an endpoint's health (routes: :mod:`.table`)."""

from __future__ import annotations

from datetime import timedelta

from aiohttp import web

from schemas import api_events as models
from worker.api.appkeys import STORE
from worker.api.routes import (
    TOKEN,
    ApiError,
    check_window,
    json_response,
    own_webhook,
    parse_query,
)
from worker.store.records import EndpointStats, StoredEvent, utcnow

STATS_WINDOW = timedelta(hours=24)
# An endpoint whose 95th percentile reaches this is slow, as the scheduler sees it.
SLOW_P95_MS = 250.0

_EVENT_TYPES = models.EventTypeList(
    data=[
        models.EventTypeInfo(
            name=name,
            description=models.EVENT_DESCRIPTIONS[name],
            body_schema=models.delivered_body_schema(name),
        )
        for name in models.LISTED_EVENT_TYPES
    ]
)


def _event(event: StoredEvent) -> models.Event:
    return models.Event(
        id=event.id,
        type=event.type,
        occurred_at=event.occurred_at,
        received_at=event.received_at,
        data=event.data,
    )


async def list_event_types(_request: web.Request) -> web.Response:
    return json_response(_EVENT_TYPES)


async def list_events(request: web.Request) -> web.Response:
    query = parse_query(request, models.EventListQuery)
    check_window(query.since, query.until)
    page = await request.app[STORE].events.list_for_org(
        request[TOKEN].org_id,
        query.limit,
        query.cursor,
        event_type=query.type,
        since=query.since,
        until=query.until,
    )
    return json_response(
        models.EventList(
            data=[_event(e) for e in page.data],
            has_more=page.has_more,
            next_cursor=page.next_cursor,
        )
    )


async def get_event(request: web.Request) -> web.Response:
    org_id = request[TOKEN].org_id
    event_id = request.match_info["event_id"]
    store = request.app[STORE]
    event = await store.events.get_for_org(org_id, event_id)
    if event is None:
        raise ApiError(404, "not_found", "no such event in this organization")
    deliveries = await store.events.deliveries_of(org_id, event_id)
    return json_response(
        models.EventWithDeliveries(
            **_event(event).model_dump(),
            deliveries=[
                models.EventDelivery(
                    webhook_id=d.webhook_id,
                    state=d.state,
                    attempts=d.attempts,
                    last_attempt_at=d.last_attempt_at,
                    last_status_code=d.last_status_code,
                    next_attempt_at=d.next_attempt_at,
                )
                for d in deliveries
            ],
        )
    )


def health_state(stats: EndpointStats, *, enabled: bool, failing: bool) -> models.HealthState:
    """disabled, else failing (a failure run is open), else slow (p95 at least 250 ms, or a
    parked backlog), else healthy."""
    if not enabled:
        return "disabled"
    if failing:
        return "failing"
    if (stats.p95_ms is not None and stats.p95_ms >= SLOW_P95_MS) or stats.parked > 0:
        return "slow"
    return "healthy"


async def webhook_stats(request: web.Request) -> web.Response:
    webhook = await own_webhook(request)
    query = parse_query(request, models.StatsQuery)
    until = utcnow()
    since = query.since if query.since is not None else until - STATS_WINDOW
    if since > until:
        raise ApiError(400, "validation_error", "since: must not be in the future")
    stats = await request.app[STORE].stats.endpoint(webhook.id, since, until)
    total = stats.succeeded + stats.failed
    return json_response(
        models.Stats(
            webhook_id=webhook.id,
            since=since,
            until=until,
            attempts=models.AttemptCounts(succeeded=stats.succeeded, failed=stats.failed),
            success_ratio=stats.succeeded / total if total else None,
            duration_ms=models.Durations(p50=stats.p50_ms, p95=stats.p95_ms),
            last_success_at=stats.last_success_at,
            last_failure_at=stats.last_failure_at,
            failing_since=webhook.failing_since,
            backlog=models.Backlog(pending=stats.pending, parked=stats.parked),
            state=health_state(
                stats, enabled=webhook.enabled, failing=webhook.failing_since is not None
            ),
        )
    )
