"""A model setting chosen per call, not stored on the model: motion strength, FreeU.

A video model may run in several threads at once with different settings (kinema.models.video_model's contract),
so such a setting lives in a context variable that a `with setting.applied(value):` block sets for its own thread
(or task), and the layers read `setting.current()` inside the forward pass.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Generic, TypeVar

T = TypeVar("T")


class RunSetting(Generic[T]):
    """One per-call setting with a default the model runs at outside any `applied` block.

    `current()` reads the context variable only while some block in some thread applies another value than the
    default: torch.compile cannot trace ContextVar.get (a layer reading it would split the graph there), but it can
    guard on the count of such blocks, so a compiled model stays one graph while no run changes the setting.
    """

    def __init__(self, name: str, default: T):
        self.default = default
        self._value: ContextVar[T] = ContextVar(f"kinema_{name}", default=default)
        self.others_running = 0  # `applied` blocks with another value than the default, in all threads
        self._count_lock = threading.Lock()

    def _count(self, change: int) -> None:
        with self._count_lock:
            self.others_running += change

    @contextmanager
    def applied(self, value: T) -> Iterator[None]:
        """Within this block, in this thread (or task), the model runs with `value`."""
        counted = value != self.default
        token = self._value.set(value)
        if counted:
            self._count(1)
        try:
            yield
        finally:
            if counted:
                self._count(-1)
            self._value.reset(token)

    def current(self) -> T:
        """The value the enclosing `applied` block set (the default outside one)."""
        return self._value.get() if self.others_running else self.default
