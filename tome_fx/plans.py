"""The merge plan: per block, tokens in/out and r. Frozen; prints as a table."""
from __future__ import annotations

from dataclasses import dataclass

from tabulate import tabulate


@dataclass(frozen=True)
class BlockPlan:
    index: int
    site: str  # attention node in the graph
    kind: str  # "sdpa" | "softmax"
    norm: str  # "pre" | "post"
    tokens_in: int
    r: int  # merges actually applied (after clamping to the block's limit)
    tokens_out: int
    flops: int | None = None  # the block's FLOPs incl. its merge (cost model), else None
    # tokens not computed after this block's attention because the output never reads them
    # (tome_fx.passes.drop); tokens_out = tokens_in - r - dropped
    dropped: int = 0


@dataclass(frozen=True)
class LevelPlan:
    """ToMeSD: one resolution level of the model (its transformer blocks share a token grid)."""

    downsample: int  # ceil(sqrt(input pixels // tokens)), as the authors' code
    grid: tuple  # (h, w)
    ratio: float
    r: int  # tokens removed in each merged op: int(tokens * ratio), at most the sources
    ops: int  # merged ops at this level
    flops_original: int | None = None  # FLOPs of the level's transformer blocks' ops
    flops: int | None = None  # the same ops merged, their matches included

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class Skipped:
    site: str
    reason: str


FRONTENDS = {"fx": "torch.fx symbolic tracing", "export": "torch.export (ATen graph)"}


@dataclass(frozen=True)
class Plan:
    blocks: tuple[BlockPlan, ...]
    protected: int  # prefix tokens never merged (class, distillation, register tokens)
    skipped: tuple[Skipped, ...] = ()
    frontend: str = "fx"  # capture path: "fx" (symbolic tracing) | "export" (torch.export)
    # Set by tome_fx.plan (the cost model); FLOPs are for the example inputs' batch.
    flops: int | None = None  # whole rewritten model
    flops_original: int | None = None  # the model without merging
    budget: float | None = None  # requested flops_budget
    strategy: str | None = None
    drift: float | None = None  # fidelity proxy of the chosen schedule (see tome_fx.cost.plan)
    notes: tuple[str, ...] = ()  # what capture and rewrite noticed (e.g. why export was used)
    # ToMato (tome_fx.tomato_api): one merge at ``merge_block`` over 4-neighbour components.
    method: str = "tome"  # "tome" | "tomato"
    merge_block: int | None = None
    similarity: str | None = None  # "attention" | "keys"
    sim_threshold: float | None = None  # threshold mode; None in budget (count) mode
    grid: tuple | None = None  # (h, w) patch grid the components are taken over
    # ToMe from a flops_budget: each block merges the same share of its tokens at any token
    # count (``r`` are the counts at the example inputs; ``kernels.tome.merge_count``)
    scales: bool = False
    levels: tuple[LevelPlan, ...] = ()  # ToMeSD (method "tomesd"): per resolution level

    @property
    def r(self) -> list[int]:
        return [b.r for b in self.blocks]

    @property
    def ratio(self) -> float | None:
        """FLOPs of the rewritten model / FLOPs of the original."""
        if self.flops is None or not self.flops_original:
            return None
        return self.flops / self.flops_original

    @property
    def predicted_speedup(self) -> float | None:
        """Speed-up if run time were proportional to FLOPs (1 / ratio)."""
        ratio = self.ratio
        return None if not ratio else 1.0 / ratio

    def table(self, fmt: str = "simple") -> str:
        with_flops = any(b.flops is not None for b in self.blocks)
        with_drop = any(b.dropped for b in self.blocks)
        rows = []
        for b in self.blocks:
            row = [b.index, b.site, b.kind, b.norm, b.tokens_in, b.r]
            if self.scales:
                row.append(f"{b.r / b.tokens_in:.1%}" if b.tokens_in else "-")
            row += [b.dropped, b.tokens_out] if with_drop else [b.tokens_out]
            if with_flops:
                row.append(None if b.flops is None else b.flops / 1e6)
            rows.append(row)
        head = ["block", "attention", "kind", "norm", "tokens in", "r"]
        head += ["r / tokens"] if self.scales else []
        head += ["dropped", "tokens out"] if with_drop else ["tokens out"]
        if with_flops:
            head.append("MFLOPs")
        return tabulate(rows, headers=head, tablefmt=fmt, floatfmt=".1f")

    def level_table(self, fmt: str = "simple") -> str:
        """ToMeSD's levels: grid, tokens, ratio, r, merged ops, their FLOPs before and after."""
        rows = [[lv.downsample, f"{lv.grid[0]}x{lv.grid[1]}", lv.tokens, lv.ratio, lv.r,
                 lv.ops, None if lv.flops_original is None else lv.flops_original / 1e6,
                 None if lv.flops is None else lv.flops / 1e6] for lv in self.levels]
        head = ["downsample", "grid", "tokens", "ratio", "r", "merged ops", "MFLOPs before",
                "MFLOPs after"]
        return tabulate(rows, headers=head, tablefmt=fmt,
                        floatfmt=("g", "", "g", ".3f", "g", "g", ".1f", ".1f"))

    def __str__(self) -> str:
        lines = [self.table(), f"protected prefix tokens: {self.protected}",
                 f"captured with: {FRONTENDS.get(self.frontend, self.frontend)}"]
        if self.flops is not None and self.flops_original:
            budget = "" if self.budget is None else f" (budget {self.budget:g})"
            lines.append(
                f"FLOPs: {self.flops / 1e9:.4g} G of {self.flops_original / 1e9:.4g} G, "
                f"ratio {self.ratio:.4f}{budget}, predicted speed-up {self.predicted_speedup:.3f}x"
            )
        if self.scales:
            lines.append("the schedule scales with the token count: each block merges its share "
                         "(r / tokens) of the tokens it gets; r is the count at the example inputs")
        if self.method in ("tomesd", "todo"):
            lines.insert(1, self.level_table())
        elif self.method != "tome":
            how = (f"threshold {self.sim_threshold:g}" if self.sim_threshold is not None
                   else "exact token count per image")
            lines.append(f"method: {self.method} at block {self.merge_block}, {self.similarity} "
                         f"similarity, {how}, grid {self.grid}")
        if self.strategy is not None:
            drift = "" if self.drift is None else f", output drift {self.drift:.3g}"
            lines.append(f"strategy: {self.strategy}{drift}")
        for s in self.skipped:
            lines.append(f"skipped {s.site}: {s.reason}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
