"""The fidelity floor: no sample is merged below ``min_tokens`` real tokens.

Schedules scale with the token count (``kernels.tome.merge_count``), so without a floor a
6-token sentence loses half its tokens at ``flops_budget=0.5`` and its embedding its meaning
(trained MiniLM: cosine 0.12 to the original; ``benchmarks/short_inputs.py``). The floor is an
argument of every ``tome_merge`` (per sample, at any runtime length, arithmetic only), set
after the rewrite; the budget search keeps it too (``CostModel.floor``), so at the example
inputs the plan's ratio is what the module spends. The plan's note says below which length the
floor binds, and where an ``r`` schedule merges less at the example inputs.
"""
from __future__ import annotations

import dataclasses
from numbers import Integral

import torch
from torch.utils._pytree import tree_leaves

from .. import graph as gu
from ..kernels.tome import merge_count, merge_limit, tome_merge

MIN_TOKENS = 24  # "auto" on token ids: the least multiple of 8 keeping every sentence of
# benchmarks/short_inputs.py at cosine >= 0.9 on the trained MiniLM at flops_budget=0.5

_LONGEST = 1 << 16  # lengths searched for the one from which the floor no longer binds


def check_min_tokens(min_tokens) -> int | str:
    """``min_tokens`` as ``"auto"`` or an int >= 0 (None: 0, no floor), else a one-line error."""
    if min_tokens is None:
        return 0
    if min_tokens == "auto":
        return min_tokens
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, Integral):
        raise TypeError(f"min_tokens must be 'auto' or an int (0 or None: no floor), "
                        f"got {min_tokens!r}")
    if min_tokens < 0:
        raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
    return int(min_tokens)


def resolve_min_tokens(min_tokens, inputs) -> int:
    """``"auto"``: ``MIN_TOKENS`` where the model takes token ids (an integer ``[batch, tokens]``
    input: text, whose sentences come short), 0 elsewhere (an image's token count is fixed by
    its size, and ToMe's own schedules, r=16 on ViT-B, end below the floor)."""
    if min_tokens != "auto":
        return min_tokens
    ids = any(isinstance(t, torch.Tensor) and t.dim() == 2 and not t.dtype.is_floating_point
              and t.dtype != torch.bool for t in tree_leaves(inputs))
    return MIN_TOKENS if ids else 0


def _counts(merges, n_tokens: int, prefix: int, min_tokens: int = 0) -> list[int]:
    """The r each merge applies to one sample of ``n_tokens`` tokens (a chain of merges, as
    ``rules.ToMe`` inserts them; ``start`` is the first merge's count)."""
    out, start = [], n_tokens
    for r in merges:
        k = max(0, min(merge_count(r, n_tokens, prefix, start, min_tokens),
                       merge_limit(n_tokens, prefix)))
        out.append(k)
        n_tokens -= k
    return out


def apply_floor(rewrite, min_tokens: int):
    """Set the floor on every ToMe merge of ``rewrite`` (a ``pipeline.Rewrite``) and note in its
    plan what it changes. Returns ``rewrite``."""
    gm, plan = rewrite.graph_module, rewrite.plan
    merges = [m for m in gu.merge_nodes(gm) if m.target is tome_merge]
    if not min_tokens or not merges:
        return rewrite
    for m in merges:
        gu.set_merge_arg(m, "min_tokens", min_tokens)
    gm.recompile()
    blocks = [m.meta["tome"]["block"] for m in merges]
    rs = [gu.merge_arg(m, "r") for m in merges]
    prefix, n0 = plan.protected, plan.blocks[blocks[0]].tokens_in
    longest = next((n for n in range(1, _LONGEST) if _counts(rs, n, prefix, min_tokens)
                    == _counts(rs, n, prefix) and sum(_counts(rs, n, prefix)) > 0), None)
    note = (f"min_tokens={min_tokens}: no sample is merged below {min_tokens} tokens, "
            + (f"one of fewer than {longest} tokens merges less" if longest else
               "every sample merges less") + " (min_tokens=0: no floor)")
    plain, floored = _counts(rs, n0, prefix), _counts(rs, n0, prefix, min_tokens)
    less = [b for b, a, f in zip(blocks, plain, floored) if f < a]
    if less:
        note += (f"; at the example inputs ({n0} tokens) block(s) {_span(less)} merge less "
                 f"(r {' '.join(map(str, plain))} -> {' '.join(map(str, floored))})")
    kept = tuple(n for n in plan.notes if not n.startswith("min_tokens="))  # a plan reapplied
    rewrite.plan = dataclasses.replace(plan, notes=kept + (note,))
    gm.tome = rewrite.plan
    return rewrite


def _span(blocks: list[int]) -> str:
    return str(blocks[0]) if len(blocks) == 1 else \
        f"{blocks[0]}..{blocks[-1]}" if blocks == list(range(blocks[0], blocks[-1] + 1)) else \
        ", ".join(map(str, blocks))
