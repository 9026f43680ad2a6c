"""ToMato tensor ops: merge once over 4-neighbour components of the patch grid.

ToMato ("Token Merging at Once") joins each patch token with those of its 4 grid neighbours
(up, down, left, right; no wrap between rows) that are similar enough, follows the joining
transitively, and replaces each connected group by one token: the size-weighted mean, with the
sizes added. Everything here is tensor operations over the whole batch; the only Python loops are
over a fixed number of rounds that depends on the grid size alone (never on the data), so the
ops trace and compile. Token layout ``[batch, tokens, channels]``; sizes ``[batch, tokens, 1]``
float32. Tokens ``prefix:`` are the ``h*w`` patches in row-major order.

Two modes:

* threshold: keep the edges whose similarity is strictly greater than ``threshold``. Images end
  with different token counts; each is padded to the batch maximum with tokens of size 0 and
  value 0 (proportional attention gives them a ``log 0 = -inf`` key bias, weighted means ignore
  them), so every image's real tokens see exactly what they would see alone.
* count: keep, per image, the fewest strongest edges that leave exactly ``m - r`` components
  (``m = h*w``). Adding edges in descending order of similarity lowers the component count by 0
  or 1 per edge, so a binary search over the number of kept edges lands on the target exactly.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..errors import ShapeError
from .tokens import current_groups, identity_origin, ones_size
from .tome import keys_metric

SIMILARITIES = ("attention", "keys")


def grid_edges(h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4-neighbour edges of an ``h x w`` grid, patches numbered row-major: (u, v) with u < v.

    Right neighbours first (never across a row end), then down neighbours.
    """
    idx = torch.arange(h * w, device=device).view(h, w)
    u = torch.cat([idx[:, :-1].reshape(-1), idx[:-1, :].reshape(-1)])
    v = torch.cat([idx[:, 1:].reshape(-1), idx[1:, :].reshape(-1)])
    return u, v


def _rounds(m: int) -> int:
    return math.ceil(math.log2(m)) if m > 1 else 0


def components(u: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, m: int) -> torch.Tensor:
    """Connected components of ``m`` nodes under the kept edges, per image.

    ``u, v``: [E] edge ends; ``keep``: [B, E] bool. Returns [B, m] labels: for each node the
    smallest node index of its component.

    Hook-and-shortcut (Shiloach-Vishkin style) over a forest of parent pointers that is a star
    (every node points at its tree's root, the tree's smallest index) at the start of a round:

    1. every root with a smaller neighbouring root hooks onto the smallest one;
    2. a root s that neither hooked nor was hooked onto, but has neighbouring roots, hooks onto
       the smallest new parent among them: its neighbouring roots t are all larger than s (else
       s would have hooked in 1), so each t hooked in 1 onto a root <= s, and not onto s (s was
       not hooked onto): strictly below s;
    3. pointer jumping, ``ceil(log2 m)`` times, makes the forest a star again.

    Hooks always point to a smaller index, so no cycles. Every tree that has a neighbouring tree
    joins at least one other tree in each round, so the number of trees in every unfinished
    component at least halves: ``ceil(log2 m)`` rounds are enough. The loops are fixed-length.
    """
    b = keep.shape[0]
    device = keep.device
    ar = torch.arange(m, device=device).expand(b, m)
    p = ar.clone()
    uu, vv = u.to(device).expand(b, -1), v.to(device).expand(b, -1)
    none = torch.full((b, m), m, dtype=torch.long, device=device)
    for _ in range(_rounds(m)):
        ru, rv = p.gather(1, uu), p.gather(1, vv)
        live = keep & (ru != rv)
        # smallest neighbouring root of each root (m: none)
        low = none.scatter_reduce(1, ru, torch.where(live, rv, m), "amin")
        low = low.scatter_reduce(1, rv, torch.where(live, ru, m), "amin")
        is_root = p == ar
        hook = is_root & (low < ar)
        target = torch.where(hook, low, ar)
        hooked_onto = torch.zeros_like(p).scatter_add(1, target, hook.long()) > 0
        stagnant = is_root & ~hook & ~hooked_onto
        low2 = none.scatter_reduce(1, ru, torch.where(live, target.gather(1, rv), m), "amin")
        low2 = low2.scatter_reduce(1, rv, torch.where(live, target.gather(1, ru), m), "amin")
        jump = stagnant & (low2 < ar)
        p = torch.where(hook, low, torch.where(jump, low2, p))
        for _ in range(_rounds(m)):
            p = p.gather(1, p)
    return p


