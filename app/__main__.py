"""``unitscale-explorer [--config FILE] [--screenshot PNG]``: the desktop program."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

SCREENSHOT_SIZE = (1600, 1000)

#: The application and its window, kept alive until :func:`leave` ends the process: dropping
#: the last reference would run the whole widget tree's destructors first (see leave).
_session: list = []


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="unitscale-explorer", description=__doc__)
    parser.add_argument("--config", metavar="FILE", help="open this .json or .toml config")
    parser.add_argument("--screenshot", metavar="PNG",
                        help="open at 1600×1000, let pending work finish, save the window to "
                             "PNG and exit (works offscreen)")
    parser.add_argument("--exit-on-first-paint", action="store_true",
                        help=argparse.SUPPRESS)  # benchmarks/cold_start.py
    return parser.parse_args(argv)


def _quit_on_first_paint(app, window) -> None:
    """Quit the event loop once the window has painted (cold-start benchmark)."""
    from PySide6.QtCore import QEvent, QObject, QTimer

    class FirstPaint(QObject):
        def eventFilter(self, obj, event):  # noqa: N802 (Qt's name)
            if event.type() == QEvent.Type.Paint:
                QTimer.singleShot(0, app.quit)
            return False

    window._first_paint_filter = FirstPaint(window)
    window.installEventFilter(window._first_paint_filter)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the program; its exit code (:func:`main_exit` ends the process with it)."""
    t0 = time.perf_counter()
    args = _parse(argv)
    from unitscale_core.config import ConfigError, ModelConfig, load

    config, problem = None, ""
    if args.config:
        try:
            config = load(args.config)
        except ConfigError as exc:
            print(f"unitscale-explorer: error: {exc}", file=sys.stderr)
            if args.screenshot or args.exit_on_first_paint:
                return 2
            # the program opens anyway, on the defaults, and says why; the file is not touched
            config, problem = ModelConfig(), f"Could not open {args.config}: {exc}"

    from .platform_check import PlatformError, check

    try:  # before Qt: a platform plugin that cannot start makes Qt abort the process
        check()
    except PlatformError as exc:
        print(f"unitscale-explorer: error: {exc}", file=sys.stderr)
        return 2

    from PySide6.QtWidgets import QApplication

    from unitscale_core.blas_threads import use_one_blas_thread

    from .main_window import MainWindow

    use_one_blas_thread()  # the predictor's small products: see unitscale_core.blas_threads
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("Unit Scaling Explorer")
    app.setStyle("Fusion")
    remember = args.screenshot is None and not args.exit_on_first_paint
    window = MainWindow(config, restore_settings=remember, warm_up=not args.exit_on_first_paint,
                        path=args.config if args.config and not problem else None)
    window.exits_process = True  # main_exit ends the process with os._exit (see leave)
    _session[:] = [app, window]
    if problem:
        window.notify(problem)
    if args.screenshot:
        window.resize(*SCREENSHOT_SIZE)
        window.show()
        window.wait_for_background()
        deadline = time.perf_counter() + 120
        while time.perf_counter() < deadline:  # the worker's jobs, then their queued results
            app.processEvents()
            if not window.worker.busy():
                break
            time.sleep(0.02)
        for _ in range(10):  # let queued results and layout settle before grabbing
            app.processEvents()
            time.sleep(0.02)
        ok = window.grab().save(args.screenshot)
        print(f"first paint after {time.perf_counter() - t0:.2f} s; saved {args.screenshot}")
        window.close()
        if not ok:
            print(f"unitscale-explorer: error: could not write {args.screenshot}", file=sys.stderr)
            return 1
        return 0
    if args.exit_on_first_paint:
        _quit_on_first_paint(app, window)
    # However the event loop ends (window closed, app.quit(), session end), running work is
    # cancelled. A job that ignores the cancel for a second is left running: leave() ends the
    # process without destroying its QThread. After the window's own close (it is hidden by
    # then) that second was already spent in closeEvent: not again.
    app.aboutToQuit.connect(lambda: window.worker.stop(0 if window.isHidden() else 1000))
    window.show()
    return app.exec()


def leave(code: int) -> NoReturn:
    """End the process now with exit status ``code``, skipping the interpreter's teardown.

    By the time this runs the event loop has ended, the window's close saved and synced the
    settings, and the worker was cancelled and stopped (or was left, stuck in something
    uncancellable). What remains is the teardown: for a 96-layer config (GPT-3 shape) it
    took 19-69 s after the window closed (py-spy: ``~QGraphicsScene`` deleting the plots'
    items one by one, ``QGraphicsGridLayout::removeAt`` re-scanning its rows for each, then
    ``gc_collect_main`` inside libpyside6 clearing its weak-reference callbacks), waited on a
    stuck job, and sometimes crashed (SIGSEGV) with a training run's worker still mid-step.
    None of it does anything the operating system does not do by ending the process. So the
    buffered output is written (logging's handlers, stdout, stderr) and the process ends with
    ``os._exit``; no file is left half-written: every file the program saves is written
    atomically (unitscale_core.atomic) and closed before its save returns.
    """
    logging.shutdown()  # what atexit would have done: flush and close the log handlers
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be written
            pass
    os._exit(code)


def main_exit() -> NoReturn:
    """Console-script entry point: :func:`main`, then :func:`leave` with its exit code."""
    try:
        code = main()
    except SystemExit as exc:  # argparse: --help (0) and bad arguments (2, usage printed)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    leave(code)


if __name__ == "__main__":
    main_exit()
