"""Ctrl-C and SIGTERM during training: finish the current step, checkpoint, stop (a second signal stops at once)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from tc_lite.errors import UserError


class Interrupted(UserError):
    """Ctrl-C or SIGTERM: the run saved a checkpoint and stopped; exit code 128 + signal, as shells expect."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """Remembers the first SIGINT/SIGTERM while `installed()`; `signum` is None until one arrives."""

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log
        self.signum: int | None = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signum = signum
        self.log(f"{signal.Signals(signum).name}: saving a checkpoint after this step (press again to stop now)")

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Only the main thread can install handlers; elsewhere (a notebook worker thread) this does nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