def count_components(labels: torch.Tensor) -> torch.Tensor:
    """[B] number of components from [B, m] labels."""
    ar = torch.arange(labels.shape[1], device=labels.device)
    return (labels == ar).sum(dim=1)


def edge_similarity(kind: str, src, u, v, prefix: int, scale=None) -> torch.Tensor:
    """[B, E] similarity of each grid edge (fp32).

    ``kind``: ``"keys"`` / ``"keys_t"`` (src = keys [B, H, N, d], or K^T): cosine similarity of
    head-averaged keys. ``"probs"`` (src = softmax attention probabilities [B, H, N, N], or
    [B*H, N, N] batch-major) and ``"qk"`` (src = (q, k) of a fused attention; the probabilities
    are recomputed for the patch queries, ``softmax(q k^T * scale)`` over all keys): the
    attention probability between the two patches, symmetrised as the mean of both directions
    and averaged over heads, ``mean_h (P_h[i, j] + P_h[j, i]) / 2``.
    """
    with torch.no_grad():
        if kind in ("keys", "keys_t"):
            m = keys_metric(src, kind == "keys_t")[:, prefix:].float()
            m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return (m[:, u] * m[:, v]).sum(dim=-1)
        if kind == "qk":
            q, k = src
            if q.dim() == 3:
                q, k = q[:, None], k[:, None]
            if k.shape[1] != q.shape[1]:  # grouped-query attention: share key heads
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            s = scale if scale is not None else q.shape[-1] ** -0.5
            logits = (q[:, :, prefix:].float() @ k.float().transpose(-1, -2)) * s
            probs = logits.softmax(dim=-1)[..., prefix:]  # [B, H, m, m] patch rows and columns
        elif kind == "probs":
            probs = src.float()[..., prefix:, prefix:]  # [B, H, N, N]
        else:
            raise ValueError(f"unknown similarity source {kind!r}")
        pij = probs[:, :, u, v]
        pji = probs[:, :, v, u]
        return ((pij + pji) / 2).mean(dim=1)


def _probs_4d(probs: torch.Tensor, batch: int) -> torch.Tensor:
    if probs.dim() == 3:  # [B*H, N, N], batch-major as nn.MultiheadAttention lays it out
        return probs.reshape(batch, -1, *probs.shape[-2:])
    return probs


