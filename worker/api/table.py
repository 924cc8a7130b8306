"""The route table of ``/api/v2``: the router is filled from it and the OpenAPI document
generated from it, so what is served and what is documented cannot drift apart.

To add a call, add its handler to :mod:`worker.api.routes` and one :class:`Route` here.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from pydantic import BaseModel

from schemas import api as models
from schemas import api_events as event_models
from worker.api import events, recoveries
from worker.api import routes as api
from worker.api.openapi import openapi_document


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # below ``/api/v2``
    handler: api.Handler
    summary: str
    request_model: type[BaseModel] | None = None  # the JSON body
    response_model: type[BaseModel] | None = None  # None: no body (204)
    query_model: type[BaseModel] | None = None
    success_status: int = 200
    # Codes this call may answer besides those of every call (``ErrorCode.every_call``).
    errors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [code for code in self.errors if code not in models.ERRORS_BY_CODE]
        if unknown:
            raise ValueError(f"{self.method} {self.path}: unknown error codes {unknown}")

    @property
    def error_codes(self) -> tuple[str, ...]:
        """Its own codes; a call that reads a body may also find it too large."""
        body = ("payload_too_large",) if self.request_model is not None else ()
        return (*self.errors, *body)


_ENDPOINT = "/webhooks/{webhook_id}"
_OWN = ("not_found",)  # calls on one endpoint of the organization

ROUTES: tuple[Route, ...] = (
    Route("POST", "/webhooks", api.create_webhook, "Register an endpoint",
          request_model=models.WebhookCreate, response_model=models.WebhookWithSecret,
          success_status=201),
    Route("GET", "/webhooks", api.list_webhooks, "List endpoints, newest first",
          response_model=models.WebhookList, query_model=models.ListQuery),
    Route("GET", _ENDPOINT, api.get_webhook, "Get an endpoint",
          response_model=models.Webhook, errors=_OWN),
    Route("PATCH", _ENDPOINT, api.update_webhook, "Update an endpoint",
          request_model=models.WebhookUpdate, response_model=models.Webhook, errors=_OWN),
    Route("DELETE", _ENDPOINT, api.delete_webhook, "Delete an endpoint; deliveries stop at once",
          success_status=204, errors=_OWN),
    Route("POST", f"{_ENDPOINT}/test", api.test_webhook, "Send a signed webhook.test event now",
          response_model=models.Attempt, errors=_OWN),
    Route("POST", f"{_ENDPOINT}/rotate-secret", api.rotate_secret,
          "Issue a new secret; the old one signs for 24 more hours",
          response_model=models.WebhookWithSecret, errors=_OWN),
    Route("GET", f"{_ENDPOINT}/deliveries", api.list_deliveries, "Delivery attempts, newest first",
          response_model=models.AttemptList, query_model=models.AttemptListQuery, errors=_OWN),
    Route("POST", f"{_ENDPOINT}/deliveries/{{attempt_id}}/retry", api.retry_delivery,
          "Redeliver that attempt's event now", response_model=models.Attempt, errors=_OWN),
    Route("GET", f"{_ENDPOINT}/stats", events.webhook_stats, "The endpoint's health",
          response_model=event_models.Stats, query_model=event_models.StatsQuery, errors=_OWN),
    Route("POST", f"{_ENDPOINT}/recover", recoveries.start_recovery,
          "Send the endpoint's deliveries of a window again, at its pace",
          request_model=event_models.RecoveryCreate, response_model=event_models.Recovery,
          success_status=202, errors=_OWN),
    Route("GET", f"{_ENDPOINT}/recoveries/{{recovery_id}}", recoveries.get_recovery,
          "A recovery and its progress", response_model=event_models.Recovery, errors=_OWN),
    Route("GET", "/events", events.list_events, "The organization's events, newest first",
          response_model=event_models.EventList, query_model=event_models.EventListQuery),
    Route("GET", "/events/{event_id}", events.get_event,
          "An event with its delivery to each endpoint",
          response_model=event_models.EventWithDeliveries, errors=_OWN),
    Route("GET", "/event-types", events.list_event_types,
          "Every subscribable event type and webhook.test, with the body's JSON Schema",
          response_model=event_models.EventTypeList),
)  # fmt: skip


async def serve_openapi(_request: web.Request) -> web.Response:
    return web.json_response(openapi_document(ROUTES, api.BASE))


def add_routes(app: web.Application) -> None:
    """Every route of the table below ``/api/v2``, and the document at ``OPENAPI_PATH``."""
    for route in ROUTES:
        path = f"{api.BASE}{route.path}"
        if route.method == "GET":
            app.router.add_get(path, route.handler)  # HEAD too, as HTTP asks of a GET
        else:
            app.router.add_route(route.method, path, route.handler)
    app.router.add_get(api.OPENAPI_PATH, serve_openapi)
