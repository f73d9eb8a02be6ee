"""The worker thread: latest wins, cancellation, failures, and stopping while busy."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from app.thread_priority import BACKGROUND_NICE, thread_nice
from app.worker import Worker


@pytest.fixture
def worker(qtbot):
    w = Worker()
    yield w
    assert w.stop(2000)


def test_latest_wins_under_rapid_requests(qtbot, worker):
    gate = threading.Event()
    ran: list[int] = []
    done: list[tuple[int, object]] = []
    worker.finished_job.connect(lambda ch, rid, res: done.append((rid, res)))

    def blocker():
        gate.wait(5)
        return "first"

    with qtbot.waitSignal(worker.started_job):  # occupies the thread while requests pile up
        worker.submit("other", blocker)
    ids = [worker.submit("calc", lambda i=i: ran.append(i) or i) for i in range(200)]
    assert worker.pending_count() == 1  # one pending per channel, no queue growth
    gate.set()
    qtbot.waitUntil(lambda: len(done) == 2, timeout=5000)
    assert ran == [199]  # only the newest of the 200 ran
    assert done[-1] == (ids[-1], 199)
    assert worker.is_latest("calc", ids[-1]) and not worker.is_latest("calc", ids[0])


def test_cancel_running_job(qtbot, worker):
    steps: list[int] = []
    cancelled: list[int] = []
    worker.cancelled_job.connect(lambda ch, rid: cancelled.append(rid))

    def long_job():
        for i in range(1000):
            worker.check_cancelled()
            steps.append(i)
            time.sleep(0.005)
        return "finished"

    rid = worker.submit("long", long_job)
    qtbot.waitUntil(lambda: len(steps) > 3)
    worker.cancel("long")
    qtbot.waitUntil(lambda: cancelled == [rid], timeout=2000)
    assert len(steps) < 1000


def test_failure_then_success(qtbot, worker):
    failures: list[str] = []
    results: list[object] = []
    worker.failed_job.connect(lambda ch, rid, msg: failures.append(msg))
    worker.finished_job.connect(lambda ch, rid, res: results.append(res))

    def boom():
        raise RuntimeError("non-finite values in layer 3\nmore detail")

    def oom():
        raise MemoryError()

    worker.submit("a", boom)
    qtbot.waitUntil(lambda: len(failures) == 1)
    worker.submit("a", oom)
    qtbot.waitUntil(lambda: len(failures) == 2)
    worker.submit("a", lambda: 42)
    qtbot.waitUntil(lambda: results == [42])
    assert failures == ["non-finite values in layer 3", "out of memory"]


def test_stop_while_busy_returns_quickly(qtbot):
    w = Worker()

    def long_job():
        while True:
            w.check_cancelled()
            time.sleep(0.01)

    with qtbot.waitSignal(w.started_job):
        w.submit("long", long_job)
    t0 = time.perf_counter()
    assert w.stop(2000)
    assert time.perf_counter() - t0 < 2.0
    assert not w.isRunning()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_worker_thread_runs_below_the_gui_thread(qtbot, worker):
    """The worker's thread (and the threads it starts: torch's OpenMP team) gives way to the
    GUI thread for the CPU, so a repaint during a measurement is not stretched (thread
    priorities, app/thread_priority.py)."""
    seen: list[tuple[int | None, int | None]] = []

    def job():
        here = threading.get_native_id()
        child: list[int | None] = []
        t = threading.Thread(target=lambda: child.append(thread_nice(threading.get_native_id())))
        t.start(), t.join()
        return thread_nice(here), child[0]

    worker.finished_job.connect(lambda ch, rid, res: seen.append(res))
    worker.submit("nice", job)
    qtbot.waitUntil(lambda: bool(seen), timeout=5000)
    gui = thread_nice(threading.get_native_id())
    assert worker.native_id is not None
    assert seen[0][0] == min(19, gui + BACKGROUND_NICE) > gui
    assert seen[0][1] == seen[0][0]  # inherited by the threads it starts


class _Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("its __str__ fails too")


@pytest.mark.parametrize("exc, message", [
    (SystemExit(3), "SystemExit: 3"),
    (SystemExit(), "SystemExit"),
    (KeyboardInterrupt(), "KeyboardInterrupt"),
    (GeneratorExit("odd"), "GeneratorExit: odd"),
    (_Unprintable(), "_Unprintable"),
    (ValueError("x" * 100_000), "x" * 299 + "…"),
])
def test_worker_survives_any_exception_a_job_raises(qtbot, worker, exc, message):
    """A job's SystemExit or KeyboardInterrupt is that job's failure: the worker reports it in
    one line, serves the next request, and still stops at once (a SystemExit used to end the
    thread and leave close waiting forever)."""
    failures: list[str] = []
    results: list[object] = []
    worker.failed_job.connect(lambda ch, rid, msg: failures.append(msg))
    worker.finished_job.connect(lambda ch, rid, res: results.append(res))

    def raises():
        raise exc

    worker.submit("a", raises)
    qtbot.waitUntil(lambda: failures == [message], timeout=5000)
    worker.submit("a", lambda: 42)
    qtbot.waitUntil(lambda: results == [42], timeout=5000)
    assert worker.isRunning() and not worker.busy()
    t0 = time.perf_counter()
    assert worker.stop(2000) and time.perf_counter() - t0 < 2.0


def test_activity_follows_every_route(qtbot, worker):
    """``activity_changed`` fires for each change of the running and pending channels — start,
    finish, failure, cancel of the running job, a pending request replaced or dropped — and
    ``activity()`` is empty once the last job ended by any route; replaced and dropped
    requests are named by ``dropped_job``."""
    seen: list[tuple] = []
    busy: list[bool] = []
    dropped: list[tuple[str, int]] = []
    worker.activity_changed.connect(lambda act: seen.append(act))
    worker.busy_changed.connect(busy.append)
    worker.dropped_job.connect(lambda ch, rid: dropped.append((ch, rid)))
    gate = threading.Event()

    def held():
        while not gate.is_set():
            worker.check_cancelled()
            time.sleep(0.005)
        return "done"

    with qtbot.waitSignal(worker.started_job):
        worker.submit("run", held)
    first = worker.submit("calc", lambda: 1)
    second = worker.submit("calc", lambda: 2)  # replaces the first before it started
    other = worker.submit("other", lambda: 3)
    assert worker.activity() == ("run", "calc", "other")
    assert dropped == [("calc", first)]
    worker.cancel("other")  # dequeued: never runs, named, and gone from the activity
    assert dropped == [("calc", first), ("other", other)]
    assert worker.activity() == ("run", "calc")
    worker.cancel("run")  # the running job ends through Cancelled
    qtbot.waitUntil(lambda: worker.activity() == (), timeout=5000)
    qtbot.waitUntil(lambda: seen and seen[-1] == (), timeout=5000)
    assert ("run", "calc", "other") in seen and ("calc",) in seen
    assert busy[0] is True and busy[-1] is False
    assert worker.latest["calc"] == second
    # a failure and a plain finish each end in an empty activity too
    for fn in (lambda: 1 / 0, lambda: 5):
        seen.clear()
        worker.submit("x", fn)
        qtbot.waitUntil(lambda: seen and seen[-1] == (), timeout=5000)
        assert ("x",) in seen and worker.activity() == ()
    # cancel() of everything while one runs and another waits
    gate.clear()
    with qtbot.waitSignal(worker.started_job):
        worker.submit("run", held)
    worker.submit("later", lambda: 0)
    worker.cancel()
    qtbot.waitUntil(lambda: worker.activity() == () and not worker.busy(), timeout=5000)


def test_cancel_during_a_model_build_ends_it_with_no_model_kept(qtbot, worker):
    """Issue 19: a Measure / training start first builds the model, which Cancel could not
    stop. A cancel that arrives mid-build (here: once a few submodules exist) ends the job
    as cancelled before the model is complete, measure's cache keeps no model, and the
    worker is idle again (busy_changed(False): the busy indicator clears)."""
    import torch
    from torch.nn.modules.module import register_module_module_registration_hook

    from unitscale_core import ModelConfig
    from unitscale_core.measure import cached_model, is_cached

    cfg = ModelConfig(architecture="decoder", d_model=32, n_heads=2, d_ff=64, n_layers=12,
                      vocab_size=100, max_len=16, seq_len=8, batch_size=1, device="cpu",
                      seed=12345)
    seen: list[int] = []

    def counter(*_args) -> None:
        if threading.get_ident() == worker_thread[0]:
            seen.append(1)
            if len(seen) == 5:
                worker.cancel()  # as the GUI's Cancel would, while layers are being built

    def job():
        worker_thread.append(threading.get_ident())
        worker_thread.pop(0)
        return cached_model(cfg, torch.device("cpu"))

    worker_thread = [-1]
    outcome: list[str] = []
    worker.finished_job.connect(lambda *_: outcome.append("finished"))
    worker.cancelled_job.connect(lambda *_: outcome.append("cancelled"))
    handle = register_module_module_registration_hook(counter)
    try:
        with qtbot.waitSignal(worker.busy_changed, check_params_cb=lambda b: not b,
                              timeout=30_000):
            worker.submit("measure", job)
    finally:
        handle.remove()
    qtbot.waitUntil(lambda: bool(outcome), timeout=5000)
    assert outcome == ["cancelled"] and not worker.busy()
    assert not is_cached(cfg, "cpu")  # no half-built model kept for the next Measure
    model = cached_model(cfg, torch.device("cpu"))  # a full build, for its module count
    full = sum(1 for _ in model.modules()) - 1
    assert 5 <= len(seen) < full // 2  # stopped within a module of the cancel
    from unitscale_core import measure
    measure._models.clear()
