"""One run per output dir: RUN/run.lock names the process that holds it.

    lock = RunLock(run_dir).acquire()   # JaxalignError if another live run holds the dir
    ...
    lock.release()

The lock file is JSON: {"pid", "hostname", "started" (ISO time), "proc_start" (the process's start
time in clock ticks, from /proc, so a reused pid is not mistaken for the holder), "boot_id", "pid_ns"
(the kernel's boot id, the process's pid namespace), "token" (random, one per lock)}.

- Hold: the holder keeps the file open with an exclusive flock(2), which the kernel drops when the
  process dies, however it dies and whatever pid namespace (container) it is in.
- Create: write a temp file in the run dir, flock and fsync it, hard-link it as run.lock (which fails
  if run.lock exists, like O_EXCL): of two runs creating at once one succeeds, and run.lock is never
  seen half written or unlocked. (Without hard links: O_EXCL create, flock, write.)
- Judge: try its flock without waiting. Held: a live run, refused. Free, and the lock names this host:
  stale. Another host's lock cannot be checked from here: refused, naming the file to delete if that
  run is known to be gone. An unparsable lock with a free flock is stale after 0.25 s.
- Take over a stale lock: holding its flock, and only if run.lock still names the file judged, unlink
  it and create ours. Two runs judging one stale lock are serialised by its flock; the second then
  finds the name gone or naming the first's new lock, and judges again.
- Release: unlink run.lock if it still names our file, then close it.
- An older version's lock (no "token") whose flock is free, and any lock on a filesystem without
  flock, are judged by content: same host, boot and pid namespace: stale when its pid (with that
  proc_start) no longer runs; another boot: stale; another pid namespace: cannot be checked, refused.
  Without flock, two runs taking over one stale lock at the same instant are not serialised.

RunLocks of one process on one dir share one hold (another Trainer on the same dir); the first release
ends it. A forked child closes its copies. (On NFS a flock is a POSIX lock, which a process loses when
it closes any descriptor of the file: nothing here opens a lock file this process holds.) In a
multi-host job only process 0 takes the lock and broadcasts its verdict (`acquire_for_job`).

Run dirs at a URL (gs://...) are not locked: an object store has no O_EXCL create, and a lock left by a
preempted host could never be judged stale from a new one, so every resume would refuse. Such a run
warns that nothing stops a second run from writing into the same dir.
"""

from __future__ import annotations

import atexit
import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import threading
import time
import uuid
from typing import Any

from jaxalign.errors import JaxalignError
from jaxalign.runtime import paths

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"

_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_NO_LINK = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS}
_SETTLE = 0.25  # seconds an unparsable lock with a free flock may still be being written


def _proc_start(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot; Linux), None where unknown."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may hold spaces and parentheses: split after its closing parenthesis.
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        if fields[0] == "Z":  # a zombie has exited; only its parent has not reaped it
            return -1
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    path = pathlib.Path("/proc/sys/kernel/random/boot_id")
    return path.read_text().strip() if path.exists() else None


def _pid_ns() -> str | None:
    return os.readlink("/proc/self/ns/pid") if os.path.exists("/proc/self/ns/pid") else None


def pid_alive(pid: int, proc_start: int | None = None) -> bool:
    """Whether process `pid` of this host runs (and, when `proc_start` is known, is the same process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    start = _proc_start(pid)
    if start == -1:
        return False
    return proc_start is None or start is None or start == proc_start


def _parse(data: bytes) -> dict[str, Any]:
    try:
        info = json.loads(data)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def read_lock(path: pathlib.Path) -> dict[str, Any] | None:
    """The lock's content; None when it is missing. An unreadable file gives {}."""
    try:
        return _parse(pathlib.Path(path).read_bytes())
    except FileNotFoundError:
        return None
    except OSError:
        return {}


def describe(info: dict[str, Any]) -> str:
    return (f"pid {info.get('pid', '?')} on host {info.get('hostname', '?')}, started "
            f"{info.get('started', '?')}")


def _flock(fd: int, op: int) -> bool | None:
    """Try flock `op` without waiting: True when taken, False when held by another, None: no flock here."""
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in _NO_FLOCK or e.errno == errno.EBADF:  # EBADF: NFS, on a file opened read-only
            return None
        raise
    return True


def _open(path: pathlib.Path) -> int | None:
    """The lock file opened for judging (None: there is none), read-write: NFS flocks only those."""
    try:
        try:
            return os.open(path, os.O_RDWR)
        except PermissionError:
            return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None


