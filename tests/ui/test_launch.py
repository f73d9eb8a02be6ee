"""The launch path: the platform check before Qt, and the program under a real X server.

The check's tests fake what they must (an ``ldd`` on PATH, a plugin folder) and run the real
program in a subprocess where it matters that Qt is never reached: a Qt abort is SIGABRT
(return code -6) with a core dump, which these tests would see.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from app import platform_check
from app.platform_check import PlatformError, check, platform_candidates, problem

ROOT = Path(__file__).resolve().parents[2]

# What ldd printed for libqxcb.so on Debian 12 before libxcb-icccm4 / libxcb-keysyms1 were there
LDD_MISSING = """\
\tlinux-vdso.so.1 (0x00007ffd5a3f1000)
\tlibQt6XcbQpa.so.6 => /venv/PySide6/Qt/lib/libQt6XcbQpa.so.6 (0x00007f0e1c000000)
\tlibxcb-cursor.so.0 => /lib/x86_64-linux-gnu/libxcb-cursor.so.0 (0x00007f7ce5510000)
\tlibxcb-icccm.so.4 => not found
\tlibxcb-util.so.1 => /lib/x86_64-linux-gnu/libxcb-util.so.1 (0x00007f7ce49f8000)
\tlibxcb-keysyms.so.1 => not found
\tlibxcb-icccm.so.4 => not found
\tlibxcb-keysyms.so.1 => not found
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f7ce381e000)
"""


def _fake_plugins(tmp_path: Path) -> Path:
    """A plugin folder holding a (dummy) xcb and wayland plugin, for QT_QPA_PLATFORM_PLUGIN_PATH."""
    plugins = tmp_path / "platforms"
    plugins.mkdir()
    for name in ("libqxcb.so", "libqwayland.so"):
        (plugins / name).write_bytes(b"\x7fELF not really")
    return plugins


def _fake_ldd(tmp_path: Path, output: str) -> Path:
    """A folder with an ``ldd`` that prints ``output``, to put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ldd = bin_dir / "ldd"
    ldd.write_text("#!/bin/sh\ncat <<'EOF'\n" + output + "EOF\n")
    ldd.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize(("env", "expected"), [
    ({}, ["xcb"]),
    ({"QT_QPA_PLATFORM": ""}, ["xcb"]),  # empty is ignored by Qt, like unset
    ({"QT_QPA_PLATFORM": "offscreen"}, ["offscreen"]),
    ({"QT_QPA_PLATFORM": "xcb:nograb;offscreen"}, ["xcb", "offscreen"]),
    ({"XDG_SESSION_TYPE": "wayland"}, ["wayland", "xcb"]),
    ({"XDG_SESSION_TYPE": "Wayland"}, ["xcb"]),  # Qt compares exactly
    ({"XDG_SESSION_TYPE": "x11", "WAYLAND_DISPLAY": ""}, ["wayland", "xcb"]),  # set, even empty
    ({"XDG_SESSION_TYPE": "wayland", "QT_QPA_PLATFORM": "xcb"}, ["xcb"]),
])
def test_candidates_mirror_qt(env, expected):
    # the rule read from Qt 6.11's own log: QT_LOGGING_RULES="qt.qpa.*=true" prints
    # 'init_platform called with pluginNamesWithArguments "wayland;xcb"' for these environments
    assert platform_candidates(env) == expected


def test_no_display_is_one_line_without_looking_at_libraries():
    seen = []
    with pytest.raises(PlatformError, match="DISPLAY is not set") as info:
        check({}, platform="linux", missing=lambda p: seen.append(p) or [],
              connect=lambda b, d: "")
    assert "\n" not in str(info.value) and seen == []


def test_missing_libraries_name_their_packages(tmp_path, monkeypatch):
    plugins = _fake_plugins(tmp_path)
    fake_bin = _fake_ldd(tmp_path, LDD_MISSING)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    env = {"DISPLAY": ":99", "QT_QPA_PLATFORM_PLUGIN_PATH": str(plugins)}
    with pytest.raises(PlatformError) as info:
        check(env, platform="linux", connect=lambda b, d: pytest.fail("connected"))
    message = str(info.value)
    assert "\n" not in message
    assert "missing libxcb-icccm.so.4, libxcb-keysyms.so.1;" in message  # each once, in order
    assert message.endswith("sudo apt-get install libxcb-icccm4 libxcb-keysyms1")


