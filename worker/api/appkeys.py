"""Typed application state shared by the API and health servers."""

from __future__ import annotations

from aiohttp import web

from worker.api.jwt_tokens import JwtVerifier
from worker.ops.metrics import Metrics
from worker.pipeline.manual import ManualAttempts
from worker.pipeline.matcher import ChangeNotifier
from worker.settings import Settings
from worker.store import Store

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
METRICS = web.AppKey("metrics", Metrics)
ATTEMPTS = web.AppKey("attempts", ManualAttempts)
NOTIFIER = web.AppKey("notifier", ChangeNotifier)
# Set only when JWT_JWKS_URL is: without it, a JWT is one more unknown token.
JWT_VERIFIER = web.AppKey("jwt_verifier", JwtVerifier)