def _file_id(f: int | pathlib.Path) -> tuple[int, int] | None:  # of a path or an open descriptor
    try:
        st = os.stat(f)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _names_us(info: dict[str, Any]) -> bool:
    return info.get("pid") == os.getpid() and info.get("pid_ns") in (None, _pid_ns())


def _is_stale(info: dict[str, Any], flocked: bool | None) -> bool | None:
    """Whether the run that wrote `info` is gone, given that we took its flock (`flocked`; None: the
    filesystem has none). None: it cannot be told (a pid of another pid namespace, no flock)."""
    if not isinstance(info.get("pid"), int):
        return True  # no run can be identified by it, and none is writing it (that one holds its flock)
    if info.get("hostname") != socket.gethostname():
        return False  # cannot tell from here
    if _names_us(info):
        return True  # names this process, which does not hold it: left by it (e.g. by an older version)
    if flocked and "token" in info:
        return True  # its creator held this flock for as long as it ran
    boot, ns = info.get("boot_id"), info.get("pid_ns")
    if boot and boot != _boot_id():
        return True  # this host has rebooted since
    if ns and ns != _pid_ns():
        return None
    return not pid_alive(info["pid"], info.get("proc_start"))


def _judge(path: pathlib.Path, op: int) -> tuple[str, dict[str, Any], int | None]:
    """The verdict on the lock file at `path`: "gone" (there is none), "live" or "unsure" (its run may
    be running), or "stale" with the file judged open, holding flock `op` (the caller closes it)."""
    busy, unreadable = 0, None
    for _ in range(100):  # bounded: a lock file that keeps changing counts as live
        fd = _open(path)
        if fd is None:
            return "gone", {}, None
        flocked, info, wait = _flock(fd, op), _parse(os.pread(fd, 1 << 16, 0)), 0.0
        if flocked is False and busy < 3:  # held by its run, or for an instant by another run judging it
            busy, wait = busy + 1, 0.01
        elif flocked is not False and not info:  # being written without flock, or garbage
            if unreadable is None or unreadable[0] != _file_id(fd):
                unreadable = (_file_id(fd), time.monotonic())
            wait = 0.05 if time.monotonic() - unreadable[1] < _SETTLE else 0.0
        if wait:
            os.close(fd)  # so that a writer without hard links can take its flock
            time.sleep(wait)
            continue
        stale = False if flocked is False else _is_stale(info, flocked)
        if stale:
            return "stale", info, fd
        os.close(fd)
        return ("unsure" if stale is None else "live"), info, None
    return "live", {}, None


class _Hold:
    """This process's hold on one lock file: its open descriptor carries the flock."""

    def __init__(self, path: pathlib.Path, fd: int):
        self.path, self.fd = path, fd

    def current(self) -> bool:
        return self.fd is not None and _file_id(self.path) == _file_id(self.fd)

    def end(self) -> None:
        """Unlink the lock file if it is still ours, then close it (the flock ends after the name)."""
        try:
            if self.current():
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None


_registry_lock = threading.Lock()
_holds: dict[tuple[int, int] | None, _Hold] = {}  # by the run dir's _file_id


def _forget_holds_in_child() -> None:  # the parent's flocks stay: they end with its descriptors
    global _registry_lock
    _registry_lock = threading.Lock()  # another thread may have held it at the fork
    for hold in _holds.values():
        os.close(hold.fd)
        hold.fd = None
    _holds.clear()


os.register_at_fork(after_in_child=_forget_holds_in_child)


def live_holder(run_dir: str | pathlib.Path) -> dict[str, Any] | None:
    """The lock of another process that may be running in `run_dir` (None when free or stale)."""
    if paths.is_remote(run_dir):
        return None
    path = pathlib.Path(run_dir) / LOCK_FILE
    with _registry_lock:
        hold = _holds.get(_file_id(path.parent))
        if hold is not None and hold.current():
            return None  # this process holds it
        verdict, info, fd = _judge(path, fcntl.LOCK_SH)  # shared: two lookers do not block each other
    if fd is not None:
        os.close(fd)
    return (info or {"pid": "?"}) if verdict in ("live", "unsure") else None  # truthy even if unreadable


