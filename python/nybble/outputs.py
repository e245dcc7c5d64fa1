"""The one output policy: where nybble may write, what it may replace, and how.

Every command and API that writes uses this module: ``nybble quantize`` / ``dequantize``
(:func:`staged_output`, through ``checkpoint.quantize_checkpoint`` /
``dequantize_checkpoint``), ``nybble finetune`` and its trainer, and ``save_adapter``
(:func:`claim_folder`). The rules (the README's "Reliability" section states them for users):

1. **No output overlaps an input.** An output is refused when it is an input, is inside one
   or contains one; paths are compared after resolving symbolic links (``os.path.realpath``),
   so a link or a ``..`` cannot hide an input.
2. **nybble knows its own folders by a marker.** Every folder nybble creates holds
   ``.nybble-output.json`` (``written_by: "nybble"``, the command, the version and, for
   whole-folder outputs, every entry it wrote). ``--overwrite`` (``overwrite=True``)
   replaces an existing folder only when it is a real folder (not a link, not a file) whose
   marker says ``quantize`` or ``dequantize`` wrote it and which holds nothing but the
   entries that marker lists; anything else is refused with a message naming the path.
   Folders written in place (``save_adapter``, ``finetune``'s output and checkpoints) must be
   new, empty, or already marked by ``save_adapter`` / ``finetune``. Folders without a
   marker (other tools', or written by nybble before markers existed) are never replaced.
3. **Replacement is atomic.** A whole-folder output is built in a hidden staging folder
   beside the target and swapped in with one ``renameat2(RENAME_EXCHANGE)`` (a new output:
   ``renameat2(RENAME_NOREPLACE)``), after which the previous contents, now under the staging
   name, are removed. Where ``renameat2`` is missing (not Linux, glibc < 2.28) or the file
   system refuses it (``EINVAL`` / ``ENOSYS`` / ``ENOTSUP``), the fallback is two renames:
   the old folder to ``.NAME.nybble-old-...``, the new one into place; a kill between them
   leaves the old folder under that name and the next run for the same output renames it
   back.
4. **Signals clean up.** While a whole-folder output is staged, SIGINT, SIGTERM and SIGHUP
   (those left at their default action; an ignored SIGHUP, e.g. under ``nohup``, stays
   ignored) raise :class:`OutputInterrupted`: the staging folder is removed and the CLI
   exits 128 + the signal number (130, 143, 129). Staging folder names carry the host, the
   boot, the pid and the process start time of their writer; a run removes the staging
   folders (in the output's parent folder) whose writer is dead: same host, and another boot
   or no live process with that pid and start time. Folders of live processes, of other
   hosts, and anything not named and shaped as nybble names them, are never touched.
5. **One writer per output.** A run holds ``fcntl.flock`` on ``.NAME.nybble-lock`` beside
   the output for its duration; a second run fails at once (:class:`OutputLockedError`). The
   lock file is removed when the run ends; one left by a killed run is harmless (the kernel
   dropped its lock) and is removed by the next run.
6. **Modes follow the umask.** Files nybble writes are ``0o666 & ~umask`` and folders
   ``0o777 & ~umask``, as any program's new files; copied files do not keep the source's
   mode.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: The marker file inside every folder nybble creates.
MARKER = ".nybble-output.json"
MARKER_FORMAT = 1
#: Commands whose output folders ``--overwrite`` may replace (built whole, then swapped in).
REPLACEABLE_COMMANDS = ("quantize", "dequantize")
#: Commands that write into a folder in place (adapter files, checkpoints).
IN_PLACE_COMMANDS = ("finetune", "save_adapter")
#: The lock file beside output ``NAME`` is ``.NAME`` + this.
LOCK_SUFFIX = ".nybble-lock"

_MAX_MARKER_BYTES = 16 << 20


class OutputError(ValueError):
    """An output nybble refuses to write (the message names the path and why)."""


class OutputExistsError(OutputError, FileExistsError):
    """The output path exists and overwriting was not asked for (or is not allowed)."""


class OutputLockedError(OutputError):
    """Another nybble run is writing the same output."""


class OutputInterrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP stopped a run; the staging folder is removed. ``committed``:
    the signal came while the finished output was being moved into place, which completed."""

    def __init__(self, signum: int, committed: bool = False):
        self.signum = int(signum)
        self.committed = committed
        super().__init__(self.signal_name)

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        """The shell's status for a process stopped by this signal (130, 143, 129)."""
        return 128 + self.signum


