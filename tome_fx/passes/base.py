"""What every pass shares: the context it reads, the result it returns, node tags."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from ..match import Matches


@dataclass
class Context:
    """One rewrite round: the graph being rewritten and what is known about it."""

    gm: fx.GraphModule
    args: tuple  # example inputs, for the passes that check themselves by running the graph
    kwargs: dict
    shapes: dict  # node -> output shape(s) before any merge
    matches: Matches
    sites: list = field(default_factory=list)  # MergeSites the method inserted, in graph order

    @property
    def merges(self) -> list[fx.Node]:
        return [s.merge for s in self.sites]


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