class RunLock:
    """The lock on one run dir; `acquire` creates the dir if needed."""

    def __init__(self, run_dir: str | pathlib.Path):
        self.run_dir = pathlib.Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.held, self._hold, self._key = False, None, None

    def _content(self) -> bytes:
        info = {"pid": os.getpid(), "hostname": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "proc_start": _proc_start(os.getpid()), "boot_id": _boot_id(), "pid_ns": _pid_ns(),
                "token": uuid.uuid4().hex}
        return (json.dumps(info) + "\n").encode()

    def _create(self) -> _Hold | None:
        """Our lock file at self.path, whole and flocked before anyone can see it; None if one exists."""
        data, tmp = self._content(), self.run_dir / f".{LOCK_FILE}.{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        try:
            _flock(fd, fcntl.LOCK_EX)  # a new file: taken, or no flock on this filesystem
            os.write(fd, data)  # a few hundred bytes to a regular file: one write
            os.fsync(fd)
            os.link(tmp, self.path)
            return _Hold(self.path, fd)
        except BaseException as e:
            os.close(fd)
            if isinstance(e, (FileExistsError, FileNotFoundError)):
                return None  # a lock is there (judge it; on NFS, a resent link that worked: ours, stale)
            if not (isinstance(e, OSError) and e.errno in _NO_LINK):
                raise
        finally:
            tmp.unlink(missing_ok=True)
        return self._create_without_link(data)

    def _create_without_link(self, data: bytes) -> _Hold | None:
        """Without hard links: O_EXCL create, flock, write (a run judging it meanwhile waits, _SETTLE)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return None
        try:
            while _flock(fd, fcntl.LOCK_EX) is False:  # a run that opened the empty file is judging it
                time.sleep(0.001)
            os.write(fd, data)  # a few hundred bytes to a regular file: one write
            os.fsync(fd)
            if _file_id(self.path) == _file_id(fd):
                return _Hold(self.path, fd)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # judged stale and removed while this process was descheduled: judge again
        return None

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        key = _file_id(self.run_dir)
        with _registry_lock:
            for _ in range(10):
                hold = _holds.get(key)
                if hold is not None:
                    if hold.current():
                        break  # this process holds it already (another Trainer on the same dir)
                    hold.end()  # our lock file was removed or replaced behind our back
                    del _holds[key]
                hold = self._create()
                if hold is not None:
                    _holds[key] = hold
                    break
                verdict, info, fd = _judge(self.path, fcntl.LOCK_EX)
                if verdict == "gone":
                    continue  # released between our two looks
                if verdict != "stale":
                    raise JaxalignError(
                        f"output dir {self.run_dir} is in use by another run ({describe(info)}; lock file "
                        f"{self.path}). Wait for it to finish or choose another output_dir; if that run is known "
                        f"to be gone (e.g. its host was lost), delete {self.path}" + (
                            " (its pid is in another pid namespace of this host, and this filesystem has no "
                            "flock: whether it still runs cannot be checked)" if verdict == "unsure" else ""))
                try:
                    if _file_id(self.path) == _file_id(fd):  # still the file judged: not taken over meanwhile
                        if not _names_us(info):
                            log.warning("taking over the stale lock %s of a run that is no longer running (%s)",
                                        self.path, describe(info) if info else "unreadable lock file")
                        self.path.unlink(missing_ok=True)
                finally:
                    os.close(fd)  # after the unlink: a run judging it meanwhile then finds the name gone
            else:
                raise JaxalignError(f"could not take the lock {self.path}: another run keeps taking it")
        self._hold, self._key, self.held = hold, key, True
        atexit.register(self.release)
        return self

    def release(self) -> None:
        """Remove the lock file if this process still holds it."""
        if not self.held:
            return
        self.held = False
        atexit.unregister(self.release)
        with _registry_lock:
            if self._hold is not None and _holds.get(self._key) is self._hold:
                del _holds[self._key]
                self._hold.end()
        self._hold = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_for_job(run_dir: str | pathlib.Path) -> RunLock | None:
    """Process 0 locks the run dir; in a multi-host job its verdict is broadcast, so every process
    refuses when it cannot (and none hangs waiting for it). Returns the lock on process 0, else None."""
    import jax

    if paths.is_remote(run_dir):
        if jax.process_index() == 0:
            log.warning("output dir %s is a URL: it is not locked, so nothing stops another run from writing "
                        "into it at the same time (see jaxalign.runtime.run_lock)", run_dir)
        return None
    lock, error = None, ""
    if jax.process_index() == 0:
        try:
            lock = RunLock(run_dir).acquire()
        except JaxalignError as e:
            error = str(e)
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        if int(multihost_utils.broadcast_one_to_all(np.int32(bool(error)))) and not error:
            error = f"output dir {run_dir} is in use by another run (process 0 could not lock it; see its log)"
    if error:
        raise JaxalignError(error)
    return lock
