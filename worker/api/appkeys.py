"""Typed application state shared by the API and health servers."""

from __future__ import annotations

from aiohttp import web

from worker.ops.metrics import Metrics
from worker.pipeline.delivery import Deliverer
from worker.pipeline.fanout import ChangeNotifier
from worker.settings import Settings
from worker.store.store import Store

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
METRICS = web.AppKey("metrics", Metrics)
DELIVERER = web.AppKey("deliverer", Deliverer)
NOTIFIER = web.AppKey("notifier", ChangeNotifier)
