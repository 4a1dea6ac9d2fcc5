"""One run per run folder: an exclusive lock, `<run>/run.lock`, held for the life of the run.

The file holds its holder as JSON, {"pid", "host", "process_start", "since"}, and is locked with
`fcntl.flock` on an open descriptor, so the kernel frees the lock when the holder's process ends in
any way (kill -9 included). A second run on the same folder fails at once with `RunFolderBusy`
naming the holder's pid and host. A lock left by a process that is gone (the file still names it,
but nothing holds the flock; or, on this host, no process with that pid and start time) is stale:
the next run takes it over and says so. Where the file system has no flock, the holder's liveness
decides on this host; a holder on another host cannot be checked, and the message says to delete
the file once that run is known to be gone. When the run ends the file is emptied, not deleted
(deleting a flocked file lets two processes each lock a different file of the same name).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import socket
import time

from flowmap_jax.cli.cli_exit import RunFailure

LOCK_NAME = "run.lock"


class RunFolderBusy(RunFailure, RuntimeError):
    """Another run holds the run folder; the message names its pid and host."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a run folder. process_start: the process's start time in clock ticks since boot
    (/proc/<pid>/stat field 22; "" where unknown), which tells a reused pid from its first owner."""

    pid: int
    host: str
    process_start: str = ""
    since: float = 0.0

    @classmethod
    def this_process(cls) -> Holder:
        return cls(os.getpid(), socket.gethostname(), _process_start(os.getpid()), time.time())

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since)) if self.since else "unknown time"
        return f"pid {self.pid} on host {self.host} (since {since})"

    def is_running(self) -> bool | None:
        """True/False for a holder on this host; None on another host (it cannot be checked)."""
        if self.host != socket.gethostname():
            return None
        if self.pid == os.getpid():
            return False  # this process is starting: the file names an earlier owner of our pid
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by someone else
        start = _process_start(self.pid)
        return not (start and self.process_start and start != self.process_start)


def _process_start(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: another open file holds it; None: the file system has no flock."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _read_holder(fd: int) -> Holder | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode(errors="replace").strip()
    if not text:
        return None
    try:
        data = json.loads(text)
        return Holder(int(data["pid"]), str(data["host"]), str(data.get("process_start", "")),
                      float(data.get("since", 0.0)))
    except (ValueError, KeyError, TypeError):
        return None  # a garbled file: nobody can be named; flock still decides


class RunLock:
    """The lock on one run folder; `acquire` it, `release` it at the end (also done on close of the
    process). `took_over`: the stale holder this lock replaced, or None."""

    def __init__(self, path: str, fd: int, holder: Holder, took_over: Holder | None):
        self.path, self._fd, self.holder, self.took_over = path, fd, holder, took_over

    @classmethod
    def acquire(cls, run_dir: str) -> RunLock:
        """Lock `run_dir` (an existing folder) for this process; RunFolderBusy if another run holds it."""
        path = os.path.join(run_dir, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            locked = _try_flock(fd)
            previous = _read_holder(fd)
            running = previous.is_running() if previous is not None else False
            if locked is False or running:
                who = previous.describe() if previous else "another process (run.lock does not say which)"
                raise RunFolderBusy(f"the run folder {run_dir} is in use by {who}; wait for that run to end "
                                    f"or stop it, or choose another --run.dir")
            if locked is None and running is None:
                raise RunFolderBusy(f"the run folder {run_dir} is in use by {previous.describe()}, which cannot be "
                                    f"checked from this host (no file locking here); if that run is gone, delete "
                                    f"{path} and start again")
            holder = Holder.this_process()
            data = json.dumps(dataclasses.asdict(holder)).encode() + b"\n"
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, holder, previous)

    def release(self) -> None:
        """Empty the file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass  # the folder may be gone (a start that failed removes its new folder)
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None
