"""A GPU's device rules, checked on a CPU: host tensors in collectives, host/device mixing, host syncs.

On a GPU machine the compute device (cuda:N) differs from where a tensor lands by default (the
CPU), NCCL takes CUDA tensors only, and every `.item()` makes the host wait for the device. On a
CPU-only box all of that is invisible: everything is one device. This module makes it visible.
mmscale runs with `MMSCALE_DEVICE=cpu:0` (its compute device, given explicitly), and a
TorchFunctionMode tags every tensor mmscale's own code leaves on the host — made by a factory
without a device, moved with `.cpu()` / `.to("cpu")`, or coming out of a DataLoader — and follows
the tag through every op, as a GPU would follow the tensor's device:

* a collective (torch.distributed.all_reduce, all_gather, ...) on a host tensor is an error
  ("NCCL has no CPU backend");
* an op mixing a host tensor of one or more dimensions with a device one is an error (CUDA raises
  "Expected all tensors to be on the same device"); 0-dim host scalars may mix, as on CUDA;
* a host read of a device tensor from mmscale's code (`item`, `tolist`, `bool`, `int`, `float`,
  `nonzero`, `.cpu()`, a blocking host->device copy, ...) is counted with its call site.

Parameters and module buffers count as on the device (the engine moves the module there).
Install it with `install()`; `tests/devicecheck/sitecustomize.py` does so in every process
started with this directory on PYTHONPATH and MMSCALE_DEVICECHECK=1 (the ranks of a launcher run),
and writes each process's counts to MMSCALE_DEVICECHECK_OUT/<pid>.json at exit.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.data import get_worker_info

TORCH_DIR = os.path.dirname(torch.__file__)
THIS = os.path.abspath(__file__)
MMSCALE_DIR = str(Path(__file__).resolve().parents[2] / "mmscale")
HOST = torch.device("cpu")
SIM_DEVICE = torch.device("cpu", 0)  # what mmscale runs with under the check: MMSCALE_DEVICE=cpu:0
DEVICE_DESCRIPTOR = torch.Tensor.device
FACTORIES = {
    torch.tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.rand, torch.randn,
    torch.randint, torch.randperm, torch.linspace, torch.eye, torch.as_tensor, torch.empty_strided,
    torch.scalar_tensor, torch.from_numpy,
}  # fmt: skip
READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero", "argwhere",
         "unique", "masked_select", "__repr__", "__format__"}  # fmt: skip
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter",
               "broadcast", "reduce", "all_to_all_single", "gather", "scatter")  # fmt: skip


class DeviceRuleError(RuntimeError):
    """What would fail on a GPU with NCCL."""


class State:
    syncs: Counter = Counter()  # "file:line func" -> count (mmscale's own calls)
    violations: list[str] = []
    collectives: Counter = Counter()


def _caller():
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename.startswith(TORCH_DIR) or os.path.abspath(f.f_code.co_filename) == THIS):
        f = f.f_back
    return f


def _where(frame) -> str:
    if frame is None:
        return "?"
    path = frame.f_code.co_filename
    root = os.path.dirname(MMSCALE_DIR)
    return f"{os.path.relpath(path, root) if path.startswith(root) else os.path.basename(path)}:{frame.f_lineno}"


# Code held to the rules: mmscale's package, plus directories a test names (its stand-ins for old code).
MINE = (MMSCALE_DIR, *[p for p in os.environ.get("MMSCALE_DEVICECHECK_MINE", "").split(os.pathsep) if p])


def _mine(frame) -> bool:
    return frame is not None and frame.f_code.co_filename.startswith(MINE)


def is_host(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) and getattr(t, "_mm_host", False)


def _tag(out: Any, host: bool) -> None:
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
            try:
                t._mm_host = host
            except (AttributeError, RuntimeError):  # a few C-made tensors refuse attributes
                pass


def _target_is_host(args, kwargs) -> bool | None:
    """For .to(...)/.cpu(): True (host), False (a device), None (dtype only: the input decides)."""
    device = kwargs.get("device")
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            device = a
        elif isinstance(a, torch.Tensor):
            return is_host(a)
    if device is None:
        return None
    return torch.device(device) == HOST


class Placement(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if get_worker_info() is not None:  # a DataLoader worker (forked with the mode): host-only by design
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        frame = _caller()
        mine = _mine(frame)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        hosts = [t for t in tensors if is_host(t)]
        devices = [t for t in tensors if not is_host(t)]
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None

        if getattr(func, "__self__", None) is DEVICE_DESCRIPTOR and mine and first is not None:
            # A device tensor reports the compute device, as on a GPU (`device=x.device` stays there).
            return HOST if is_host(first) else SIM_DEVICE
        if mine and name in READS and first is not None and not is_host(first):
            State.syncs[f"{_where(frame)} {name}"] += 1
        if name in ("to", "cpu", "cuda", "pin_memory"):
            target = True if name in ("cpu", "pin_memory") else (False if name == "cuda" else _target_is_host(args, kwargs))
            out = func(*args, **kwargs)
            source_host = first is not None and is_host(first)
            if mine and target is True and first is not None and not source_host:
                State.syncs[f"{_where(frame)} {name}(host)"] += 1  # a device -> host copy waits for the device
            if mine and target is False and source_host and not kwargs.get("non_blocking", False):
                State.syncs[f"{_where(frame)} {name}(blocking host->device)"] += 1
            if target is None or (target is True and not mine):
                target = source_host  # only mmscale's own code is held to putting tensors on the host
            if out is first and target != source_host:
                # On one physical device `.cpu()` / `.to()` hand back the tensor itself; on a GPU machine
                # they make a new one on the other side. A view is that new tensor here.
                with torch._C.DisableTorchFunction():
                    out = first.view_as(first)
            _tag(out, target)
            return out
        if func in FACTORIES:
            out = func(*args, **kwargs)
            device = kwargs.get("device")
            _tag(out, mine and (device is None or torch.device(device) == HOST))
            return out
        if name == "copy_" and first is not None:
            out = func(*args, **kwargs)  # cross-device copies are legal; the destination keeps its place
            if mine and len(args) > 1 and is_host(args[1]) and not is_host(first) and not kwargs.get("non_blocking"):
                State.syncs[f"{_where(frame)} copy_(blocking host->device)"] += 1
            return out
        big_host = [t for t in hosts if t.ndim > 0]
        big_device = [t for t in devices if t.ndim > 0]
        if big_host and big_device and name not in ("__getitem__", "__setitem__"):
            kinds = ", ".join(f"{'host' if is_host(t) else 'device'} {tuple(t.shape)}" for t in tensors)
            msg = (f"{_where(frame)}: {name} mixes a host tensor {tuple(big_host[0].shape)} with a device tensor "
                   f"{tuple(big_device[0].shape)} (CUDA: 'Expected all tensors to be on the same device'); "
                   f"arguments: {kinds}")
            State.violations.append(msg)
            raise DeviceRuleError(msg)
        if name in ("__getitem__", "__setitem__") and first is not None and not is_host(first):
            index = args[1] if len(args) > 1 else None
            for t in tree_flatten(index)[0]:
                if isinstance(t, torch.Tensor) and mine:
                    if is_host(t):
                        State.syncs[f"{_where(frame)} {name}(host index)"] += 1
                    elif t.dtype == torch.bool:
                        State.syncs[f"{_where(frame)} {name}(bool mask)"] += 1
        out = func(*args, **kwargs)
        _tag(out, bool(hosts) and not big_device and (bool(big_host) or not devices))
        return out


def _check_collective(name: str, fn):
    def wrapped(*args, **kwargs):
        frame = _caller()
        for t in tree_flatten((args, kwargs))[0]:
            if is_host(t):
                msg = (f"{_where(frame)}: torch.distributed.{name} on a host tensor {tuple(t.shape)} "
                       "(NCCL serves CUDA tensors only: put it on distributed.comm_device())")
                State.violations.append(msg)
                raise DeviceRuleError(msg)
        State.collectives[name] += 1
        return fn(*args, **kwargs)

    wrapped.__wrapped__ = fn
    return wrapped


def _taint_loader_batches() -> None:
    from torch.utils.data import dataloader

    original = dataloader._BaseDataLoaderIter.__next__

    def __next__(self):
        batch = original(self)
        _tag(batch, True)  # batches arrive in host memory (pinned or not)
        return batch

    dataloader._BaseDataLoaderIter.__next__ = __next__


def _untaint_module_state() -> None:
    original = torch.nn.Module._apply

    def _apply(self, fn, recurse=True):
        out = original(self, fn, recurse)
        for b in self.buffers(recurse=False):
            _tag(b, False)  # the engine moved the module (buffers included) to the device
        return out

    torch.nn.Module._apply = _apply


_mode: Placement | None = None


def install() -> None:
    """Check this process from now on (idempotent)."""
    global _mode
    if _mode is not None:
        return
    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, _check_collective(name, getattr(dist, name)))
    _taint_loader_batches()
    _untaint_module_state()
    _mode = Placement()
    _mode.__enter__()


def report() -> dict[str, Any]:
    """What this process saw: host syncs by call site, collective counts, violations."""
    return {"syncs": dict(State.syncs), "collectives": dict(State.collectives), "violations": list(State.violations)}


def write_report_at_exit(directory: str) -> None:
    """Write `report()` to directory/<pid>.json when the process exits."""
    def write() -> None:
        path = Path(directory) / f"{os.getpid()}.json"
        path.write_text(json.dumps({"rank": os.environ.get("RANK"), **report()}))

    atexit.register(write)
