"""Structured logs: one line per event that matters, JSON for machines or key=value for people.

`choose_format` decides which (pure); `configure` sets it up, optionally with a JSON copy of every line in a file
(`podsweep up` keeps one in its data directory). Never log secrets or whole reports; bind identifiers (digest,
scan_id, node) instead.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import IO, Any, Literal

import structlog
from opentelemetry import trace


def _trace_ids(_: object, __: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        event["trace_id"] = format(span.trace_id, "032x")
    return event


Format = Literal["auto", "json", "console"]


def choose_format(setting: Format, stderr_is_terminal: bool) -> Literal["json", "console"]:
    """What stderr gets: what was asked for (`--log-format`, `log_format`), else lines for people on a terminal
    and JSON where a program reads them (a pipe, a file, a container's log)."""
    if setting != "auto":
        return setting
    return "console" if stderr_is_terminal else "json"


class _Outputs:
    """Writes each line to whatever sys.stderr is now (a logger made while stderr was redirected, by pytest's capture
    or a daemon's reopened streams, never writes to a closed file later), and a JSON copy to the log file if any."""

    def __init__(self, stderr: structlog.types.Processor, file: IO[str] | None) -> None:
        self._stderr = stderr
        self._file = file
        self._json = structlog.processors.JSONRenderer()

    def msg(self, **event: Any) -> None:
        if self._file is not None:
            self._file.write(str(self._json(None, "", dict(event))) + "\n")
            self._file.flush()
        print(self._stderr(None, "", event), file=sys.stderr, flush=True)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


_file: IO[str] | None = None


FILE_KEEP_BYTES = 64 * 1024 * 1024


def _open_private(path: Path) -> IO[str]:
    """Append to `path`, created 0600 in a 0700 directory: logs name images, namespaces and nodes. A file past
    FILE_KEEP_BYTES is moved to `<name>.1` first (replacing the one before), so two at most are kept."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists() and path.stat().st_size > FILE_KEEP_BYTES:
        path.replace(path.with_name(path.name + ".1"))
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a", encoding="utf-8")


def configure(level: str = "info", fmt: Format = "auto", file: Path | None = None) -> None:
    """Logs at `level` to stderr in `fmt` (see `choose_format`), and every line as JSON to `file` when given."""
    global _file
    if _file is not None:
        _file.close()
    _file = _open_private(file) if file is not None else None
    terminal = sys.stderr.isatty()
    stderr: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if choose_format(fmt, terminal) == "json"
        else structlog.dev.ConsoleRenderer(colors=terminal)
    )
    outputs = _Outputs(stderr, _file)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _trace_ids,
            structlog.processors.format_exc_info,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=lambda *_: outputs,
        cache_logger_on_first_use=False,
    )


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]


configure()  # sane defaults for code that logs before (or without) the CLI configuring it, e.g. tests
