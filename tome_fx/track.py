"""Token sources: which input tokens each merged token holds, without changing any output.

``track_sources(module, *inputs)`` runs a rewritten module with an ``fx.Interpreter``. Every
merge (``tome_merge``, ``tomato_merge``) runs unchanged (so outputs are bit-identical to
``module(*inputs)``); next to it the same matching (``kernels.tome.match_tokens``,
``kernels.tomato.tomato_labels``, called with the merge's own arguments, bound by name) is recomputed
and applied to a source map ``S`` of shape [B, N, N0]
(``S[b, i, j] = 1`` when token ``i`` holds input token ``j``; ``N0`` = tokens entering the first
merge, protected prefix included). Merging adds rows (a sum, not a mean), so a row's sum is the
token's size; that is checked against the size the merge returns.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from . import graph as gu
from .kernels.tomato import component_slots, tomato_labels, tomato_merge
from .kernels.tome import match_tokens, tome_merge


def merge_sources(sources: torch.Tensor, plan) -> torch.Tensor:
    """Apply a merge plan (``kernels.tome.bipartite_plan``) to a source map: merged rows are
    added to the rows of their slots."""
    keep, src, dst, live = plan

    def rows(index):
        return sources.gather(1, index[..., None].expand(-1, -1, sources.shape[-1]))

    moved = rows(src) if live is None else rows(src) * live[..., None].to(sources.dtype)
    return rows(keep).scatter_add(1, dst[..., None].expand_as(moved), moved)


def component_sources(sources: torch.Tensor, prefix: int, labels, n_out) -> torch.Tensor:
    """Apply a ToMato labelling (``tomato.tomato_labels``) to a source map: a component's row is
    the sum of its patches' rows."""
    slot, n_out = component_slots(labels, n_out)
    rest = sources[:, prefix:]
    out = rest.new_zeros(rest.shape[0], n_out, rest.shape[-1]).scatter_add(
        1, slot[..., None].expand(-1, -1, rest.shape[-1]), rest)
    return torch.cat([sources[:, :prefix], out], dim=1)


def _tome(sources, a):
    plan = match_tokens(a["x"].shape[1], a["keys"], a["r"], a["prefix"], a["keys_transposed"],
                        a["origin"], a["groups"], a["start"], a["pad"])
    return sources if plan is None else merge_sources(sources, plan)


def _tomato(sources, a):
    found = tomato_labels(a["x"], a["src"], a["r"], a["prefix"], a["grid"], a["kind"],
                          a["threshold"], a["scale"], a["origin"], a["groups"])
    return sources if found is None else component_sources(sources, a["prefix"], *found)


# merge function -> (its signature, how its matching moves a source map)
_MERGES = {fn: (inspect.signature(fn), apply)
           for fn, apply in ((tome_merge, _tome), (tomato_merge, _tomato))}


@dataclass
class Tracked:
    output: object  # the module's output, identical to module(*inputs)
    sources: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> [B, N, N0]
    prefix: int = 0  # protected tokens (rows and columns 0..prefix-1)
    num_blocks: int = 0

    def at(self, block: int) -> torch.Tensor | None:
        """Source map of the tokens leaving ``block`` (the last merge at or before it)."""
        done = [k for k in self.sources if k <= block]
        return self.sources[max(done)] if done else None


class _Tracker(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.current: torch.Tensor | None = None
        self.by_block: dict[int, torch.Tensor] = {}
        self.prefix = 0

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.op == "call_function" and n.target in _MERGES:
            with self._set_current_node(n):
                args, kwargs = self.fetch_args_kwargs_from_env(n)
            signature, apply = _MERGES[n.target]
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            self._track(n, out, apply, bound.arguments)
        return out

    def _track(self, n, out, apply, arguments: dict):
        x, prefix = arguments["x"], arguments["prefix"]
        batch, tokens = x.shape[0], x.shape[1]
        self.prefix = prefix
        if self.current is None:
            self.current = torch.eye(tokens, device=x.device).expand(batch, -1, -1)
        elif self.current.shape[1] != tokens:
            raise RuntimeError(f"source tracking: {n.name} sees {tokens} tokens, "
                               f"the previous merge left {self.current.shape[1]}")
        self.current = apply(self.current, arguments)
        new_size = out[1][..., 0].float()
        if new_size.shape != self.current.shape[:2] or not torch.equal(new_size, self.current.sum(-1)):
            raise RuntimeError(f"source tracking disagrees with {n.name}'s token sizes")
        block = n.meta.get("tome", {}).get("block", len(self.by_block))
        self.by_block[block] = self.current


def track_sources(module: fx.GraphModule, *args, **kwargs) -> Tracked:
    """Run a module from ``tome_fx.optimize`` on inputs, recording each merge's token sources."""
    if not isinstance(module, fx.GraphModule):
        raise TypeError(f"track_sources needs the GraphModule tome_fx.optimize returns "
                        f"(not compiled), got {type(module).__name__}")
    run = _Tracker(module)
    with torch.no_grad():
        output = gu.run_interpreter(run, module, args, kwargs)
    plan = getattr(module, "tome", None)
    num = len(plan.blocks) if plan is not None else len(run.by_block)
    prefix = plan.protected if plan is not None else run.prefix
    return Tracked(output, run.by_block, prefix, num)