def labels_for_count(sim: torch.Tensor, u, v, m: int, target: int,
                     allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Labels leaving exactly ``target`` components per image, joining the strongest edges.

    For k strongest edges kept, count(k) falls from m (k = 0) to 1 (k = E, the grid is connected)
    by steps of 0 or 1, so the smallest k with count(k) <= target has count(k) == target.
    A binary search finds it for every image at once: ceil(log2(E + 1)) labellings.
    ``allowed`` [B, E] (padding groups): other edges are never joined, so an image whose allowed
    edges cannot get down to ``target`` keeps more components.
    """
    b, e = sim.shape
    device = sim.device
    if allowed is not None:
        sim = sim.masked_fill(~allowed, float("-inf"))
    order = sim.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(e, device=device).expand(b, e))
    lo = torch.zeros(b, dtype=torch.long, device=device)
    hi = torch.full((b,), e, dtype=torch.long, device=device)
    for _ in range(math.ceil(math.log2(e + 1))):
        mid = (lo + hi) // 2
        c = count_components(components(u, v, _kept(rank < mid[:, None], allowed), m))
        ok = c <= target
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid + 1)
    return components(u, v, _kept(rank < hi[:, None], allowed), m)


def _kept(keep: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    return keep if allowed is None else keep & allowed


def component_slots(labels: torch.Tensor, n_out: int | None = None):
    """(slot [B, m]: each patch's output position after the prefix, components in the order
    of their first patch; ``n_out``, or the batch's largest component count if None)."""
    ar = torch.arange(labels.shape[1], device=labels.device)
    is_root = labels == ar
    slot = (is_root.cumsum(dim=1) - 1).gather(1, labels)
    if n_out is None:
        n_out = int(is_root.sum(dim=1).max())  # data-dependent: threshold mode only
    return slot, n_out


def merge_components(x, size, labels, prefix: int, n_out: int | None = None):
    """Merge patch tokens ``x[:, prefix:]`` by component labels [B, m] (size-weighted mean).

    Components go in the order of their first patch (row-major), after the prefix. With
    ``n_out`` None the output has the batch's largest component count; images with fewer are
    padded with value-0, size-0 tokens at the end.
    """
    c = x.shape[-1]
    slot, n_out = component_slots(labels, n_out)
    rest, rest_size = x[:, prefix:], size[:, prefix:].to(x.dtype)
    w = torch.cat([rest * rest_size, rest_size], dim=-1)
    out = w.new_zeros(x.shape[0], n_out, c + 1).scatter_add(
        1, slot[..., None].expand(-1, -1, c + 1), w)
    new_size = out[..., c:]
    new_x = out[..., :c] / new_size.clamp_min(torch.finfo(new_size.dtype).tiny)
    out_x = torch.cat([x[:, :prefix], new_x], dim=1)
    out_size = torch.cat([size[:, :prefix], new_size.to(size.dtype)], dim=1)
    return out_x, out_size


def tomato_labels(x, src, r, prefix: int, grid: tuple, kind: str, threshold=None, scale=None,
                  origin=None, groups=None):
    """(component labels [B, h*w], tokens out per image or None) of the merge ``tomato_merge``
    applies, or None where it merges nothing. Arguments as ``tomato_merge``."""
    h, w = grid
    m = h * w
    if r is not None and r <= 0:
        return None
    if x.shape[1] - prefix != m:  # the grid is the example inputs'; never guess another
        raise ShapeError(f"ToMato merges over the {h}x{w} patch grid of the example inputs "
                         f"({m} patch tokens), got {x.shape[1] - prefix}: optimize again with "
                         "example inputs of this size")
    u, v = grid_edges(h, w, x.device)
    if kind == "probs":
        src = _probs_4d(src, x.shape[0])
    sim = edge_similarity(kind, src, u, v, prefix, scale)
    allowed = None
    if groups is not None:  # only patches of one padding group join
        g = current_groups(groups, origin, x.shape[0], x.shape[1])[:, prefix:]
        allowed = (g[:, u] == g[:, v]).all(dim=-1)
    with torch.no_grad():
        if r is None:
            keep = sim > threshold
            return components(u, v, keep if allowed is None else keep & allowed, m), None
        n_out = max(m - int(r), 1)
        labels = labels_for_count(sim, u, v, m, n_out, allowed)
        # with groups an image may keep more than n_out components: pad to the batch's largest
        return labels, n_out if allowed is None else max(n_out, int(count_components(labels).max()))


@fx.wrap
def tomato_merge(x, src, size, r, prefix: int, grid: tuple, kind: str, threshold=None,
                 scale=None, origin=None, groups=None):
    """ToMato merge of ``x`` [B, N, C] on the ``grid = (h, w)`` patches after ``prefix``.

    ``r``: None for threshold mode (edges with similarity > ``threshold``), else the number of
    patch tokens to remove (count mode: exactly ``h*w - r`` patch tokens per image remain;
    ``r = 0`` merges nothing). ``src``/``kind``/``scale``: see ``edge_similarity``.
    Returns (merged x, sizes [B, N', 1] fp32). ``origin``/``groups`` (padding groups, as
    ``tome_merge``): patches of different groups never join, and ``origin`` is returned too.
    """
    if size is None:
        size = ones_size(x)
    found = tomato_labels(x, src, r, prefix, grid, kind, threshold, scale, origin, groups)
    if groups is not None:
        origin = identity_origin(origin, x.shape[0], x.shape[1], x.device)
    if found is None:
        return (x, size) if groups is None else (x, size, origin)
    labels, n_out = found
    out = merge_components(x, size, labels, prefix, n_out)
    if groups is None:
        return out
    slot, n_out = component_slots(labels, n_out)
    rest = origin[:, prefix:]  # every patch of a component has its group: any one will do
    joined = rest.new_zeros(rest.shape[0], n_out).scatter(1, slot, rest)
    return (*out, torch.cat([origin[:, :prefix], joined], dim=1))


def tomato_flops(kind: str, batch: int, heads: int, tokens: int, prefix: int, head_dim: int) -> int:
    """FLOPs of one ``tomato_merge`` (FlopCounterMode convention): the recomputed q k^T product
    of ``"qk"`` (patch queries against all keys); the other kinds only gather and compare."""
    if kind != "qk":
        return 0
    return 2 * batch * heads * (tokens - prefix) * tokens * head_dim
