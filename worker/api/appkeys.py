"""Typed application state shared by the API and health servers."""

from __future__ import annotations

from aiohttp import web

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