def test_unknown_library_says_how_to_find_its_package(tmp_path):
    env = {"DISPLAY": ":99", "QT_QPA_PLATFORM_PLUGIN_PATH": str(_fake_plugins(tmp_path))}
    why = problem("xcb", env, missing=lambda p: ["libxcb-cursor.so.0", "libweird.so.3"])
    assert "missing libxcb-cursor.so.0, libweird.so.3" in why
    assert "apt-get install libxcb-cursor0" in why and "apt-file search" in why


def test_plugin_that_loads_still_needs_a_display_server(tmp_path):
    env = {"DISPLAY": ":99", "QT_QPA_PLATFORM_PLUGIN_PATH": str(_fake_plugins(tmp_path))}
    asked = []
    with pytest.raises(PlatformError, match="no X server"):
        check(env, platform="linux", missing=lambda p: [],
              connect=lambda base, display: asked.append((base, display)) or
              f"no X server answers on DISPLAY={display!r}")
    assert asked == [("xcb", ":99")]
    check(env, platform="linux", missing=lambda p: [], connect=lambda b, d: "")  # passes


def test_fallback_platform_rescues_and_both_reasons_are_given(tmp_path):
    env = {"DISPLAY": ":99", "XDG_SESSION_TYPE": "wayland",
           "QT_QPA_PLATFORM_PLUGIN_PATH": str(_fake_plugins(tmp_path))}

    def missing(plugin):
        return ["libwayland-cursor.so.0"] if "wayland" in plugin.name else []

    check(env, platform="linux", missing=missing, connect=lambda b, d: "")  # xcb takes over
    with pytest.raises(PlatformError) as info:
        check(env, platform="linux", missing=missing, connect=lambda b, d: "no X server")
    message = str(info.value)
    assert message.startswith("cannot open a window: wayland: ")
    assert "libwayland-cursor0" in message and "then xcb: no X server" in message


@pytest.mark.parametrize("env", [{"QT_QPA_PLATFORM": "offscreen"}, {"QT_QPA_PLATFORM": "minimal"}])
def test_offscreen_and_other_platforms_are_not_checked(env):
    check(env, platform="linux", missing=lambda p: pytest.fail("ldd"),
          connect=lambda b, d: pytest.fail("connect"))


def test_macos_and_windows_are_not_checked():
    for name in ("darwin", "win32"):
        check({}, platform=name, missing=lambda p: pytest.fail("ldd"))


def test_the_real_ldd_parse_finds_nothing_missing_for_a_system_library():
    libc = Path("/lib/x86_64-linux-gnu/libc.so.6")
    if not libc.exists() or shutil.which("ldd") is None:
        pytest.skip("needs glibc's ldd and libc at the Debian path")
    assert platform_check.ldd_missing(libc) == []


