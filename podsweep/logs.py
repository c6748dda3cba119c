"""Structured logs: one line per event that matters, JSON for machines or key=value for people.

Never log secrets or whole reports; bind identifiers (digest, scan_id, node) instead.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog
from opentelemetry import trace


def _trace_ids(_: object, __: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        event["trace_id"] = format(span.trace_id, "032x")
    return event


class _StderrLogger:
    """Writes each line to whatever sys.stderr is now: a logger made while stderr was redirected (pytest's
    capture, a daemon's reopened streams) never writes to a closed file later."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def _logger_factory(*_: object) -> _StderrLogger:
    return _StderrLogger()


def configure(level: str = "info", fmt: Literal["auto", "json", "console"] = "auto") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _trace_ids,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=_logger_factory,
        cache_logger_on_first_use=False,
    )


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]


configure()  # sane defaults for code that logs before (or without) the CLI configuring it, e.g. tests
