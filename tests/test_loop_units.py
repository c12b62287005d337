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


def test_changed_settings_names_what_defines_a_run_and_lets_cadence_change():
    from mmscale.config import load_config, to_dict
    from mmscale.train.loop import RESUME_MAY_CHANGE, changed_settings

    saved = to_dict(load_config("launch/configs/tiny.yaml"))
    same = to_dict(load_config("launch/configs/tiny.yaml", ["train.steps=500", "train.log_every=1",
                                                             "train.save_every=7", "data.workers=0", "eval.batch_size=8"]))
    assert changed_settings(saved, same) == []  # longer, logged and saved differently: the same run
    other = to_dict(load_config("launch/configs/tiny.yaml", ["train.lr=0.1", "model.text.config.num_hidden_layers=1"]))
    assert changed_settings(saved, other) == [
        "model.text.config: " + repr(saved["model"]["text"]["config"]) + " -> " + repr(other["model"]["text"]["config"]),
        "train.lr: 0.001 -> 0.1",
    ]
    assert changed_settings(saved, other, RESUME_MAY_CHANGE + ("train.lr", "model")) == []
