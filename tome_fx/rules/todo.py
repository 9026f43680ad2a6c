"""ToDo: self-attention keys and values from a downsampled (or similarity-merged) token grid
(kernel: ``kernels.todo``; where: ``rules.local``'s self-attention sites).

Per self-attention over a 2-D grid, the reduction goes on the attention's normalised input
(``merge_at``) and feeds only the key and value projections; the queries keep every token, so
the output has the input's tokens and nothing is unmerged. Where the keys pass a position table
after their projection (rotary embedding), the reduction goes on SDPA's key and value inputs
instead (after the table), for the downsample branch; similarity merging there is refused (keys
and values would need one match). A table is found where the keys' path multiplies in a
per-token tensor, including values written in place into the keys' buffer (Wan fills
``empty_like(k)`` slice by slice), at the image's or the joint sequence's token count (Flux:
text then image). The kernels reduce only the image tokens (``start``: the text before them)
frame by frame (``frames``: a video transformer's grids, never mixed), on the grid of the
site: a ``[B, C, (F,) h, w]`` tensor's last two sizes, or Flux's ``img_ids`` rows.

One graph serves one *branch* (``"downsample"``, ``"similarity"`` or ``"none"``): the timestep
switch picks the graph (``diffusion.module``'s ``variant``), never both computations per call.
Levels: level 1 is the finest downsample level with a self-attention in this graph, level 2 the
next; other levels are left alone (the authors pick them by channel width, 320 and 640).
"""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.fx as fx

from .. import graph as gu
from ..kernels.todo import POOLS, todo_downsample, todo_similarity
from ..kernels.tomesd import grid_rows
from ..passes.base import Context, inserted
from ..passes.size_bias import fold_into_sdpa
from ..plans import LevelPlan, Plan
from .local import STEP_INPUTS, LocalBlock, _paths, find_local, step_input, values_of

BRANCHES = ("downsample", "similarity", "none")
NO_SITES = "a self-attention over a 2-D token grid"
LAYOUT = (torch.ops.aten.view, torch.ops.aten.reshape, torch.ops.aten._unsafe_view,
          torch.ops.aten.transpose, torch.ops.aten.permute, torch.ops.aten.contiguous,
          torch.ops.aten.clone, torch.ops.aten.unflatten, torch.ops.aten.flatten)


def sides(factor) -> tuple[Fraction, Fraction]:
    """A level's factor (one for both sides, or a budget's (rows, columns) pair, real-valued)
    as fractions: the kept grid is ``h * den // num`` by ``w * den // num``."""
    pair = factor if isinstance(factor, tuple) else (factor, factor)
    return tuple(Fraction(f).limit_denominator(1 << 16) for f in pair)


