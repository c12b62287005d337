"""Pieces of the loop that need no launcher: the preemption flag and the single-process collectives."""

from __future__ import annotations

import os
import signal

import torch

from mmscale import distributed
from mmscale.train.preemption import PreemptionHandler


def test_signal_sets_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as handler:
        assert not handler.requested and not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)  # delivered before the next bytecode
        assert handler.requested and handler.received == signal.SIGUSR1
        assert handler.should_stop()  # a world of one agrees with itself
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing: the process must not die
        assert handler.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before


def test_collectives_without_a_process_group():
    assert not distributed.is_initialized()
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.all_ranks(True) and not distributed.all_ranks(False)
    assert distributed.all_reduce_sum(2.5) == 2.5
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    t = torch.arange(6).view(3, 2)
    assert torch.equal(distributed.all_gather_padded(t), t)
