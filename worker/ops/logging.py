"""structlog configuration: JSON lines for machines, console rendering for a terminal.

Configured once at the entry point. Context such as ``event_id``, ``webhook_id`` and
``attempt`` is bound through contextvars, so every line of one delivery carries it.
"""

from __future__ import annotations

import logging
import sys

import structlog

_SECRET_KEYS = frozenset(
    {
        "secret",
        "previous_secret",
        "secret_keys",
        "token",
        "authorization",
        "signing_secret",
        "password",
    }
)


def redact_secrets(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """A last line of defence: never render a value under a key that names a secret."""
    for key in event_dict.keys() & _SECRET_KEYS:
        event_dict[key] = "[redacted]"
    return event_dict


def configure_logging(log_format: str, level: str) -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard library; keep their warnings, in the same stream.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(name)s %(message)s")
