"""Stopping long work cleanly on Ctrl-C, SIGTERM and SIGHUP.

Inside `stop_on_signals()` each of these raises an exception in the main thread (`KeyboardInterrupt`, or
`Terminated` for SIGTERM / SIGHUP), so that every `finally` and cleanup runs, and a second signal is ignored so that
it cannot cut the cleanup short. The exception is raised wherever the main thread happens to be, and a library that
runs Python from C can swallow it there (seen: numpy's lazy import of numpy.random, which then let `kinema data
synth` run to the end after a SIGTERM). So the stop is also recorded, and long loops call `stop_if_requested()` once
per step (a clip, a sampling step, a training step), which raises it again where nothing can swallow it.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS: tuple[int, ...] = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                                      if hasattr(signal, name))


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so that every `finally` and cleanup runs, as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_requested: int | None = None  # the signal that asked to stop, while stop_on_signals() is active


def _stop(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _on_signal(signum: int, frame: object) -> None:
    global _requested
    for other in STOP_SIGNALS:  # a second signal must not cut the cleanup short
        signal.signal(other, signal.SIG_IGN)
    _requested = signum
    raise _stop(signum)


def stop_if_requested() -> None:
    """Raise the stop a signal asked for, if one did (KeyboardInterrupt or Terminated); call once per step of long
    work. Outside `stop_on_signals()` nothing is ever requested."""
    if _requested is not None:
        raise _stop(_requested)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn Ctrl-C, SIGTERM and SIGHUP into exceptions while the block runs; the handlers found before are put back
    afterwards. Outside the main thread, where Python allows no handlers, signals are left as they are."""
    global _requested
    previous: dict[int, Any] = {}
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, _on_signal)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        _requested = None