@dataclass(frozen=True)
class ToDo:
    """Key/value reduction in ``branch``. ``factor``/``ratio``: level (1, 2) -> per-side
    downsample factor (1: nothing; a non-integer from a budget) / similarity ratio."""

    branch: str = "downsample"
    factor: tuple = (2.0, 1.0)  # levels 1 and 2
    ratio: tuple = (0.5, 0.5)
    method: str = "nearest-exact"
    sx: int = 2
    sy: int = 2
    use_rand: bool = False
    seed: int = 0
    prop_attn: bool = False
    unmerge: bool = False  # queries keep every token: nothing to unmerge
    notes: tuple = ()

    def sites(self, ctx: Context) -> list[LocalBlock]:
        return [b for b in ctx.matches.blocks if isinstance(b, LocalBlock)]

    def prepare(self, ctx: Context) -> dict[int, str]:
        """The self-attention sites replace the matched blocks; a site whose keys cannot be
        reduced without its queries, or whose grid the chosen reduction does not fit, is
        refused with the reason."""
        m = ctx.matches
        blocks, refusals = find_local(ctx.gm, ctx.shapes, m.cores, (ctx.args, ctx.kwargs))
        blocks = [dataclasses.replace(b, index=i)
                  for i, b in enumerate(b for b in blocks if b.op == "attn")]
        if not blocks:
            why = "; ".join(sorted({r.reason for r in refusals})) or "no attention"
            raise ValueError(f"method='todo' needs {NO_SITES}: {why}")
        m.blocks, m.refusals, m.cross = blocks, refusals, []
        levels = self.levels(blocks)
        refused = {}
        for b in blocks:
            level = levels.get(b.downsample)
            _, users, why = kv_inputs(b, ctx.shapes) if level else (None, [], None)
            if users is not None and why and self.branch == "downsample":
                why = None if not self.prop_attn else (  # fold_size takes [B, N] sizes
                    f"{why}: reduced at SDPA's inputs, where prop_attn is not supported")
            elif users is not None and why:
                why = f"{why}; similarity merging after it would need one match for both"
            h, w = b.hw
            if why is None and level and self.branch == "downsample":
                fh, fw = sides(self.factor[level - 1])
                if h * fh.denominator // fh.numerator < 1 or w * fw.denominator // fw.numerator < 1:
                    why = (f"the {h}x{w} grid is smaller than the downsample factor "
                           f"{self.show(level)}")
            if why is None and level and self.branch == "similarity" and (
                    h < self.sy or w < self.sx) and self.ratio[level - 1] > 0:
                why = f"the {h}x{w} grid is smaller than one {self.sy}x{self.sx} window"
            if why:
                refused[b.index] = why
        return refused

    @staticmethod
    def levels(sites) -> dict[int, int]:
        """Downsample level -> ToDo level (1: the finest with a self-attention, 2: the next)."""
        have = sorted({b.downsample for b in sites})
        return {ds: i + 1 for i, ds in enumerate(have[:2])}

    def reduces(self, level: int | None) -> bool:
        if not level or self.branch == "none":
            return False
        if self.branch == "downsample":
            return max(sides(self.factor[level - 1])) > 1
        return self.ratio[level - 1] > 0

    def enabled(self, ctx: Context, disabled: dict, dropping: bool) -> set[int]:
        sites = self.sites(ctx)
        levels = self.levels(sites)
        return {b.index for b in sites
                if b.index not in disabled and self.reduces(levels.get(b.downsample))}

    def drop_blocker(self, ctx: Context, disabled: dict) -> str | None:
        return "ToDo keeps every query: every token is computed"

    def insert(self, ctx: Context, enabled: set[int]) -> list:
        """Splice the reductions; the pipeline sees no merge (the token stream is unchanged,
        only the keys and values of each attention are fewer), so it returns no MergeSite and
        counts the rewrites on the graph (``kv_counts``)."""
        graph = ctx.gm.graph
        step = step_input(ctx.gm, ctx.shapes) if self.use_rand else None
        levels = self.levels(self.sites(ctx))
        for b in self.sites(ctx):
            if b.index not in enabled:
                continue
            level = levels[b.downsample]
            at, users, _ = kv_inputs(b, ctx.shapes)
            at = at if users else None
            sources = [at] if at is not None else [b.core.keys, values_of(b.core)]
            order = {n: i for i, n in enumerate(graph.nodes)}
            point = min(users, key=order.__getitem__) if users else b.core.anchor
            h, w = grid_nodes(graph, b, ctx.shapes, point)
            size = None
            for src in sources:
                with graph.inserting_before(point):
                    call = x = self._reduce(graph, src, h, w, level, step, b, ctx.shapes.get(src))
                    if self.prop_attn:
                        x = inserted(graph.call_function(operator.getitem, (call, 0)), "kv")
                        size = inserted(graph.call_function(operator.getitem, (call, 1)), "size")
                for u in (users if at is not None else [b.core.anchor]):
                    u.replace_input_with(src, x)
            if self.prop_attn and size is not None and b.core.kind == "sdpa":
                fold_into_sdpa(graph, b.core.anchor, size, ctx.shapes[b.core.query][-1],
                      ctx.shapes[b.core.anchor][-1])
        ctx.gm.recompile()
        return []

    def _reduce(self, graph, x, h, w, level: int, step, b: LocalBlock, shape):
        """The reduction call on ``x`` (its tokens on dim -2, ``shape`` at capture)."""
        start, frames = b.start, b.frames
        # every token is the grid's (a UNet): no split and join around the reduction
        only = start == 0 and gu.is_tensor_shape(shape) and shape[-2] == b.tokens
        if self.branch == "downsample":
            fs, new = sides(self.factor[level - 1]), []
            for n, f in zip((h, w), fs):
                scaled = n if f.denominator == 1 else inserted(
                    graph.call_function(operator.mul, (n, f.denominator)), "shape")
                new.append(inserted(graph.call_function(operator.floordiv, (scaled, f.numerator)),
                                    "shape"))
            whole = fs[0] == fs[1] and fs[0].denominator == 1  # the authors' pool
            pool = fs[0].numerator if whole and self.method in POOLS else None
            args = (x, h, w, new[0], new[1], self.method, start, frames, pool, self.prop_attn, only)
            fn = todo_downsample
        else:
            args = (x, h, w, self.sx, self.sy, self.ratio[level - 1], self.use_rand, self.seed,
                    b.group, step, start, frames, self.prop_attn, only)
            fn = todo_similarity
        return inserted(graph.call_function(fn, args), "kv_reduce", site=b.index,
                        branch=self.branch)

    def blame(self, ctx: Context, node) -> list[int]:
        """The sites whose reduced keys or values reach ``node``."""
        calls = [n for n in ctx.gm.graph.nodes
                 if n.meta.get("tome", {}).get("role") == "kv_reduce"]
        return sorted({n.meta["tome"]["site"] for n in calls if node in gu.descendants([n])})

    def describe(self, plan: Plan, ctx: Context) -> Plan:
        """Rows: one per self-attention, ``r`` the keys removed; notes: per level, the tokens,
        the keys kept and how."""
        removed = kv_removed(ctx.gm, ctx.args, ctx.kwargs)
        sites = self.sites(ctx)
        rows = tuple(dataclasses.replace(row, kind="attn", norm="kv", tokens_out=row.tokens_in,
                                         r=removed.get(b.index, 0))
                     for row, b in zip(plan.blocks, sites))
        notes, levels = list(plan.notes), []
        for ds, level in sorted(self.levels(sites).items()):
            here = [b for b in sites if b.downsample == ds]
            k = min(b.tokens - removed.get(b.index, 0) for b in here)  # the image's keys
            done = sum(b.index in removed for b in here)
            levels.append(LevelPlan(ds, here[0].hw, 1 - k / here[0].tokens,
                                    here[0].tokens - k, done))
            how = self.how(level) if done else "unchanged"
            notes.append(f"ToDo level {level} (downsample {ds}): {here[0].tokens} tokens, "
                         f"keys/values {k} ({how}) in {done} of {len(here)} self-attention(s)")
        return dataclasses.replace(plan, blocks=rows, method="todo", notes=tuple(notes),
                                   levels=tuple(levels))

    def show(self, level: int) -> str:
        fh, fw = sides(self.factor[level - 1])
        return f"{float(fh):.4g}" if fh == fw else f"{float(fh):.4g}x{float(fw):.4g}"

    def how(self, level: int) -> str:
        if self.branch == "downsample":
            return f"{self.method}, factor {self.show(level)}"
        return f"similarity, ratio {self.ratio[level - 1]:g}, {self.sx}x{self.sy} windows"


