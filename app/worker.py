"""The one background thread that runs expensive work (and, from issue 4 on, owns torch).

Each request goes to a *channel* ("positional", "measure", "attention", …). Per channel only
the newest pending request is kept (latest wins); a request replaced before it started never
runs. Results carry the request id; a panel drops any result whose id is not the newest it
asked for. Results cross to the GUI as plain numpy arrays and dataclasses via queued signals.
A job may call ``check_cancelled()`` between steps; cancellation and failures come back as
messages, and the worker keeps serving.
"""

from __future__ import annotations

import itertools
import logging
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QObject, QThread, Signal

from .thread_priority import lower_this_thread

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """Raised inside a job by ``check_cancelled`` when its request was cancelled or replaced."""


@dataclass
class Request:
    id: int
    channel: str
    fn: Callable[..., Any]
    args: tuple
    kwargs: dict


class Worker(QThread):
    """A QThread serving requests; ``submit`` is called from the GUI thread."""

    started_job = Signal(str, int)  # channel, request id
    finished_job = Signal(str, int, object)  # channel, request id, result
    failed_job = Signal(str, int, str)  # channel, request id, one-line message
    cancelled_job = Signal(str, int)
    progress = Signal(str, int, float, str)  # channel, request id, fraction, text

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.setObjectName("worker")
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._pending: OrderedDict[str, Request] = OrderedDict()
        self._current: Request | None = None
        self._cancel_current = False
        self._stopping = False
        self.latest: dict[str, int] = {}  # newest request id per channel (GUI side)
        self.native_id: int | None = None  # the OS thread id, once running

    # -- GUI thread ----------------------------------------------------------------------------
    def submit(self, channel: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
        """Queue ``fn(*args, **kwargs)`` on ``channel``, replacing a pending request there.

        A running job of the same channel is asked to cancel (its result would be stale).
        """
        with self._lock:
            rid = next(self._ids)
            self._pending[channel] = Request(rid, channel, fn, args, kwargs)
            self._pending.move_to_end(channel)
            self.latest[channel] = rid
            if self._current is not None and self._current.channel == channel:
                self._cancel_current = True
            self._lock.notify()
        if not self.isRunning():
            self.start(QThread.Priority.LowPriority)  # Windows, macOS; Linux: run()
        return rid

    def is_latest(self, channel: str, request_id: int) -> bool:
        """True when ``request_id`` is the newest request made on ``channel``."""
        return self.latest.get(channel) == request_id

    def cancel(self, channel: str | None = None) -> None:
        """Drop pending requests (of ``channel``, or all) and ask the running job to stop."""
        with self._lock:
            for name in list(self._pending):
                if channel is None or name == channel:
                    del self._pending[name]
            if self._current is not None and channel in (None, self._current.channel):
                self._cancel_current = True

    def busy(self) -> bool:
        with self._lock:
            return self._current is not None or bool(self._pending)

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    def stop(self, timeout_ms: int = 2000) -> bool:
        """Cancel everything, end the thread, wait for it; True when it ended in time."""
        with self._lock:
            self._stopping = True
            self._pending.clear()
            self._cancel_current = True
            self._lock.notify()
        return self.wait(timeout_ms) if self.isRunning() else True

    # -- worker thread -------------------------------------------------------------------------
    def check_cancelled(self) -> None:
        """Call between steps of a long job; raises Cancelled when it should stop."""
        if self._cancel_current:
            raise Cancelled()

    def report(self, fraction: float, text: str = "") -> None:
        """Progress of the running job, 0..1."""
        current = self._current
        if current is not None:
            self.progress.emit(current.channel, current.id, float(fraction), text)

    def run(self) -> None:  # noqa: D401 - QThread's entry point
        self.native_id = threading.get_native_id()
        lower_this_thread()  # the GUI thread paints first (app/thread_priority.py)
        while True:
            with self._lock:
                while not self._pending and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                _, request = self._pending.popitem(last=False)
                self._current = request
                self._cancel_current = False
            self.started_job.emit(request.channel, request.id)
            try:
                result = request.fn(*request.args, **request.kwargs)
            except Cancelled:
                self.cancelled_job.emit(request.channel, request.id)
            except MemoryError:
                self.failed_job.emit(request.channel, request.id, "out of memory")
            except Exception as exc:  # a failed job must not end the worker
                log.debug("job %s failed:\n%s", request.channel, traceback.format_exc())
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self.failed_job.emit(request.channel, request.id, message)
            else:
                self.finished_job.emit(request.channel, request.id, result)
            finally:
                with self._lock:
                    self._current = None
