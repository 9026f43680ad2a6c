"""ToMeSD's local merging (Bolya & Hoffman, "Token Merging for Fast Stable Diffusion", 2023).

The tokens are an ``h x w`` grid (row-major). The grid is cut into ``sy x sx`` windows; one
token per window is a destination (the top-left one, or a random one with ``use_rand``), every
other token is a source. The ``r`` sources most similar (cosine, on ``metric``) to their best
destination are averaged into it. ``tomesd_match`` computes that once per transformer block;
``tomesd_merge`` applies it to the input of an op (attention, cross-attention or MLP) and
``tomesd_unmerge`` copies each merged token of the op's output back to every position it holds.

A match is ``(where, count, rep)``: ``where[b, i]`` is the merged position of token ``i``
(unmerged sources first, in descending similarity as in the authors' code, then the destinations
in window order), ``count[b, j]`` how many tokens merged position ``j`` holds and ``rep[b, j]``
the token whose position it keeps (its destination, or itself); ``None`` when nothing merges.
Merging is a scatter-add over ``where`` divided by ``count``, unmerging one gather.

Tokens before the grid's (text tokens in front of the image ones, as Flux's single-stream
blocks and joint attention ``cat([text, image])`` lay them out) pass unmerged: their count is
the input's token count less the match's, so it needs no argument.
"""
from __future__ import annotations

import torch

from ..errors import ShapeError

_MASK = (1 << 31) - 1  # 31-bit hash arithmetic: products stay inside int64


