"""Input dimensions of an exported graph: the batch a program is fixed at, the sizes it keeps
symbolic, and names for them (an ONNX file's ``batch``, ``sequence``, ...)."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx


def _user_inputs(module: Any) -> list[fx.Node]:
    """Placeholders of the inputs a caller passes (an ExportedProgram's graph also has
    placeholders for its parameters and buffers); [] without an fx graph."""
    graph = getattr(module, "graph", None)
    if not isinstance(graph, fx.Graph):
        return []
    signature = getattr(module, "graph_signature", None)
    names = set(signature.user_inputs) if signature is not None else None
    return [n for n in graph.nodes if n.op == "placeholder" and (names is None or n.name in names)]


def static_batch(module: Any) -> int | None:
    """The batch size an ExportedProgram or an export-captured GraphModule is fixed at
    (dimension 0 of every input tensor recorded as a number), else None: a symbolic batch, or
    a graph with no recorded input shapes (fx tracing keeps any batch)."""
    sizes = set()
    for n in _user_inputs(module):
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() > 0:
            size = val.shape[0]
            if isinstance(size, torch.SymInt) and not size.node.expr.is_number:
                return None
            sizes.add(int(size))
    return sizes.pop() if len(sizes) == 1 else None


def free_dims(program: Any, count: int) -> dict:
    """Free size symbol of the first ``count`` inputs -> [(input index, dimension), ...]."""
    found: dict = {}
    for i, node in enumerate(_user_inputs(program)[:count]):
        for d, size in enumerate(getattr(node.meta.get("val"), "shape", ())):
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                found.setdefault(size.node.expr, []).append((i, d))
    return found


def axis_names(program: Any, names: list[str], tensors) -> dict:
    """Free size symbol -> its name: ``batch`` (dimension 0), ``sequence`` (dimension 1 of
    ``[B, N]`` ids and masks and of ``[B, N, C]`` tokens), ``height`` and ``width`` (images),
    else ``<input>_dim<d>``; ``names``: the inputs' names."""
    found: dict = {}
    for symbol, where in free_dims(program, len(names)).items():
        i, d = where[0]
        rank = tensors[i].dim()
        name = ("batch" if d == 0 else "sequence" if d == 1 and rank in (2, 3)
                else {2: "height", 3: "width"}.get(d) if rank == 4 else None)
        found[symbol] = name if name and name not in found.values() else f"{names[i]}_dim{d}"
    return found
