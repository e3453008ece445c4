"""The run-dir lock (jaxalign.runtime.run_lock) against real processes: two runs starting on one dir at the same
instant (with a stale lock there, or none), a lock file being written, a holder killed with SIGKILL, a
holder in another pid namespace, and a release after the lock was taken over.

Each worker is a Python subprocess that runs commands read line by line from its stdin (one JSON
object a line) and answers each with one JSON line."""

import json
import logging
import os
import pathlib
import select
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from jaxalign.errors import JaxalignError
from jaxalign.runtime import run_lock

REPO = pathlib.Path(__file__).resolve().parents[1]
MODULE = pathlib.Path(run_lock.__file__)  # what the workers load: the module under test

WORKER = r"""
import fcntl, importlib.util, json, os, signal, sys, time
spec = importlib.util.spec_from_file_location("run_lock_under_test", sys.argv[1])
run_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_lock)

def reply(**kw):
    print(json.dumps(kw), flush=True)

lock = None
reply(pid=os.getpid(), pid_ns=os.readlink("/proc/self/ns/pid"))
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "acquire":
        while time.time() < cmd.get("at", 0):  # spin: both workers start within microseconds
            pass
        try:
            lock = run_lock.RunLock(cmd["dir"]).acquire()
            reply(ok=True)
        except Exception as e:
            reply(ok=False, type=type(e).__name__, error=str(e))
    elif cmd["op"] == "release":
        if lock is not None:
            lock.release()
        lock = None
        reply(ok=True)
    elif cmd["op"] == "hold":  # a lock file this process is writing: created, flocked, partly written
        fd = os.open(cmd["path"], os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, cmd["content"].encode())
        reply(ok=True)
    elif cmd["op"] == "fork":  # a child that keeps the inherited descriptors and outlives this process
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        reply(child=child)
    elif cmd["op"] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
"""


