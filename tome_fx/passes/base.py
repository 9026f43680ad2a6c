from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    count: int  # rewrites that fired
    info: Any = None  # pass-specific details
    notes: list[str] = field(default_factory=list)


def inserted(node: fx.Node, role: str, **facts) -> fx.Node:
    """Tag a node the passes created, so analyses know it is ours."""
    node.meta["tome"] = {"role": role, "inserted": True, **facts}
    return node


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.lint()
    gm.recompile()
    return gm
