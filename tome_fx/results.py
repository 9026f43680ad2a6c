"""What ``tome_fx.sweep`` returns: a row per strategy and budget, the paired comparison of the
default strategy with constant r (exact McNemar test), a table, JSON and a plot."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from math import comb

import numpy as np
import torch
from tabulate import tabulate

from .errors import MissingExtraError

DEFAULT = "auto"  # optimize's default strategy: its rows are compared with constant r


@dataclass(frozen=True)
class Row:
    strategy: str
    budget: float
    ratio: float  # FLOPs of the plan over the original's, at the calibration inputs
    r: tuple[int, ...] | None
    cosine: float  # mean per-input cosine similarity of outputs (pooled embeddings)
    top1: float | None = None  # % with labels
    agreement: float | None = None  # % of inputs whose top-1 class is unchanged
    nn_agreement: float | None = None  # % whose nearest other input is unchanged (embeddings)
    items_per_s: float | None = None
    speedup: float | None = None
    right: str | None = None  # which inputs it gets right (packed bits, hex), for the pairing


@dataclass(frozen=True)
class Pair:
    budget: float
    only_default: int  # inputs only the default strategy gets right
    only_constant: int
    difference: float  # points
    p: float  # two-sided exact McNemar p-value


@dataclass(frozen=True)
class SweepResult:
    model: str
    data: str
    evaluated: int
    calibration: str
    rows: tuple[Row, ...]
    pairs: tuple[Pair, ...]
    throughput_batch: int | None
    world_size: int = 1  # processes that evaluated (torchrun), each a share of the batches
    items_per_rank: tuple[int, ...] = ()  # inputs each process evaluated, rank 0 first
    throughput_note: str | None = None  # how items/s were measured (summed over processes)
    threads: int | None = None  # CPU threads torch computed with while timing (per process)

    @classmethod
    def from_dict(cls, d: dict) -> "SweepResult":
        """The result ``to_dict`` (or ``--json``) wrote."""
        rows = tuple(Row(**{**r, "r": None if r["r"] is None else tuple(r["r"])})
                     for r in d["rows"])
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in d.items() if k in fields}, "rows": rows,
                      "pairs": tuple(Pair(**p) for p in d["pairs"]),
                      "items_per_rank": tuple(d.get("items_per_rank", ()))})

    def ordered(self) -> list[Row]:
        """Rows by strategy (first seen first), budgets from high to low: the original first."""
        names = list(dict.fromkeys(r.strategy for r in self.rows))
        return sorted(self.rows, key=lambda r: (r.budget < 1.0 or r.strategy != "original",
                                                names.index(r.strategy), -r.budget))

    def table(self, fmt: str = "github") -> str:
        has = lambda key: any(getattr(r, key) is not None for r in self.rows)  # noqa: E731
        cols = [("strategy", "strategy", "{}"), ("budget", "budget", "{:g}"),
                ("ratio", "FLOP ratio", "{:.3f}"), ("r", "schedule r", None)]
        cols += [(k, h, f) for k, h, f in (
            ("top1", "top-1 %", "{:.2f}"), ("agreement", "same prediction %", "{:.2f}"),
            ("cosine", "output cosine", "{:.4f}"), ("nn_agreement", "same nearest neighbour %",
                                                    "{:.2f}"),
            ("items_per_s", self._rate_header(), "{:.1f}"), ("speedup", "speed-up", "{:.2f}x"))
            if has(k)]
        body = []
        for row in self.ordered():
            cells = []
            for key, _, fmt_ in cols:
                v = getattr(row, key)
                if key == "r":
                    cells.append("—" if v is None else " ".join(map(str, v)))
                else:
                    cells.append("—" if v is None else fmt_.format(v))
            body.append(cells)
        return tabulate(body, headers=[h for _, h, _ in cols], tablefmt=fmt, disable_numparse=True)

    def _rate_header(self) -> str:
        return "items/s" if self.world_size == 1 else f"items/s (sum of {self.world_size})"

    def paired_table(self, fmt: str = "github") -> str:
        body = [[f"{p.budget:g}", p.only_default, p.only_constant, f"{p.difference:+.2f}",
                 f"{p.p:.2f}"] for p in self.pairs]
        head = ["budget", f"only {DEFAULT} right", "only constant right", "difference (points)",
                "McNemar p"]
        return tabulate(body, headers=head, tablefmt=fmt, disable_numparse=True)

    def __str__(self) -> str:
        spread = (f", {self.world_size} processes: {'+'.join(map(str, self.items_per_rank))}"
                  if self.world_size > 1 else "")
        note = f"\nthroughput: {self.throughput_note}" if self.throughput_note else ""
        text = (f"tome-fx sweep: {self.model} on {self.evaluated} inputs of {self.data} "
                f"(calibration: {self.calibration}{spread}){note}\n\n{self.table('simple')}")
        if self.pairs:
            text += f"\n\n{DEFAULT} vs constant, input by input:\n\n{self.paired_table('simple')}"
        return text

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    def plot(self, path) -> None:
        """PNG: accuracy (top-1, else agreement, else cosine) against the FLOP ratio and, when
        measured, against throughput; one line per strategy."""
        try:
            import matplotlib
        except ImportError:
            raise MissingExtraError("plotting needs matplotlib: pip install matplotlib") from None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        key, label = next((k, lab) for k, lab in (
            ("top1", "top-1 accuracy (%)"), ("agreement", "same prediction as original (%)"),
            ("nn_agreement", "same nearest neighbour (%)"), ("cosine", "output cosine"))
            if any(getattr(r, k) is not None for r in self.rows))
        speed = any(r.items_per_s is not None for r in self.rows)
        fig, axes = plt.subplots(1, 2 if speed else 1, figsize=(11 if speed else 6, 4.2),
                                 squeeze=False)
        original = next((r for r in self.rows if r.budget >= 1.0), None)
        for name in dict.fromkeys(r.strategy for r in self.rows if r.budget < 1.0):
            pts = [r for r in self.rows if r.strategy == name or r is original]
            for ax, x in zip(axes[0], ("ratio", "items_per_s")):
                xy = sorted((getattr(r, x), getattr(r, key)) for r in pts)
                ax.plot([a for a, _ in xy], [b for _, b in xy], marker="o", ms=3, label=name)
        axes[0][0].set_xlabel("FLOP ratio (rewritten / original)")
        axes[0][0].invert_xaxis()
        if speed:
            axes[0][1].set_xlabel(f"throughput ({self._rate_header()})")
        for ax in axes[0]:
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{self.model}: {self.evaluated} inputs of {self.data}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def bits(mask: torch.Tensor) -> str:
    """Which inputs a row gets right, packed (hex): ``Row.right``."""
    return np.packbits(mask.numpy()).tobytes().hex()


def _unbits(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), np.uint8))[:n].astype(bool)


def mcnemar(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: how likely a split this uneven of the discordant
    inputs is if both methods were equally accurate (binomial, p = 1/2)."""
    m, k = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(comb(m, i) for i in range(k + 1)) / 2 ** m) if m else 1.0


def pairs(rows: list[Row], n: int) -> tuple[Pair, ...]:
    right = {(r.strategy, r.budget): _unbits(r.right, n) for r in rows if r.right}
    out = []
    for budget in sorted({b for _, b in right if b < 1.0}, reverse=True):
        if (DEFAULT, budget) in right and ("constant", budget) in right:
            a, b = right[(DEFAULT, budget)], right[("constant", budget)]
            only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
            out.append(Pair(budget, only_a, only_b, 100 * (only_a - only_b) / n,
                            mcnemar(only_a, only_b)))
    return tuple(out)

