"""Files written and read safely: atomic writes, bounded reads, printable text from files.

``atomic_write`` is the one way monolith-torch replaces a file (checkpoints,
predictions, generated data): the bytes go to a new temp file in the target's
directory, created exclusively under an unpredictable name
(``.<name>.tmp-<16 hex>``, ``O_CREAT | O_EXCL | O_NOFOLLOW``), are fsynced,
renamed over the target and the directory is fsynced. A symlink planted at a
temp name cannot redirect the write (the name is not guessable and an existing
name is never opened), and ``rename`` replaces a directory entry, never what a
link points to. A target that already is a symlink is refused
(``SymlinkTargetError``) rather than silently turned into a regular file. A
write that fails or is interrupted (an exception, ``KeyboardInterrupt``)
removes its temp file and leaves the target as it was; a process killed with
SIGKILL leaves the temp file, which ``temp_files`` finds by its prefix.

Imports only the standard library.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Iterator
from typing import IO

__all__ = [
    "SymlinkTargetError",
    "append_file",
    "atomic_write",
    "check_target",
    "printable",
    "read_limited",
    "temp_files",
]

_TEMP_RE = re.compile(r"\.(?P<name>.+)\.tmp-[0-9a-f]{16}")


class SymlinkTargetError(OSError):
    """A file to be written is a symbolic link; monolith-torch neither follows nor replaces it."""

    def __init__(self, path: str):
        super().__init__(errno.ELOOP, "is a symbolic link; refusing to write through or replace it", path)

    def __str__(self) -> str:
        return f"{self.filename!r} {self.strerror}"


def check_target(path: str | os.PathLike) -> str:
    """Checks that ``path`` can be replaced by ``atomic_write``; returns it as an absolute path.

    Raises:
        SymlinkTargetError: ``path`` is a symbolic link (dangling or not).
        IsADirectoryError: ``path`` is a directory.
        FileNotFoundError / NotADirectoryError: its directory does not exist.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.islink(path):
        raise SymlinkTargetError(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a directory", path)
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(errno.ENOENT, "directory does not exist", directory)
    return path


def _create_temp(directory: str, name: str) -> tuple[int, str]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.tmp-{secrets.token_hex(8)}")
        try:
            # 0o666 under the umask: the file gets the permissions a plain open() would give.
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temp name after 100 tries", directory)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str = "utf-8") -> Iterator[IO]:
    """Replaces ``path`` atomically with what the ``with`` body writes to the yielded file.

    Args:
        path: the target file; its directory must exist.
        mode: ``"wb"`` (bytes) or ``"w"`` (text in ``encoding``, ``\\n`` line ends).
        encoding: the text encoding for ``mode="w"``.

    Raises:
        ValueError: a mode other than ``"wb"`` or ``"w"``.
        SymlinkTargetError, IsADirectoryError, FileNotFoundError: see ``check_target``;
            raised before anything is created.
        OSError: the write, fsync or rename failed; the temp file is removed and
            the target is untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"Invalid mode: {mode!r} (expected 'wb' or 'w')")
    path = check_target(path)
    directory, name = os.path.split(path)
    fd, tmp = _create_temp(directory, name)
    renamed = False
    try:
        if mode == "wb":
            f = os.fdopen(fd, "wb")
        else:
            f = os.fdopen(fd, "w", encoding=encoding, newline="\n")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        renamed = True
        _fsync_dir(directory)
    except BaseException:
        if not renamed:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def temp_files(path: str | os.PathLike) -> list[str]:
    """Temp files ``atomic_write`` left for ``path`` (a process killed mid-write), sorted."""
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    return sorted(
        os.path.join(directory, e) for e in entries if (m := _TEMP_RE.fullmatch(e)) and m.group("name") == name
    )


def append_file(path: str | os.PathLike, encoding: str = "utf-8") -> IO[str]:
    """Opens ``path`` for appending text, creating it; a symbolic link there is refused, not followed.

    Raises:
        SymlinkTargetError: ``path`` is a symbolic link.
        OSError: it cannot be opened.
    """
    path = os.fspath(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP and os.path.islink(path):
            raise SymlinkTargetError(path) from None
        raise
    return os.fdopen(fd, "a", encoding=encoding)


def read_limited(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of ``path``, read without ever holding more than ``max_bytes + 1`` of them.

    Raises:
        OSError: it cannot be read.
        ValueError: it holds more than ``max_bytes`` bytes (``/dev/zero``, a huge file).
    """
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{os.fspath(path)!r} is larger than {max_bytes} bytes")
    return data


def printable(text: str | bytes, limit: int | None = None) -> str:
    """``text`` safe to print on a terminal: control and other non-printable characters escaped.

    Text read from data files or paths may hold ESC/OSC sequences or invalid
    UTF-8; every message that quotes such text passes it through here first.
    Bytes are decoded as UTF-8 with invalid bytes written ``\\xNN``; a control
    character becomes its Python escape (``\\x1b``, ``\\t``, ``\\u202e``).

    Args:
        text: the text (or raw bytes) to show.
        limit: keep at most this many characters of ``text`` (before escaping),
            marking a cut with ``...``.
    """
    if isinstance(text, bytes | bytearray | memoryview):
        text = bytes(text).decode("utf-8", "backslashreplace")
    cut = limit is not None and len(text) > limit
    if cut:
        text = text[:limit]
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text + "..." if cut else text