class Worker:
    def __init__(self, log_path: pathlib.Path, module: pathlib.Path = MODULE, prefix: tuple = ()):
        self.log_path = log_path
        self.proc = subprocess.Popen([*prefix, sys.executable, "-c", WORKER, str(module)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_path.open("w"),
                                     text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        hello = self.read()
        self.pid, self.pid_ns = hello["pid"], hello["pid_ns"]

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float = 30) -> dict:
        # Strictly one answer per command, so nothing is left in the reader's buffer between reads.
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            pytest.fail(f"worker {self.proc.pid} did not answer:\n{self.log_path.read_text()[-3000:]}")
        line = self.proc.stdout.readline()
        if not line:
            pytest.fail(f"worker {self.proc.pid} exited:\n{self.log_path.read_text()[-3000:]}")
        return json.loads(line)

    def call(self, **cmd) -> dict:
        self.send(**cmd)
        return self.read()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not run_lock.pid_alive(proc.pid)
    return proc.pid


def stale_lock(kind: str, pid: int) -> str:
    """The lock a run with (dead) `pid` on this host left: written by an older version, or this one."""
    info = {"pid": pid, "hostname": socket.gethostname(), "started": "2025-01-01T00:00:00+00:00",
            "proc_start": None}
    if kind == "new":
        info.update(proc_start=12345, boot_id=run_lock._boot_id(), pid_ns=run_lock._pid_ns(), token="0" * 32)
    return json.dumps(info) + "\n"


def race(root: pathlib.Path, trials: int, module: pathlib.Path = MODULE) -> list[tuple[str, int]]:
    """`trials` trials of two workers starting RunLock(dir).acquire() at the same instant on a fresh dir,
    cycling through: no lock there, an older version's stale lock, this version's stale lock. Each
    holder keeps the lock until both have tried. Returns (kind, number of holders) per trial."""
    pid = dead_pid()
    workers = [Worker(root / f"worker{i}.log", module) for i in range(2)]
    results = []
    try:
        for trial in range(trials):
            kind = ("none", "old", "new")[trial % 3]
            run = root / f"trial{trial}"
            run.mkdir()
            if kind != "none":
                (run / run_lock.LOCK_FILE).write_text(stale_lock(kind, pid))
            at = time.time() + 0.02
            for w in workers:
                w.send(op="acquire", dir=str(run), at=at)
            answers = [w.read() for w in workers]
            for a in answers:
                assert a["ok"] or a["type"] == "JaxalignError" and "is in use by another run" in a["error"], a
            results.append((kind, sum(a["ok"] for a in answers)))
            for w in workers:
                assert w.call(op="release")["ok"]
    finally:
        for w in workers:
            w.stop()
    return results


def test_two_runs_starting_at_the_same_instant_never_both_hold_the_lock(tmp_path):
    """100 trials; a stale lock (an older version's or this one's, its pid dead) in two thirds of them.
    Each trial ends with the dir free and no temp file left."""
    results = race(tmp_path, 100)
    doubles = [(i, kind) for i, (kind, holders) in enumerate(results) if holders != 1]
    assert not doubles, f"trials without exactly one holder: {doubles}"
    leftovers = [p for p in tmp_path.glob("trial*/*")]
    assert not leftovers, leftovers


@pytest.mark.parametrize("content", ["", '{"pid": 12'])
def test_a_lock_file_being_written_is_not_taken_over(tmp_path, caplog, content):
    """A lock file whose writer runs and holds its flock is refused, even empty or half written; once its
    writer has died, the unreadable file is taken over."""
    run = tmp_path / "run"
    run.mkdir()
    path = run / run_lock.LOCK_FILE
    writer = Worker(tmp_path / "writer.log")
    try:
        assert writer.call(op="hold", path=str(path), content=content)["ok"]
        with pytest.raises(JaxalignError, match=rf"is in use by another run \(pid \? on host \?.*delete {path}"):
            run_lock.RunLock(run).acquire()
        assert run_lock.live_holder(run)
        assert path.read_text() == content  # untouched
    finally:
        writer.stop()
    with caplog.at_level(logging.WARNING):
        lock = run_lock.RunLock(run).acquire()
    assert f"taking over the stale lock {path} of a run that is no longer running (unreadable" in caplog.text
    lock.release()
    assert not path.exists()


def test_a_holder_killed_with_sigkill_is_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    path = run / run_lock.LOCK_FILE
    holder = Worker(tmp_path / "holder.log")
    try:
        assert holder.call(op="acquire", dir=str(run))["ok"]
        assert json.loads(path.read_text())["pid"] == holder.pid
        with pytest.raises(JaxalignError, match=rf"in use by another run \(pid {holder.pid} on host "
                                                rf"{socket.gethostname()}, started .*delete {path}"):
            run_lock.RunLock(run).acquire()
        assert run_lock.live_holder(run)["pid"] == holder.pid
        holder.send(op="die")
        assert holder.proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        holder.stop()
    assert json.loads(path.read_text())["pid"] == holder.pid  # left behind by the kill
    assert run_lock.live_holder(run) is None
    with caplog.at_level(logging.WARNING):
        lock = run_lock.RunLock(run).acquire()
    assert f"taking over the stale lock {path} of a run that is no longer running (pid {holder.pid} " in caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    try:
        done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True,
                              check=False, timeout=20)
        return done.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_a_holder_in_another_pid_namespace_is_refused_while_it_lives(tmp_path, caplog):
    """A run in another pid namespace (a container) of this host, its lock naming a pid of that
    namespace: refused while it lives (its flock is held), taken over once it is killed, though a
    process with that pid number may run here. Where `unshare` cannot make a pid namespace (not root),
    a worker of this namespace holds a lock file that claims another one."""
    run = tmp_path / "run"
    run.mkdir()
    path = run / run_lock.LOCK_FILE
    if _unshare_works():
        # sh stays pid 1 of the new namespace, so that the worker (pid 2 there) can SIGKILL itself.
        holder = Worker(tmp_path / "holder.log", prefix=("unshare", "--pid", "--fork", "--mount-proc", "sh", "-c",
                                                          '"$0" "$@"; true'))
        assert holder.pid_ns != run_lock._pid_ns() and holder.pid == 2
        assert holder.call(op="acquire", dir=str(run))["ok"]
    else:
        holder = Worker(tmp_path / "holder.log")
        assert holder.call(op="hold", path=str(path), content=json.dumps({
            "pid": 2, "hostname": socket.gethostname(), "started": "now", "proc_start": 1,
            "boot_id": run_lock._boot_id(), "pid_ns": "pid:[1]", "token": "1" * 32}))["ok"]
    try:
        info = json.loads(path.read_text())
        assert info["pid"] == 2 and info["pid_ns"] != run_lock._pid_ns()
        with pytest.raises(JaxalignError, match=rf"in use by another run \(pid 2 on host {socket.gethostname()}"):
            run_lock.RunLock(run).acquire()
        assert run_lock.live_holder(run)["pid"] == 2
        holder.send(op="die")
        holder.proc.wait(timeout=30)
    finally:
        holder.stop()
    with caplog.at_level(logging.WARNING):
        lock = run_lock.RunLock(run).acquire()
    assert f"taking over the stale lock {path} of a run that is no longer running (pid 2 " in caplog.text
    lock.release()


