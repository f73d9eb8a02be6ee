"""A small background thread for analytic predictions that do not fit in a frame.

Not :mod:`app.worker`: that thread owns torch and the device and runs one job at a time;
a prediction touches neither and would wait behind a measurement or a training chunk.
:func:`~unitscale_core.scaling.predict.predict` is thread-safe (a lock-protected cache).

Latest wins: :meth:`PredictionThread.request` replaces everything still pending with the new
list, so only the newest config's predictions run once the current one (which cannot be
interrupted) is done. Each result carries the ``(config, formats)`` it was computed for and
reaches the GUI thread through a queued signal; the receiver drops results it no longer needs.
"""

from __future__ import annotations

import logging
import threading

from PySide6.QtCore import QObject, QThread, Signal

from unitscale_core.config import ModelConfig
from unitscale_core.scaling.predict import predict

log = logging.getLogger(__name__)

Key = tuple[ModelConfig, tuple[str, ...]]


class PredictionThread(QThread):
    """Runs ``predict(cfg, formats)`` for the newest requested keys, in order."""

    ready = Signal(object, object, object)  # cfg, formats, rows (list[TensorRow])
    failed = Signal(object, object, str)  # cfg, formats, one-line message

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.setObjectName("predictionThread")
        self._cond = threading.Condition()
        self._pending: list[Key] = []
        self._current: Key | None = None
        self._stopping = False

    # -- GUI thread ----------------------------------------------------------------------------
    def request(self, keys: list[Key]) -> None:
        """Predict ``keys`` in order, replacing whatever is still pending (latest wins)."""
        with self._cond:
            if self._stopping:
                return
            # the running one need not run again: its result is on its way
            self._pending = [k for k in dict.fromkeys(keys) if k != self._current]
            self._cond.notify()
        if self._pending and not self.isRunning():
            self.start()

    def cancel_pending(self) -> None:
        """Forget pending requests (the running prediction, if any, finishes)."""
        with self._cond:
            self._pending = []

    def busy(self) -> bool:
        """True while a prediction runs or waits."""
        with self._cond:
            return self._current is not None or bool(self._pending)

    def stop(self, timeout_ms: int | None = None) -> bool:
        """Drop pending requests, let the running prediction finish (its result is not
        sent) and end the thread; True when it has ended (``None``: wait as long as it
        takes, tens of milliseconds for a 96-layer model)."""
        with self._cond:
            self._stopping = True
            self._pending = []
            self._cond.notify()
        if not self.isRunning():
            return True
        return self.wait() if timeout_ms is None else self.wait(timeout_ms)

    # -- the thread ----------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                key = self._current = self._pending.pop(0)
            cfg, formats = key
            try:
                rows, error = predict(cfg, formats=formats), None
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
