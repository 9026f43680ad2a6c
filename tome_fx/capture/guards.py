"""Input checks of a captured graph: ``check_inputs`` (its first node: a wrong shape is one
``ShapeError`` line), and export's own guards (``_guards_fn``) in a form that pickles."""
from __future__ import annotations

import inspect

import sympy
import torch
import torch.fx as fx
import torch.nn as nn
from torch.export import _unlift

from ..errors import ShapeError

# torch's maker of ``ep.module()``'s guard function (a generated function: it does not pickle)
_MAKE_GUARDS = getattr(_unlift, "_convert_guards_code_to_fn", None)


class InputGuards(nn.Module):
    """``ep.module()``'s ``_guards_fn``, made by torch from the guards' code, kept to make it
    again when unpickled."""

    def __init__(self, code, paths):
        super().__init__()
        self.code, self.paths = list(code), list(paths)
        self._is_impure = True  # a call with no users that DCE must keep, as torch's
        self._check = _MAKE_GUARDS(self.code, self.paths).forward

    def forward(self, *args):
        try:
            return self._check(*args)
        except AssertionError as exc:  # one line, as check_inputs: the sizes export allows
            raise ShapeError(f"the module was captured for other input sizes ({exc}); optimize "
                             "again with example inputs of the shape you will run") from None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_check"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._check = _MAKE_GUARDS(self.code, self.paths).forward


def unlifted(ep) -> fx.GraphModule:
    """``ep.module()`` with its guard function an ``InputGuards`` (torch's does not pickle)."""
    if _MAKE_GUARDS is None:  # another torch: its own guards, which do not pickle
        return ep.module()
    _unlift._convert_guards_code_to_fn = InputGuards
    try:
        return ep.module()
    finally:
        _unlift._convert_guards_code_to_fn = _MAKE_GUARDS


def _described(dims) -> str:
    def one(d):
        if isinstance(d, int):
            return str(d)
        lo, hi = d[1], d[2]
        return "any" if lo <= 1 and hi is None else f"{lo}..{'' if hi is None else hi}"
    return "(" + ", ".join(one(d) for d in dims) + ")"


@torch.fx.node.has_side_effect
def check_inputs(spec: tuple, *inputs) -> None:
    """Raise ``ShapeError`` (one line) if an input's shape is not one the graph was captured for.

    ``spec``: per input ``(name, dims)``, ``dims`` a tuple of ints (fixed sizes) and
    ``(symbol, low, high)`` (sizes free at run time within ``low..high``, ``high`` None for no
    bound; one symbol in two places means equal sizes), and ``why`` after them where a
    position table sets ``high`` (``capture.positions``); None for a non-tensor input."""
    seen: dict[str, tuple[str, int]] = {}
    for (name, dims), x in zip(spec, inputs):
        if dims is None or not isinstance(x, torch.Tensor):
            continue
        shape = tuple(x.shape)
        what = f"input {name!r} has shape {shape} but the module was captured for {_described(dims)}"
        fix = "optimize again with example inputs of the shape you will run"
        if len(shape) != len(dims):
            raise ShapeError(f"{what} ({len(dims)} dimensions); {fix}")
        for d, (want, got) in enumerate(zip(dims, shape)):
            if isinstance(want, int):
                if want != got:
                    raise ShapeError(f"{what}: dimension {d} is fixed at {want}; {fix}")
                continue
            symbol, lo, hi = want[:3]
            if hi is not None and got > hi and len(want) > 3:
                raise ShapeError(f"{name} has {got} tokens; {want[3]}")
            if got < lo or (hi is not None and got > hi):
                bound = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
                raise ShapeError(f"{what}: dimension {d} must be {bound}, got {got}")
            other, size = seen.setdefault(symbol, (f"{name!r} dimension {d}", got))
            if size != got:
                raise ShapeError(f"{what}: its dimension {d} must equal {other} "
                                 f"({size}), got {got}")


def input_check_hook(gm: fx.GraphModule):
    """A forward pre-hook doing ``gm``'s ``check_inputs`` in eager Python, or None if ``gm`` has
    none. For ``torch.compile``: inside a compiled graph the check is traced, and a failing check
    there is a compile error, not the ShapeError."""
    node = next((n for n in gm.graph.nodes if n.op == "call_function" and n.target is check_inputs),
                None)
    if node is None:
        return None
    spec, signature = node.args[0], inspect.signature(gm.forward)

    def hook(module, args, kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:  # the call itself says what is wrong
            return
        check_inputs(spec, *(bound.arguments.get(name) for name, _ in spec))

    return hook


def export_spec(gm: fx.GraphModule, ranges: dict) -> tuple:
    """``check_inputs``' spec of ``gm``'s placeholders; ``ranges``: export's range constraints
    (symbol -> the sizes the program accepts)."""
    def dim(d):
        if not isinstance(d, torch.SymInt) or d.node.expr.is_number:  # a size export fixed
            return int(d)
        expr = d.node.expr
        valid = ranges.get(expr)
        lo, hi = (valid.lower, valid.upper) if valid is not None else (0, None)
        finite = lambda v: isinstance(v, (int, sympy.Integer))  # noqa: E731 - not int_oo
        lo = int(lo) if finite(lo) else 0
        # export's ranges start at 2 (it traces with sizes above 1), its program takes 1 too
        return (str(expr), 1 if lo == 2 else lo, int(hi) if finite(hi) else None)

    def dims(val):
        return tuple(dim(d) for d in val.shape) if isinstance(val, torch.Tensor) else None

    return tuple((p.target, dims(p.meta.get("val")))
                 for p in gm.graph.nodes if p.op == "placeholder")


def example_spec(gm: fx.GraphModule, args: tuple, kwargs: dict, fixed=None) -> tuple:
    """``check_inputs``' spec for a graph that records no sizes (fx): the number of dimensions
    of each tensor input in the example, every size free but, for the first input, the sizes
    after the batch when they are ``fixed`` (the size the model declares and takes only)."""
    def dims(p, i):
        x = args[i] if i < len(args) else kwargs.get(p.target)
        if not isinstance(x, torch.Tensor):
            return None
        pinned = i == 0 and fixed is not None and tuple(x.shape[1:]) == tuple(fixed)
        return tuple(size if pinned and d > 0 else (f"{p.target}.{d}", 0, None)
                     for d, size in enumerate(x.shape))

    placeholders = [p for p in gm.graph.nodes if p.op == "placeholder"]
    return tuple((p.target, dims(p, i)) for i, p in enumerate(placeholders))


def add_input_check(gm: fx.GraphModule, spec: tuple) -> tuple:
    """Insert ``check_inputs`` with ``spec`` (``export_spec``, ``example_spec``) in front of
    export's guards (before the first computation); returns the spec."""
    placeholders = [p for p in gm.graph.nodes if p.op == "placeholder"]
    if not placeholders:
        return ()
    with gm.graph.inserting_after(placeholders[-1]):
        gm.graph.call_function(check_inputs, (spec, *placeholders))
    return spec


def dynamic_sizes(spec: tuple) -> str | None:
    """The plan's note on the sizes beyond the batch that the module takes at any value."""
    free = [f"{name} dimension {d} ({lo}..{'' if hi is None else hi})"
            for name, dims in spec for d, size in enumerate(dims or ())
            if d > 0 and not isinstance(size, int) for lo, hi in [size[1:3]]]
    return f"dynamic sizes (any value in range): {', '.join(free)}" if free else None

