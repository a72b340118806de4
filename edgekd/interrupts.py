"""Holding Ctrl-C and SIGTERM for a block that must not be cut in half."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM that arrive inside the block take effect right after it (their handlers are swapped for
    ones that note them, then restored and the signals raised again): a few renames, or a training step whose
    optimizer update and BatchNorm statistics must land together or not at all, are not cut in half. Outside the
    main thread, where handlers cannot be set, the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {number: signal.signal(number, lambda received, _frame: arrived.append(received))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(arrived):
            signal.raise_signal(number)
