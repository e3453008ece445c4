"""One run per output dir: RUN/run.lock names the process that holds it.

    lock = RunLock(run_dir).acquire()   # JaxalignError if another live run holds the dir
    ...
    lock.release()

The lock file is JSON: {"pid", "hostname", "started" (ISO time), "proc_start" (the process's start
time in clock ticks, from /proc, so a reused pid is not mistaken for the holder)}. It is created with
O_CREAT | O_EXCL, so of two runs starting at once exactly one gets it.

A lock is stale when its holder is on this host and no longer runs (a run killed with SIGKILL, or a
crashed host's leftovers after a reboot): it is taken over with a warning, so a crash never blocks the
dir for good. A lock held from another host cannot be checked from here: the run refuses, and says
which file to delete if that run is known to be gone. In a multi-host job only process 0 takes the
lock and broadcasts its verdict (`acquire_for_job`).

Run dirs at a URL (gs://...) are not locked: an object store has no O_EXCL create, and a lock left
by a preempted host could never be judged stale from a new one, so every resume would refuse.
Such a run warns that nothing stops a second run from writing into the same dir.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import pathlib
import socket
import time
from typing import Any

from jaxalign import paths
from jaxalign.errors import JaxalignError

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


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


def read_lock(path: pathlib.Path) -> dict[str, Any] | None:
    """The lock's content; None when it is missing. An unreadable file gives {}."""
    for _ in range(5):  # a lock being written right now: its creator fills it within microseconds
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            info = json.loads(text)
            if isinstance(info, dict):
                return info
        except json.JSONDecodeError:
            pass
        time.sleep(0.05)
    return {}


def describe(info: dict[str, Any]) -> str:
    return (f"pid {info.get('pid', '?')} on host {info.get('hostname', '?')}, started "
            f"{info.get('started', '?')}")


def live_holder(run_dir: str | pathlib.Path) -> dict[str, Any] | None:
    """The lock of another process that may be running in `run_dir` (None when free or stale)."""
    if paths.is_remote(run_dir):
        return None
    info = read_lock(pathlib.Path(run_dir) / LOCK_FILE)
    if not info:
        return None
    return None if _is_stale(info) or _is_ours(info) else info


def _is_ours(info: dict[str, Any]) -> bool:
    return info.get("pid") == os.getpid() and info.get("hostname") == socket.gethostname()


def _is_stale(info: dict[str, Any]) -> bool:
    if not info or not isinstance(info.get("pid"), int):
        return True  # unreadable: whoever wrote it did not finish; no run can be identified by it
    if info.get("hostname") != socket.gethostname():
        return False  # cannot tell from here
    return not pid_alive(info["pid"], info.get("proc_start"))


class RunLock:
    """The lock on one run dir; `acquire` creates the dir if needed."""

    def __init__(self, run_dir: str | pathlib.Path):
        self.run_dir = pathlib.Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.held = False

    def _content(self) -> bytes:
        info = {"pid": os.getpid(), "hostname": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "proc_start": _proc_start(os.getpid())}
        return (json.dumps(info) + "\n").encode()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, self._content())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                break
            info = read_lock(self.path)
            if info is None:  # released between our two looks
                continue
            if _is_ours(info):  # this process already holds it (another Trainer on the same dir)
                self.path.write_bytes(self._content())
                break
            if not _is_stale(info):
                raise JaxalignError(
                    f"output dir {self.run_dir} is in use by another run ({describe(info)}; lock file "
                    f"{self.path}). Wait for it to finish or choose another output_dir; if that run is known "
                    f"to be gone (e.g. its host was lost), delete {self.path}")
            log.warning("taking over the stale lock %s of a run that is no longer running (%s)",
                        self.path, describe(info) if info else "unreadable lock file")
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass  # another starting run removed it first; O_EXCL decides between us
        else:
            raise JaxalignError(f"could not take the lock {self.path}: another run keeps taking it")
        self.held = True
        atexit.register(self.release)
        return self

    def release(self) -> None:
        """Remove the lock file if this process still holds it."""
        if not self.held:
            return
        self.held = False
        atexit.unregister(self.release)
        info = read_lock(self.path)
        if info and _is_ours(info):
            self.path.unlink(missing_ok=True)

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
                        "into it at the same time (see jaxalign.run_lock)", run_dir)
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