def exit_code_of(interrupt: BaseException) -> int:
    """128 + the signal of an interrupt (a plain KeyboardInterrupt is SIGINT: 130)."""
    return getattr(interrupt, "exit_code", 128 + signal.SIGINT)


# ----------------------------------------------------------------------------- paths


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def check_overlap(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *,
                  may_contain: bool = False) -> None:
    """Refuses an output that is an input, is inside one or (unless ``may_contain``)
    contains one, comparing real paths (symbolic links resolved)."""
    ro = _real(out)
    for inp in inputs:
        if inp is None:
            continue
        ri = _real(inp)
        given = (os.fspath(out), os.fspath(inp))
        real_note = "" if given == (str(ro), str(ri)) else f" (real paths {ro} and {ri})"
        if ro == ri:
            same = "" if given == (str(ro), str(ri)) else f" (both are {ro})"
            raise OutputError(f"output {out} must not be the input or inside it: it is the input {inp}{same}")
        if ri in ro.parents:
            raise OutputError(f"output {out} must not be the input or inside it: it is inside the input {inp}"
                              f"{real_note}")
        if ro in ri.parents and not may_contain:
            raise OutputError(f"output {out} must not contain an input: the input {inp} is inside it{real_note}")


# ----------------------------------------------------------------------------- the marker


def _version() -> str:
    try:
        from ._core import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover - the extension is always built
        return "unknown"


def read_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of a folder nybble wrote, or None (no marker, or not a valid one)."""
    path = Path(folder) / MARKER
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_MARKER_BYTES:
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not (isinstance(marker, dict) and marker.get("written_by") == "nybble"
            and isinstance(marker.get("command"), str)):
        return None
    entries = marker.get("entries")
    if entries is not None and not (isinstance(entries, list) and all(isinstance(e, str) for e in entries)):
        return None
    return marker


def write_marker(folder: str | os.PathLike, command: str, entries: list[str] | None = None) -> None:
    """Writes ``.nybble-output.json`` into ``folder`` (aside, then renamed into place)."""
    folder = Path(folder)
    marker: dict[str, Any] = {
        "written_by": "nybble",
        "format": MARKER_FORMAT,
        "command": command,
        "nybble_version": _version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if entries is not None:
        marker["entries"] = entries
    tmp = folder / f"{MARKER}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, folder / MARKER)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _entries(folder: Path) -> list[str]:
    """Every file, folder and link under ``folder`` (relative, '/'-separated), links not
    followed, the marker left out."""
    found = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for name in dirs + files:
            entry = (rel / name).as_posix()
            if entry != MARKER:
                found.append(entry)
    return sorted(found)


def _not_replaceable(out: Path) -> str | None:
    """Why ``--overwrite`` may not replace ``out`` (None: it may)."""
    st = os.lstat(out)
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link (--overwrite replaces only a folder nybble wrote, never a link or its target)"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder nybble wrote (it is a file)"
    marker = read_marker(out)
    if marker is None:
        return (f"was not written by nybble (it has no {MARKER}); --overwrite replaces only nybble's own "
                "output folders: remove it yourself or choose another output")
    if marker["command"] not in REPLACEABLE_COMMANDS or marker.get("entries") is None:
        return (f"is the output of nybble {marker['command']}, which --overwrite never replaces (only "
                f"{' / '.join(REPLACEABLE_COMMANDS)} outputs)")
    extra = sorted(set(_entries(out)) - set(marker["entries"]))
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        return (f"holds files nybble did not write ({', '.join(extra[:5])}{more}); --overwrite refused: "
                "move them out or remove the folder yourself")
    return None


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], overwrite: bool) -> None:
    """The checks before a whole-folder output is written: no overlap with an input, and an
    existing ``out`` only with ``overwrite`` and only when nybble wrote it."""
    out = Path(out)
    check_overlap(out, inputs)
    if not os.path.lexists(out):
        return
    why = _not_replaceable(out)
    if not overwrite:
        if why is None:
            raise OutputExistsError(f"{out} already exists (pass --overwrite to replace it)")
        raise OutputExistsError(f"{out} already exists and {why}")
    if why is not None:
        raise OutputError(f"cannot overwrite {out}: it {why}")


def claim_folder(folder: str | os.PathLike, command: str,
                 inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Makes ``folder`` ready for ``command`` to write into in place: creates it with a
    marker, or accepts it when it is empty (then marks it) or already marked by
    ``save_adapter`` / ``finetune``; refuses anything else."""
    folder = Path(folder)
    check_overlap(folder, inputs)
    if os.path.lexists(folder) and not folder.is_dir():
        raise OutputError(f"output {folder} exists and is not a folder")
    if folder.is_dir():
        marker = read_marker(folder)
        if marker is not None:
            if marker["command"] in IN_PLACE_COMMANDS:
                return folder
            raise OutputError(f"output {folder} is the output of nybble {marker['command']}; "
                              f"write the {command} output to another folder")
        with os.scandir(folder) as it:
            if any(True for _ in it):
                raise OutputError(f"output {folder} already holds files nybble did not write (it has no "
                                  f"{MARKER}); {command} writes only into a new or empty folder, or one it wrote "
                                  "before: choose another output")
    else:
        folder.mkdir(parents=True, exist_ok=True)
    write_marker(folder, command)
    return folder