def grid_nodes(graph, b: LocalBlock, shapes, point) -> tuple:
    """(h, w) of the site's grid, computed before ``point``: the grid tensor's last two sizes
    over its patch side, or (Flux) the rows of its ``img_ids`` at the width read at capture
    (``grid_rows`` checks the ids at every call)."""
    def call(fn, *args):
        with graph.inserting_before(point):
            return inserted(graph.call_function(fn, args), "shape")
    if b.ids is not None:
        return call(grid_rows, b.ids, b.hw[1]), b.hw[1]
    rank, patch = len(shapes[b.grid]), shapes[b.grid][-1] // b.hw[1]
    h, w = (call(torch.ops.aten.sym_size.int, b.grid, rank - d) for d in (2, 1))
    if patch > 1:  # p x p patches cut from the grid by a reshape
        h, w = call(operator.floordiv, h, patch), call(operator.floordiv, w, patch)
    return h, w


def _weight(gm, node) -> bool:
    try:
        return node.op == "get_attr" and gm.get_parameter(node.target) is not None
    except AttributeError:
        return False


def kv_inputs(b: LocalBlock, shapes) -> tuple:
    """(the attention's input: ``b.merge_at`` or past per-token ops after it that queries and
    keys share, its users that lead to the keys and values but not to the queries, None);
    (at, [], why) where the keys pass a position table after their projection, so they are
    reduced at SDPA's inputs; (at, None, why) where they cannot be reduced."""
    core, vals = b.core, values_of(b.core)
    if vals is None or core.kind != "sdpa":
        return b.merge_at, None, "the attention is not one SDPA call with its own values"
    gm, at = b.merge_at.graph.owning_module, b.merge_at
    while True:  # past per-token ops shared by queries and keys (adaLN's modulation)
        q_path, kv_path = _paths(at, [core.query]), _paths(at, [core.keys, vals])
        users = [u for u in at.users if u in kv_path]
        shared = [u for u in users if u in q_path]
        if not shared:
            break
        if (len(shared) > 1 or len(users) > 1 or gu.is_linear(gm, shared[0])
                or shapes.get(shared[0]) != shapes.get(at)):
            return at, None, (f"{shared[0].name} computes queries and keys together (a fused "
                          "projection): the keys cannot be reduced without the queries")
        at = shared[0]
    tokens, seq = shapes[at][1], shapes[core.query][-2]  # seq: text tokens too (joint)
    region = kv_path | _written(at, kv_path)
    for n in region:
        for i in n.all_input_nodes:
            s = shapes.get(i)
            if (i is not at and i not in region and gu.is_tensor_shape(s)
                    and not _weight(b.merge_at.graph.owning_module, i)
                    and (tokens in s or seq in s) and sum(d > 1 for d in s) >= 2):
                return at, [], (f"the keys pass {n.name}, which combines them with {i.name}, a "
                            f"{list(s)} table (rotary or position embedding)")
    return at, users, None


