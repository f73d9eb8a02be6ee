"""Can Qt open a window here?  Checked before the ``QApplication`` exists.

Without this, a missing system library or a missing display makes Qt abort the process (SIGABRT,
a core dump) with a message that can name the wrong package (Qt 6.5+ always blames
``libxcb-cursor0``).  :func:`check` mirrors Qt's own choice of platform plugin, and for the two
that need the desktop (``xcb``, ``wayland``) finds what would stop them:

* the plugin's shared libraries that the dynamic loader cannot find (``ldd`` on the installed
  plugin lists the whole dependency tree, including ``libQt6XcbQpa.so.6``'s), each with the
  Debian/Ubuntu package that provides it (:data:`DEBIAN_PACKAGES`, from ``dpkg -S`` on Debian 12);
* no display to talk to (``DISPLAY`` unset, or no X server / Wayland compositor answering).

Qt's choice, as PySide6 6.11's ``QGuiApplication`` makes it on Linux (read from its
``qt.qpa.plugin`` log, ``QT_LOGGING_RULES="qt.qpa.*=true"``): a non-empty ``QT_QPA_PLATFORM``
wins (a ``;``-separated list tried in order, ``name:arguments`` per entry); otherwise
``"wayland;xcb"`` when ``WAYLAND_DISPLAY`` is set (even empty) or ``XDG_SESSION_TYPE`` is exactly
``wayland``, else ``"xcb"``.  Qt takes the first entry that starts, so the check passes when any
entry would.  Other platforms (``offscreen``, ``minimal``, ``vnc``, ...) and other operating
systems (macOS's ``cocoa`` and Windows' ``windows`` plugins need nothing outside the wheel) are
not checked.

Cost: one ``ldd`` (about 20 ms) and one connect to the display; nothing when offscreen.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

# soname -> Debian/Ubuntu package, for every library outside the PySide6 wheel that the xcb and
# wayland platform plugins load (ldd of libqxcb.so / libqwayland.so, then `dpkg -S` on Debian 12).
DEBIAN_PACKAGES: dict[str, str] = {
    "libEGL.so.1": "libegl1",
    "libGL.so.1": "libgl1",
    "libGLX.so.0": "libglx0",
    "libGLdispatch.so.0": "libglvnd0",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libX11.so.6": "libx11-6",
    "libXau.so.6": "libxau6",
    "libXdmcp.so.6": "libxdmcp6",
    "libbrotlicommon.so.1": "libbrotli1",
    "libbrotlidec.so.1": "libbrotli1",
    "libbsd.so.0": "libbsd0",
    "libcap.so.2": "libcap2",
    "libdbus-1.so.3": "libdbus-1-3",
    "libexpat.so.1": "libexpat1",
    "libffi.so.8": "libffi8",
    "libfontconfig.so.1": "libfontconfig1",
    "libfreetype.so.6": "libfreetype6",
    "libgcrypt.so.20": "libgcrypt20",
    "libglib-2.0.so.0": "libglib2.0-0",
    "libgpg-error.so.0": "libgpg-error0",
    "libgthread-2.0.so.0": "libglib2.0-0",
    "liblz4.so.1": "liblz4-1",
    "liblzma.so.5": "liblzma5",
    "libmd.so.0": "libmd0",
    "libpcre2-8.so.0": "libpcre2-8-0",
    "libpng16.so.16": "libpng16-16",
    "libsystemd.so.0": "libsystemd0",
    "libwayland-client.so.0": "libwayland-client0",
    "libwayland-cursor.so.0": "libwayland-cursor0",
    "libwayland-egl.so.1": "libwayland-egl1",
    "libxcb-glx.so.0": "libxcb-glx0",
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-util.so.1": "libxcb-util1",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxcb.so.1": "libxcb1",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libz.so.1": "zlib1g",
    "libzstd.so.1": "libzstd1",
}

CHECKED = ("xcb", "wayland")  # the platforms that need the desktop's libraries and a display
_NOT_FOUND = re.compile(r"^\s*(\S+)\s+=>\s+not found\s*$", re.MULTILINE)


class PlatformError(ValueError):
    """The platform Qt would use cannot start; the message is one line and says what to do."""


def platform_candidates(environ: Mapping[str, str]) -> list[str]:
    """The platform plugins Qt will try, in order (see the module docstring for the rule)."""
    requested = environ.get("QT_QPA_PLATFORM", "")
    if requested:
        names = requested.split(";")
    elif "WAYLAND_DISPLAY" in environ or environ.get("XDG_SESSION_TYPE") == "wayland":
        names = ["wayland", "xcb"]
    else:
        names = ["xcb"]
    # "xcb:option=value" passes arguments to the plugin; "wayland-egl" is a key of libqwayland
    return [name.split(":", 1)[0].strip() for name in names if name.strip()]


def _plugin_file(name: str, environ: Mapping[str, str]) -> Path | None:
    """The plugin library Qt would load for platform ``name``, or None when none is found."""
    stem = "wayland" if name.startswith("wayland") else name
    dirs = [environ.get("QT_QPA_PLATFORM_PLUGIN_PATH", "")]
    dirs += [str(Path(p) / "platforms") for p in environ.get("QT_PLUGIN_PATH", "").split(":") if p]
    spec = importlib.util.find_spec("PySide6")  # no import: importing PySide6 costs time
    for location in (spec.submodule_search_locations or []) if spec else []:
        dirs.append(str(Path(location) / "Qt" / "plugins" / "platforms"))
    for d in dirs:
        if d and (Path(d) / f"libq{stem}.so").is_file():
            return Path(d) / f"libq{stem}.so"
    return None


def ldd_missing(library: Path) -> list[str]:
    """Sonames the dynamic loader cannot find for ``library`` or anything it loads.

    ``ldd`` walks the whole tree (the xcb plugin's own ``libQt6XcbQpa.so.6`` included). Where
    there is no ``ldd`` (musl without it), loading the plugin with ``ctypes`` names the first
    missing library instead.
    """
    ldd = shutil.which("ldd")
    if ldd:
        try:
            out = subprocess.run([ldd, str(library)], capture_output=True, text=True,
                                 timeout=10, check=False).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None:
            return list(dict.fromkeys(_NOT_FOUND.findall(out)))
    try:
        ctypes.CDLL(str(library), mode=os.RTLD_LAZY)
    except OSError as exc:
        found = re.match(r"(\S+?): cannot open shared object file", str(exc))
        return [found.group(1)] if found else [str(exc)]
    return []


def _connect_xcb(display: str) -> str:
    """Empty when an X server answers on ``display``, else why not (libxcb's own test)."""
    try:
        xcb = ctypes.CDLL("libxcb.so.1")
    except OSError:
        return "libxcb.so.1 cannot be loaded"
    xcb.xcb_connect.restype = ctypes.c_void_p
    xcb.xcb_connect.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    xcb.xcb_connection_has_error.argtypes = [ctypes.c_void_p]
    xcb.xcb_disconnect.argtypes = [ctypes.c_void_p]
    conn = xcb.xcb_connect(display.encode(), None)
    error = xcb.xcb_connection_has_error(conn)
    xcb.xcb_disconnect(conn)  # also frees the error object libxcb returns on failure
    if error:
        return f"no X server answers on DISPLAY={display!r} (libxcb error {error})"
    return ""


def _connect_wayland(display: str) -> str:
    """Empty when a Wayland compositor answers (``WAYLAND_DISPLAY``, default ``wayland-0``)."""
    try:
        wl = ctypes.CDLL("libwayland-client.so.0")
    except OSError:
        return "libwayland-client.so.0 cannot be loaded"
    wl.wl_display_connect.restype = ctypes.c_void_p
    wl.wl_display_connect.argtypes = [ctypes.c_char_p]
    wl.wl_display_disconnect.argtypes = [ctypes.c_void_p]
    conn = wl.wl_display_connect(display.encode() if display else None)
    if not conn:
        return f"no Wayland compositor answers on {display or 'wayland-0'!r}"
    wl.wl_display_disconnect(conn)
    return ""


def packages_for(sonames: list[str]) -> list[str]:
    """Debian/Ubuntu packages providing ``sonames``, in order, without repeats (known ones)."""
    return list(dict.fromkeys(DEBIAN_PACKAGES[s] for s in sonames if s in DEBIAN_PACKAGES))


def problem(name: str, environ: Mapping[str, str], *,
            missing: Callable[[Path], list[str]] = ldd_missing,
            connect: Callable[[str, str], str] | None = None) -> str:
    """Why platform ``name`` cannot start here, or "" when it can (or is not one we check)."""
    base = "wayland" if name.startswith("wayland") else name
    if base not in CHECKED:
        return ""
    if base == "xcb" and not environ.get("DISPLAY"):
        return ("DISPLAY is not set, so there is no X display to open a window on (run inside a "
                "desktop session or under Xvfb, or use QT_QPA_PLATFORM=offscreen with "
                "--screenshot)")
    plugin = _plugin_file(name, environ)
    if plugin is None:  # nothing to inspect: Qt will list the plugins it has
        return ""
    lacking = missing(plugin)
    if lacking:
        unknown = [s for s in lacking if s not in DEBIAN_PACKAGES]
        text = (f"the Qt {base} platform plugin cannot load: missing {', '.join(lacking)}")
        packages = packages_for(lacking)
        if packages:
            text += f"; install with: sudo apt-get install {' '.join(packages)}"
        if unknown:
            text += f" (find the package for {', '.join(unknown)} with apt-file search)"
        return text
    if connect is None:
        connect = _connect
    display = environ.get("DISPLAY", "") if base == "xcb" else environ.get("WAYLAND_DISPLAY", "")
    return connect(base, display)


def _connect(base: str, display: str) -> str:
    return _connect_xcb(display) if base == "xcb" else _connect_wayland(display)


def check(environ: Mapping[str, str] | None = None, *, platform: str = sys.platform,
          missing: Callable[[Path], list[str]] = ldd_missing,
          connect: Callable[[str, str], str] | None = None) -> None:
    """Raise :class:`PlatformError` (one line) when no platform Qt would try can start."""
    if not platform.startswith("linux"):
        return
    env = os.environ if environ is None else environ
    reasons = []
    for name in platform_candidates(env):
        why = problem(name, env, missing=missing, connect=connect)
        if not why:
            return  # Qt would start on this one
        reasons.append(why if len(reasons) == 0 else f"then {name}: {why}")
    if len(reasons) > 1:
        reasons[0] = f"{platform_candidates(env)[0]}: {reasons[0]}"
    raise PlatformError("cannot open a window: " + "; ".join(reasons))
