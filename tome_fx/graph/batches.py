"""Modules whose batch size is fixed (a program saved with torch.export's default static
shapes, and what tome_fx captures from it), run on any number of items: in chunks of their
batch, the last chunk padded by repeating its last item and the padding dropped from the
outputs. Exact wherever items do not interact, as in every model tome_fx rewrites.

Re-exporting such a program with a dynamic batch is no way out: its graph bakes the batch
into shape arguments (``aten.reshape(x, [2, 197, 3, 3, 64])``)."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves, tree_map

from .dims import static_batch


def items(inputs: Any) -> int | None:
    """Items in ``inputs`` (dimension 0 of the first tensor), None without a tensor."""
    first = next((t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor) and t.dim()), None)
    return None if first is None else int(first.shape[0])


def fit_batch(inputs: Any, size: int, start: int = 0) -> Any:
    """Items ``start:start + size`` of ``inputs`` (tensors with the batch as dimension 0, in
    any container), the last item repeated where fewer remain."""
    n = items(inputs)

    def fit(t):
        if not isinstance(t, torch.Tensor) or not t.dim() or t.shape[0] != n:
            return t
        part = t[start:start + size]
        missing = size - len(part)
        return torch.cat([part, part[-1:].expand(missing, *part.shape[1:])]) if missing else part

    return tree_map(fit, inputs)


def in_batches(fn: Callable, args: tuple, kwargs: dict, size: int | None) -> Any:
    """``fn(*args, **kwargs)``, in calls of exactly ``size`` items when ``size`` is set and the
    inputs hold another number: outputs with the batch as dimension 0 are concatenated."""
    n = items((args, kwargs))
    if size is None or n is None or n == size:
        return fn(*args, **kwargs)
    outs = []
    for start in range(0, n, size):
        a, k = fit_batch((args, kwargs), size, start)
        outs.append(fn(*a, **k))

    def join(*parts):
        if not isinstance(parts[0], torch.Tensor):
            return parts[0]
        if not parts[0].dim() or parts[0].shape[0] != size:
            raise ValueError(f"cannot run a module fixed at batch {size} on {n} items: an output "
                             f"of shape {tuple(parts[0].shape)} has no batch dimension")
        return torch.cat(parts)[:n]

    return tree_map(join, outs[0], *outs[1:])


class InBatches(nn.Module):
    """``module`` called on any number of items, ``size`` at a time (``in_batches``)."""

    def __init__(self, module: nn.Module, size: int):
        super().__init__()
        self.module, self.size = module, size

    def forward(self, *args, **kwargs):
        return in_batches(self.module, args, kwargs, self.size)


def batched(module: nn.Module) -> nn.Module:
    """``module`` itself, or ``InBatches`` of it where its batch is static."""
    size = static_batch(module)
    return module if size is None or isinstance(module, InBatches) else InBatches(module, size)