# ----------------------------------------------------------------------------- file modes


def umask() -> int:
    """The process umask (read from /proc on Linux; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a new ordinary file: 0o666 less the umask."""
    return 0o666 & ~umask()


def honour_umask(path: str | os.PathLike) -> None:
    """Gives a file nybble wrote the mode a new ordinary file gets (writers such as
    safetensors' create theirs 0600 through a temporary file)."""
    os.chmod(path, file_mode())


def copy_tree(src: Path, dst: Path) -> None:
    """Copies a file or folder (links followed, as ``copytree(symlinks=False)``); files keep
    their times but get the umask's mode, not the source's."""
    if src.is_dir():
        dst.mkdir()
        for child in sorted(src.iterdir()):
            copy_tree(child, dst / child.name)
    else:
        shutil.copy2(src, dst)
        honour_umask(dst)


def _fsync_tree(folder: Path) -> None:
    """Makes a staged folder durable before it becomes visible under its final name."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- renameat2

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)}


class RenameUnsupported(OSError):
    """renameat2 is missing here, or this file system refuses the flag."""


def _load_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2_fn = _load_renameat2()


def renameat2(src: str | os.PathLike, dst: str | os.PathLike, flags: int) -> None:
    """``renameat2(AT_FDCWD, src, AT_FDCWD, dst, flags)``; :class:`RenameUnsupported` when
    it is missing or the file system refuses ``flags``."""
    if _renameat2_fn is None:
        raise RenameUnsupported(errno.ENOSYS, "renameat2 is not available", os.fspath(src))
    if _renameat2_fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        if err in _UNSUPPORTED:
            raise RenameUnsupported(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))
        raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))


def _move_new(staging: Path, out: Path) -> None:
    """Renames ``staging`` to ``out`` only if ``out`` does not exist (atomically where
    RENAME_NOREPLACE works)."""
    try:
        renameat2(staging, out, RENAME_NOREPLACE)
        return
    except RenameUnsupported:
        pass
    except FileExistsError:
        raise OutputExistsError(f"{out} appeared while it was being written (not by nybble); "
                                "the new output was discarded") from None
    if os.path.lexists(out):
        raise OutputExistsError(f"{out} appeared while it was being written (not by nybble); "
                                "the new output was discarded")
    os.rename(staging, out)


def _swap_in(staging: Path, out: Path) -> Path:
    """Puts ``staging`` at ``out`` in place of the existing output; returns where the old
    contents now are (to be removed). One RENAME_EXCHANGE, else two renames."""
    try:
        renameat2(staging, out, RENAME_EXCHANGE)
        return staging
    except RenameUnsupported:
        pass
    old = out.parent / _temp_name(out.name, "old")
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old, out)
        raise
    return old


# ----------------------------------------------------------------------------- staging names

_TEMP_RE = re.compile(
    r"^\.(?P<name>.+)\.nybble-(?P<tag>staging|old)-(?P<host>[0-9a-f]{12})-(?P<boot>[0-9a-f]{12})-"
    r"(?P<pid>[0-9]+)-(?P<start>[0-9]+)-[0-9a-f]{8}$",
    re.DOTALL,
)
#: Longest output name kept whole in a staging name (NAME_MAX is 255).
_NAME_KEEP = 150


def _host_id() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:12]


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip().replace("-", "").lower()
        if re.fullmatch(r"[0-9a-f]{12,}", boot):
            return boot[:12]
    except OSError:
        pass
    return "0" * 12


def process_start_time(pid: int) -> int | None:
    """A process's start time (clock ticks after boot, /proc/PID/stat field 22), or None
    when it does not exist or this system has no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def _temp_name(out_name: str, tag: str) -> str:
    pid = os.getpid()
    start = process_start_time(pid) or 0
    return (f".{out_name[:_NAME_KEEP]}.nybble-{tag}-{_host_id()}-{_boot_id()}-{pid}-{start}-"
            f"{secrets.token_hex(4)}")


