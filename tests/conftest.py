"""Session hygiene: DeepSpeed's CPU backend leaves ~70 MB shared-memory buffers behind every launch."""

from __future__ import annotations

import os
import time

import pytest

SHM_DIR = "/dev/shm"
PREFIX = "deepspeed_allreduce_buffer_"


@pytest.fixture(scope="session", autouse=True)
def remove_leaked_cpu_comm_buffers():
    """Unlink the buffers made during this session (a crashed or killed rank never removes its own).

    Only files older than a minute: another test session on the machine may be starting a job and
    open them by name; once a job has started, unlinking does not affect its mappings.
    """
    start = time.time()
    yield
    if not os.path.isdir(SHM_DIR):
        return
    now = time.time()
    for name in os.listdir(SHM_DIR):
        path = os.path.join(SHM_DIR, name)
        try:
            mtime = os.path.getmtime(path)
            if name.startswith(PREFIX) and start <= mtime <= now - 60:
                os.unlink(path)
        except OSError:
            pass
