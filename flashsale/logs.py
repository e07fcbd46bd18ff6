"""structlog configured once per process: JSON for services, readable in a terminal."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure(
    service: str | None = None, json: bool | None = None, level: str | None = None
) -> None:
    """Configure structlog and stdlib logging; call once from a composition root."""
    if json is None:
        fmt = os.environ.get("FLASHSALE_LOG_FORMAT", "auto")
        json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    lvl = getattr(logging, (level or os.environ.get("FLASHSALE_LOG_LEVEL", "INFO")).upper(), 20)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        # WriteLogger writes line and newline in one call; PrintLogger's print() makes two, and
        # another thread's log line landed between them (a JSON line with Faust's text glued on).
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries (aiokafka, faust, psycopg) log through stdlib: route them to the same stream.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(lvl, logging.WARNING))
    if service:
        structlog.contextvars.bind_contextvars(service=service)
