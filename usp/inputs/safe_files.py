"""Reading and writing the files of a run directory and its checkpoints without following links.

A run directory, or a checkpoint copied from somewhere else, may hold names that someone else
placed there: a symbolic link ``.lock -> ~/.bashrc`` would make a plain ``open(..., "w")`` write
over a file outside the run, and a link or a FIFO in place of ``latest`` would make a plain read
echo a file from elsewhere or block forever. Every file usp writes or reads inside a run
directory therefore goes through this module:

- a name is opened with ``O_NOFOLLOW`` (a link is refused by the kernel, not by a check that a
  race could overtake) and ``O_NONBLOCK`` (a FIFO cannot block the open), then ``fstat`` must say
  it is a regular file;
- a new file is created with ``O_CREAT | O_EXCL`` (never an existing name, link or not);
- a file is replaced atomically: its content goes into a temporary name created exclusively,
  then ``os.replace`` puts it in place (a rename replaces the name itself, never a link's target);
- a directory is created with ``mkdir`` and an existing one must be a real directory (``lstat``).

Every refusal is an :class:`UnsafePathError` (a ``ValueError``) naming the entry and what it is,
never what it points to holds. Inputs that live outside a run (data files, model and tokenizer
folders, which may be links into a download cache) are opened with ``follow_links=True``: links
are followed, and a FIFO or a device is still refused.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_NO_BLOCK = os.O_NONBLOCK | os.O_CLOEXEC
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


class UnsafePathError(ValueError):
    """A name in a run directory or checkpoint is not what usp reads or writes there."""


def describe(path: Path) -> str | None:
    """What ``path`` is, when it is not a regular file: ``"a symbolic link to '/etc/x'"``, ``"a
    FIFO (named pipe)"``...; None for a regular file or no entry at all."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # no entry (or a file where a folder is)
        return None
    if stat.S_ISLNK(mode):
        return f"a symbolic link to {os.readlink(path)!r}"
    return _kind(mode)


def _kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def refusal(path: Path, what: str) -> UnsafePathError:
    return UnsafePathError(
        f"{path} is {what}, not a regular file: usp never reads or writes through a link inside "
        "a run directory or a checkpoint, and never reads a FIFO or a device (nothing was read "
        "or written there); remove or replace it"
    )


def check_file_or_absent(path: Path) -> None:
    """Refuse a name that exists and is not a regular file (a link, a FIFO, a directory...)."""
    what = describe(path)
    if what is not None:
        raise refusal(path, what)


def check_directory_or_absent(path: Path) -> None:
    """Refuse a name that exists and is not a real directory (a link to one included)."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISDIR(mode):
        return
    what = (f"a symbolic link to {os.readlink(path)!r}" if stat.S_ISLNK(mode)
            else _kind(mode) or "a regular file")
    raise UnsafePathError(
        f"{path} is {what}, not a directory; usp keeps a run's files in real directories (never "
        "behind a link, which could send its writes elsewhere): pass the directory itself, or "
        "remove the entry"
    )


def open_regular(path: Path, flags: int, mode: int = 0o644, follow_links: bool = False) -> int:
    """``os.open`` that refuses links (unless ``follow_links``), FIFOs, devices and directories;
    returns a file descriptor of a regular file."""
    flags |= _NO_BLOCK | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_links:
            raise refusal(path, describe(path) or "a symbolic link") from None
        if exc.errno in (errno.EISDIR, errno.ENXIO):  # a directory, or a FIFO nobody reads
            found = (os.stat if follow_links else os.lstat)(path).st_mode
            raise refusal(path, _kind(found) or "not a regular file") from None
        raise
    kind = _kind(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise refusal(path, kind)
    os.set_blocking(fd, True)
    return fd


def read_bytes(path: Path, limit: int | None = None, follow_links: bool = False) -> bytes:
    """The bytes of the regular file ``path``; a ValueError naming it when it holds more than
    ``limit`` bytes (a pointer or a settings file is small; a huge one is not ours)."""
    fd = open_regular(path, os.O_RDONLY, follow_links=follow_links)
    with os.fdopen(fd, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if limit is not None and size > limit:
            raise UnsafePathError(f"{path} holds {size} bytes, more than such a file ever holds "
                                  f"({limit}); it was not read")
        return file.read()


def read_text(path: Path, limit: int | None = None, follow_links: bool = False) -> str:
    return read_bytes(path, limit, follow_links).decode("utf-8")


def write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist, as a link or anything else) and write ``data``."""
    fd = open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def remove_stale(path: Path) -> None:
    """Remove a leftover temporary file: a regular file or a link (``unlink`` removes the link
    itself, never its target); anything else is refused."""
    what = describe(path)
    if what is not None and not what.startswith("a symbolic link"):
        raise refusal(path, what)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def replace(path: Path, data: bytes) -> None:
    """Atomically make ``path`` a regular file holding ``data``: written to ``PATH.tmp``
    (created exclusively), then renamed over ``path``, which must be a regular file or absent."""
    path = Path(path)
    check_file_or_absent(path)
    temporary = path.with_name(path.name + ".tmp")
    remove_stale(temporary)
    write_new(temporary, data)
    os.replace(temporary, path)


def open_append(path: Path):
    """``path`` opened for appending text (created if absent), refusing links and FIFOs."""
    fd = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return os.fdopen(fd, "a")


def make_directory(path: Path) -> None:
    """Create the directory ``path`` (its parent must exist) or accept an existing real one."""
    try:
        os.mkdir(path)
    except FileExistsError:
        check_directory_or_absent(path)
