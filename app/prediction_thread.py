"""A small background thread for analytic predictions that do not fit in a frame.

Not :mod:`app.worker`: that thread owns torch and the device and runs one job at a time;
a prediction touches neither and would wait behind a measurement or a training chunk.
:func:`~unitscale_core.scaling.predict.predict` is thread-safe (a lock-protected cache).

Latest wins: :meth:`PredictionThread.request` replaces everything still pending with the new
list, and a running prediction that is no longer wanted gives up at its next sub-block
(``predict``'s ``should_stop``). Each result carries the ``(config, formats)`` it was computed
for and reaches the GUI thread through a queued signal; the receiver drops results it no longer
needs. The thread is a daemon Python thread rather than a QThread: one op of an extreme config
(a softmax quadrature over 10⁵ keys) can take seconds, and closing the window must not wait for
it nor leave a running QThread behind; a daemon thread simply ends with the process.
"""

from __future__ import annotations

import logging
import threading

from PySide6.QtCore import QObject, Signal

from unitscale_core.config import ModelConfig
from unitscale_core.scaling.predict import PredictionCancelled, predict

from .thread_priority import lower_this_thread

log = logging.getLogger(__name__)

Key = tuple[ModelConfig, tuple[str, ...]]


class PredictionThread(QObject):
    """Runs ``predict(cfg, formats)`` for the newest requested keys, in order, in a daemon
    thread; signals are emitted from that thread and arrive queued in the GUI thread."""

    ready = Signal(object, object, object)  # cfg, formats, rows (list[TensorRow])
    failed = Signal(object, object, str)  # cfg, formats, one-line message

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._cond = threading.Condition()
        self._pending: list[Key] = []
        self._current: Key | None = None
        self._latest: set[Key] = set()  # the newest request's keys: others are stale
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- GUI thread ----------------------------------------------------------------------------
    def request(self, keys: list[Key]) -> None:
        """Predict ``keys`` in order, replacing whatever is still pending (latest wins)."""
        with self._cond:
            if self._stopping:
                return
            # the running one need not run again: its result is on its way (and one that is
            # no longer wanted gives up at its next sub-block)
            self._latest = set(keys)
            self._pending = [k for k in dict.fromkeys(keys) if k != self._current]
            self._cond.notify()
        if self._pending and not self.isRunning():
            self._thread = threading.Thread(target=self.run, name="predictionThread",
                                            daemon=True)
            self._thread.start()

    def isRunning(self) -> bool:  # noqa: N802 (the QThread name the panel and tests use)
        """True while the thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def cancel_pending(self) -> None:
        """Forget pending requests (the running prediction, if any, finishes)."""
        with self._cond:
            self._pending = []

    def busy(self) -> bool:
        """True while a prediction runs or waits."""
        with self._cond:
            return self._current is not None or bool(self._pending)

    def stop(self, timeout_ms: int | None = None) -> bool:
        """Drop pending requests, stop the running prediction at its next sub-block (its
        result is not sent) and end the thread; True when it has ended (``None``: wait as
        long as that takes, a few milliseconds)."""
        with self._cond:
            self._stopping = True
            self._pending = []
            self._cond.notify()
        if not self.isRunning():
            return True
        self._thread.join(None if timeout_ms is None else timeout_ms / 1000)
        return not self.isRunning()

    # -- the thread ----------------------------------------------------------------------------
    def run(self) -> None:
        lower_this_thread()  # typing in the model panel stays smooth (app/thread_priority.py)
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                key = self._current = self._pending.pop(0)
            cfg, formats = key
            try:
                rows, error = predict(cfg, formats=formats, should_stop=lambda key=key: (
                    self._stopping or key not in self._latest)), None
            except PredictionCancelled:  # stale, or the window is closing
                with self._cond:
                    self._current = None
                    if self._stopping:
                        return
                continue
            except Exception as exc:  # a failure comes back as a message; the thread lives on
                log.exception("prediction failed for %s", cfg)
                rows, error = None, f"{type(exc).__name__}: {exc}".splitlines()[0]
            with self._cond:
                self._current = None
                if self._stopping:
                    return
            if error is None:
                self.ready.emit(cfg, formats, rows)
            else:
                self.failed.emit(cfg, formats, error)
