"""Throughput measurement: warm-up, CUDA synchronisation, median of timed runs; progress bars.

``throughput(fn, inputs)`` times one module; ``compare(original, rewritten, inputs)`` times
two in the same rounds (the order alternating), as ``tome-fx bench`` and ``tome_fx.sweep`` do::

    from tome_fx.timing import compare, throughput
    ips = throughput(model, (x,), warmup=3, runs=10)   # images (batch items) per second
    compare(model, fast, (x,))                         # {"original", "rewritten", "speedup"}
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Sequence

import torch
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm


def progress(total: int | None = None, desc: str = "", quiet: bool | None = None, file=None,
             **kwargs) -> tqdm:
    """A tqdm bar on ``file`` (stderr): off when ``quiet`` is True; when ``quiet`` is None, on
    only if ``file`` is a terminal. Bars are removed when they finish (``leave=False``)."""
    file = file if file is not None else sys.stderr
    if quiet is None:
        quiet = not bool(getattr(file, "isatty", lambda: False)())
    return tqdm(total=total, desc=desc, disable=quiet, file=file, leave=False,
                dynamic_ncols=True, **kwargs)


def cores() -> int:
    """CPU cores this process may run on (its affinity), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on this platform
        return os.cpu_count() or 1


@contextlib.contextmanager
def cpu_threads(threads: int | None = None):
    """Yields the number of CPU threads torch computes with: ``threads`` (intra-op, and
    inter-op where torch still allows setting it: before any parallel work), else what it
    has (``torch.get_num_threads()``). The intra-op count is restored after."""
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
        with contextlib.suppress(RuntimeError):  # set once per process, before parallel work
            torch.set_num_interop_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def busy_cpu(threads: int) -> str | None:
    """Why CPU timings with ``threads`` threads are not to be trusted here, or None: the
    1-minute load average above the cores this process may use (other processes share them),
    or more threads than those cores."""
    n = cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        load = 0.0
    why = []
    if load > n:
        why.append(f"the 1-minute load average is {load:.1f} on {n} core(s): other processes "
                   "share the CPU")
    if threads > n:
        why.append(f"{threads} threads on {n} core(s)")
    if not why:
        return None
    return (f"{' and '.join(why)}, so times and speed-ups are unreliable (time on an idle "
            "machine, or with one thread: --threads 1)")


def _devices(inputs: Sequence) -> set[torch.device]:
    values = inputs.values() if isinstance(inputs, dict) else inputs
    return {t.device for t in values if isinstance(t, torch.Tensor)}


def _sync(devices: set[torch.device]) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def to_device(inputs, device: torch.device):
    """``inputs`` (tensors in a tuple, dict or other container) on ``device``."""
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, inputs)


def call(fn: Callable, inputs):
    """``fn(**inputs)`` for a dict of keyword inputs, else ``fn(*inputs)``."""
    return fn(**inputs) if isinstance(inputs, dict) else fn(*inputs)


def interleaved(fns: Sequence[Callable], inputs, warmup: int = 3, runs: int = 10, bar=None,
                clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Seconds per call of each of ``fns`` on the same ``inputs`` (``call``): ``warmup``
    untimed rounds, then ``runs`` timed ones. Each round calls every function once, the order
    rotating from round to round, so a change of machine load hits all of them alike.

    Runs under ``torch.no_grad``; on CUDA each call is synchronised before the clock stops.
    ``bar`` (optional, a tqdm bar) is advanced once per call, warm-up included.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    devices = _devices(inputs)
    out: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for i in range(warmup + runs):
            k = i % len(fns)
            for j in [*range(k, len(fns)), *range(k)]:
                _sync(devices)
                t0 = clock()
                call(fns[j], inputs)
                _sync(devices)
                if i >= warmup:
                    out[j].append(clock() - t0)
                if bar is not None:
                    bar.update()
    return out


def timings(fn: Callable, inputs, warmup: int = 3, runs: int = 10, bar=None) -> list[float]:
    """Seconds per call of ``fn`` alone (``interleaved`` with one function)."""
    return interleaved([fn], inputs, warmup, runs, bar)[0]


def batch_size(inputs) -> int:
    values = inputs.values() if isinstance(inputs, dict) else inputs
    first = next((t for t in values if isinstance(t, torch.Tensor)), None)
    if first is None or first.dim() == 0:
        raise ValueError("inputs need a tensor with a batch dimension")
    return int(first.shape[0])


def throughput(fn: Callable, inputs, warmup: int = 3, runs: int = 10, bar=None) -> float:
    """Batch items per second: batch size / median seconds per call (see ``timings``)."""
    return batch_size(inputs) / statistics.median(timings(fn, inputs, warmup, runs, bar))


def compare(original: Callable, rewritten: Callable, inputs, warmup: int = 3, runs: int = 10,
            bar=None, clock: Callable[[], float] = time.perf_counter) -> dict:
    """``{"original": items/s, "rewritten": items/s, "speedup": rewritten / original}``, both
    timed in the same rounds (``interleaved``), medians."""
    times = interleaved([original, rewritten], inputs, warmup, runs, bar, clock)
    speeds = [batch_size(inputs) / statistics.median(t) for t in times]
    return {"original": speeds[0], "rewritten": speeds[1], "speedup": speeds[1] / speeds[0]}