def removed_count(tokens: int, h: int, w: int, sx: int, sy: int, ratio: float, r=None) -> int:
    """Tokens a match removes: ``int(tokens * ratio)`` (or ``r``), at most the sources. In
    symbolic-size arithmetic (the same values on ints), so that export keeps the token count
    symbolic instead of guarding it to one value."""
    want = torch.sym_int(tokens * ratio) if r is None else r
    return torch.sym_max(0, torch.sym_min(want, tokens - (h // sy) * (w // sx)))


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash (xorshift-multiply rounds)."""
    for mult in (0x2C1B3C6D, 0x297A2D39):
        x = ((x ^ (x >> 15)) * mult) & _MASK
    return x ^ (x >> 15)


def _hashed(seed: int, salt: int, step, n: int, batch: int, device) -> torch.Tensor:
    """``[batch or 1, n]`` pseudo-random non-negative ints from (seed, salt, the value of
    ``step``): one row per sample, from that sample's step (a batch of timesteps), or one row
    for all when the step is one value (or absent)."""
    key = torch.tensor((seed * 0x9E3779B1 + salt * 0x85EBCA77) & _MASK, device=device).reshape(1)
    if step is not None:  # a denoising step gives a new pattern; the same step the same one
        bits = step.reshape(-1).to(torch.float32).view(torch.int32).to(torch.int64)
        if bits.shape[0] != 1 and batch % bits.shape[0] == 0:  # samples x frames: per sample
            bits = bits.repeat_interleave(batch // bits.shape[0])
        elif bits.shape[0] != 1:  # an unrelated count: one pattern, from the first
            bits = bits[:1]
        key = _mix((key + (bits & _MASK)) & _MASK)
    return _mix((key[:, None] + torch.arange(n, device=device) * 0x61C88647) & _MASK)


def _offsets(hs: int, ws: int, sx: int, sy: int, use_rand: bool, seed: int, salt: int, step,
             batch: int, device) -> torch.Tensor:
    """Which cell of each window is its destination (0 = top-left), ``[batch or 1, hs, ws]``."""
    if not use_rand:
        return torch.zeros(1, hs, ws, dtype=torch.int64, device=device)
    return (_hashed(seed, salt, step, hs * ws, batch, device) % (sy * sx)).view(-1, hs, ws)


def split_grid(h: int, w: int, sx: int, sy: int, off: torch.Tensor) -> torch.Tensor:
    """Positions ``[dst..., src...]`` of the ``h x w`` grid: one destination per full
    ``sy x sx`` window (window row-major), then the sources in row-major order (rows and columns
    past the last full window are sources). ``off`` ``[hs, ws]`` or ``[B, hs, ws]``: the result
    ``[h*w]`` or ``[B, h*w]``."""
    hs, ws = h // sy, w // sx
    lead = off.shape[:-2]
    rows = torch.arange(hs, device=off.device)[:, None] * sy + off // sx
    cols = torch.arange(ws, device=off.device)[None, :] * sx + off % sx
    dst = (rows * w + cols).reshape(*lead, hs * ws)
    flag = torch.zeros(*lead, h * w, dtype=torch.int64, device=off.device)
    flag = flag.scatter(-1, dst, torch.ones_like(dst))
    src = torch.argsort(flag, dim=-1, stable=True)[..., :h * w - hs * ws]
    return torch.cat([dst, src], -1)


def tomesd_match(metric: torch.Tensor, h: int, w: int, sx: int = 2, sy: int = 2,
                 ratio: float = 0.5, r: int | None = None, use_rand: bool = False,
                 seed: int = 0, salt: int = 0, step: torch.Tensor | None = None):
    """The match of ``metric`` ``[B, P + h*w, C]`` (the block's input tokens; the ``P`` tokens
    before the grid's are never merged), or None when no token merges. ``r`` overrides ``ratio`` (tokens removed, clamped to the sources). With
    ``use_rand`` each window's destination is a hash of (``seed``, ``salt``, the value of
    ``step``): a new pattern per denoising step, the same one for the same step (a prompt and
    its unconditional twin in separate calls, or a rerun), and no random state is touched."""
    batch, tokens = metric.shape[0], h * w
    metric = metric[:, metric.shape[1] - tokens:]
    r = removed_count(tokens, h, w, sx, sy, ratio, r)
    if r <= 0:
        return None
    hs, ws = h // sy, w // sx
    n_dst = hs * ws
    off = _offsets(hs, ws, sx, sy, use_rand, seed, salt, step, batch, metric.device)
    order = split_grid(h, w, sx, sy, off).expand(batch, tokens)  # one row per sample
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        rows = order.unsqueeze(-1).expand(-1, -1, m.shape[-1])
        dst, src = m.gather(1, rows[:, :n_dst]), m.gather(1, rows[:, n_dst:])
        best, target = (src @ dst.transpose(-1, -2)).max(dim=-1)
        ranked = best.argsort(dim=-1, descending=True)  # [B, n_src]: merged first
    n_unm = tokens - n_dst - r
    # merged position of each source in ranked order: a destination, or its unmerged rank
    kept = torch.arange(n_unm, device=metric.device).expand(batch, n_unm)
    joined = n_unm + target.gather(1, ranked[:, :r])
    src_where = torch.empty_like(ranked).scatter(1, ranked, torch.cat([joined, kept], 1))
    dst_where = (n_unm + torch.arange(n_dst, device=metric.device)).expand(batch, n_dst)
    where = torch.empty(batch, tokens, dtype=torch.int64, device=metric.device).scatter(
        1, order, torch.cat([dst_where, src_where], 1))
    count = torch.zeros(batch, tokens - r, dtype=metric.dtype, device=metric.device)
    count = count.scatter_add(1, where, torch.ones_like(where, dtype=metric.dtype))
    src = order[:, n_dst:].gather(1, ranked[:, r:])  # unmerged sources, in merged order
    return where, count, torch.cat([src, order[:, :n_dst]], 1)


def _prefix(x: torch.Tensor, n: int, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` split along ``dim`` into the tokens before the grid's and the grid's ``n``."""
    p = x.shape[dim] - n
    return x.narrow(dim, 0, p), x.narrow(dim, p, n)


def tomesd_merge(x: torch.Tensor, match) -> torch.Tensor:
    """``x`` ``[B, P + N, C]`` with each merged group of the grid's ``N`` averaged:
    ``[B, P + N - r, C]``."""
    if match is None:
        return x
    where, count = match[0], match[1]
    head, x = _prefix(x, where.shape[1])
    index = where.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    total = x.new_zeros(x.shape[0], count.shape[1], x.shape[-1]).scatter_add(1, index, x)
    return torch.cat([head, total / count.unsqueeze(-1).to(x.dtype)], 1)


def tomesd_unmerge(y: torch.Tensor, match) -> torch.Tensor:
    """``y`` ``[B, P + N - r, C]`` back to ``[B, P + N, C]``: every token gets its group's row."""
    if match is None:
        return y
    head, y = _prefix(y, match[1].shape[1])
    return torch.cat([head, y.gather(1, match[0].unsqueeze(-1).expand(-1, -1, y.shape[-1]))], 1)


def tomesd_table(table: torch.Tensor, match) -> torch.Tensor:
    """A per-token table ``[1, P + N, ...]`` (rotary cos or sin) at the merged tokens:
    ``[B, P + N - r, ...]``, each merged token at the position it keeps (``rep``)."""
    if match is None:
        return table
    rep = match[2]
    head, grid = _prefix(table, match[0].shape[1])
    batch, rest = rep.shape[0], grid.shape[2:]
    index = rep.reshape(batch, -1, *(1,) * len(rest)).expand(batch, rep.shape[1], *rest)
    picked = grid.expand(batch, *grid.shape[1:]).gather(1, index)
    return torch.cat([head.expand(batch, *head.shape[1:]), picked], 1)


def grid_rows(ids: torch.Tensor, w: int) -> int:
    """Rows of the ``? x w`` grid that position ids ``[N, 3]`` (row in column 1, column in 2,
    row-major, as FluxPipeline lays them out) must be; a ``ShapeError`` (one line) when they
    are another grid, so a module captured for one grid is never run on another."""
    n = ids.shape[0]
    ok = _grid_ok(ids, w)
    message = (f"img_ids are not the row-major grid of width {w} this module was captured "
               "for; capture it again for this image size")
    if torch.compiler.is_compiling():  # a DiffusionModule checks on the host first (is_grid)
        torch._assert_async(ok, message)
    elif n % w or not bool(ok):
        raise ShapeError(message)
    return n // w


def _grid_ok(ids: torch.Tensor, w: int) -> torch.Tensor:
    pos = torch.arange(ids.shape[0], device=ids.device)
    return (ids[:, 1] == pos // w).all() & (ids[:, 2] == pos % w).all()


def is_grid(ids: torch.Tensor, w: int) -> bool:
    """Whether position ids ``[N, 3]`` are the row-major grid of width ``w`` (on the host)."""
    return ids.shape[0] % w == 0 and bool(_grid_ok(ids, w))
