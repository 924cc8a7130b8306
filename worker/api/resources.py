"""The endpoint as the API shows it, built from the store's record and the service's settings.

An endpoint is shown with the ``timeout_seconds`` its attempts get: the service's
``DELIVERY_TIMEOUT`` when it sets none, or when that setting was lowered below its own since.
"""

from __future__ import annotations

from schemas import api as models
from worker.settings import Settings
from worker.store.records import Webhook


def _seconds(value: float) -> int | float:
    """Whole seconds as an integer (``15``, not ``15.0``), as ``timeout_seconds`` is set."""
    return int(value) if float(value).is_integer() else value


def webhook_resource(webhook: Webhook, settings: Settings) -> models.Webhook:
    limit = _seconds(settings.delivery_timeout)
    timeout = webhook.timeout_seconds
    return models.Webhook(
        id=webhook.id,
        url=webhook.url,
        events=list(webhook.events),
        enabled=webhook.enabled,
        description=webhook.description,
        headers=dict(webhook.headers),
        rate_limit=webhook.rate_limit,
        timeout_seconds=limit if timeout is None else min(timeout, limit),
        ordered=webhook.ordered,
        created_at=webhook.created_at,
        updated_at=webhook.updated_at,
        disabled_reason=webhook.disabled_reason,
    )


def with_secret(webhook: Webhook, settings: Settings) -> models.WebhookWithSecret:
    """The endpoint with its signing secret: the answer of creation and rotation only."""
    return models.WebhookWithSecret(
        **webhook_resource(webhook, settings).model_dump(), secret=webhook.secret
    )
