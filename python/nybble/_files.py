"""Opening the files nybble reads: regular files only, small JSON files bounded.

A FIFO given as input would block ``open()`` until a writer appears (and ignore Ctrl-C
while it waits); a character device would stream forever. Every reader of a path the user
names (checkpoint shards and their headers in Rust, config.json, the shard index,
adapter_config.json, adapter weights, training data) refuses anything but a regular file
(symlinks followed) before reading a byte, with the same error as the Rust core:
:class:`nybble.errors.CorruptFileError` whose ``reason`` says "not a regular file (a FIFO)".
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from .errors import CorruptFileError

#: Largest JSON side file read (config.json, adapter_config.json): real ones are a few KB.
MAX_JSON_BYTES = 64 << 20


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def not_regular_error(path: Path, mode: int) -> CorruptFileError:
    reason = f"not a regular file ({_kind(mode)})"
    return CorruptFileError(f"{path}: {reason}; nybble reads regular files only", path=path, reason=reason)


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Opens ``path`` for binary reading if it is a regular file; else
    :class:`~nybble.errors.CorruptFileError` (``FileNotFoundError`` etc. when it cannot be
    opened at all). The type is checked on the path and again on the open descriptor, which is
    opened ``O_NONBLOCK`` so that nothing swapped in between can block the open."""
    path = Path(path)
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise not_regular_error(path, mode)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular_error(path, mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_text(path: str | os.PathLike) -> io.TextIOWrapper:
    """:func:`open_regular` as UTF-8 text."""
    return io.TextIOWrapper(open_regular(path), encoding="utf-8")


def read_json_file(path: str | os.PathLike, limit: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in a regular file of at most ``limit`` bytes, parsed strictly
    (:func:`nybble.formats.parse_json`). Raises ``ValueError`` (with the path) for a file too
    large or not valid JSON, :class:`~nybble.errors.CorruptFileError` for a non-regular file."""
    from .formats import parse_json

    path = Path(path)
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: larger than the {limit}-byte limit for a JSON file")
    return parse_json(data, str(path))
