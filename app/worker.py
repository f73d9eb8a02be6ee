"""The one background thread that runs expensive work (and, from issue 4 on, owns torch).

Each request goes to a *channel* ("positional", "measure", "attention", …). Per channel only
the newest pending request is kept (latest wins); a request replaced before it started never
runs. Results carry the request id; a panel drops any result whose id is not the newest it
asked for. Results cross to the GUI as plain numpy arrays and dataclasses via queued signals.
A job may call ``check_cancelled()`` between steps; cancellation and failures come back as
messages, and the worker keeps serving — whatever the job raises, ``SystemExit`` and
``KeyboardInterrupt`` included (the thread ends only through :meth:`Worker.stop`).

``activity_changed`` fires whenever the set of running or pending channels changes, by any
route: a job starts or ends (finished, failed, cancelled), a request is queued, replaced
before it started, or dropped by :meth:`Worker.cancel`. It is a prompt to look, not a value
to trust: emitted from both threads, a queued emission can arrive after a newer direct one,
so a receiver reads :meth:`Worker.activity` (under the lock) instead of the payload.
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

from unitscale_core.model_build import cancellable_builds

from .thread_priority import lower_this_thread

log = logging.getLogger(__name__)

#: Longest failure message passed on (a status-bar line, not the job's whole output).
MAX_MESSAGE = 300


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
    #: a request that never ran: replaced by a newer one on its channel, or dropped by cancel()
    dropped_job = Signal(str, int)  # channel, request id
    progress = Signal(str, int, float, str)  # channel, request id, fraction, text
    #: the running and pending channels changed (see the module docstring); payload: activity()
    activity_changed = Signal(object)
    busy_changed = Signal(bool)  # busy() turned True or False

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.setObjectName("worker")
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._pending: OrderedDict[str, Request] = OrderedDict()
        self._current: Request | None = None
        self._cancel_current = False
        self._stopping = False
        self._activity: tuple[str, ...] = ()  # last announced activity()
        self.latest: dict[str, int] = {}  # newest request id per channel (GUI side)
        self.native_id: int | None = None  # the OS thread id, once running

    # -- GUI thread ----------------------------------------------------------------------------
    def submit(self, channel: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
        """Queue ``fn(*args, **kwargs)`` on ``channel``, replacing a pending request there.

        A running job of the same channel is asked to cancel (its result would be stale).
        """
        with self._lock:
            rid = next(self._ids)
            replaced = self._pending.pop(channel, None)
            self._pending[channel] = Request(rid, channel, fn, args, kwargs)
            self.latest[channel] = rid
            if self._current is not None and self._current.channel == channel:
                self._cancel_current = True
            self._lock.notify()
        if replaced is not None:
            self.dropped_job.emit(replaced.channel, replaced.id)
        if not self.isRunning():
            self.start(QThread.Priority.LowPriority)  # Windows, macOS; Linux: run()
        self._announce()
        return rid

    def is_latest(self, channel: str, request_id: int) -> bool:
        """True when ``request_id`` is the newest request made on ``channel``."""
        return self.latest.get(channel) == request_id

    def cancel(self, channel: str | None = None) -> None:
        """Drop pending requests (of ``channel``, or all) and ask the running job to stop."""
        with self._lock:
            dropped = [self._pending.pop(name) for name in list(self._pending)
                       if channel is None or name == channel]
            if self._current is not None and channel in (None, self._current.channel):
                self._cancel_current = True
        for request in dropped:
            self.dropped_job.emit(request.channel, request.id)
        self._announce()

    def busy(self) -> bool:
        with self._lock:
            return self._current is not None or bool(self._pending)

    def activity(self) -> tuple[str, ...]:
        """The channels with work: the running one first, then the pending ones in order."""
        with self._lock:
            return self._activity_locked()

    def _activity_locked(self) -> tuple[str, ...]:
        running = () if self._current is None else (self._current.channel,)
        return running + tuple(name for name in self._pending if name not in running)

    def _announce(self) -> None:
        """Emit ``activity_changed`` (and ``busy_changed``) if the activity changed since the
        last announcement; either thread."""
        with self._lock:
            now, before = self._activity_locked(), self._activity
            self._activity = now
        if now != before:
            self.activity_changed.emit(now)
            if bool(now) != bool(before):
                self.busy_changed.emit(bool(now))

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
        self._announce()
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
            self._announce()
            try:
                self._serve(request)
            finally:
                with self._lock:
                    self._current = None
                self._announce()

    def _serve(self, request: Request) -> None:
        """Run one job and emit its outcome; never raises (a failed job must not end the
        worker). ``BaseException`` is caught on purpose: a job's ``SystemExit`` or
        ``KeyboardInterrupt`` (only the main thread gets real Ctrl+C) is that job's failure,
        not the thread's; the thread itself ends only through ``stop()``'s flag."""
        try:
            with cancellable_builds(self.check_cancelled):  # Cancel works mid model build
                result = request.fn(*request.args, **request.kwargs)
        except Cancelled:
            self.cancelled_job.emit(request.channel, request.id)
        except MemoryError:
            self.failed_job.emit(request.channel, request.id, "out of memory")
        except BaseException as exc:  # noqa: BLE001 - see the docstring
            log.debug("job %s failed:\n%s", request.channel, traceback.format_exc())
            self.failed_job.emit(request.channel, request.id, _one_line(exc))
        else:
            self.finished_job.emit(request.channel, request.id, result)


def _one_line(exc: BaseException) -> str:
    """The first line of the exception's message (at most ``MAX_MESSAGE`` characters); its
    type's name when it has none, or in front when it is not an ``Exception`` (``SystemExit:
    3`` says more than ``3``)."""
    name = type(exc).__name__
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a job's exception whose __str__ itself fails
        text = ""
    lines = text.strip().splitlines()
    text = lines[0].strip() if lines else ""
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 1] + "…"
    if not isinstance(exc, Exception):
        return f"{name}: {text}" if text else name
    return text or name
