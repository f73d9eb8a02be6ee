"""Safe file access: atomic writes, checked destinations and bounded reads.

Writes go to a temporary file beside the target, then ``os.replace``: a crash or an error
part-way leaves the old file (or no file) in place, never half a file. The backup of the
previous version is written the same way, before the new file replaces the old one, so a
failed save (a full disk) keeps both the old file and the old backup whole.

Reads (:func:`read_regular_file`) take only regular files, at most a stated number of bytes,
opened non-blocking: a FIFO, ``/dev/zero`` or a socket named as a config can neither hang the
program nor fill its memory.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

#: Bytes read or copied per system call.
CHUNK = 1 << 20


class FileProblem(ValueError):
    """A file that cannot be read or written as asked; the message names it and why."""


def short_path(path: str | os.PathLike[str], limit: int = 80) -> str:
    """``path`` for a message: whole when short, else its start and end around an ellipsis."""
    text = os.fspath(path)
    text = text if isinstance(text, str) else os.fsdecode(text)
    return text if len(text) <= limit else f"{text[:limit // 2]}…{text[-(limit // 2 - 1):]}"


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``);
    elsewhere by setting it and putting it straight back."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte of ``data`` is written (a short write is not an error)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _temporary(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path`` with the mode a plain ``open`` would give it:
    ``0o666 & ~umask`` (``mkstemp`` alone makes it 0600, hiding saved files from others)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except OSError:  # a file system without modes (some network shares): keep mkstemp's
        pass
    return fd, tmp


def _copy_atomically(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` through a fsynced temporary file and ``os.replace``."""
    fd, tmp = _temporary(target)
    try:
        with open(source, "rb") as src:
            while chunk := src.read(CHUNK):
                _write_all(fd, chunk)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise


def check_destination(path: str | os.PathLike[str], what: str = "output") -> Path:
    """Refuse, before any work, a destination :func:`atomic_open` could not write.

    The folder must exist, be a folder and be writable (a temporary file is made there);
    ``path`` itself must not be a folder. Raises :class:`FileProblem` naming ``what``.
    """
    path = Path(path)
    folder = path.parent
    name, where = short_path(path), short_path(folder)
    try:
        if path.is_dir():
            raise FileProblem(f"{what} {name} is a folder; give a file name inside it")
        if not folder.exists():
            raise FileProblem(f"{what} {name}: folder {where} does not exist")
        if not folder.is_dir():
            raise FileProblem(f"{what} {name}: {where} is not a folder")
        if path.exists() and not path.is_file():
            raise FileProblem(f"{what} {name} exists and is not a regular file")
    except OSError as exc:  # a name too long, a loop of links, …
        raise FileProblem(f"{what} {name}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FileProblem(f"{what} {name}: folder {where} is not writable")
    return path


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w",
                backup: Path | None = None) -> Iterator[IO]:
    """Open a temporary file for writing; on success it replaces ``path`` (fsynced first).

    ``backup``: where to keep the previous version of ``path``. It is copied there first,
    atomically (temporary file, fsync, rename), and only then is the new file written: a
    failure in the copy (a full disk) leaves the old file and the old backup whole, a failure
    in the new file leaves the old file whole and the backup equal to it. At most one
    temporary file exists at any moment. ``mode`` is ``"w"`` (UTF-8 text) or ``"wb"``. The
    new file's mode is ``0o666 & ~umask``, as ``open`` would make it.
    """
    path = Path(path)
    if path.is_dir():  # else the work is done and only os.replace fails
        raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
    if backup is not None and path.is_file():
        _copy_atomically(path, backup)
    fd, tmp = _temporary(path)
    try:
        kwargs = {"encoding": "utf-8"} if "b" not in mode else {}
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_regular_file(path: str | os.PathLike[str], max_bytes: int,
                      what: str | None = None) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``max_bytes``.

    Checked with ``os.stat`` before opening, opened with ``O_NONBLOCK`` (a FIFO swapped in
    after the check cannot block the open) and checked again with ``fstat`` on the open file;
    at most ``max_bytes + 1`` bytes are read, so a file that grows is still refused. Raises
    :class:`FileProblem` naming ``what`` (default: the file's name) and the reason.
    """
    path = Path(path)
    name = what or short_path(path.name)

    def refuse_kind(mode: int) -> None:
        if stat.S_ISDIR(mode):
            raise FileProblem(f"{name} is a folder, not a file")
        if not stat.S_ISREG(mode):
            kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else \
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else \
                "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
            raise FileProblem(f"{name} is {kind}; only regular files are read")

    def refuse_size(size: int) -> None:
        from .sizing import format_bytes  # sizing imports config, which imports this module

        if size > max_bytes:
            raise FileProblem(f"{name} is {format_bytes(size)}, above the "
                              f"{format_bytes(max_bytes)} this file may have")

    try:
        info = os.stat(path)
    except OSError as exc:
        raise FileProblem(f"cannot read {name}: {exc.strerror or exc}") from None
    refuse_kind(info.st_mode)
    refuse_size(info.st_size)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise FileProblem(f"cannot read {name}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        refuse_kind(info.st_mode)
        refuse_size(info.st_size)
        parts, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(CHUNK, max_bytes + 1 - total))
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
        refuse_size(total)
        return b"".join(parts)
    except OSError as exc:
        raise FileProblem(f"cannot read {name}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
