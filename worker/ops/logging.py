"""structlog configuration: JSON lines for machines, console rendering for a terminal.

Configured once at the entry point. Context such as ``event_id``, ``webhook_id`` and
``attempt`` is bound through contextvars, so every line of one delivery carries it.

Libraries log through the standard library; one handler on the root logger renders their
records with the same processors and renderer, plus the name of the logger (``logger``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import TextIO

import structlog
from opentelemetry import trace

# Libraries whose standard-library loggers follow LOG_LEVEL (their children with them).
LIBRARY_LOGGERS = ("aiormq", "aio_pika", "aiohttp", "alembic", "sqlalchemy", "asyncio")
# SQLAlchemy's INFO and DEBUG echo every statement with its bound parameters, which carry
# secrets and payloads: below WARNING it stays off whatever LOG_LEVEL says.
# Alembic's INFO lines ("Context impl SQLiteImpl.") come at every start and say nothing an
# operator acts on; migrations the service runs log their own line.
_FLOORS = {"sqlalchemy": logging.WARNING, "alembic": logging.WARNING}
_HANDLER_NAME = "sellfern_webhooks"
_SECRET_KEYS = frozenset(
    {
        "secret",
        "previous_secret",
        "secret_keys",
        "token",
        "authorization",
        "signing_secret",
        "password",
        # An endpoint's own request headers: customer data, often an API key of theirs.
        "headers",
        "extra_headers",
    }
)


def redact_secrets(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """A last line of defence: never render a value under a key that names a secret."""
    for key in event_dict.keys() & _SECRET_KEYS:
        event_dict[key] = "[redacted]"
    return event_dict


def add_trace_ids(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """``trace_id`` and ``span_id`` of the current span, when there is one (worker.ops.tracing),
    so that a line can be found from its trace and the other way round."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict["trace_id"] = trace.format_trace_id(context.trace_id)
        event_dict["span_id"] = trace.format_span_id(context.span_id)
    return event_dict


def configure_logging(log_format: str, level: str, stream: TextIO | None = None) -> None:
    """Render structlog and standard-library logging as one stream; safe to call again."""
    out = stream if stream is not None else sys.stderr
    threshold = logging.getLevelNamesMapping()[level.upper()]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_ids,
        redact_secrets,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    _route_standard_logging(out, threshold, shared, renderer)


def _route_standard_logging(
    out: TextIO,
    threshold: int,
    shared: list[structlog.typing.Processor],
    renderer: structlog.typing.Processor,
) -> None:
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    # Loggers of other libraries keep to warnings, as before; those we know follow LOG_LEVEL.
    root.setLevel(max(threshold, logging.WARNING))
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(max(threshold, _FLOORS.get(name, logging.NOTSET)))


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """Silence libraries' own report of a failure the caller reports itself, in one line
    naming the setting to check (a first connect to the broker, say)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
