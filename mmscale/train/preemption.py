"""Preemption: a signal on any rank becomes a clean stop on all of them.

Schedulers announce a preemption with SIGTERM (SLURM sends it to every task, then SIGKILL
after a grace period) and some send SIGUSR1 earlier (`sbatch --signal=USR1@120`). The
deepspeed launcher forwards SIGTERM to its ranks and SIGKILLs them 30 s later. A handler
that saved right away would deadlock: saving is collective, and the other ranks may be in
the middle of a step. So the handler only sets a flag, and the loop asks every rank once
per step whether any rank has it (`should_stop`); all then finish that step, save and exit.

Ctrl-C (SIGINT) is one more such signal: the first one stops the run the same way. It also
makes the next SIGINT fatal at the kernel level (SIG_DFL), so a second Ctrl-C aborts at once
without saving, even while the process is blocked inside a collective, where no Python handler
could run. Which processes a terminal's Ctrl-C reaches depends on how the run was started
(launch/README.md says what each way does).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterable
from types import FrameType

from mmscale import distributed

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionHandler:
    """Turns SIGTERM/SIGUSR1/SIGINT into a flag the ranks agree on at step boundaries."""

    def __init__(self, signals: Iterable[signal.Signals] = DEFAULT_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        self.received_at: float | None = None
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> PreemptionHandler:
        """Catch the signals (main thread only)."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only set a flag: a signal handler runs between two bytecodes of whatever the main
        # thread was doing, possibly inside a collective, so it must not start one itself.
        if self.received is None:
            self.received = signal.Signals(signum)
            self.received_at = time.monotonic()
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the second Ctrl-C ends the process at once
            if os.environ.get("RANK", "0") == "0":
                # os.write, not print: the handler may run while the main thread is inside a print.
                os.write(2, b"\nmmscale: Ctrl-C: finishing this step, saving a checkpoint, then exiting "
                            b"(Ctrl-C again aborts without saving)\n")

    @property
    def requested(self) -> bool:
        """This rank got a signal (local, not a collective)."""
        return self.received is not None

    def should_stop(self) -> bool:
        """True on every rank when any rank got a signal (a collective: call it on all ranks)."""
        stop = distributed.any_rank(self.requested)
        if stop and self.received is None:
            self.received_at = time.monotonic()  # this rank learnt it from a peer
        return stop

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()
