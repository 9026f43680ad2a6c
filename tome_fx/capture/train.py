"""The training forward in the captured graph: dropout that follows ``.train()``/``.eval()``.

A graph records one pass of the model's Python, so a choice the code makes by ``self.training``
(``F.dropout(x, p, self.training)``, SDPA's ``dropout_p=p if self.training else 0``) is baked in.
capture records the model in train mode, and every dropout probability becomes
``train_switch(p, 0.0)`` (``TrainSwitch``, a submodule: ``.train()``/``.eval()`` reach it), so one
graph, with one matching and one merge schedule, computes both modes. nn.Dropout modules left
as modules follow the mode by themselves. HuggingFace's SpecAugment draws its masks through
``capture.specaug.spec_augment_mask``, whose ``training`` flag is switched the same way.

First the model runs once in train mode (``probe_training``): a training forward that draws
random numbers in Python (numpy, ``random``: a graph would freeze them; SpecAugment's draws
aside) or beyond dropout (stochastic depth, LayerDrop) cannot be switched, and one
with no dropout and no batch statistics needs no train-mode graph. A train-mode graph is kept
only if under ``.eval()`` it computes the model's eval forward on the example inputs
(``train_problem``); otherwise capture falls back to the eval-mode graph and says why.
"""
from __future__ import annotations

import os
import pickle
import random
import sys
import traceback
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .. import graph as gu
from ..errors import one_line
from .specaug import CALLED_THROUGH, DRAWS, EMBED, spec_augment_mask

aten = torch.ops.aten
_DROPOUT = ((1, "p", 0.5), (2, "training", True))
_ALPHA = ((1, "p", 0.5), (2, "training", False))
_ATEN_DROPOUT = ((1, "p", 0.0), (2, "train", True))
_SDPA = ((4, "dropout_p", 0.0), None)
_SPEC_AUGMENT = ((3, "prob", 0.0), (6, "training", False))
# op -> ((position, name, default) of the probability, the same of its train flag or None)
SWITCHED = {
    F.dropout: _DROPOUT, F.dropout1d: _DROPOUT, F.dropout2d: _DROPOUT, F.dropout3d: _DROPOUT,
    F.alpha_dropout: _ALPHA, F.feature_alpha_dropout: _ALPHA,
    torch.dropout: _ATEN_DROPOUT, torch.alpha_dropout: _ATEN_DROPOUT,
    torch.feature_dropout: _ATEN_DROPOUT, torch.feature_alpha_dropout: _ATEN_DROPOUT,
    F.scaled_dot_product_attention: _SDPA,
    aten.dropout.default: _ATEN_DROPOUT, aten.feature_dropout.default: _ATEN_DROPOUT,
    aten.alpha_dropout.default: _ATEN_DROPOUT, aten.feature_alpha_dropout.default: _ATEN_DROPOUT,
    aten.native_dropout.default: _ATEN_DROPOUT, aten.scaled_dot_product_attention.default: _SDPA,
    spec_augment_mask: _SPEC_AUGMENT, **{op: _SPEC_AUGMENT for op in DRAWS},
}
_RANDOM = {"bernoulli", "normal", "uniform", "multinomial", "exponential", "cauchy", "geometric",
           "log_normal", "poisson", "random"}  # and rand, randn, randint, randperm, ...
SWITCH = "train_switch"


class TrainSwitch(nn.Module):
    """``if_train`` under ``.train()``, ``if_eval`` under ``.eval()``."""

    def forward(self, if_train, if_eval):
        return if_train if self.training else if_eval


def add_train_switches(gm: fx.GraphModule) -> int:
    """Route every active dropout probability (and its train flag) of ``gm`` through
    ``train_switch``; returns how many ops now follow the mode."""
    count, time_masks = 0, False
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target in CALLED_THROUGH:
            n.target = CALLED_THROUGH[n.target]
        rule = SWITCHED.get(n.target) if n.op == "call_function" else None
        if rule is None:
            continue
        if not _drops(rule, lambda at, name, default: gu.arg(n, at, name, default)):
            continue
        if SWITCH not in gm._modules:
            gm.add_submodule(SWITCH, TrainSwitch())
        (p_at, p_name, p_default), flag = rule
        with gm.graph.inserting_before(n):
            p = gu.arg(n, p_at, p_name, p_default)
            gu.set_arg(n, p_at, p_name, gm.graph.call_module(SWITCH, (p, 0.0)))
            if flag is not None and (len(n.args) > flag[0] or flag[1] in n.kwargs):
                gu.set_arg(n, flag[0], flag[1], gm.graph.call_module(SWITCH, (True, False)))
        count += 1
        time_masks |= n.target is spec_augment_mask and gu.arg(n, 2, "dim", None) == 1
    if time_masks:
        _detach_in_eval(gm)
    gm.recompile()
    return count


def _detach_in_eval(gm: fx.GraphModule) -> None:
    """SpecAugment's embedding, which only its drawn time mask reads, detached under
    ``.eval()``: no gradient there, as in the model (not merely a zero one)."""
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and n.target.rsplit(".", 1)[-1] == EMBED:
            with gm.graph.inserting_after(n):
                detached = gm.graph.call_method("detach", (n,))
            with gm.graph.inserting_after(detached):
                switched = gm.graph.call_module(SWITCH, (n, detached))
            n.replace_all_uses_with(switched, lambda user: user not in (detached, switched))


def _drops(rule, arg) -> bool:
    """Whether a call of a ``SWITCHED`` op drops anything; ``arg(position, name, default)``
    reads its arguments."""
    (p_at, p_name, p_default), flag = rule
    p = arg(p_at, p_name, p_default)
    on = True if flag is None else arg(*flag)
    return on is True and not isinstance(p, fx.Node) and bool(p)


