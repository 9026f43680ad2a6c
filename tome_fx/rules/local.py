"""Where ToMeSD merges: the ops of a transformer block over a 2-D token grid.

A transformer block of a diffusion model is a chain of residual branches on one token stream:
self-attention, optionally cross-attention (keys and values from the text), then the MLP. Each
is ``x + op(norm(x))``. A ``LocalBlock`` is one such branch: the merge goes on the op's input
(the first value after ``x`` that every path into the op passes: the norm, or the modulated
norm of adaLN blocks) and the unmerge on its output, before the residual add. The branch
chain is found from the graph, anchored on each self-attention core (``match``), so no model
class is named: diffusers UNets, DiT/PixArt and the image side of MM-DiT joint attention look
the same here.

Only spatial self-attention over a grid merges: a block's grid is a ``[B, C, h, w]`` tensor
whose ``h`` and ``w`` dimensions are, traced through the layout ops between them (``axes``),
the block's token dimension, row-major; or ``[B, C, F, h, w]`` whose frames x grid are the
tokens (video transformers: a site with ``frames=F``); or, for a latent packed into tokens before
the model (Flux), the grid its ``img_ids`` input gives (``packed``), the image tokens after the
text ones (``start``). Temporal attention (video UNets move the grid into the batch and attend
over the frames, which may number ``h*w``) is refused with its reason. A block's level is
``ceil(sqrt(latent pixels // tokens))`` (the authors' formula), the latent being the model's
``sample``/``hidden_states`` input the grid comes from (else its first 4-D or 5-D input), never
another image input: a ControlNet's conditioning image is 8x the latent's side.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch.fx as fx

from .. import graph as gu
from ..match import Block, Core, Refusal, site_name
from . import axes
from .packed import find_ids_grid, image_last

Node = fx.Node
OPS = ("attn", "crossattn", "mlp")
NO_GRID = ("the tokens do not form a 2-D grid (no [B, C, h, w] tensor with h*w = tokens "
           "feeds them): text or other sequence tokens stay unmerged")
TEMPORAL = ("temporal attention: its tokens are frames (the grid's h and w are in the batch), "
            "not a spatial grid")
VIDEO = ("its tokens are frames x an h x w grid (a video transformer): ToMeSD's windows are "
         "2-D, over one image's grid; merge it with method='tome', which needs no grid")
PACKED = ("its image tokens are a model input ([B, tokens, C]: the latent is packed into tokens "
          "before the model, as Flux packs 2x2 latent patches), so the graph has no 2-D grid; "
          "merge it with method='tome', which needs no grid")
STEP_INPUTS = ("timestep", "timesteps", "t")  # a new random pattern per denoising step


@dataclass(frozen=True)
class LocalBlock(Block):
    """One op of a transformer block, merged on its input and unmerged before its residual add.

    As a ``Block`` (for the pipeline's plan and checks): ``stream_in`` is the residual stream
    ``x``, ``merge_at`` the op's input, ``attn_add``/``mlp_add`` the residual add; ``core`` is
    the op's attention core (for the MLP, its transformer block's self-attention)."""

    op: str = "attn"  # one of OPS
    group: int = 0  # transformer block: one match per group, on its input tokens
    metric: Node | None = None  # the group's input tokens, which the match is computed on
    grid: Node | None = None  # [B, C, h, w] whose h x w grid the tokens are (row-major)
    hw: tuple = (0, 0)
    downsample: int = 1  # ceil(sqrt(input pixels // tokens)), as the authors' code
    op_out: Node | None = None  # the op's output, unmerged before the residual add
    frames: int = 1  # grids per token sequence (row-major, frame by frame)
    start: int = 0  # first image token in the attention's token dimension (text before it)
    ids: Node | None = None  # the position-ids input the grid comes from (Flux), else None

    @property
    def name(self) -> str:
        node = self.core.anchor if self.op != "mlp" else self.op_out
        stack = node.meta.get("nn_module_stack")
        path = list(stack.values())[-1][0] if stack else ""
        if self.op == "mlp" and ".ff" in path:
            path = path[:path.index(".ff") + 3]
        return f"{path or node.name} ({self.op})"

    @property
    def tokens(self) -> int:
        """The image tokens (every frame's grid)."""
        return self.frames * self.hw[0] * self.hw[1]


def values_of(core: Core) -> Node | None:
    """The attention's values (SDPA's third argument, or the right side of ``probs @ v``)."""
    if core.kind == "sdpa":
        return gu.arg(core.anchor, 2, "value", None)
    return core.out.args[1] if len(core.out.args) > 1 else None


def _paths(start: Node, ends) -> set[Node]:
    """Nodes on def-use paths from ``start`` to any of ``ends`` (``start`` excluded)."""
    up, todo = set(), [e for e in ends]
    seen = set(todo)
    while todo:  # ancestors of the ends, not walking past start
        n = todo.pop()
        up.add(n)
        for i in n.all_input_nodes:
            if i not in seen and i is not start:
                seen.add(i)
                todo.append(i)
    return gu.descendants([start], lambda u, _: u in up) & up


def _reaches(start: Node, target: Node, region: set, without: Node) -> bool:
    return target in gu.descendants([start], lambda u, _: u in region and u is not without)


def _op_input(start: Node, targets: list, shapes) -> Node | None:
    """The first node after ``start`` that every path from it to ``targets`` passes, with the
    stream's [batch, tokens] leading shape; None if there is none."""
    region = _paths(start, targets)
    lead = shapes[start][:2]
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    for n in sorted(region, key=order.__getitem__):
        s = shapes.get(n)
        if not (gu.is_tensor_shape(s) and len(s) == 3 and s[:2] == lead):
            continue
        if not any(_reaches(start, t, region, n) for t in targets):
            return n
    return None


def _stream(s) -> bool:
    return gu.is_tensor_shape(s) and len(s) == 3


def _residual_adds(core: Core, shapes) -> list[tuple[Node, Node]]:
    """(add, stream) pairs after the attention: ``add = stream + f(attention)`` with the stream a
    [B, N, C] input of the attention's queries. MM-DiT joint attention has two (image, text)."""
    feeds = gu.ancestors_within(core.query, 60)
    found, desc, frontier = [], {core.out}, [core.out]
    for _ in range(30):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in desc:
                    continue
                desc.add(u)
                if gu.is_add(u):
                    others = [_uncast(a, feeds) for a in u.args[:2]
                              if isinstance(a, Node) and a not in desc]
                    if (len(others) == 1 and others[0] in feeds and _stream(shapes.get(others[0]))
                            and shapes.get(others[0]) == shapes.get(u)):
                        found.append((u, others[0]))
                        continue
                nxt.append(u)
        frontier = nxt
    return found


def _uncast(node: Node, feeds: set) -> Node:
    """``node``, or the node of ``feeds`` it casts (Wan adds ``x.float()``, a cast of its own
    beside the one its norm reads)."""
    while node not in feeds and gu.is_call(node, gu.CAST) and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def _op_output(add: Node, stream: Node) -> Node:
    """The residual add's other side than the stream (or a cast of it)."""
    a, b = add.args[:2]
    return a if _uncast(b, {stream}) is stream else b


def _next_branch(add: Node) -> tuple[Node, Node, set] | None:
    """The next residual branch on the stream ``add``: (its add, the op output, its nodes)."""
    for u in add.users:
        if gu.is_add(u) and add in u.args[:2]:
            other = u.args[1] if u.args[0] is add else u.args[0]
            if isinstance(other, Node):
                region = _paths(add, [other])
                if region:
                    return u, other, region
    return None


def _candidates(stream: Node, shapes, most: int = 6) -> list[Node]:
    """The nearest 4-D and 5-D ancestors of ``stream`` (breadth first), at most ``most``; not
    the outputs of layout ops (a grid is computed, then laid out as tokens)."""
    seen, frontier, found = {stream}, [stream], []
    for _ in range(2000):
        nxt = []
        for n in frontier:
            s = shapes.get(n)
            if (gu.is_tensor_shape(s) and len(s) in (4, 5) and n.op != "get_attr"
                    and not axes.is_layout(n)):
                found.append(n)
                if len(found) == most:
                    return found
            nxt.extend(i for i in n.all_input_nodes if i not in seen and not seen.add(i))
        if not nxt:
            break
        frontier = nxt
    return found


def find_grid(gm: fx.GraphModule, stream: Node, tokens: int, shapes,
              dim: int = 1) -> tuple[Node | None, str]:
    """The nearest [B, C, h, w] ancestor whose ``h`` and ``w`` dims are the tokens of
    ``stream`` (row-major), traced through the ops between them (``axes``); else None and why
    not: temporal attention (the tokens come from the batch, where the frames are), frames x
    grid (video transformers), packed latents, or no grid. ``dim``: the tokens' dimension."""
    grid, frames, why = grid_frames(gm, stream, tokens, shapes, dim)
    return (grid, "") if grid is not None and frames == 1 else (None, why)


def grid_frames(gm: fx.GraphModule, stream: Node, tokens: int, shapes,
                dim: int = 1) -> tuple[Node | None, int, str]:
    """``find_grid``, with frames: a ``[B, C, F, h, w]`` ancestor whose ``F x h x w`` are the
    tokens is a grid of ``F`` frames. (grid, frames, why not)."""
    why = None
    for grid in _candidates(stream, shapes):
        dims = axes.trace_axes(grid, stream, shapes, gm)
        if dims is None:
            continue
        dims = (dims[0], dims[dim])
        h, w = shapes[grid][-2:]
        p = axes.patch_of(dims, h, w) if len(shapes[grid]) == 4 else 0
        if p and (h // p) * (w // p) == tokens:
            return grid, 1, ""
        atoms = axes.token_atoms(dims)
        if len(shapes[grid]) == 5 and atoms == (("f", shapes[grid][2]), ("h", h), ("w", w)):
            return grid, shapes[grid][2], VIDEO
        if axes.from_batch(dims) and atoms[-2:] != (("h", h), ("w", w)):
            why = why or TEMPORAL
        elif len(atoms) > 2 and atoms[-2:] == (("h", h), ("w", w)):
            why = why or VIDEO
    if why is None and step_input(gm, shapes) is not None:  # a diffusion model
        latent = latent_input(gm, shapes, gu.ancestors_within(stream, 100_000))
        why = PACKED if latent is not None and len(shapes[latent]) == 3 else None
    return None, 1, why or NO_GRID


LATENT_NAMES = ("sample", "hidden_states")  # diffusers' names for the noisy latent


def latent_input(gm: fx.GraphModule, shapes, among=None) -> Node | None:
    """The model's latent: the input named ``sample`` or ``hidden_states`` (diffusers' names),
    else the first 4-D or 5-D input in the forward's order; only inputs in ``among``."""
    inputs = [p for p in gm.graph.nodes if p.op == "placeholder" and (among is None or p in among)
              and gu.is_tensor_shape(shapes.get(p))]
    named = [p for p in inputs if p.name in LATENT_NAMES]
    return (named or [p for p in inputs if len(shapes[p]) in (4, 5)] or [None])[0]


def _pixels(gm: fx.GraphModule, grid: Node, shapes) -> int | None:
    """Spatial size (H x W, its last two dims) of the latent the grid comes from
    (``latent_input``: not the largest input: a ControlNet's conditioning image is 8x the
    latent's side)."""
    latent = latent_input(gm, shapes, gu.ancestors_within(grid, 100_000))
    if latent is None or len(shapes[latent]) not in (4, 5):
        return None
    return shapes[latent][-2] * shapes[latent][-1]


def step_input(gm: fx.GraphModule, shapes) -> Node | None:
    """The timestep input, if the model has one (its value picks the random pattern)."""
    for p in gm.graph.nodes:
        if p.op == "placeholder" and p.name in STEP_INPUTS and gu.is_tensor_shape(shapes.get(p)):
            return p
    return None


def _ungrouped(gm, shapes, cores, grouped) -> list[Refusal]:
    """Why the self-attentions with no residual stream found around them do not merge."""
    out = []
    for core in cores:
        q, k = shapes.get(core.query), shapes.get(core.keys)
        if id(core) in grouped or not (gu.is_tensor_shape(q) and gu.is_tensor_shape(k)) \
                or len(q) < 3 or q[-2] != k[-2]:
            continue
        grid, why = find_grid(gm, core.query, q[-2], shapes, dim=len(q) - 2)
        out.append(Refusal(site_name(core.anchor), why if grid is None else
                           "no residual stream x + attention(norm(x)) found around it"))
    return out


def _site(index, op, core, group, metric, stream, add, out, merge_at, found):
    grid, hw, ds, frames, start, ids = found
    return LocalBlock(index, core, stream, add, merge_at, add, "pre", 1, op=op, group=group,
                      metric=metric, grid=grid, hw=hw, downsample=ds, op_out=out, frames=frames,
                      start=start, ids=ids)


def _grid(gm, shapes, inputs, core, stream) -> tuple[tuple | None, str]:
    """(grid, hw, frames, start, ids) of the group's tokens, or None and why not."""
    tokens = shapes[stream][1]
    grid, frames, why = grid_frames(gm, stream, tokens, shapes)
    if grid is not None:
        seq = shapes[core.query][-2]
        start = seq - tokens if seq > tokens and image_last(core.query, tokens, shapes) else 0
        h, w = shapes[grid][-2:]
        p = math.isqrt(h * w * frames // tokens)  # patches cut by a reshape: p x p each
        return (grid, (h // p, w // p), frames, start, None), ""
    packed, reason = find_ids_grid(gm, shapes, *inputs, stream, core.query)
    if packed is None:
        return None, reason or why
    return (None, packed.hw, 1, packed.start, packed.ids), ""


def find_local(gm: fx.GraphModule, shapes, cores,
               inputs: tuple = ((), {})) -> tuple[list[LocalBlock], list[Refusal]]:
    """Every op ToMeSD can merge around, grouped by transformer block, and the refusals.
    ``inputs``: the example's (args, kwargs), where a grid is an input's values (Flux's ids)."""
    sites: list[LocalBlock] = []
    refusals: list[Refusal] = []
    groups: list[tuple] = []  # (self-attention core, add, stream)
    for core in cores:
        for add, stream in _residual_adds(core, shapes):
            keys_from = gu.ancestors_within(core.keys, 60)
            if stream in keys_from:  # self-attention (or joint attention) on this stream
                groups.append((core, add, stream))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups.sort(key=lambda g: order[g[2]])
    refusals += _ungrouped(gm, shapes, cores, {id(g[0]) for g in groups})
    largest = None
    for g, (core, add, stream) in enumerate(groups):
        found, why = _grid(gm, shapes, inputs, core, stream)
        if found is None:
            refusals.append(Refusal(site_name(core.anchor), why))
            continue
        grid, hw, frames, start, ids = found
        tokens = hw[0] * hw[1]  # one frame's
        pixels = _pixels(gm, grid, shapes) if grid is not None else None
        largest = max(largest or 0, tokens)
        ds = int(math.ceil(math.sqrt(pixels // tokens))) if pixels else 0  # 0: fixed below
        targets = [t for t in (core.query, core.keys, values_of(core)) if t is not None]
        chain = [("attn", core, add, _op_output(add, stream), stream, targets)]
        at = add
        while True:
            nxt = _next_branch(at)
            if nxt is None:
                break
            branch_add, out, region = nxt
            inner = [c for c in cores if c.anchor in region]
            if inner and all(c.keys not in region for c in inner) and len(inner) == 1:
                chain.append(("crossattn", inner[0], branch_add, out, at, [inner[0].query]))
            elif not inner and any(gu.is_linear(gm, n) for n in region):
                chain.append(("mlp", core, branch_add, out, at, [out]))
                break
            else:
                break
            at = branch_add
        for op, c, a, out, s, targets in chain:
            merge_at = _op_input(s, targets, shapes)
            if merge_at is None or merge_at is out:
                refusals.append(Refusal(site_name(c.anchor), f"no single input of the {op} "
                                        "with the stream's tokens to merge"))
                continue
            sites.append(_site(len(sites), op, c, g, stream, s, a, out, merge_at,
                               (grid, hw, ds, frames, start, ids)))
    if largest:  # no image input: the level relative to the finest grid
        sites = [s if s.downsample else dataclasses.replace(s, downsample=int(math.ceil(
            math.sqrt(largest // (s.hw[0] * s.hw[1]))))) for s in sites]
    return sites, refusals
