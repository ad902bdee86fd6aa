"""Logging setup shared by the daemons and tools: structlog in front, stdlib logging behind.

Every log record, whether it comes from ``structlog.get_logger(name)`` or from a plain
``logging.getLogger(name)`` (trio, libraries), goes through one stderr handler and comes out
as one JSON object per line when stderr is not a terminal (journald, log shippers, tests) or
as colourised key=value lines on a terminal. Each record has ``timestamp`` (ISO 8601, UTC),
``level``, ``logger`` and ``event`` plus the bound key-values.
"""

from __future__ import annotations

import logging
import sys
from types import MappingProxyType
from typing import Any, Final, TextIO

import structlog

# marks the handler we install so that calling configure_logging twice replaces it
_HANDLER_NAME: Final = "control.logsetup"

_LEVELS: Final = MappingProxyType(
    {
        "debug": logging.DEBUG,
        "info": logging.INFO,
        "warning": logging.WARNING,
        "warn": logging.WARNING,
        "error": logging.ERROR,
        "critical": logging.CRITICAL,
    }
)


def parse_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r} (choose from {', '.join(_LEVELS)})") from None


def configure_logging(
    level: str | int = "info",
    json: bool | None = None,
    *,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and the stdlib root logger.

    ``json=None`` picks JSON lines unless ``stream`` (default stderr) is a terminal.
    Safe to call again (e.g. after parsing ``--log-level``): it replaces its own handler.
    """
    numeric = parse_level(level)
    out = stream if stream is not None else sys.stderr
    if json is None:
        json = not (hasattr(out, "isatty") and out.isatty())

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    # applied to records from both structlog and plain stdlib loggers
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        timestamper,
    ]
    renderer: Any
    if json:
        renderer = structlog.processors.JSONRenderer(default=str)
        # no locals in tracebacks: they bloat lines and may hold guest data
        tracebacks = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        final: list[Any] = [tracebacks, renderer]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=hasattr(out, "isatty") and out.isatty())
        final = [renderer]

    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        # filtering below the level happens before any processor runs: disabled debug calls
        # on hot paths cost one method call
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
