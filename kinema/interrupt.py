"""Stopping long work cleanly on Ctrl-C, SIGTERM and SIGHUP.

Inside `stop_on_signals()` each of these raises an exception in the main thread (`KeyboardInterrupt`, or
`Terminated` for SIGTERM / SIGHUP), so that every `finally` and cleanup runs, and a second signal is ignored so that
it cannot cut the cleanup short. The exception is raised wherever the main thread happens to be, and a library that
runs Python from C can swallow it there (seen: numpy's lazy import of numpy.random, which then let `kinema data
synth` run to the end after a SIGTERM). So the stop is also recorded, and long loops call `stop_if_requested()` once
per step (a clip, a sampling step, a training step), which raises it again where nothing can swallow it.

Work whose state must change together defers the first signal: inside `stops_deferred()` it is only recorded, and
the work stops at the end of its unit (the trainer finishes the step and saves a checkpoint there); a second signal
raises at once.
"""

from __future__ import annotations

import signal
import sys
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
_deferring = False  # inside stops_deferred(): a first signal is only recorded


def _stop(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _on_signal(signum: int, frame: object) -> None:
    global _requested
    if _deferring and _requested is None:  # the work finishes its unit first; a second signal stops it at once
        _requested = signum
        print("kinema: stopping once this step is done and saved (Ctrl-C again stops at once, without saving it)",
              file=sys.stderr, flush=True)
        return
    for other in STOP_SIGNALS:  # a second signal must not cut the cleanup short
        signal.signal(other, signal.SIG_IGN)
    _requested = _requested or signum
    raise _stop(signum)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """In a worker process (DataLoader's `worker_init_fn`): ignore Ctrl-C, SIGTERM and SIGHUP. A terminal, or
    `kill -- -PGID`, sends them to the whole process group; a worker that died of one made the main process fail
    mid-step ("DataLoader worker exited unexpectedly") instead of finishing the step and saving. The main process
    alone decides when to stop; it then shuts its workers down. A DataLoader worker whose parent dies exits by
    itself (torch watches); a process pool's takes `pool_worker_init`."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def pool_worker_init() -> None:
    """A process pool's worker initializer: `ignore_stop_signals`, and exit when the parent process dies. A
    DataLoader worker has torch's watchdog for that; a ProcessPoolExecutor's worker has none and, its parent killed
    (SIGKILL, the out-of-memory killer), waited on its task pipe for ever, immune to the SIGTERM it ignores."""
    import multiprocessing
    import os
    import threading
    import time

    ignore_stop_signals()
    # The OS parent, and the pool's process by its pid: a forkserver's worker has the server as its OS parent.
    spawner = multiprocessing.parent_process()
    first_parent = os.getppid()

    def parent_alive() -> bool:
        if os.getppid() != first_parent:  # orphaned: adopted by init (or a subreaper), even while the dead parent
            return False                  # waits, a zombie, for its own parent to reap it
        if spawner is None or spawner.pid is None or os.name == "nt":  # Windows' os.kill(pid, 0) sends Ctrl-C
            return True
        try:
            os.kill(spawner.pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by another user
            return True
        return True

    def watch() -> None:
        while parent_alive():
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="kinema-parent-watch", daemon=True).start()


def stop_if_requested() -> None:
    """Raise the stop a signal asked for, if one did (KeyboardInterrupt or Terminated); call once per step of long
    work. Outside `stop_on_signals()` nothing is ever requested; inside `stops_deferred()` nothing is raised."""
    if _requested is not None and not _deferring:
        raise _stop(_requested)


def stop_requested() -> bool:
    """Whether a stop signal has arrived (the work inside `stops_deferred()` asks this at the end of its unit)."""
    return _requested is not None


@contextmanager
def stops_deferred() -> Iterator[None]:
    """Inside the block a first stop signal is only recorded (and one line says so), so that a unit of work whose
    state must change together, such as a training step (weights, optimiser, EMA, generators) and its checkpoint,
    finishes whole; `stop_if_requested()` after the block raises it. A second signal raises at once, as outside."""
    global _deferring
    outer = _deferring
    _deferring = True
    try:
        yield
    finally:
        _deferring = outer


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
