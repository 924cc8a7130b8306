"""Typed application state shared by the API and health servers."""

from __future__ import annotations

from aiohttp import web

from worker.delivery import Deliverer
from worker.fanout import ChangeNotifier
from worker.metrics import Metrics
from worker.settings import Settings
from worker.store import Store

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
METRICS = web.AppKey("metrics", Metrics)
DELIVERER = web.AppKey("deliverer", Deliverer)
NOTIFIER = web.AppKey("notifier", ChangeNotifier)