VIEWS = LAYOUT + (torch.ops.aten.slice, torch.ops.aten.select)


def _written(at, kv_path: set) -> set:
    """Nodes whose values an in-place op writes into a tensor on the keys' path (Wan's rotary
    embedding fills ``empty_like(k)`` slice by slice), with the paths from ``at`` to them."""
    writes = []
    for n in at.graph.nodes:
        name = getattr(gu.packet(n), "__name__", "")
        if not (name.endswith("_") and n.args and isinstance(n.args[0], fx.Node)):
            continue
        base = n.args[0]
        while base not in kv_path and gu.packet(base) in VIEWS:
            base = base.args[0]
        if base in kv_path:
            writes.append(n)
    return (_paths(at, writes) | set(writes)) if writes else set()


def kv_removed(gm, args, kwargs) -> dict[int, int]:
    """Site -> keys removed, by running the graph with its reductions (example inputs)."""
    calls = [n for n in gm.graph.nodes if n.meta.get("tome", {}).get("role") == "kv_reduce"]
    if not calls:
        return {}
    shapes, _ = gu.record_shapes(gm, args, kwargs)
    out = {}
    for n in calls:
        s = shapes.get(n)
        s = s[0] if isinstance(s, (tuple, list)) and not gu.is_tensor_shape(s) else s
        out[n.meta["tome"]["site"]] = shapes[n.args[0]][-2] - s[-2]
    return out


PASS = VIEWS + tuple(gu.CAST) + (torch.ops.aten.expand, torch.ops.aten.unsqueeze)


def step_scale(gm) -> float:
    """How much the model multiplies its timestep input by before anything else reads it
    (casts and layout ops passed): the input is then ``t / scale`` of the 0..1000 schedule the
    thresholds are written for. Flux multiplies by 1000 (its pipeline passes ``t / 1000``);
    a UNet, DiT or Wan reads the step as given (1). Read from the graph, so any model that
    scales its step input in its forward is covered without naming its class."""
    step = next((p for p in gm.graph.nodes if p.op == "placeholder" and p.name in STEP_INPUTS),
                None)
    todo, seen = [step] if step is not None else [], set()
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if gu.is_call(u, {torch.ops.aten.mul, operator.mul}, ("mul",)):
                other = [a for a in u.args[:2] if a is not n]
                if other and isinstance(other[0], (int, float)) and other[0] > 0:
                    return float(other[0])
            elif gu.packet(u) in PASS or gu.is_call(u, set(), ("to", "float", "expand")):
                todo.append(u)
    return 1.0


def branch_at(t: float, switch: float, stop: float, secondary: str) -> str:
    """The authors' branch at timestep ``t`` (0..1000): none at or below ``stop``, downsample
    above ``switch``, else ``secondary``."""
    u = t / 1000
    if u <= stop:
        return "none"
    return "downsample" if u > switch else secondary


def reachable(switch: float, stop: float, secondary: str) -> set[str]:
    """Every branch some timestep in [0, 1000] takes."""
    points = {0.0, 1.0}
    for v in (switch, stop):
        points |= {min(max(v + d, 0.0), 1.0) for d in (-1e-9, 0.0, 1e-9)}
    return {branch_at(u * 1000, switch, stop, secondary) for u in points}