def _writer_is_dead(m: re.Match) -> bool:
    if m["host"] != _host_id():
        return False  # another machine sharing this file system: its processes are not ours to judge
    if m["boot"] != _boot_id():
        return True  # written before this machine last booted
    pid, start = int(m["pid"]), int(m["start"])
    if pid <= 0:
        return False
    now = process_start_time(pid)
    if now is not None:
        return start != 0 and now != start  # the pid now belongs to another process
    if os.path.isdir("/proc/self"):
        return True  # /proc works and has no such process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def remove_dead_staging(parent: str | os.PathLike, out_name: str | None = None) -> list[str]:
    """Removes the staging folders in ``parent`` left by dead nybble runs (for any output),
    and lock files nobody holds; for output ``out_name``, also settles a replacement the
    fallback left half done: the old folder is renamed back when the output is missing,
    removed when it is in place. Returns the names removed or restored. Only entries named
    and shaped as nybble names them, owned by this user, are touched."""
    parent = Path(parent)
    done = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return done
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(LOCK_SUFFIX):
            if _remove_stale_lock(parent / entry.name):
                done.append(entry.name)
            continue
        m = _TEMP_RE.match(entry.name)
        if m is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            continue
        if not _writer_is_dead(m):
            continue
        path = parent / entry.name
        if m["tag"] == "old":
            if out_name is None or m["name"] != out_name or len(out_name) >= _NAME_KEEP:
                continue  # another output's previous folder: its own next run settles it
            if not os.path.lexists(parent / out_name):
                try:
                    os.rename(path, parent / out_name)  # the replacement never happened: restore
                    done.append(entry.name)
                except OSError:
                    pass
                continue
        shutil.rmtree(path, ignore_errors=True)
        done.append(entry.name)
    return done


# ----------------------------------------------------------------------------- locking


