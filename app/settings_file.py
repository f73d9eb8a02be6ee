"""The session's settings file: found without reading it, checked before Qt reads it, and a
damaged one kept aside before anything is written over it.

On Linux (and wherever QSettings keeps an INI file) the settings are one text file,
``~/.config/UnitScalingExplorer/unitscale-explorer.conf``. Qt reads whatever is there without
complaint: binary garbage, an empty file and NUL bytes all read as "no settings" with
``QSettings.status() == NoError``, and a FIFO in its place blocks the constructor for good.
So the program looks first (:func:`settings_damage`):

- only a regular file of at most :data:`MAX_SETTINGS_BYTES` is read, never blocking
  (:func:`unitscale_core.atomic.read_regular_file`);
- it must be what Qt writes: UTF-8 text without control characters (Qt escapes them), each
  line blank, a comment, a ``[section]`` or a ``key=value``, and not empty.

A damaged file is never modified: its bytes are first copied, atomically, to
``unitscale-explorer.conf.damaged`` (``.damaged.2`` … when that exists,
:func:`keep_damaged_copy`); only then does the session start on the defaults and write its
own settings on close. Where no copy can be kept, or the file cannot be read at all (a FIFO, a
device, no permission), the session's settings are not saved and the notice says so.
"""

from __future__ import annotations

import os
from pathlib import Path

from unitscale_core.atomic import FileProblem, atomic_open, read_regular_file

#: Largest settings file read (the program writes a few kilobytes: a config, a recent list,
#: each panel's choices up to :data:`app.widgets.controls_state.MAX_TEXT` characters, and the
#: window layout).
MAX_SETTINGS_BYTES = 4 << 20
#: Copies of damaged settings files kept side by side before the oldest is reused.
MAX_DAMAGED_COPIES = 9
DAMAGED_SUFFIX = ".damaged"


def settings_damage(path: str | os.PathLike[str]) -> tuple[str | None, bytes | None]:
    """``(reason, data)``: why the settings file at ``path`` cannot be used (None when it can,
    or when there is none yet) and its bytes when they could be read (None when not, e.g. a
    FIFO or a device: then the file must not be opened by QSettings either)."""
    path = Path(path)
    if not os.path.lexists(path):
        return None, None  # the first launch
    try:
        data = read_regular_file(path, MAX_SETTINGS_BYTES, what=f"settings file {path.name}")
    except FileProblem as exc:
        return str(exc), None
    return content_damage(data), data


def content_damage(data: bytes) -> str | None:
    """Why ``data`` is not a settings file Qt wrote (None when it could be): empty, NUL bytes,
    not UTF-8, control characters, or a line that is neither a section, a comment nor a
    ``key=value``. The reason names the line."""
    if not data.strip():
        return "is empty"
    if b"\x00" in data:
        line = data.count(b"\n", 0, data.index(b"\x00")) + 1
        return f"holds NUL bytes (line {line})"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return f"is not UTF-8 text (line {line})"
    continued = False
    for number, line in enumerate(text.splitlines(), start=1):
        if any(ord(c) < 32 and c != "\t" for c in line):
            return f"holds control characters (line {number})"
        stripped = line.strip()
        ok = continued or not stripped or stripped[0] in ";#" or \
            (stripped.startswith("[") and stripped.endswith("]")) or \
            ("=" in stripped and not stripped.startswith("="))
        if not ok:
            return f"line {number} is not a setting ({stripped[:30]!r})"
        continued = line.endswith("\\") and (len(line) - len(line.rstrip("\\"))) % 2 == 1
    return None


def keep_damaged_copy(path: str | os.PathLike[str], data: bytes) -> Path:
    """Copy ``data`` (the damaged file's bytes) to ``PATH.damaged`` — or the first free
    ``PATH.damaged.N`` up to :data:`MAX_DAMAGED_COPIES`, else the oldest of them — atomically.
    Returns where; raises OSError when it cannot be written."""
    path = Path(path)
    candidates = [path.with_name(path.name + DAMAGED_SUFFIX)] + [
        path.with_name(f"{path.name}{DAMAGED_SUFFIX}.{n}") for n in
        range(2, MAX_DAMAGED_COPIES + 1)]
    free = [c for c in candidates if not os.path.lexists(c)]
    if free:
        target = free[0]
    else:
        target = min(candidates, key=lambda c: c.lstat().st_mtime)
    with atomic_open(target, "wb") as handle:
        handle.write(data)
    return target
