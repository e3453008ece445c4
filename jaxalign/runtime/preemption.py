"""Stop cleanly when the job is preempted: SIGTERM -> finish the step, checkpoint it, exit 75.

SIGTERM is what a TPU VM or spot/preemptible VM gets before it is taken away (and what Kubernetes,
Slurm and `kill` send first); SIGKILL follows after a grace period. The handler only sets a flag;
the training loop asks `requested()` after each step and, when it says so, writes a checkpoint of that
step, waits for the write and returns, so `--resume` continues exactly (see jaxalign.run.loop).
Further SIGTERMs change nothing: the checkpoint being written is finished. SIGINT (Ctrl-C) acts like
SIGTERM the first time; a second SIGINT aborts (KeyboardInterrupt; the pending write still completes
unless interrupted again).

Watches nest: `jaxalign train` and `jaxalign pipeline` hold one for the whole command (a signal during
set-up or between stages is kept, not fatal), and the loop's own watch shares it.

Multi-host: every process must stop at the same step, or the collectives of the next step hang.
`requested()` all-gathers each process's flag (a psum of local flags, in effect) and answers True on
all of them when any was signalled, so a signal that reaches some hosts first, or only one, still
stops the whole job at one step. That is one tiny collective per step, done only when
process_count > 1 (a single-host run pays nothing); the loop already reads each step's metrics on the
host, so it costs no overlap. (jax.experimental.multihost_utils.reached_preemption_sync_point is the
alternative on TPU pods whose coordination service receives preemption notices itself.)
"""

from __future__ import annotations

import signal
import threading

import numpy as np

_ACTIVE: list[PreemptionWatch] = []  # the watches entered, outermost first


class PreemptionWatch:
    """Context manager: while active, SIGTERM (and a first SIGINT) set `received` instead of killing
    the process. Entered inside another watch, it shares that one's signals."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals, self._received, self.previous, self.outer = signals, None, {}, None

    @property
    def received(self):
        return self.outer.received if self.outer is not None else self._received

    def __enter__(self) -> PreemptionWatch:
        if _ACTIVE:
            self.outer = _ACTIVE[0]
        elif threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.signals:
                self.previous[sig] = signal.signal(sig, self._handler)
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous, self.outer = {}, None

    def _handler(self, signum, frame) -> None:  # only sets a flag: the loop acts between steps
        if signum == signal.SIGINT and self._received is not None:
            raise KeyboardInterrupt(f"second stop signal ({signal.Signals(signum).name}): aborting")
        if self._received is None:
            self._received = signum

    def requested(self) -> bool:
        """Whether to stop after this step: the same answer on every process of the job."""
        import jax

        local = self.received is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(local))))
