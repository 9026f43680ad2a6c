"""Throughput measurement: warm-up, CUDA synchronisation, median of timed runs.

``throughput(fn, inputs)`` is what the CLI and the benchmark scripts use::

    from tome_fx.cli.bench import throughput
    ips = throughput(model, (x,), warmup=3, runs=10)   # images (batch items) per second
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Sequence

import torch


class Progress:
    """A one-line progress bar on a terminal (``stream``, stderr by default).

    Draws nothing until ``delay`` seconds have passed, so short runs stay quiet, and nothing
    at all when the stream is not a terminal (unless ``enabled=True``).
    """

    def __init__(self, total: int, desc: str = "", stream=None, enabled: bool | None = None,
                 delay: float = 0.5, width: int = 30):
        self.total, self.desc, self.width, self.delay = max(total, 1), desc, width, delay
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled
        self.count = 0
        self.start = time.perf_counter()
        self.drawn = False

    def update(self, n: int = 1) -> None:
        self.count = min(self.count + n, self.total)
        if self.enabled and time.perf_counter() - self.start >= self.delay:
            fill = self.width * self.count // self.total
            bar = "#" * fill + "-" * (self.width - fill)
            self.stream.write(f"\r{self.desc} |{bar}| {self.count}/{self.total}")
            self.stream.flush()
            self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\r" + " " * (len(self.desc) + self.width + 16) + "\r")
            self.stream.flush()
            self.drawn = False


def _devices(inputs: Sequence) -> set[torch.device]:
    return {t.device for t in inputs if isinstance(t, torch.Tensor)}


def _sync(devices: set[torch.device]) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def timings(fn: Callable, inputs: Sequence, warmup: int = 3, runs: int = 10,
            progress: Progress | None = None) -> list[float]:
    """Seconds per call of ``fn(*inputs)`` for ``runs`` calls after ``warmup`` untimed calls.

    Runs under ``torch.no_grad``; on CUDA each call is synchronised before the clock stops.
    ``progress`` (optional) is advanced once per call, warm-up included.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    devices = _devices(inputs)
    out = []
    with torch.no_grad():
        for i in range(warmup + runs):
            _sync(devices)
            t0 = time.perf_counter()
            fn(*inputs)
            _sync(devices)
            if i >= warmup:
                out.append(time.perf_counter() - t0)
            if progress is not None:
                progress.update()
    return out


def batch_size(inputs: Sequence) -> int:
    first = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
    if first is None or first.dim() == 0:
        raise ValueError("inputs need a tensor with a batch dimension")
    return int(first.shape[0])


def throughput(fn: Callable, inputs: Sequence, warmup: int = 3, runs: int = 10,
               progress: Progress | None = None) -> float:
    """Batch items per second: batch size / median seconds per call (see ``timings``)."""
    return batch_size(inputs) / statistics.median(timings(fn, inputs, warmup, runs, progress))
