"""The rows of the quality benchmark: each a way to run the trained UNet (the original, the
authors' ToMeSD and ToDo, tome_fx's methods at ratios and at FLOP budgets) built from one spec."""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parents[1] / "tests")]
import model as M  # noqa: E402

# ToDo's keys and values merged by similarity at every step (the switch past t/1000 = 1), with
# proportional attention: tome_fx's own variant, the sizes of merged keys in one SDPA. 4x4
# windows: one destination per 16 tokens, so 0.7 is reachable (2x2 windows keep a quarter of
# the keys at least: FLOP ratio 0.79 on this model).
KV_MERGE = dict(method="todo", timestep_threshold_switch=1.0, prop_attn="fold", sx=4, sy=4)


@dataclass(frozen=True)
class Row:
    name: str
    family: str  # one line per family in the plot
    kind: str  # "original", "authors_tomesd", "authors_todo" or "tome_fx"
    options: dict = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "_" for c in self.name).strip("_")


def rows() -> list[Row]:
    out = [Row("unmerged", "unmerged", "original")]
    for r in (0.3, 0.5, 0.7):
        out.append(Row(f"tomesd (authors) {r}", "tomesd (authors)", "authors_tomesd", {"ratio": r}))
        out.append(Row(f"tomesd {r}", "tomesd", "tome_fx", {"method": "tomesd", "ratio": r}))
    # top-left destinations in ToDo's similarity branch (the last 20% of steps): the reference
    # of the authors' processor has no random ones, and the same function is then compared
    plain = {"use_rand": False}
    out.append(Row("todo (authors)", "todo (authors)", "authors_todo", plain))
    out.append(Row("todo", "todo", "tome_fx", {"method": "todo", **plain}))
    out.append(Row("kv-merge fold", "kv-merge fold", "tome_fx", dict(KV_MERGE)))
    # matched rows: every step at the budget (ToDo's stop threshold 0 would leave a step at
    # t = 0 unreduced; the sampler's trailing steps end at t = 49, so this only makes it sure)
    every = {"timestep_threshold_stop": -1.0}
    for b in (0.9, 0.8, 0.7):
        out.append(Row(f"tomesd @{b}", "tomesd @budget", "tome_fx",
                       {"method": "tomesd", "flops_budget": b}))
        out.append(Row(f"todo @{b}", "todo @budget", "tome_fx",
                       {"method": "todo", "flops_budget": b, **plain, **every}))
        out.append(Row(f"kv-merge fold @{b}", "kv-merge fold @budget", "tome_fx",
                       {**KV_MERGE, "flops_budget": b, **every}))
    return out


def build(row: Row, net: M.ClassUNet, seed: int = 0, batch: int = 2):
    """The callable the sampler calls in place of ``net.unet`` (the model is never changed);
    ``batch``: the UNet's batch (twice the images: guidance), so tome_fx captures once."""
    unet = net.unet
    if row.kind == "original":
        return unet
    torch.manual_seed(seed)  # the methods' random destinations, when drawn at build time
    if row.kind == "authors_tomesd":
        import tomesd
        patched = copy.deepcopy(unet)
        tomesd.apply_patch(patched, **row.options)
        return patched
    if row.kind == "authors_todo":
        from reference_todo import ReferenceToDo
        patched = copy.deepcopy(unet)
        widths = M.UNET["block_out_channels"][:2]  # level 1 and 2 by width, as the authors
        return ReferenceToDo(patched, widths=widths, **row.options).apply()
    import tome_fx
    return tome_fx.optimize(unet, example_inputs=example_inputs(net, batch), **row.options)


def example_inputs(net: M.ClassUNet, batch: int = 2) -> dict:
    """A call as the sampler makes it (classes, then as many empty ones; one condition token),
    so budgets are fit on the cross-attention's real length."""
    size = M.UNET["sample_size"]
    labels = torch.tensor([0] * (batch // 2) + [M.NULL] * (batch - batch // 2))
    with torch.no_grad():
        context = net.condition(labels)
    return dict(sample=torch.randn(batch, M.UNET["in_channels"], size, size,
                                   generator=torch.Generator().manual_seed(0)),
                timestep=torch.tensor(500), encoder_hidden_states=context)
