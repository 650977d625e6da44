"""The small files of a run folder (``config.yaml``, ``mlflow_run.json``, ``metrics.jsonl``):
written whole or not at all, and read even after a kill or a full disk tore the last line. And the
folder's lock: one run at a time writes into a run folder (``RunFolderLock``).

A kill or a full disk mid-write leaves a 0-byte ``config.yaml`` or a half ``metrics.jsonl`` line.
Whole files are written to a temporary name, flushed and renamed (the old file stays until the new
one is complete); the metrics file is append-only, so only its last line can be torn, and the
reader drops such a line (saying so) instead of failing every later resume.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from foundation.atomic_files import atomic_write
from foundation.errors import UserError
from foundation.logs import get_logger
from trainer.runtime.dataclass_yaml import ConfigError

log = get_logger()


class DiskFullError(UserError, RuntimeError):
    """No space left while writing a run file: a user error (free space, then resume)."""


class RunFolderInUseError(UserError, RuntimeError):
    """Another process holds the run folder's lock: a user error naming the holder."""


class RunFileError(UserError, RuntimeError):
    """A run file that is not the run's own (a symbolic link out of the folder): a user error."""


LOCK_FILE = ".simclr.lock"
OWN_FILES = ("metrics.jsonl", "mlflow_run.json", "config.yaml")  # written by the run, in place or replaced


def check_own_files(run_dir: str | Path) -> None:
    """The run writes only into its own folder: a run file that is a symbolic link (appending would
    write through it, to wherever it points) is refused, naming the fix."""
    for name in OWN_FILES:
        path = Path(run_dir) / name
        if path.is_symlink():
            target = os.readlink(path)
            raise RunFileError(f"{path} is a symbolic link (to {target}); a run writes only into its own folder. "
                               f"Replace the link with the file itself (cp --remove-destination {target} {path}) "
                               "or remove it, then run again")


class RunFolderGoneError(UserError, RuntimeError):
    """The run folder was moved or removed while the run trained: the run stops without writing
    anything into the old path (no second, partial run folder)."""


