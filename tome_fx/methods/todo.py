"""``method="todo"``: ToDo (Smith et al. 2024), keys and values of the self-attention computed
from the token grid downsampled (``kernels.todo``, ``rules.todo``, ``cost.todo``); the authors'
option names and defaults (``DEFAULTS``), their one-line checks, and the module it returns.

The timestep switch: ``t/1000 > timestep_threshold_switch`` runs the downsample branch, else
``secondary_merge_method``; ``t/1000 <= timestep_threshold_stop`` runs the model unchanged.
``t`` is on the 0..1000 schedule: a model that multiplies its step input by a constant first
(Flux: ``timestep * 1000``, its pipeline passing ``t / 1000``) is read with that constant
(``rules.todo.step_scale``, from the captured graph), so Flux's 0.5 is step 500. A
diffusers model comes back as a ``DiffusionModule`` whose graphs are one per call signature
*and branch* (its ``variant`` reads the timestep on the host), so each call computes only its
own branch. A batch of per-sample timesteps that fall in different branches is a ValueError (one
graph runs per call). A model that is not a diffusers model has no per-call wrapper: it gets the
one branch its thresholds allow at every timestep, or a ValueError when they allow several.
``optimize(prop_attn="fold")`` gives merged keys their sizes (proportional attention, folded
into one SDPA); the default leaves them off, as the authors do.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from ..capture import capture
from ..compiling import finish_module
from ..cost.search import check_budget
from ..cost.todo import fit_budget, rewrite_todo
from ..diffusion import DiffusionModule, call_inputs, is_diffusers
from ..diffusion import default_inputs as diffusion_inputs
from ..diffusion.inputs import STEP_NAMES
from ..diffusion.module import _key, state_fingerprint
from ..kernels.todo import POOLS
from ..rules.todo import BRANCHES, ToDo, branch_at, reachable, step_scale
from ..rules.tomesd import check_ratio
from .common import check_model, finish
from .registry import Method, OptimizeCall, register_method

MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")  # F.interpolate on 4-D
DEFAULTS = dict(downsample_factor=2, downsample_factor_level_2=1,
                downsample_method="nearest-exact", timestep_threshold_switch=0.2,
                timestep_threshold_stop=0.0, secondary_merge_method="similarity", ratio=0.5,
                ratio_level_2=0.5, sx=2, sy=2, use_rand=True, seed=None)
LEVEL_OPTIONS = ("downsample_factor", "downsample_factor_level_2", "ratio", "ratio_level_2")


@dataclasses.dataclass(frozen=True)
class Switch:
    """The timestep thresholds: which branch a call runs."""

    switch: float
    stop: float
    secondary: str
    scale: float = 1.0  # the model's step input is t / scale (rules.todo.step_scale)

    def __call__(self, inputs: dict) -> str:
        name = next((n for n in STEP_NAMES if n in inputs), None)
        if name is None:
            raise ValueError("method='todo' reads the timestep of every call: the model's call "
                             f"has no {' or '.join(STEP_NAMES)} input")
        values = torch.as_tensor(inputs[name]).detach().flatten().tolist()
        found = {branch_at(float(v) * self.scale, self.switch, self.stop, self.secondary) for v in values}
        if len(found) > 1:
            raise ValueError(f"method='todo': the batch's timesteps {sorted(set(values))} fall "
                             f"in different branches ({', '.join(sorted(found))}); one graph runs "
                             "per call, so call the model once per branch")
        return found.pop()


def _number(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        raise TypeError(f"{name} must be a number, got {v!r}")
    return float(v)


def check_options(options: dict, budget: bool) -> dict:
    """The options with the defaults filled in; one-line errors for unknown or bad ones."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unexpected arguments for method='todo': {', '.join(unknown)}")
    given = [k for k in LEVEL_OPTIONS if k in options]
    if budget and given:
        raise ValueError(f"pass either {given[0]} or flops_budget, not both: the budget picks "
                         "each level's factor and ratio")
    o = {**DEFAULTS, **options}
    for name in ("downsample_factor", "downsample_factor_level_2"):
        v = o[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if o["downsample_method"] not in MODES + POOLS:
        extra = (" (linear and trilinear take 3-D and 5-D inputs; the grid is 2-D: bilinear)"
                 if o["downsample_method"] in ("linear", "trilinear") else "")
        raise ValueError(f"downsample_method must be one of {', '.join(MODES + POOLS)}, got "
                         f"{o['downsample_method']!r}{extra}")
    for name in ("timestep_threshold_switch", "timestep_threshold_stop"):
        o[name] = _number(name, o[name])
    if o["secondary_merge_method"] not in BRANCHES:
        raise ValueError(f"secondary_merge_method must be one of {', '.join(BRANCHES)}, got "
                         f"{o['secondary_merge_method']!r}")
    for name in ("ratio", "ratio_level_2"):
        check_ratio(o[name], name)
    for name in ("sx", "sy"):
        if isinstance(o[name], bool) or not isinstance(o[name], int) or o[name] < 1:
            raise ValueError(f"{name} must be an int >= 1, got {o[name]!r}")
    if o["sx"] * o["sy"] < 2:
        raise ValueError("sx * sy must be at least 2: a 1x1 window has no token to merge")
    if not isinstance(o["use_rand"], bool):
        raise TypeError(f"use_rand must be True or False, got {o['use_rand']!r}")
    if o["seed"] is not None and (isinstance(o["seed"], bool) or not isinstance(o["seed"], int)):
        raise TypeError(f"seed must be an int, got {o['seed']!r}")
    return o


def todo_method(options: dict, budget: bool, prop_attn: bool = False) -> tuple[ToDo, Switch]:
    """The method (in the downsample branch) and the switch of ``optimize(method="todo")``."""
    o = check_options(options, budget)
    seed = o["seed"]
    if seed is None:  # a fresh pattern per module, reproducible under torch.manual_seed
        seed = int(torch.randint(0, 1 << 31, ())) if o["use_rand"] else 0
    method = ToDo("downsample", (float(o["downsample_factor"]),
                                 float(o["downsample_factor_level_2"])),
                  (float(o["ratio"]), float(o["ratio_level_2"])), o["downsample_method"],
                  o["sx"], o["sy"], o["use_rand"], seed=seed, prop_attn=prop_attn)
    switch = Switch(o["timestep_threshold_switch"], o["timestep_threshold_stop"],
                    o["secondary_merge_method"])
    return method, switch


class Builder:
    """Builds the module of a model for keyword inputs in a branch (image sizes dynamic). The
    last capture is kept: a new branch of the same call (same input shapes, same model state)
    is only a new rewrite of it, not a new capture."""

    def __init__(self, method: ToDo, compile):
        self.method, self.compile, self.last = method, compile, None

    @staticmethod
    def key(model: nn.Module, inputs: dict):
        return (state_fingerprint(model), model.training,
                tuple((n, _key(v), tuple(getattr(v, "shape", ()))) for n, v in inputs.items()))

    def __call__(self, model: nn.Module, inputs: dict, branch: str) -> nn.Module:
        key = self.key(model, inputs)
        if self.last is None or self.last[0] != key:
            self.last = (key, capture(model, inputs, image_sizes=True))
        captured = self.last[1]
        result = rewrite_todo(captured, dataclasses.replace(self.method, branch=branch))
        out = result.graph_module
        out.tome_counts = result.counts
        return finish_module(out, self.compile, captured)


@register_method
class ToDoMethod(Method):
    """ToDo (Smith et al. 2024): keys and values from the downsampled token grid."""

    name = "todo"
    options = tuple(k for k in DEFAULTS)
    doc = "keys and values of diffusion self-attention downsampled (queries kept; budget or options)"

    def optimize(self, model: nn.Module, call: OptimizeCall) -> nn.Module:
        self.check_unplanned(call)
        check_model(model)
        self.check_options(call)
        if call.r is not None:
            raise ValueError("method='todo' takes its options or flops_budget, not r")
        unused = [k for k in ("strategy", "calibration", "unmerge", "drop_unread", "min_tokens")
                  if k in call.given]
        if call.prop_attn == "bias":
            unused.insert(0, "prop_attn='bias'")
        if unused:  # an error, not silently ignored
            raise ValueError(f"method='todo' takes no {unused[0]}: it reduces keys and values "
                             "(prop_attn='fold' gives merged keys their sizes)")
        budget = call.flops_budget
        if budget is not None:
            check_budget(budget)
        method, switch = todo_method(call.options, budget is not None, call.prop_attn == "fold")
        if not is_diffusers(model):
            return _plain(model, method, switch, budget, call)
        inputs = call_inputs(model, diffusion_inputs(model) if call.example_inputs is None
                             else call.example_inputs)
        build = Builder(method, call.compile)
        captured = capture(model, inputs, image_sizes=True)
        build.last = (build.key(model, inputs), captured)
        switch = dataclasses.replace(switch, scale=step_scale(captured.graph_module))
        if budget is not None:  # the budget's factors and ratios, at the example's size
            build.method = fit_budget(captured, dataclasses.replace(
                method, branch=priced(switch)), budget)
        first = build(model, inputs, switch(inputs))
        return DiffusionModule(model, build, inputs, first, variant=switch)


def priced(switch: Switch) -> str:
    """The branch a budget is met in: downsample where some step takes it, else similarity."""
    branches = reachable(switch.switch, switch.stop, switch.secondary)
    return "downsample" if "downsample" in branches or "similarity" not in branches \
        else "similarity"


def _plain(model, method: ToDo, switch: Switch, budget, call: OptimizeCall) -> nn.Module:
    """A model that is not a diffusers model: no wrapper reads each call's timestep, so one
    branch must serve every step."""
    branches = reachable(switch.switch, switch.stop, switch.secondary)
    if len(branches) > 1:
        raise ValueError(f"method='todo' on {type(model).__name__} (not a diffusers model: no "
                         f"wrapper reads each call's timestep) would need branches "
                         f"{', '.join(sorted(branches))}; pass timestep_threshold_switch=-1 "
                         "and timestep_threshold_stop=-1 for the downsample branch at every step")
    captured = capture(model, call.example_inputs)
    found = dataclasses.replace(method, branch=branches.pop())
    if budget is not None:
        found = fit_budget(captured, found, budget)
    return finish(rewrite_todo(captured, found), call.compile, budget, captured)
