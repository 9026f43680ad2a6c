"""``TomeModule``: the GraphModule capture makes and ``optimize`` returns. Unlike torch's, it
keeps its graph, node tags and tome_fx attributes through ``copy.deepcopy`` and pickling
(``torch.save``/``torch.load``), and warns when ``.train()`` cannot switch on training.

torch pickles a GraphModule as its generated code and traces that code again when loading:
the trace steps into every function it is not told is a leaf (our kernels), cannot re-trace a
``torch.export`` graph at all (its tracer class takes arguments), and loses ``node.meta``.
Its deepcopy keeps only the attributes the graph reads. Here the graph itself is pickled, node
by node: names, arguments and the ``meta`` keys in ``KEPT_META`` come back as they were, and
call targets are stored by their qualified name where that name finds them again (ATen ops do
not pickle).

``shared_parameters`` is the memo under which ``copy.deepcopy`` copies a module's structure but
not its parameters: capture and every rewrite round copy the model that way, so the module
``optimize`` returns holds the model's own ``nn.Parameter`` objects (one copy of the weights, as
``torch.compile``). A plain ``copy.deepcopy`` or ``torch.save`` of that module copies them.
"""
from __future__ import annotations

import builtins
import copy
import functools
import importlib
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import _get_qualified_name, map_aggregate, map_arg

KEPT_META = ("tome", "is_wrapped", "stack_trace")
# attributes GraphModule.__init__ derives from the graph: made again, not pickled
_DERIVED = {"_graph", "_code", "_lineno_map", "_prologue_start", "_tracer_cls", "_tracer_extras",
            "shape_env"}


def shared_parameters(*owners) -> dict:
    """A ``copy.deepcopy`` memo that maps every parameter of ``owners`` (modules, or iterables of
    tensors) to itself: the copy's modules hold the same ``nn.Parameter`` objects (tied ones
    stay tied), while buffers and every other tensor are copied."""
    memo: dict = {}
    for owner in owners:
        tensors = owner.parameters() if isinstance(owner, nn.Module) else owner
        memo.update((id(t), t) for t in tensors if isinstance(t, nn.Parameter))
    return memo


def parameter_memo(module: nn.Module, model: nn.Module | dict) -> dict:
    """``shared_parameters`` of ``model``, plus every parameter of ``module`` that is not one of
    ``model``'s but stands for the one of its name (``model``'s ``named_parameters``, or a dict of
    them): the same shape, dtype, device and values (a wrapper export made of the same storage,
    or a copy). The parameters of a ``copy.deepcopy(module, memo)`` are then ``model``'s."""
    memo = shared_parameters(model if isinstance(model, nn.Module) else model.values())
    named = (dict(model.named_parameters(remove_duplicate=False)) if isinstance(model, nn.Module)
             else model)
    for name, p in module.named_parameters(remove_duplicate=False):
        own = named.get(name)
        if id(p) in memo or not isinstance(own, nn.Parameter):
            continue
        if own.shape == p.shape and own.dtype == p.dtype and own.device == p.device \
                and own.device.type != "meta" \
                and (own.data_ptr() == p.data_ptr() or torch.equal(own.detach(), p.detach())):
            memo[id(p)] = own
    return memo


class _Ref:
    """A node of a pickled graph, by its position."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class _Named:
    """A call target pickled by its qualified name (``torch.ops.aten.linear.default``)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


def _resolve(name: str):
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        return functools.reduce(getattr, parts[i:], module)
    return getattr(builtins, name)


def _target(target):
    if not callable(target):
        return target
    try:
        name = _get_qualified_name(target)
        return _Named(name) if _resolve(name) is target else target
    except Exception:  # noqa: BLE001 - no name that finds it: pickled as it is
        return target


def graph_state(graph: fx.Graph) -> tuple:
    """``graph`` as picklable data: (nodes, codegen)."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    ref = lambda n: _Ref(index[n])  # noqa: E731
    nodes = [(n.op, n.name, _target(n.target), map_arg(n.args, ref), map_arg(n.kwargs, ref),
              n.type, {k: n.meta[k] for k in KEPT_META if k in n.meta}) for n in graph.nodes]
    return nodes, graph._codegen


def graph_from_state(state: tuple) -> fx.Graph:
    nodes, codegen = state
    graph, made = fx.Graph(), []
    node_of = lambda a: made[a.index] if isinstance(a, _Ref) else a  # noqa: E731
    for op, name, target, args, kwargs, type_expr, meta in nodes:
        target = _resolve(target.name) if isinstance(target, _Named) else target
        node = graph.create_node(op, target, map_aggregate(args, node_of),
                                 map_aggregate(kwargs, node_of), name=name, type_expr=type_expr)
        node.meta.update(meta)
        made.append(node)
    graph.set_codegen(codegen)
    return graph


def _rebuild(state: dict, graph: tuple) -> "TomeModule":
    root = nn.Module()
    root.__dict__.update(state)
    module = TomeModule(root, graph_from_state(graph))
    module.__dict__.update(state)  # every submodule, parameter and attribute, read or not
    return module


class TomeModule(fx.GraphModule):
    """A GraphModule that pickles and deep-copies whole (see the module docstring).

    ``tome_eval_only``: why the training forward could not be captured (None when it was):
    ``.train()`` then warns that the module computes the eval-mode forward."""

    def __reduce__(self):
        state = {k: v for k, v in self.__dict__.items() if k not in _DERIVED}
        return _rebuild, (state, graph_state(self.graph))

    def __deepcopy__(self, memo):
        new = super().__deepcopy__(memo)
        for key, value in self.__dict__.items():  # the ones torch's deepcopy drops
            if key not in new.__dict__:
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def train(self, mode: bool = True):
        why = self.__dict__.get("tome_eval_only")
        if mode and why:
            warnings.warn(f"{why}; under .train() this module computes the graph recorded in "
                          "eval mode",
                          UserWarning, stacklevel=2)
        return super().train(mode)
