"""Helpers for test workers started with torch.multiprocessing.spawn."""

from __future__ import annotations

import os
import sys

from mmscale import distributed


def leave() -> None:
    """End a spawned worker whose results are already written: leave the process group with its peers
    (a barrier, then destroy), then exit at once, without the interpreter's finalisation.

    gloo's threads can still hold work objects with tensors when the interpreter tears itself down,
    and a rank then dies of SIGABRT ("terminate called without an active exception") after its work
    is done, failing the test that spawned it. Nothing is left to clean up in a worker: its output
    is on disk and its parent reads the exit code.
    """
    distributed.destroy(together=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
