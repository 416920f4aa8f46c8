"""Where kinema's messages go.

Library modules log through `logging.getLogger(__name__)`, so every message is under the `kinema` logger, and never
print: the application decides what is shown. Without any setup Python shows warnings and errors on stderr.
The CLI shows them with `log_to_stderr`, one plain line each.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

LOGGER_NAME = "kinema"


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = " ".join(record.getMessage().split())
        return f"kinema: {record.levelname.lower()}: {message}"


class _CurrentStderr(logging.Handler):
    """Writes to whatever `sys.stderr` is when a message comes (a StreamHandler keeps the stream it was made with,
    which misses a later redirection)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def cli_level(verbose: bool, quiet: bool) -> int:
    """The level the CLI shows: info with --verbose, errors only with --quiet, else warnings and up."""
    return logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING


@contextmanager
def log_to_stderr(level: int) -> Iterator[None]:
    """Show the `kinema` logger's messages at `level` and up on stderr, one `kinema: LEVEL: message` line each, while
    the block runs; the logger's level, handlers and propagation are as before afterwards.

    Propagation is off meanwhile, so a handler the host program set on the root logger does not print them twice.
    """
    logger = logging.getLogger(LOGGER_NAME)
    saved_level, saved_propagate = logger.level, logger.propagate
    handler = _CurrentStderr()
    handler.setFormatter(_OneLine())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)
        logger.propagate = saved_propagate
