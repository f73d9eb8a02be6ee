"""Atomic file writes: write a temporary file beside the target, then ``os.replace``.

A crash or an error part-way leaves the old file (or no file) in place, never half a file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w",
                backup: Path | None = None) -> Iterator[IO]:
    """Open a temporary file for writing; on success it replaces ``path`` (fsynced first).

    ``backup``: where to copy the previous version of ``path`` before replacing it.
    ``mode`` is ``"w"`` (UTF-8 text) or ``"wb"``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        kwargs = {"encoding": "utf-8"} if "b" not in mode else {}
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if backup is not None and path.exists():
            backup.write_bytes(path.read_bytes())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
