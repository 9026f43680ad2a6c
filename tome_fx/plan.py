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


@dataclass(frozen=True)
class Skipped:
    site: str
    reason: str


@dataclass(frozen=True)
class Plan:
    blocks: tuple[BlockPlan, ...]
    protected: int  # prefix tokens never merged (class, distillation, register tokens)
    skipped: tuple[Skipped, ...] = ()
    frontend: str = "fx"

    @property
    def r(self) -> list[int]:
        return [b.r for b in self.blocks]

    def table(self, fmt: str = "simple") -> str:
        rows = [(b.index, b.site, b.kind, b.norm, b.tokens_in, b.r, b.tokens_out) for b in self.blocks]
        head = ["block", "attention", "kind", "norm", "tokens in", "r", "tokens out"]
        return tabulate(rows, headers=head, tablefmt=fmt)

    def __str__(self) -> str:
        lines = [self.table(), f"protected prefix tokens: {self.protected}"]
        for s in self.skipped:
            lines.append(f"skipped {s.site}: {s.reason}")
        return "\n".join(lines)