def _is_random(name: str, target) -> bool:
    base = name.split(".")[0].strip("_")
    return (base in _RANDOM or base.startswith("rand")) and target not in SWITCHED


def _random_op(n: fx.Node) -> str | None:
    if n.op not in ("call_function", "call_method"):
        return None
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    return name if _is_random(name, n.target) else None


class _Recorder(TorchFunctionMode):
    """What a forward does that depends on the mode: the first torch call drawing random numbers
    beyond dropout (and where in the model's code), whether a dropout drops anything, whether
    batch norm uses the batch's statistics. SpecAugment's draws (``DRAWS``) are its own: they
    are left out of what ``python`` sees drawn."""

    def __init__(self, python: "PythonRandom"):
        super().__init__()
        self.python = python
        self.random: str | None = None
        self.dropout = self.batch_stats = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}

        def arg(at, name, default):
            return args[at] if len(args) > at else kwargs.get(name, default)

        name = getattr(func, "__name__", "")
        if func in SWITCHED:
            self.dropout |= _drops(SWITCHED[func], arg)
            if func in DRAWS:
                return self.python.own(func, args, kwargs)
        elif func is F.batch_norm:
            self.batch_stats |= arg(5, "training", False) is True
        elif self.random is None and _is_random(name, func):
            frames = [f for f in traceback.extract_stack()[:-1]
                      if f"{os.sep}torch{os.sep}" not in f.filename]
            where = frames[-1] if frames else None
            self.random = name + (f" at {os.path.basename(where.filename)}:{where.lineno} in "
                                  f"{where.name}" if where else "")
        return func(*args, **kwargs)


@dataclass
class Probe:
    """The model's forward in train mode, on the example inputs."""

    why: str | None = None  # why no train-mode graph can be its training forward
    differs: bool = False  # it depends on the mode: dropout, batch statistics
    error: Exception | None = None  # what it raised


def probe_training(model: nn.Module, args: tuple, kwargs: dict) -> Probe:
    """Run ``model`` (capture's copy) in train mode on the example inputs; its buffers (batch
    statistics: the copy's own, whose parameters are the user's) and the caller's random
    generators are put back as they were, and the model is left in eval mode. Under
    ``no_grad`` no parameter is written."""
    # by owner and name: a forward may replace a buffer (timm's ConViT caches its relative
    # positions in one), and copying into the new tensor would corrupt it
    saved = [(owner, name, b, b.detach().clone()) for owner in model.modules()
             for name, b in owner._buffers.items() if b is not None]
    model.train()
    try:
        with torch.random.fork_rng(), torch.no_grad(), PythonRandom() as drawn, \
                _Recorder(drawn) as seen:
            model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - whatever fails, the eval-mode graph is kept
        return Probe(f"it fails in train mode ({type(exc).__name__}: {one_line(exc)})", True, exc)
    finally:
        model.eval()
        with torch.no_grad():
            for owner, name, buffer, value in saved:
                buffer.copy_(value)
                owner._buffers[name] = buffer
    why = []
    if drawn.drew:
        why.append("it draws random numbers in Python (numpy or random), which a graph would "
                   "freeze")
    if seen.random:
        why.append(f"it draws random numbers beyond dropout ({seen.random})")
    return Probe("; ".join(why) or None, seen.dropout or seen.batch_stats)


def _same(a, b) -> bool:
    want, have = _tensors(a), _tensors(b)
    return len(want) == len(have) and all(
        x.shape == y.shape and torch.allclose(x.float(), y.float(), rtol=1e-3, atol=1e-4,
                                              equal_nan=True) for x, y in zip(want, have))


def train_problem(gm: fx.GraphModule, reference, args: tuple, kwargs: dict) -> str | None:
    """Why ``gm`` (captured in train mode, switches added) is not the model's eval forward under
    ``.eval()``: a random op beyond dropout, or other outputs than ``reference`` on the example
    inputs; None if it is."""
    for n in gm.graph.nodes:
        op = _random_op(n)
        if op:
            where = n.meta.get("stack_trace", "").strip().splitlines()
            return (f"it draws random numbers beyond dropout ({op}"
                    f"{' at ' + where[-1].strip() if where else ''})")
    gm.eval()
    with torch.no_grad():
        got = gm(*args, **kwargs)
    if not _same(reference, got):
        return "its train-mode graph computes other values than the model in eval mode"
    return None


def _tensors(out) -> list:
    if hasattr(out, "to_tuple"):  # a HuggingFace ModelOutput
        out = out.to_tuple()
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


class PythonRandom:
    """Whether the code run inside drew numbers from Python's ``random`` or numpy's global
    generator (``drew``), calls run by ``own`` aside; both are put back as they were."""

    def __enter__(self):
        self.states = self._states()
        self.drew = False
        self._last = self.states[1]  # the state after the last ``own`` call
        return self

    def own(self, func, args, kwargs):
        """``func(*args, **kwargs)``, whose draws are not counted."""
        self.drew |= self._states()[1] != self._last
        try:
            return func(*args, **kwargs)
        finally:
            self._last = self._states()[1]

    def __exit__(self, *exc):
        self.drew |= self._states()[1] != self._last
        random.setstate(self.states[0][0])
        if self.states[0][1] is not None:
            sys.modules["numpy"].random.set_state(self.states[0][1])
        return False

    @staticmethod
    def _states():
        numpy = sys.modules.get("numpy")
        raw = (random.getstate(), numpy.random.get_state() if numpy is not None else None)
        return raw, pickle.dumps(raw)