def _run_program(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _bare_env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISPLAY", "WAYLAND_DISPLAY", "XDG_SESSION_TYPE", "QT_QPA_PLATFORM")}
    return {**env, "XDG_CONFIG_HOME": str(tmp_path / "config"), **extra}


@pytest.mark.parametrize("platform", ["", "xcb"])
def test_program_without_display_exits_2_in_one_line(tmp_path, platform):
    env = _bare_env(tmp_path, **({"QT_QPA_PLATFORM": platform} if platform else {}))
    result = _run_program(env)
    assert result.returncode == 2, result.stderr  # not -6 (Qt's abort)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "DISPLAY is not set" in lines[0]
    assert lines[0].startswith("unitscale-explorer: error: ")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_program_with_missing_libraries_exits_2_naming_packages(tmp_path):
    env = _bare_env(tmp_path, DISPLAY=":99", QT_QPA_PLATFORM="xcb",
                    QT_QPA_PLATFORM_PLUGIN_PATH=str(_fake_plugins(tmp_path)),
                    PATH=f"{_fake_ldd(tmp_path, LDD_MISSING)}{os.pathsep}{os.environ['PATH']}")
    result = _run_program(env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "libxcb-icccm.so.4, libxcb-keysyms.so.1" in lines[0]
    assert "apt-get install libxcb-icccm4 libxcb-keysyms1" in lines[0]


def test_offscreen_skips_the_check(tmp_path):
    # a plugin path whose xcb "plugin" would fail the check: offscreen must not look at it
    script = textwrap.dedent("""
        import os, sys
        from app.platform_check import check
        check(); print("ok")
    """)
    env = _bare_env(tmp_path, QT_QPA_PLATFORM="offscreen",
                    QT_QPA_PLATFORM_PLUGIN_PATH=str(_fake_plugins(tmp_path)))
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def _explorer() -> str | None:
    """The installed ``unitscale-explorer`` of this interpreter's environment (else PATH's)."""
    beside = Path(sys.executable).with_name("unitscale-explorer")
    return str(beside) if beside.exists() else shutil.which("unitscale-explorer")


@pytest.fixture
def xvfb():
    """A fresh Xvfb on a free display (``-displayfd``: it picks and reports the number)."""
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not on PATH (apt-get install xvfb); real-window smoke test skipped")
    read_fd, write_fd = os.pipe()
    server = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0",
                               "1920x1080x24", "-nolisten", "tcp"], pass_fds=(write_fd,),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd) as pipe:  # Xvfb writes the number once it accepts clients
            number = pipe.readline().strip()
        if not number:
            pytest.fail(f"Xvfb did not start (exit code {server.poll()})")
        yield f":{number}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def _painted(png: Path):
    """(width, height, distinct colours, share of pixels on a sharp edge) of a PNG."""
    import numpy as np
    from PySide6.QtGui import QImage

    image = QImage(str(png)).convertToFormat(QImage.Format.Format_RGB32)
    w, h = image.width(), image.height()
    pixels = np.frombuffer(image.constBits(), np.uint32, count=h * image.bytesPerLine() // 4)
    pixels = pixels.reshape(h, -1)[:, :w]
    grey = ((pixels >> 16 & 255) + (pixels >> 8 & 255) + (pixels & 255)) / 3.0
    edges = float((np.abs(np.diff(grey, axis=1)) > 60).mean())  # glyph strokes, lines, markers
    return w, h, len(np.unique(pixels)), edges


def test_real_window_under_xvfb(tmp_path, xvfb):
    """The installed program opens a real xcb window under Xvfb and paints it."""
    from app.__main__ import SCREENSHOT_SIZE

    program = _explorer()
    if program is None:
        pytest.skip("unitscale-explorer is not installed in this environment")
    png = tmp_path / "window.png"
    env = _bare_env(tmp_path, DISPLAY=xvfb, QT_QPA_PLATFORM="xcb")
    result = subprocess.run([program, "--screenshot", str(png)], env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr  # a missing library is rc 2 with its name
    assert "saved" in result.stdout
    w, h, colours, edges = _painted(png)
    # the size asked for, or more where the window's minimum size is larger
    assert w >= SCREENSHOT_SIZE[0] and h >= SCREENSHOT_SIZE[1], (w, h)
    # a blank or single-colour window has 1-3 colours and no edges; the real one (antialiased
    # text, the chart's markers and bands, table rows) had 457 colours and 5.1% edge pixels
    assert colours > 150, colours
    assert edges > 0.01, edges


# -- exit ------------------------------------------------------------------------------------

_STUCK_SESSION = r"""
import sys, threading, time
from PySide6.QtCore import QTimer
import app.__main__ as program
import app.main_window as main_window

show = main_window.MainWindow.show
release = threading.Event()


def stuck():  # a job that never looks at the cancel flag (a model build, a tokenisation)
    release.wait(120)


def shown(window):
    show(window)
    window._confirm = False  # the quit prompt has its own test
    window.worker.submit("stuck", stuck)
    QTimer.singleShot(500, lambda: (print("closing", flush=True), window.close()))


main_window.MainWindow.show = shown
program.leave(program.main([]))
"""


def test_closing_with_a_stuck_job_ends_the_process(tmp_path):
    """The program (not a test window) leaves a job that ignores Cancel to die with the
    process: before, the close waited for it (up to the job's end: 30 s for a long text)."""
    env = _bare_env(tmp_path, QT_QPA_PLATFORM="offscreen")
    start = subprocess.Popen([sys.executable, "-c", _STUCK_SESSION], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = start.communicate(timeout=60)  # the job alone would hold it 120 s
    except subprocess.TimeoutExpired:
        start.kill()
        out, err = start.communicate()
        pytest.fail(f"the process did not end after the window closed: {out!r} {err[-500:]}")
    assert "closing" in out
    assert start.returncode == 0, err[-2000:]  # not -11 (SIGSEGV) nor -6 (Qt's abort)


def test_leave_flushes_output_and_exits_with_the_code(tmp_path):
    script = ("import logging, sys; from app.__main__ import leave\n"
              "logging.basicConfig(filename=sys.argv[1], level=logging.INFO)\n"
              "logging.getLogger('x').info('logged before leaving')\n"
              "sys.stdout.write('no newline, still buffered'); leave(3)\n")
    log = tmp_path / "log.txt"
    result = subprocess.run([sys.executable, "-c", script, str(log)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert result.stdout == "no newline, still buffered"  # a pipe: block-buffered till leave
    assert "logged before leaving" in log.read_text()


def test_main_exit_passes_argparse_codes(tmp_path):
    env = _bare_env(tmp_path, QT_QPA_PLATFORM="offscreen")
    help_run = _run_program(env, "--help")
    assert help_run.returncode == 0 and "--screenshot" in help_run.stdout
    bad = _run_program(env, "--no-such-flag")
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr


def test_screenshot_of_a_96_layer_config_ends(tmp_path):
    """A 96-layer config's --screenshot run ends, exit 0, no crash (the interpreter's teardown
    of its widgets took 19-69 s and is skipped now; the timeout here is generous on purpose:
    benchmarks/exit_time.py times it)."""
    import json

    config = json.loads((ROOT / "resources" / "presets" / "tiny.json").read_text())
    path = tmp_path / "deep.json"
    path.write_text(json.dumps({**config, "n_layers": 96}))
    png = tmp_path / "deep.png"
    result = _run_program(_bare_env(tmp_path, QT_QPA_PLATFORM="offscreen"), "--config",
                          str(path), "--screenshot", str(png), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert png.stat().st_size > 10_000


def _busy_window(qtbot, monkeypatch, *, confirm: bool):
    """A shown MainWindow whose worker runs a job until the returned event is set."""
    import threading

    from app.main_window import MainWindow

    window = MainWindow(confirm_unsaved=confirm)
    qtbot.addWidget(window)
    window.show()
    release = threading.Event()
    window.worker.submit("measure", release.wait, 30)
    qtbot.waitUntil(lambda: window.worker.activity() == ("measure",), timeout=5000)
    return window, release


@pytest.mark.parametrize(("answer", "stays_open"), [("Cancel", True), ("Yes", False)])
def test_quitting_while_a_job_runs_asks_first(qtbot, monkeypatch, answer, stays_open):
    from PySide6.QtWidgets import QMessageBox

    asked = []

    def question(parent, title, text, buttons, default):
        asked.append(text)
        return getattr(QMessageBox.StandardButton, answer)

    monkeypatch.setattr(QMessageBox, "question", question)
    window, release = _busy_window(qtbot, monkeypatch, confirm=True)
    try:
        window.close()
        assert len(asked) == 1 and "measure" in asked[0]
        assert window.isVisible() is stays_open
        assert window.worker.isRunning() is stays_open  # Yes: the job was cancelled, stopped
    finally:
        release.set()
        window.close()
        window.worker.wait(5000)


def test_no_prompt_when_idle_or_in_test_windows(qtbot, monkeypatch):
    from PySide6.QtWidgets import QMessageBox

    monkeypatch.setattr(QMessageBox, "question", lambda *a: pytest.fail("asked"))
    window, release = _busy_window(qtbot, monkeypatch, confirm=False)  # tests' windows
    release.set()
    window.close()
    assert not window.isVisible()


def test_training_between_chunks_counts_as_running_work(qtbot, monkeypatch):
    from app.main_window import MainWindow

    window = MainWindow()
    qtbot.addWidget(window)
    assert window.running_work() == ""
    monkeypatch.setattr(window.training_panel, "is_active", lambda: True)
    assert window.running_work() == "training"
    window.close()