def test_release_leaves_a_lock_another_run_has_taken_over(tmp_path):
    """A's lock file is deleted by hand (as the refusal message advises when its run is thought gone), B
    takes the dir; A's release then leaves B's lock in place."""
    run = tmp_path / "run"
    path = run / run_lock.LOCK_FILE
    a, b = Worker(tmp_path / "a.log"), Worker(tmp_path / "b.log")
    try:
        assert a.call(op="acquire", dir=str(run))["ok"]
        path.unlink()
        assert b.call(op="acquire", dir=str(run))["ok"]
        assert a.call(op="release")["ok"]
        assert json.loads(path.read_text())["pid"] == b.pid
        with pytest.raises(JaxalignError, match=rf"in use by another run \(pid {b.pid} "):
            run_lock.RunLock(run).acquire()
        assert b.call(op="release")["ok"]
        assert not path.exists()
    finally:
        a.stop()
        b.stop()


def test_one_process_shares_its_hold(tmp_path):
    """A second RunLock on a dir this process holds (another Trainer) succeeds and sees no other
    holder; the first release ends the hold, a later one does nothing."""
    run = tmp_path / "run"
    path = run / run_lock.LOCK_FILE
    first = run_lock.RunLock(run).acquire()
    second = run_lock.RunLock(run).acquire()
    assert run_lock.live_holder(run) is None and json.loads(path.read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in run.iterdir()) == [run_lock.LOCK_FILE]  # no temp file left
    second.release()
    assert not path.exists()
    first.release()
    with run_lock.RunLock(run):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_a_forked_child_does_not_keep_a_dead_holders_lock(tmp_path, caplog):
    """The holder forks a child (a data loader, say), then is killed; the child, still running, has
    closed its copy of the lock's descriptor, so the next run takes the dir over."""
    run = tmp_path / "run"
    holder, child = Worker(tmp_path / "holder.log"), None
    try:
        assert holder.call(op="acquire", dir=str(run))["ok"]
        child = holder.call(op="fork")["child"]
        holder.send(op="die")
        holder.proc.wait(timeout=30)
        assert run_lock.pid_alive(child)
        with caplog.at_level(logging.WARNING):
            run_lock.RunLock(run).acquire().release()
        assert f"of a run that is no longer running (pid {holder.pid} " in caplog.text
    finally:
        holder.stop()
        if child is not None:
            os.kill(child, signal.SIGKILL)


def test_judged_by_content_where_there_is_no_flock():
    """Without flock (flocked=None): same pid namespace, by pid; another boot: stale; another pid
    namespace of this boot: cannot be told."""
    host, boot, ns = socket.gethostname(), run_lock._boot_id(), run_lock._pid_ns()
    live = {"pid": os.getppid(), "hostname": host, "boot_id": boot, "pid_ns": ns, "token": "0" * 32}
    assert run_lock._is_stale(live, None) is False
    assert run_lock._is_stale({**live, "pid": dead_pid()}, None) is True
    assert run_lock._is_stale({**live, "boot_id": "another boot"}, None) is True
    assert run_lock._is_stale({**live, "pid_ns": "pid:[1]"}, None) is None
    assert run_lock._is_stale({**live, "hostname": "elsewhere"}, None) is False
    assert run_lock._is_stale({**live, "hostname": "elsewhere"}, True) is False
    assert run_lock._is_stale({**live, "pid_ns": "pid:[1]"}, True) is True  # its flock is free: gone
