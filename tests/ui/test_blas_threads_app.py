"""The desktop program holds numpy's BLAS to one thread (unitscale_core.blas_threads)."""

from __future__ import annotations

from threadpoolctl import threadpool_limits

from unitscale_core import blas_threads
from unitscale_core.blas_threads import blas_thread_counts


def test_the_app_applies_it_before_its_window(monkeypatch, tmp_path):
    """``unitscale-explorer --screenshot`` (offscreen) runs with numpy's BLAS at one thread."""
    import app.__main__ as entry
    import app.main_window as main_window

    seen = []
    real = main_window.MainWindow

    def window(*args, **kwargs):
        seen.append(blas_thread_counts())
        return real(*args, **kwargs)

    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    monkeypatch.delenv(blas_threads.ENV, raising=False)
    monkeypatch.setattr(main_window, "MainWindow", window)
    threadpool_limits(limits=2, user_api="blas")
    try:
        entry.main(["--screenshot", str(tmp_path / "w.png")])
    finally:
        after = blas_thread_counts()
        threadpool_limits(limits=2, user_api="blas")
    assert seen == [{1}] and after == {1}
