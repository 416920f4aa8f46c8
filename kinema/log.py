"""Where kinema's messages go.

Library modules log through `logging.getLogger(__name__)`, so every message is under the `kinema` logger, and never
print: the application decides what is shown. Without any setup Python shows warnings and errors on stderr.
The CLI shows them with `log_to_stderr`, one plain line each.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
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


# transformers draws its own bars (loading weights, writing shards) whatever stderr is. This is huggingface_hub's
# switch, which transformers and huggingface_hub read once, when they are imported.
HUB_BARS_OFF = "HF_HUB_DISABLE_PROGRESS_BARS"
_BAR_MODULES = ("transformers.utils.logging", "diffusers.utils.logging")  # each has the three *_progress_bar functions


@contextmanager
def library_progress_bars(shown: bool) -> Iterator[None]:
    """While the block runs, the progress bars transformers and diffusers draw themselves are on or off with kinema's
    own (`shown`; the CLI's rule: a terminal and no --quiet).

    Off means: the modules already imported are switched off until the block ends, and `HF_HUB_DISABLE_PROGRESS_BARS`
    is set meanwhile, so transformers imported during the block starts with its bars off and keeps them off (it
    reads the switch once; a CLI process is the block's whole life).
    """
    if shown:
        yield
        return
    saved_env = os.environ.get(HUB_BARS_OFF)
    os.environ[HUB_BARS_OFF] = "1"
    saved = {name: bool(sys.modules[name].is_progress_bar_enabled()) for name in _BAR_MODULES if name in sys.modules}
    for name in saved:
        sys.modules[name].disable_progress_bar()
    try:
        yield
    finally:
        if saved_env is None:
            del os.environ[HUB_BARS_OFF]
        else:
            os.environ[HUB_BARS_OFF] = saved_env
        for name, enabled in saved.items():
            if enabled:
                sys.modules[name].enable_progress_bar()


@contextmanager
def warnings_of_this_thread(on_warning: Callable[[str], None]) -> Iterator[None]:
    """While the block runs, `on_warning(text)` gets each kinema warning (and error) this thread logs, on one line:
    a job's warnings, for the user who asked for that job only (the web app shows them, the API returns them)."""
    handler = _ThreadWarnings(threading.get_ident(), on_warning)
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


class _ThreadWarnings(logging.Handler):
    def __init__(self, thread_id: int, on_warning: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.thread_id = thread_id
        self.on_warning = on_warning

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread_id:
            self.on_warning(" ".join(record.getMessage().split()))
