"""FLOPs of a rewritten model as a closed-form function of the merge schedule; budget search.

Counting convention: 2 FLOPs per multiply-add, as ``torch.utils.flop_counter.FlopCounterMode``
(which counts matrix products, convolutions and attention; element-wise ops count 0).

How the model is built (``CostModel.build``), from the graph rather than from a known layout:

* The model is rewritten once with the largest merge everywhere (``r`` clamped per block at run
  time), so every block that can merge has a ``tome_merge`` node.
* Token counts change only at merges, so the graph splits into segments at the blocks' merge
  points: segment 0 (before block 0's merge point: patch embedding, block 0's attention) sees
  ``N0`` tokens, segment ``i`` (block ``i-1``'s MLP, block ``i``'s attention) sees ``T_i``, the
  tokens entering block ``i``, and the last segment (the last MLP, the head) sees ``T_L``.
* Each node's FLOPs are computed from the tensors it runs on: linear layers ``2*rows*in*out``,
  matrix products ``2*M*K*N`` per batch entry, fused attention ``2*B*H*Lq*Lk*(d_qk + d_v)``
  (the QK^T and AV products, heads and head dims read from the tensors), convolutions; any
  other op that FlopCounterMode would count is measured with it node by node.
* The graph is run twice: with r = 0 everywhere and with the largest r. Comparing a node's
  FLOPs at the two token counts of its segment tells whether it is constant (the head on the
  class token), linear (per-token linears) or quadratic (attention products) in the count.
* The merge step costs its score matrix, ``2*B*|A|*|B|*d`` (the product in
  ``ops.bipartite_match``), with ``|A|``, ``|B|`` the two halves of the unprotected tokens and
  ``d`` the key dimension; it is 0 where a block merges nothing.

So ``flops(schedule) = sum_s (c_s + a_s*T_s + q_s*T_s**2) + sum_i merge_i(T_i, r_i)``: evaluating
a schedule is a few arithmetic operations per block, cheap enough for a search.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode

from . import graph_utils as gu
from . import ops
from .capture import normalize_inputs
from .plans import Plan

BIG_R = 1 << 30  # "merge as much as the block allows"; clamped at run time by tome_merge

_LINEAR_FUNCS = {F.linear, torch._C._nn.linear}
_CONV_FUNCS = {F.conv1d, F.conv2d, F.conv3d}
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
STRATEGIES = ("auto", "constant", "decreasing")


# ---------------------------------------------------------------------------------------------
# per-node FLOPs
# ---------------------------------------------------------------------------------------------

def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def merge_flops(tokens: int, r: int, prefix: int, batch: int, dim: int) -> int:
    """FLOPs of one ``tome_merge`` on ``tokens`` tokens: its A x B cosine-score product."""
    r = min(r, ops.merge_limit(tokens, prefix))
    if r <= 0:
        return 0
    rest, off = tokens - prefix, prefix % 2
    n_a = len(range(off, rest, 2))
    n_b = len(range(1 - off, rest, 2))
    return 2 * batch * n_a * n_b * dim


def _known_flops(gm: fx.GraphModule, n: fx.Node, args, kwargs, out) -> int | None:
    """FLOPs of a recognised op from its actual tensors; None if the op is not recognised."""
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        if isinstance(mod, nn.Linear):
            return 2 * args[0].numel() * mod.out_features
        if isinstance(mod, _CONV_MODULES) and isinstance(out, torch.Tensor):
            return 2 * out.numel() * _prod(mod.weight.shape[1:])
        return None
    if n.op == "call_function" and n.target in _LINEAR_FUNCS:
        return 2 * args[0].numel() * args[1].shape[0]
    if n.op == "call_function" and n.target in _CONV_FUNCS and isinstance(out, torch.Tensor):
        return 2 * out.numel() * _prod(args[1].shape[1:])
    if gu.is_matmul(n) and isinstance(out, torch.Tensor):
        a = args[0]
        return 2 * out.numel() * a.shape[-1]
    if gu.is_sdpa(n):
        q, k, v = args[0], args[1], args[2]
        return 2 * _prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return None


class _FlopRun(fx.Interpreter):
    """Runs a rewritten graph with chosen r per merge node; records FLOPs per node."""

    def __init__(self, gm: fx.GraphModule, r_of: dict, count: bool = True):
        super().__init__(gm)
        self.r_of = r_of
        self.count = count
        self.flops: dict[fx.Node, int] = {}
        self.merges: dict[fx.Node, tuple[int, int, int]] = {}  # node -> (tokens, batch, dim)
        self.shapes: dict[str, Any] = {}  # node name -> output shape(s)

    def run_node(self, n: fx.Node) -> Any:
        out = self._run_node(n)
        if self.count:
            self.shapes[n.name] = tree_map(
                lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else None, out)
        return out

    def _run_node(self, n: fx.Node) -> Any:
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if n in self.r_of:
                args = (*args[:3], self.r_of[n], *args[4:])
            if n.op == "call_function" and n.target is ops.tome_merge:
                x, keys = args[0], args[1]
                transposed = args[5] if len(args) > 5 else kwargs.get("keys_transposed", False)
                dim = keys.shape[-2] if transposed else keys.shape[-1]
                self.merges[n] = (x.shape[1], x.shape[0], dim)
                return getattr(self, n.op)(n.target, args, kwargs)
            if not self.count or n.op not in ("call_module", "call_function", "call_method"):
                return getattr(self, n.op)(n.target, args, kwargs)
            known = n.op == "call_module" or gu.is_matmul(n) or gu.is_sdpa(n) or (
                n.op == "call_function" and n.target in _LINEAR_FUNCS | _CONV_FUNCS)
            if known:
                out = getattr(self, n.op)(n.target, args, kwargs)
                f = _known_flops(self.module, n, args, kwargs, out)
                if f is not None:
                    self.flops[n] = f
                    return out
            with FlopCounterMode(display=False) as fc:  # anything else FlopCounterMode counts
                out = getattr(self, n.op)(n.target, args, kwargs)
            f = fc.get_total_flops()
            if f:
                self.flops[n] = f
            return out


def _run(gm, inputs, r_of, count=True) -> _FlopRun:
    args, kwargs = inputs
    run = _FlopRun(gm, r_of, count)
    with torch.no_grad():
        run.output = gu.run_interpreter(run, gm, args, kwargs)
    return run


# ---------------------------------------------------------------------------------------------
# the closed-form model
# ---------------------------------------------------------------------------------------------

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
    heads: tuple[int, ...] = ()
    irregular: list[str] = field(default_factory=list)  # nodes fitted by interpolation
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

    @property
    def num_blocks(self) -> int:
        return len(self.enabled)

    def limit(self, i: int, tokens: int) -> int:
        if not self.enabled[i]:
            return 0
        limit = ops.merge_limit(tokens, self.prefix)
        return min(limit, self.caps[i]) if self.caps else limit

    def clamp(self, schedule: Sequence[int]) -> list[int]:
        """The r each block really applies (tome_merge clamps to the block's limit)."""
        t, out = self.tokens, []
        for i in range(self.num_blocks):
            r = max(0, min(int(schedule[i]) if i < len(schedule) else 0, self.limit(i, t)))
            out.append(r)
            t -= r
        return out

    def token_counts(self, schedule: Sequence[int]) -> list[int]:
        """Tokens entering each block, then the tokens after the last one (length L + 1)."""
        t, out = self.tokens, [self.tokens]
        for r in self.clamp(schedule):
            t -= r
            out.append(t)
        return out

    def breakdown(self, schedule: Sequence[int]) -> tuple[list[float], float]:
        """(FLOPs per block, FLOPs outside the blocks) for a schedule."""
        r = self.clamp(schedule)
        t = self.token_counts(r)
        per_block, outside = _by_owner(
            ((owner, term.at(t[seg])) for (seg, owner), term in self.terms.items()), self.num_blocks)
        for i in range(self.num_blocks):
            if r[i] > 0:
                per_block[i] += merge_flops(t[i], r[i], self.prefix, self.batch, self.merge_dims[i])
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
    def build(cls, model: nn.Module, example_inputs=None, prop_attn: bool = True,
              drop: bool = True) -> "CostModel":
        from .api import default_inputs, rewrite

        if example_inputs is None:
            example_inputs = default_inputs(model)
        rw = rewrite(model, lambda n: [BIG_R] * n, example_inputs, prop_attn, drop)
        gm, base = rw.graph_module, rw.plan
        inputs = normalize_inputs(example_inputs)
        merge_nodes = {}
        for n in gm.graph.nodes:
            tag = n.meta.get("tome", {})
            if n.op == "call_function" and n.target is ops.tome_merge and tag.get("role") == "merge":
                merge_nodes[tag["block"]] = n
        run0 = _run(gm, inputs, {m: 0 for m in merge_nodes.values()})
        run1 = _run(gm, inputs, {m: BIG_R for m in merge_nodes.values()})
        num = len(base.blocks)
        tokens = base.blocks[0].tokens_in if base.blocks else 0  # 0: no block matched
        enabled = tuple(i in merge_nodes for i in range(num))
        batch = next((v[1] for v in run1.merges.values()), None)
        if batch is None:  # nothing can merge: take the batch from block inputs
            batch = 1
        dims = tuple(run1.merges[merge_nodes[i]][2] if i in merge_nodes else 0 for i in range(num))
        model_ = cls(tokens, base.protected, batch, enabled, dims, {}, base_plan=base,
                     graph_module=gm, merge_nodes=merge_nodes, inputs=inputs,
                     reference=run0.output)
        if any(len(m.args) > 7 and m.args[7] is not None for m in merge_nodes.values()):
            model_.caps = tuple(b.r for b in base.blocks)
        t1 = model_.token_counts(model_.max_schedule())
        for i, b in enumerate(base.blocks):  # the closed form's token counts are the measured ones
            if b.tokens_in != t1[i]:
                raise RuntimeError(f"cost model: block {i} tokens {t1[i]} != measured {b.tokens_in}")
        model_.heads = _heads(gm, num)
        owners = _owners(gm, rw.blocks)
        model_.terms = _fit_terms(gm, run0.flops, run1.flops, tokens, t1, owners, model_.irregular)
        if rw.counts.get("drop_unread"):
            plain = rewrite(model, lambda n: [0] * n, example_inputs, prop_attn, drop=False)
            flops = _run(plain.graph_module, inputs, {}).flops
            owner = _owners(plain.graph_module, plain.blocks)
            model_.original = _by_owner(((owner[n], f) for n, f in flops.items()), num)
        return model_


def _heads(gm: fx.GraphModule, num: int) -> tuple[int, ...]:
    heads = [0] * num
    for n in gm.graph.nodes:
        tag = n.meta.get("tome", {})
        if tag.get("role") == "attention" and tag.get("block", num) < num:
            heads[tag["block"]] = tag.get("heads", 0)
    return tuple(heads)


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


def _fit_terms(gm, f0: dict, f1: dict, n0: int, t1: list[int], owners: dict,
               irregular: list) -> dict:
    """Group nodes by (segment, owner) and fit each node's FLOPs as c, a*T or q*T**2."""
    seg = 0
    terms: dict[tuple[int, int], _Term] = {}
    for n in gm.graph.nodes:
        if n in f0 or n in f1:
            a0, a1 = f0.get(n, 0), f1.get(n, 0)
            term = terms.setdefault((seg, owners.get(n, -1)), _Term())
            x0, x1 = n0, t1[seg]
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
                irregular.append(n.name)
        tag = n.meta.get("tome", {})
        if tag.get("role") == "merge_point":
            seg = tag["block"] + 1
    return terms


# ---------------------------------------------------------------------------------------------
# schedule search
# ---------------------------------------------------------------------------------------------

TOLERANCE = 0.01  # achieved ratio must be in [b - TOLERANCE, b]
_CLOSE = 0.0025  # the adjustment stops once this close below the budget
_ROUNDING = 1e-10  # output drift below this is float rounding (one merge moves it >= 1e-7)


def check_budget(flops_budget) -> float:
    """``flops_budget`` as a float in (0, 1], else ValueError/TypeError naming the value."""
    if isinstance(flops_budget, bool) or not isinstance(flops_budget, (int, float)):
        raise TypeError(f"flops_budget must be a number in (0, 1], got {flops_budget!r}")
    b = float(flops_budget)
    if not (0.0 < b <= 1.0) or math.isnan(b):
        raise ValueError(f"flops_budget must be in (0, 1] (a fraction of the original FLOPs), "
                         f"got {flops_budget}")
    return b


def _shapes(num: int) -> dict[str, list[float]]:
    """Relative merge amounts per block: the candidate family for the 'auto' strategy."""
    t = [i / (num - 1) if num > 1 else 0.0 for i in range(num)]
    return {
        "constant": [1.0] * num,
        "decreasing": [2.0 * (1 - x) for x in t],  # the paper's (r, -1): 2r down to 0
        "increasing": [2.0 * x for x in t],
        "decreasing-half": [1.5 - x for x in t],
        "increasing-half": [0.5 + x for x in t],
        "front-loaded": [(1 - x) ** 2 for x in t],
        "back-loaded": [x * x for x in t],
        "skip-first-quarter": [0.0 if x < 0.25 else 1.0 for x in t],
        "skip-first-half": [0.0 if x < 0.5 else 1.0 for x in t],
        "first-half-only": [1.0 if x <= 0.5 else 0.0 for x in t],
        "middle": [1.0 - abs(2 * x - 1) for x in t],
    }


_MOST = 1 << 30  # "as many merges as the block allows" (clamp cuts it to the block's limit)


def _pin(cm: CostModel, schedule: list[int], pinned: frozenset) -> list[int]:
    """``schedule`` with the pinned blocks merging the most their token count allows."""
    return cm.clamp([_MOST if i in pinned else r for i, r in enumerate(schedule)])


def _adjust(cm: CostModel, schedule: list[int], hi: float, close: float,
            pinned: frozenset = frozenset()) -> list[int]:
    """Single-block (and pairwise) r changes that bring the FLOPs to <= hi and close below it.

    Pinned blocks are never moved; they are re-pinned after each move (their limit depends on
    the tokens earlier blocks leave).
    """
    s = _pin(cm, schedule, pinned)
    cost = cm.flops(s)
    num = cm.num_blocks
    movable = [i for i in range(num) if i not in pinned]
    for _ in range(10 * (cm.tokens + num)):
        if cost <= hi and cost >= close:
            break
        moves = []
        if cost > hi:  # merge more: the single +1 that stays closest above/below hi
            for i in movable:
                t = s.copy()
                t[i] += 1
                t = _pin(cm, t, pinned)
                if t != s:
                    moves.append((cm.flops(t), t))
            under = [m for m in moves if m[0] <= hi]
            pick = max(under, key=lambda m: m[0]) if under else min(moves, key=lambda m: m[0], default=None)
        else:  # merge less: the single -1, else a (-1, +1) pair, that rises most within hi
            for i in movable:
                if s[i] > 0:
                    t = s.copy()
                    t[i] -= 1
                    t = _pin(cm, t, pinned)
                    moves.append((cm.flops(t), t))
            under = [m for m in moves if cost < m[0] <= hi]
            if not under:
                for i in movable:
                    if s[i] == 0:
                        continue
                    for j in movable:
                        if j == i:
                            continue
                        t = s.copy()
                        t[i] -= 1
                        t[j] += 1
                        t = _pin(cm, t, pinned)
                        c = cm.flops(t)
                        if cost < c <= hi:
                            under.append((c, t))
            pick = max(under, key=lambda m: m[0]) if under else None
        if pick is None:
            break
        cost, s = pick
    return s


def _fit(cm: CostModel, weights: list[float], hi: float, close: float,
         pinned: frozenset = frozenset()) -> list[int] | None:
    """Scale a shape to the least merging that meets ``hi`` FLOPs, then adjust block by block."""
    if not any(w > 0 for i, w in enumerate(weights) if i not in pinned):
        return None

    def sched(alpha: float) -> list[int]:
        return _pin(cm, [int(math.floor(alpha * w + 1e-9)) for w in weights], pinned)

    top = (cm.tokens + 1) / min(w for i, w in enumerate(weights) if w > 0 and i not in pinned)
    if cm.flops(sched(top)) > hi:
        return None  # this shape cannot reach the budget
    lo = 0.0
    for _ in range(60):
        mid = (lo + top) / 2
        if cm.flops(sched(mid)) <= hi:
            top = mid
        else:
            lo = mid
    return _adjust(cm, sched(top), hi, close, pinned)


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


class _Calibration:
    """Runs the max-merge rewrite with a chosen r per block on the calibration inputs."""

    def __init__(self, cm: CostModel):
        self.cm = cm
        self.reference = cm.reference
        if self.reference is None:
            self.reference = self.output([0] * cm.num_blocks)

    def output(self, schedule: list[int]) -> Any:
        r_of = {node: schedule[i] for i, node in self.cm.merge_nodes.items()}
        return _run(self.cm.graph_module, self.cm.inputs, r_of, count=False).output

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
            alone[i] = _MOST
            alone = self.cm.clamp(alone)
            if alone[i] == 0 or self.drift(alone) > _ROUNDING:
                break
            free.add(i)
        return frozenset(free)


def candidates(cm: CostModel, budget: float, strategy: str = "auto",
               notes: list | None = None, calib: _Calibration | None = None) -> dict[str, list[int]]:
    """The schedules ``search`` chooses among for a budget < 1, by name, in the FLOP window.

    ``notes``, if given, receives a line per fact the search used (free blocks).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    num = cm.num_blocks
    orig = cm.flops_original
    hi = budget * orig
    floor = cm.flops(cm.max_schedule())
    if floor > hi:
        raise ValueError(
            f"flops_budget={budget} is below the smallest reachable FLOP ratio "
            f"{floor / orig:.4f} for this model and input size (merging the most every block "
            f"allows); pass flops_budget >= {math.ceil(floor / orig * 1e4) / 1e4}")
    close = (budget - _CLOSE) * orig
    shapes = _shapes(num)
    names = list(shapes) if strategy == "auto" else [strategy]
    pinned = (calib or _Calibration(cm)).free_blocks() if strategy == "auto" else frozenset()
    if pinned and notes is not None:
        notes.append(f"auto: merging in block(s) {', '.join(map(str, sorted(pinned)))} leaves the "
                     f"calibration outputs unchanged, so every schedule merges the most there")
    fits = {}
    for name in names:
        s = _fit(cm, shapes[name], hi, close, pinned)
        fits[name] = s if s is not None else _adjust(cm, cm.max_schedule(), hi, close, pinned)
    if pinned:  # the free merges alone, trimmed (or topped up) to the budget
        fits["free-first"] = _adjust(cm, _pin(cm, [0] * num, pinned), hi, close)
        for name in ("constant", "decreasing"):  # unpinned too: auto never loses to these
            s = _fit(cm, shapes[name], hi, close)
            if s is not None:
                fits[name + " (unpinned)"] = s
    in_window = lambda s: cm.flops(s) >= (budget - TOLERANCE) * orig  # noqa: E731
    if not any(in_window(s) for s in fits.values()):  # keep the >= b - 0.01 guarantee
        for name in _shapes(num):
            if name not in fits:
                s = _fit(cm, shapes[name], hi, close)
                if s is not None and in_window(s):
                    fits[name] = s
                    break
    if any(in_window(s) for s in fits.values()):
        fits = {k: s for k, s in fits.items() if in_window(s)}
    unique: dict[str, list[int]] = {}
    for name, s in fits.items():
        if s not in unique.values():
            unique[name] = s
    return unique


def scored_candidates(cm: CostModel, budget: float, strategy: str = "auto",
                      notes: list | None = None) -> dict[str, tuple[list[int], float]]:
    """``candidates`` with each schedule's calibration drift: name -> (schedule, drift)."""
    calib = _Calibration(cm)
    return {name: (s, calib.drift(s))
            for name, s in candidates(cm, budget, strategy, notes, calib).items()}


def best(cm: CostModel, scored: dict[str, tuple[list[int], float]]) -> tuple[list[int], float]:
    """The least-drift (schedule, drift) of ``scored``; ties go to more FLOPs (closer to the budget)."""
    return min(scored.values(), key=lambda sd: (sd[1], -cm.flops(sd[0])))


def search(cm: CostModel, budget: float, strategy: str = "auto",
           notes: list | None = None) -> tuple[list[int], float | None]:
    """(schedule, drift) for a FLOP budget; see ``plan`` for the strategies and guarantees."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if budget >= 1.0:
        return [0] * cm.num_blocks, 0.0
    if not any(cm.enabled):  # nothing can merge: the rewrite as it is (optimize warns)
        if notes is not None:
            notes.append(f"flops_budget={budget:g} is not met: no block can merge")
        return [0] * cm.num_blocks, None
    return best(cm, scored_candidates(cm, budget, strategy, notes))


def to_plan(cm: CostModel, schedule: list[int], budget: float | None = None,
            strategy: str | None = None, drift: float | None = None, notes=()) -> Plan:
    """The Plan for a schedule: the max-merge rewrite's sites, with this schedule's numbers."""
    r = cm.clamp(schedule)
    t = cm.token_counts(r)
    per_block, _ = cm.breakdown(r)
    rows = tuple(  # a block that drops unread tokens keeps the protected ones
        dataclasses.replace(b, r=r[i], tokens_in=t[i],
                            tokens_out=cm.prefix if b.dropped else t[i + 1],
                            dropped=t[i + 1] - cm.prefix if b.dropped else 0,
                            flops=int(round(per_block[i])))
        for i, b in enumerate(cm.base_plan.blocks)
    )
    return dataclasses.replace(cm.base_plan, blocks=rows, flops=cm.flops(r),
                               flops_original=cm.flops_original, budget=budget,
                               strategy=strategy, drift=drift,
                               notes=cm.base_plan.notes + tuple(notes))


def plan(model: nn.Module, flops_budget: float, example_inputs: Any = None,
         strategy: str = "auto", prop_attn: bool = True, drop: bool = True) -> Plan:
    """A merge schedule whose FLOPs are at most ``flops_budget`` times the original's.

    ``example_inputs`` set the token count (and serve as calibration inputs); without them the
    model's declared input size is used (timm ``pretrained_cfg``, a config's ``image_size``).
    FLOPs come from ``CostModel`` (2 per multiply-add, as ``FlopCounterMode``), for the example
    inputs' batch. Guarantees: achieved ratio <= b, and >= b - 0.01 whenever an integer schedule
    gets there (dropping unread tokens, see ``optimize(drop_unread=)``, can leave the ratio
    lower with no merging at all); ``b = 1`` merges nothing; ``b`` below the smallest reachable ratio (the most
    merging every block allows) raises ValueError naming that ratio.

    Strategies (each is scaled to the budget, then adjusted block by block to land just below it):

    * ``"constant"``: the least constant r that meets the budget (the paper's constant r).
    * ``"decreasing"``: the paper's ``(r, -1)`` ramp, from 2r in the first block to 0.
    * ``"auto"`` (default): a family of schedules (constant; decreasing/increasing ramps of two
      slopes; front- and back-loaded; merging only after the first quarter/half; only in the
      first half; peaked in the middle), each fitted to the budget, and the one with the least
      **output drift** wins. Trailing blocks whose merge leaves the calibration outputs
      unchanged (the last block of a class-token model: the head never reads the tokens its MLP
      would process) are *free*: every shape merges the most there, so the FLOPs they save are
      not taken from blocks that matter (``Plan.notes`` names them). Output drift is the fidelity proxy: the mean over the calibration
      samples of the cosine distance ``1 - cos(f, f_r)`` between the unmerged model's output
      ``f`` and the merged model's ``f_r`` (token dimensions that merging shortens are averaged
      out). Pass real inputs as ``example_inputs`` for a meaningful proxy; random inputs only
      measure how much the schedule perturbs the function. The constant and decreasing schedules
      are in the family, so on the calibration inputs "auto" is never worse than either.

    The returned Plan's ``drift`` is the chosen schedule's proxy value for every strategy.
    """
    b = check_budget(flops_budget)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if example_inputs is None:
        from .api import default_inputs

        example_inputs = default_inputs(model)
    cm = CostModel.build(model, example_inputs, prop_attn, drop)
    notes: list[str] = []
    schedule, drift = search(cm, b, strategy, notes)
    return to_plan(cm, schedule, b, strategy, drift, notes)


def rewrite_for_budget(model: nn.Module, flops_budget: float, example_inputs: Any = None,
                       prop_attn: bool = True, strategy: str = "auto", drop: bool = True):
    """``rewrite`` with the schedule ``plan`` picks; the module's ``.tome`` is that plan."""
    from .api import default_inputs, rewrite

    if example_inputs is None:
        example_inputs = default_inputs(model)
    chosen = plan(model, flops_budget, example_inputs, strategy, prop_attn, drop)
    result = rewrite(model, lambda n: list(chosen.r) + [0] * (n - len(chosen.r)),
                     example_inputs, prop_attn, drop)
    if result.plan.r == chosen.r:
        result.plan = chosen
        result.graph_module.tome = chosen
    return result