class OutputLock:
    """``fcntl.flock`` on ``.NAME.nybble-lock`` beside output ``NAME``, held while a run
    writes it. Not blocking: a second run fails at once with :class:`OutputLockedError`.
    The file is removed on release (the inode is checked after locking, so a lock on a
    file another run just removed is never taken for the lock)."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out.parent / f".{self.out.name}{LOCK_SUFFIX}"
        self.fd: int | None = None

    def acquire(self) -> OutputLock:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        for _ in range(100):
            try:
                fd = os.open(self.path, flags, 0o666)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                    raise OutputError(f"cannot lock {self.out}: {self.path} is not a lock file nybble wrote") from None
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_pid(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    by = f" (pid {holder})" if holder else ""
                    raise OutputLockedError(f"{self.out} is being written by another nybble run{by}: wait for it "
                                            f"to finish or choose another output (lock file {self.path})") from None
                raise
            try:
                st = os.stat(self.path, follow_symlinks=False)
                same = (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
            except FileNotFoundError:
                same = False
            if not same:  # the run before us removed the file after we opened it: try again
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            return self
        raise OutputLockedError(f"{self.out}: could not take the lock file {self.path}")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding the lock
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _remove_stale_lock(path: Path) -> bool:
    """Removes a lock file nobody holds (left by a killed run): taken, checked to be still
    the file at ``path``, unlinked while held, exactly as a run releases its own."""
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # held: a live run
        try:
            now = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


# ----------------------------------------------------------------------------- signals


def _terminating_signals() -> list[int]:
    return [s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None]


class SignalGuard:
    """Within ``with``: SIGINT, SIGTERM and SIGHUP raise :class:`OutputInterrupted` where
    they would otherwise kill the process (default action, or Python's default SIGINT
    handler); ignored or custom handlers are left alone. :meth:`deferred` holds a signal
    back until a step that must not be cut (the final swap) is done. Main thread only."""

    def __init__(self):
        self._saved: dict[int, Any] = {}
        self._defer = False
        self.pending: int | None = None

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in _terminating_signals():
            previous = signal.getsignal(sig)
            if previous in (signal.SIG_DFL, signal.default_int_handler):
                self._saved[sig] = previous
                signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if self._defer:
            self.pending = signum
            return
        raise OutputInterrupted(signum)

    @contextmanager
    def deferred(self, raise_after: bool = False) -> Iterator[None]:
        """Signals inside are held back; with ``raise_after``, one that came is raised as
        soon as the block is done (so a step such as creating the staging folder and
        recording it happens whole, or not at all); otherwise it stays in ``pending``."""
        self._defer = True
        try:
            yield
        finally:
            self._defer = False
        if raise_after and self.pending is not None:
            signum, self.pending = self.pending, None
            raise OutputInterrupted(signum)

    def __exit__(self, *exc) -> bool:
        for sig, previous in self._saved.items():
            signal.signal(sig, previous)
        self._saved.clear()
        return False


# ----------------------------------------------------------------------------- staged outputs


@contextmanager
def staged_output(out: str | os.PathLike, *, overwrite: bool = False,
                  inputs: Iterable[str | os.PathLike | None] = (), command: str = "quantize") -> Iterator[Path]:
    """Yields a fresh hidden staging folder beside ``out``; when the block succeeds, writes
    the marker and moves the folder to ``out`` atomically (replacing a nybble output there
    when ``overwrite``); on any failure or signal removes it. Holds the output's lock
    throughout and first removes staging folders of dead runs."""
    out = Path(out)
    inputs = list(inputs)
    check_output(out, inputs, overwrite)  # before anything is created
    with SignalGuard() as guard:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(out)
        staging: Path | None = None
        try:
            with guard.deferred(raise_after=True):  # taken and recorded whole
                lock.acquire()
            remove_dead_staging(out.parent, out.name)
            check_output(out, inputs, overwrite)  # again, now that no other nybble run can write it
            try:
                with guard.deferred(raise_after=True):  # created and recorded whole
                    path = out.parent / _temp_name(out.name, "staging")
                    path.mkdir()
                    staging = path
                yield staging
                write_marker(staging, command, _entries(staging))
                _fsync_tree(staging)
                with guard.deferred():
                    if os.path.lexists(out):
                        why = _not_replaceable(out) if overwrite else "appeared (not written by nybble)"
                        if why is not None:
                            raise OutputExistsError(f"{out} changed while it was being written: it {why}; "
                                                    "the new output was discarded")
                        old = _swap_in(staging, out)
                        _fsync_dir(out.parent)
                        shutil.rmtree(old, ignore_errors=True)
                    else:
                        _move_new(staging, out)
                        _fsync_dir(out.parent)
            except BaseException:
                if staging is not None:
                    with guard.deferred():  # a second signal does not cut the clean-up short
                        shutil.rmtree(staging, ignore_errors=True)
                raise
        finally:
            lock.release()
    if guard.pending is not None:
        raise OutputInterrupted(guard.pending, committed=True)