class RunFolderLock:
    """An exclusive lock on a run folder for the run's life, so that two runs never interleave
    their metrics, checkpoints and MLflow runs in one folder.

    Two locks, both dropped by the kernel when the holder dies, however it dies (no stale lock after
    a SIGKILL): a ``flock`` on the folder itself, which deleting a file cannot undo, and a POSIX
    record lock on ``.simclr.lock``, which names the holder (pid, host, start) for the message a
    second process gets (and is the lock where a network file system refuses ``flock`` on a folder).
    Forked children (DataLoader workers) hold neither. Never open the lock file elsewhere in the
    holder: closing any descriptor of it drops a POSIX lock.

    ``check`` (at log steps and checkpoints) finds a folder moved or removed under the run, and
    writes the lock file again if someone deleted it."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._dir_fd: int | None = None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dir_fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:  # other errors: no flock on folders here (some network file systems): the file lock
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                os.close(dir_fd)
                self._refuse(self._holder_of_file())
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(dir_fd)
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = self.holder(fd)
            os.close(fd)
            self._refuse(holder)
        self._fd, self._dir_fd = fd, dir_fd
        self._write_holder()
        os.register_at_fork(after_in_child=self._close_in_child)

    def _refuse(self, holder: str) -> None:
        raise RunFolderInUseError(
            f"{self.run_dir} is in use by another run ({holder}); two runs in one folder would mix their "
            "checkpoints and metrics. Wait for it to end or stop it, or give this run its own train.run_dir")

    def _holder_of_file(self) -> str:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return f"its {LOCK_FILE} was deleted, so its name is unknown"
        try:
            return self.holder(fd)
        finally:
            os.close(fd)

    def _write_holder(self) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                        "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)

    def _close_in_child(self) -> None:
        # a forked child sharing the folder's flock would keep it after the holder dies
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    @staticmethod
    def holder(fd: int) -> str:
        try:
            who = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"pid {who['pid']} on {who['host']}, since {who['started']}"
        except (OSError, ValueError, KeyError, TypeError):  # it has not written its name yet
            return "a process that is just starting"

    def moved_away(self, exc: BaseException) -> RunFolderGoneError | None:
        """For a write that found no folder (moved between a step's check and its write): the
        ``RunFolderGoneError`` that says where it went; None when the folder is where it was, the
        error is another, or this process does not hold the folder."""
        if not isinstance(exc, FileNotFoundError):
            return None
        try:
            self.check()
        except RunFolderGoneError as gone:
            return gone
        return None

    def check(self) -> None:
        """Raise ``RunFolderGoneError`` (saying where the run's files are now) if the folder was moved
        or removed since ``acquire``; write the lock file again if it was deleted."""
        if self._dir_fd is None:
            return
        held = os.fstat(self._dir_fd)
        try:
            now = os.stat(self.run_dir)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            self._heal_lock_file()
            return
        try:
            where = os.readlink(f"/proc/self/fd/{self._dir_fd}")
        except OSError:
            where = ""
        if not where or where.endswith(" (deleted)") or held.st_nlink == 0:
            raise RunFolderGoneError(f"the run folder {self.run_dir} was removed while the run trained; the run "
                                     "stopped without writing anything more (nothing of it is left to resume)")
        newest = sorted(Path(where, "checkpoints").glob("step_*.pt"))
        kept = f"its newest checkpoint is now {newest[-1]}" if newest else "it holds no checkpoint yet"
        raise RunFolderGoneError(
            f"the run folder {self.run_dir} was moved to {where} while the run trained; the run stopped without "
            f"writing into the old path ({kept}). Resume it there with train.run_dir={where}")

    def _heal_lock_file(self) -> None:
        try:
            same = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # whoever made it cannot get the folder's flock: the folder stays ours
            return
        os.close(self._fd)  # the deleted file's lock guards nothing now
        self._fd = fd
        self._write_holder()

    def release(self) -> None:
        for fd in (self._fd, self._dir_fd):
            if fd is not None:
                os.close(fd)  # drops the lock; the file stays (removing it would race a new holder)
        self._fd = self._dir_fd = None

    def held_elsewhere(self) -> str | None:
        """Who holds the lock now (None when nobody does): ``simclr sync`` leaves a run that is still
        training as it is. Never call it in the holder's own process (the probe's close drops its lock)."""
        try:
            dir_fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # only to test; dropped by the close
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                return self._holder_of_file()
        finally:
            os.close(dir_fd)
        if not self.path.exists():
            return None
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a shared lock, only to test; dropped by the close
            return None
        except OSError:
            return self.holder(fd)
        finally:
            os.close(fd)


def _raise_readable(path: Path, exc: OSError) -> None:
    if exc.errno == errno.ENOSPC:
        raise DiskFullError(f"no space left on device while writing {path}; the run's checkpoints and earlier files "
                            "are intact: free space, then run the same command again to resume") from None
    raise exc


@contextmanager
def optional_output(what: str, run_dir: str | Path) -> Iterator[None]:
    """Writing an output the run can do without (a trace, a memory snapshot, a plot): a file-system
    error costs that output only, said in one warning naming it and why; training goes on. A run
    folder that is gone is not one of those: that error goes on to the loop, which says where it went."""
    try:
        yield
    except OSError as exc:
        if not Path(run_dir).is_dir():
            raise
        why = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        log.warning(f"{what} was not written ({why}); training goes on")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` all at once: a crash or a full disk leaves the old file."""
    try:
        atomic_write(path, text)
    except OSError as exc:
        _raise_readable(Path(path), exc)


SYSTEM_FOLDERS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/sbin", "/sys", "/usr")


def check_run_dir(run_dir: str | Path, *data_roots: str) -> None:
    """A run folder is a folder of its own: never the file system's root, a home folder, or a system
    folder (``overwrite`` clears files there), and never inside a dataset (its own files, curves.png
    among them, would be read as images: a new class); a folder, or one this user can create."""
    shown, run_dir = run_dir, Path(run_dir).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.run_dir: {shown!r} is a file; name a directory for the run's checkpoints and logs")
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"train.run_dir: {shown!r} cannot be created or written: {existing} is not writable by this "
                          "user; choose a folder you can write")
    where = run_dir.resolve()
    shared = {Path("/"), Path.home().resolve(), *map(Path, ("/home", "/root", "/tmp", "/opt", "/mnt", "/var"))}
    if where in shared or any(where == Path(s) or Path(s) in where.parents for s in SYSTEM_FOLDERS):
        raise ConfigError(f"train.run_dir={run_dir}: {where} is a shared or system folder; name a folder of its own "
                          "for the run, e.g. train.run_dir=runs/NAME")
    for key, root in zip(("data.root", "data.val_root"), data_roots):
        if root and (where == Path(root).resolve() or Path(root).resolve() in where.parents):
            raise ConfigError(f"train.run_dir={run_dir} lies inside {key}={root}: the run's own files would be read "
                              "as images (curves.png as a new class); put the run folder outside the dataset")


def append_line(path: str | Path, line: str) -> None:
    """Append one line; a full disk is a ``DiskFullError`` naming the file (no partial line is kept).
    A torn last line (left by a kill) is dropped first, so that only the last line can ever be torn."""
    path = Path(path)
    try:
        with open(path, "a+b") as f:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(max(0, size - 65536))
                tail = f.read()
                if not tail.endswith(b"\n"):
                    size -= len(tail) - (tail.rfind(b"\n") + 1)
                    f.truncate(size)
                    log.warning(f"dropped a line of {path} cut short by an earlier kill")
            try:
                f.write(line.encode() + b"\n")
                f.flush()
            except OSError:
                f.truncate(size)  # drop what part of the line got in
                raise
    except OSError as exc:
        _raise_readable(path, exc)


def read_jsonl(path: str | Path, lenient: bool = False) -> list[dict[str, Any]]:
    """The JSON rows of ``path`` ([] if absent). A last line cut short (a kill, a full disk) is
    dropped with a note; a bad line elsewhere means the file is not ours, and is an error, unless
    ``lenient`` (a plot: every readable row is drawn, and the damaged ones are named in one note)."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows, damaged = [], []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if n == len(lines) - 1:
                log.warning(f"the last line of {path} was cut short (a kill or a full disk); it is left out")
                continue
            if not lenient:
                raise ValueError(f"{path}, line {n + 1}: not a JSON row ({line[:60]!r})") from None
            damaged.append(n + 1)
    if damaged:
        log.warning(f"{len(damaged)} damaged line(s) of {path} left out of the plot (line "
                    f"{', '.join(map(str, damaged[:5]))}{' ...' if len(damaged) > 5 else ''})")
    return rows
