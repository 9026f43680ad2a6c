"""FLOPs of a rewritten model as a closed-form function of the merge schedule.

How the model is built (``CostModel.build``), from the graph rather than from a known layout:

* The model is rewritten once with the largest merge everywhere (``r`` clamped per block at run
  time), so every block that can merge has a ``tome_merge`` node.
* Token counts change only at merges, so the graph splits into segments at the blocks' merge
  points: segment 0 (before block 0's merge point: patch embedding, block 0's attention) sees
  ``N0`` tokens, segment ``i`` (block ``i-1``'s MLP, block ``i``'s attention) sees the tokens
  block ``i-1`` leaves, and the last segment (the last MLP, the head) those the last block leaves.
* A block sees the tokens an earlier block leaves (its link; in a plain transformer the block
  before it), or, where no merge reaches it, its own count: the blocks of a multi-resolution
  model (a UNet, a pyramid) see different counts. Links are read from two runs, without merging
  and at the most merging, and must explain both; a block none explains cannot be priced, and
  then nothing merges (``Plan.skipped`` says why) rather than a budget being missed silently.
* Each node's FLOPs are measured from the tensors it runs on (``cost.flops``).
* The graph is run twice: with r = 0 everywhere and with the largest r. Comparing a node's
  FLOPs at the two token counts of its segment tells whether it is constant (the head on the
  class token), linear (per-token linears) or quadratic (attention products) in the count.
* The merge step costs its score matrix, ``2*B*|A|*|B|*d`` (the product in
  ``kernels.tome.bipartite_match``), with ``|A|``, ``|B|`` the two halves of the unprotected
  tokens and ``d`` the key dimension; it is 0 where a block merges nothing.

So ``flops(schedule) = sum_s (c_s + a_s*T_s + q_s*T_s**2) + sum_i merge_i(T_i, r_i)``, with
``T_s`` the tokens segment ``s`` sees and ``T_i`` those entering block ``i``: evaluating
a schedule is a few arithmetic operations per block, cheap enough for a search.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch.fx as fx

from .. import graph as gu
from ..capture import Captured
from ..kernels.tome import merge_limit
from ..rules import ToMe
from ..pipeline import rewrite
from ..plans import Plan, Skipped
from .flops import merge_flops, run_flops

BIG_R = 1 << 30  # "merge as much as the block allows"; clamped at run time by tome_merge


@dataclass
class _Term:
    """FLOPs ``c + a*T + q*T**2`` of the nodes of one (segment, owner) group."""

    c: float = 0.0
    a: float = 0.0
    q: float = 0.0

    def at(self, t: int) -> float:
        return self.c + self.a * t + self.q * t * t


@dataclass
class CostModel:
    """Closed-form FLOPs of a model rewritten with a given merge schedule (see module doc)."""

    tokens: int  # tokens entering block 0
    prefix: int  # protected tokens
    batch: int  # batch of the example inputs; all FLOPs are for that batch
    enabled: tuple[bool, ...]  # blocks whose merge the rewrite keeps
    merge_dims: tuple[int, ...]  # key dimension of each block's merge metric
    terms: dict[tuple[int, int], _Term]  # (segment, owner block or -1 outside) -> term
    base_plan: Plan | None = None  # plan of the max-merge rewrite (sites, kinds, skips)
    graph_module: fx.GraphModule | None = None  # the max-merge rewrite, for calibration runs
    merge_nodes: dict[int, fx.Node] = field(default_factory=dict)
    inputs: tuple = ((), {})
    reference: Any = None  # the unmerged output on the example inputs (calibration reference)
    # Padding-mask groups limit merges by the data (tokens merge only within their group): the
    # most each block merged at the max schedule on the example inputs caps it.
    caps: tuple[int, ...] = ()
    # FLOPs of the model without merging or dropping, when the rewrite drops unread tokens
    # (tome_fx.passes.drop: then r = 0 everywhere is already cheaper than the original)
    original: tuple[list[float], float] | None = None  # (FLOPs per block, outside blocks)
    counts: tuple[int, ...] = ()  # tokens entering each block without merging
    links: tuple[int, ...] = ()  # the block whose tokens enter each block; -1: its own count
    floor: int = 0  # the fidelity floor (cost.floor): no merge leaves fewer tokens

    @property
    def num_blocks(self) -> int:
        return len(self.enabled)

    def limit(self, i: int, tokens: int) -> int:
        if not self.enabled[i]:
            return 0
        limit = min(merge_limit(tokens, self.prefix), max(tokens - self.floor, 0))
        return min(limit, self.caps[i]) if self.caps else limit

    def flow(self, schedule: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
        """(the r each block really applies (tome_merge clamps to the block's limit), tokens
        entering each block, tokens leaving it)."""
        rs, ins, outs = [], [], []
        for i in range(self.num_blocks):
            t = outs[self.links[i]] if self.links[i] >= 0 else self.counts[i]
            r = max(0, min(int(schedule[i]) if i < len(schedule) else 0, self.limit(i, t)))
            rs.append(r)
            ins.append(t)
            outs.append(t - r)
        return rs, ins, outs

    def clamp(self, schedule: Sequence[int]) -> list[int]:
        return self.flow(schedule)[0]

    def token_counts(self, schedule: Sequence[int]) -> list[int]:
        """Tokens each segment sees: those entering block 0, then those each block leaves
        (length L + 1; in a plain transformer, the tokens entering each block, then the last's)."""
        _, ins, outs = self.flow(schedule)
        return [ins[0] if ins else self.tokens] + outs

    def breakdown(self, schedule: Sequence[int]) -> tuple[list[float], float]:
        """(FLOPs per block, FLOPs outside the blocks) for a schedule."""
        r, ins, outs = self.flow(schedule)
        t = [ins[0] if ins else self.tokens] + outs  # token_counts
        per_block, outside = _by_owner(
            ((owner, term.at(t[seg])) for (seg, owner), term in self.terms.items()), self.num_blocks)
        for i in range(self.num_blocks):
            if r[i] > 0:
                per_block[i] += merge_flops(ins[i], r[i], self.prefix, self.batch, self.merge_dims[i])
        return per_block, outside

    def flops(self, schedule: Sequence[int]) -> int:
        per_block, outside = self.breakdown(schedule)
        return int(round(sum(per_block) + outside))

    @property
    def flops_original(self) -> int:
        per_block, outside = self.breakdown_original()
        return int(round(sum(per_block) + outside))

    def breakdown_original(self) -> tuple[list[float], float]:
        """``breakdown`` of the model as given: no merges, no tokens dropped."""
        return self.original if self.original is not None else self.breakdown([0] * self.num_blocks)

    def max_schedule(self) -> list[int]:
        return self.clamp([BIG_R] * self.num_blocks)

    @classmethod
    def build(cls, captured: Captured, prop_attn: bool | str = True, drop: bool = True,
              unmerge: str | bool = "auto") -> "CostModel":
        """The cost model of ``captured`` rewritten by ToMe (``prop_attn``, ``drop``,
        ``unmerge`` as in ``optimize``), for its example inputs' batch. Ops after an unmerge
        see the original token count whatever the schedule: they are priced as constants."""
        rw = rewrite(captured, ToMe(lambda n: [BIG_R] * n, unmerge=unmerge), prop_attn=prop_attn,
                     drop=drop)
        gm, base = rw.graph_module, rw.plan
        inputs = (captured.args, captured.kwargs)
        merge_nodes = {m.meta["tome"]["block"]: m for m in gu.merge_nodes(gm)}
        entries = {b.stream_in: b.token_dim for b in rw.blocks}  # tokens entering each block
        run0 = run_flops(gm, inputs, 0, watch=entries)
        run1 = run_flops(gm, inputs, BIG_R)
        num = len(base.blocks)
        counts = tuple(run0.sizes[b.stream_in] for b in rw.blocks)
        tokens = counts[0] if counts else 0  # 0: no block matched
        enabled = tuple(i in merge_nodes for i in range(num))
        batch = next((v[1] for v in run1.merges.values()), 1)  # 1: nothing can merge
        dims = tuple(run1.merges[merge_nodes[i]][2] if i in merge_nodes else 0 for i in range(num))
        links = _links(counts, [b.tokens_in for b in base.blocks], [b.r for b in base.blocks])
        if isinstance(links, str):  # no closed form: price and rewrite the model unmerged
            base = dataclasses.replace(base, skipped=base.skipped + tuple(
                Skipped(b.site, links) for i, b in enumerate(base.blocks) if enabled[i]))
            enabled, links = (False,) * num, (-1,) * num
        model = cls(tokens, base.protected, batch, enabled, dims, {}, base_plan=base,
                    graph_module=gm, merge_nodes=merge_nodes, inputs=inputs,
                    reference=run0.result, counts=counts, links=links)
        if any(gu.merge_arg(m, "groups") is not None for m in merge_nodes.values()):
            model.caps = tuple(b.r for b in base.blocks)
        model.terms = _fit_terms(gm, run0.flops, run1.flops, model.token_counts([0] * num),
                                 model.token_counts(model.max_schedule()), _owners(gm, rw.blocks))
        if rw.counts.get("drop_unread"):
            plain = rewrite(captured, ToMe(lambda n: [0] * n, unmerge=unmerge),
                            prop_attn=prop_attn, drop=False)
            flops = run_flops(plain.graph_module, inputs).flops
            owner = _owners(plain.graph_module, plain.blocks)
            model.original = _by_owner(((owner[n], f) for n, f in flops.items()), num)
        return model


def _links(counts, measured, merged) -> tuple[int, ...] | str:
    """For each block, the latest earlier block whose tokens enter it (-1: none, it sees its
    own count), such that the token counts without merging (``counts``) and at the most
    merging (``measured``, after each block merged ``merged``) are the ones measured; else why
    the cost model cannot price the model."""
    links: list[int] = []
    for i, (n, m) in enumerate(zip(counts, measured)):
        fits = [j for j in range(i) if counts[j] == n and measured[j] - merged[j] == m]
        if not fits and m != n:
            return (f"the cost model cannot price merging: block {i} sees {m} tokens at the most "
                    f"merging, neither its own {n} nor what an earlier block leaves")
        links.append(fits[-1] if fits else -1)
    return tuple(links)


def _owners(gm: fx.GraphModule, blocks) -> dict:
    """Node -> owning block (-1 outside), for the per-block report.

    Block ``i`` owns the nodes after its stream input up to the next block's stream input (the
    last block: up to its MLP residual add); the rest (embedding, final norm, head) is outside.
    ``blocks`` are the rewrite's matched blocks, whose nodes live in ``gm``.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    bounds = [order.get(b.stream_in, -1) for b in blocks]
    end = order.get(blocks[-1].mlp_add, len(order)) if blocks else -1
    owners = {}
    for n in gm.graph.nodes:
        k = order[n]
        inside = [i for i, lo in enumerate(bounds) if lo < k]
        owners[n] = inside[-1] if inside and k <= end else -1
    return owners


def _by_owner(flops, num: int) -> tuple[list[float], float]:
    """(FLOPs per block, FLOPs outside the blocks) from (owner block or -1, FLOPs) pairs."""
    per_block, outside = [0.0] * num, 0.0
    for owner, f in flops:
        if owner < 0:
            outside += f
        else:
            per_block[owner] += f
    return per_block, outside


def _fit_terms(gm, f0: dict, f1: dict, t0: list[int], t1: list[int], owners: dict) -> dict:
    """Group nodes by (segment, owner) and fit each node's FLOPs as c, a*T or q*T**2, from the
    runs without merging and at the most merging (``t0``, ``t1``: the tokens each segment sees)."""
    seg = 0
    terms: dict[tuple[int, int], _Term] = {}
    for n in gm.graph.nodes:
        if n in f0 or n in f1:
            a0, a1 = f0.get(n, 0), f1.get(n, 0)
            term = terms.setdefault((seg, owners.get(n, -1)), _Term())
            x0, x1 = t0[seg], t1[seg]
            if a0 == a1 or x0 == x1:
                term.c += a0
            elif x1 * a0 == x0 * a1:
                term.a += a0 / x0
            elif x1 * x1 * a0 == x0 * x0 * a1:
                term.q += a0 / (x0 * x0)
            else:  # not a pure power of the token count: interpolate linearly
                slope = (a0 - a1) / (x0 - x1)
                term.a += slope
                term.c += a0 - slope * x0
        tag = n.meta.get("tome", {})
        if tag.get("role") == "merge_point":
            seg = tag["block"] + 1
    return terms
