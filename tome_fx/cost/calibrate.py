"""Calibration: how far a schedule moves the model's outputs on the example inputs (the
fidelity proxy the ``auto`` strategy minimises), and which blocks merge for free."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from ..graph.batches import in_batches, static_batch
from .flops import run_flops
from .model import BIG_R, CostModel

ROUNDING = 1e-10  # output drift below this is float rounding (one merge moves it >= 1e-7)


def _features(out: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def output_drift(reference: Any, output: Any) -> float:
    """Mean cosine distance (1 - cos) per sample between two model outputs.

    Dimensions whose size differs (a token dimension that merging shortened) are averaged out
    in both before comparing.
    """
    total, count = 0.0, 0
    for a, b in zip(_features(reference), _features(output)):
        if a.dim() != b.dim():
            continue
        dims = tuple(d for d in range(a.dim()) if a.shape[d] != b.shape[d])
        if dims:
            a, b = a.mean(dim=dims, keepdim=True), b.mean(dim=dims, keepdim=True)
        a = a.double().reshape(a.shape[0], -1) if a.dim() > 1 else a.double().reshape(1, -1)
        b = b.double().reshape(b.shape[0], -1) if b.dim() > 1 else b.double().reshape(1, -1)
        total += float((1 - F.cosine_similarity(a, b, dim=-1, eps=1e-12)).mean())
        count += 1
    return total / max(count, 1)


def _same_tensors(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` hold the very same tensor objects, in the same places."""
    la, ta = tree_flatten(a)
    lb, tb = tree_flatten(b)
    return ta == tb and all(x is y for x, y in zip(la, lb))


class Calibration:
    """Runs the max-merge rewrite with a chosen r per block on the calibration inputs: ``inputs``
    as ``(args, kwargs)`` (real data, ``optimize(calibration=...)``), else the example inputs.
    They must hold as many tokens as the example inputs; the batch may differ (a graph fixed at
    one batch, captured from a static ``.pt2``, runs them that many at a time)."""

    def __init__(self, cm: CostModel, inputs: tuple | None = None):
        self.cm = cm
        if inputs is not None and _same_tensors(inputs, cm.inputs):
            inputs = None  # calibration= the example inputs: reuse the cost model's reference run
        self.inputs = cm.inputs if inputs is None else inputs
        self.reference = cm.reference if inputs is None else None
        if self.reference is None:
            self.reference = self.output([0] * cm.num_blocks)

    def output(self, schedule: list[int]) -> Any:
        r_of = {node: schedule[i] for i, node in self.cm.merge_nodes.items()}
        gm = self.cm.graph_module
        run = lambda *a, **k: run_flops(gm, (a, k), r_of, count=False).result  # noqa: E731
        return in_batches(run, *self.inputs, static_batch(gm))

    def drift(self, schedule: list[int]) -> float:
        return output_drift(self.reference, self.output(schedule))

    def free_blocks(self) -> frozenset:
        """Trailing blocks where merging the most leaves the calibration outputs unchanged.

        E.g. the last block of a class-token ViT: its merge only shrinks the MLP over tokens
        the head never reads. Walks back from the last block and stops at the first block
        whose merge moves the output (drift above float rounding).
        """
        free = set()
        for i in reversed(range(self.cm.num_blocks)):
            alone = [0] * self.cm.num_blocks
            alone[i] = BIG_R
            alone = self.cm.clamp(alone)
            if alone[i] == 0 or self.drift(alone) > ROUNDING:
                break
            free.add(i)
        return frozenset(free)
