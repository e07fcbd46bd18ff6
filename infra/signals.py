"""Stopping a long-running service on SIGTERM or SIGINT: one helper for every composition root."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


def stop_on_signals(log: Any, event: str) -> threading.Event:
    """An event set by SIGTERM or SIGINT (logged as ``event`` with the signal's name), for the
    service's loop to watch; installed in the main thread, where Python runs handlers."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info(event, signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop
