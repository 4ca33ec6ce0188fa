"""structlog setup: human-readable on a terminal, JSON lines with --log-json (or when not a TTY)."""

from __future__ import annotations

import logging
import sys

import structlog


def setup_logging(json_lines: bool = False, level: str = "INFO") -> None:
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(
        colors=sys.stderr.isatty())
    structlog.configure(
        processors=processors + [renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "filelock", "urllib3", "watchdog", "rq.worker"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
