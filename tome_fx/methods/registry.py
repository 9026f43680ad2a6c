"""The registry of merging methods ``optimize(method=NAME, **options)`` looks up.

A method is one object: its name, its own option names, a one-line doc and
``optimize(model, call) -> nn.Module``, where ``call`` (``OptimizeCall``) holds ``optimize``'s
common arguments, which of them the user set, and the method's own options. ``api.optimize``
checks the common arguments every method shares, then hands the call over: it has no branch
per method, so adding one is ``register_method`` and no edit of ``api`` or ``pipeline``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

DEFAULT_METHOD = "tome"
_METHODS: dict[str, "Method"] = {}


@dataclass(frozen=True)
class OptimizeCall:
    """``optimize``'s common arguments (checked and normalised by ``api.optimize``), ``given``:
    the names of those the user set to something other than the default, and ``options``: the
    method's own keyword options, unchecked."""

    r: Any = None
    flops_budget: float | None = None
    example_inputs: Any = None
    prop_attn: bool | str = True
    compile: bool | dict = False
    strategy: str = "auto"
    drop_unread: bool = True
    unmerge: str | bool = "auto"
    calibration: Any = None
    planned: Any = None
    min_tokens: Any = "auto"
    given: frozenset = frozenset()
    options: dict = field(default_factory=dict)

    @classmethod
    def common_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("given", "options"))

    @staticmethod
    def set_by_user(**values) -> frozenset:
        """The names in ``values`` that differ from ``OptimizeCall``'s defaults."""
        defaults = {f.name: f.default for f in dataclasses.fields(OptimizeCall)}
        return frozenset(k for k, v in values.items() if not _is_default(v, defaults[k]))


def _is_default(value, default) -> bool:
    if value is default:
        return True
    # tensors and dicts compare elementwise or by content: only plain scalars compare by value
    plain = (bool, int, float, str)
    return isinstance(value, plain) and type(value) is type(default) and value == default


class Method:
    """A merging method. Subclasses set ``name``, ``options`` (its own option names, checked by
    ``check_options``) and ``doc`` (one line), and implement ``optimize``."""

    name: str = ""
    options: tuple[str, ...] = ()
    doc: str = ""

    def optimize(self, model: nn.Module, call: OptimizeCall) -> nn.Module:
        raise NotImplementedError(f"method {self.name!r} does not implement optimize")

    def check_options(self, call: OptimizeCall) -> None:
        """TypeError naming the options this method does not take."""
        unknown = sorted(set(call.options) - set(self.options))
        if unknown:
            raise TypeError(f"unexpected arguments for method={self.name!r}: {', '.join(unknown)}")

    def check_unplanned(self, call: OptimizeCall) -> None:
        """``planned=`` is a schedule of the default method's: an error for any other."""
        if call.planned is not None:
            raise ValueError(f"planned= takes a ToMe plan (method={DEFAULT_METHOD!r}), not "
                             f"method={self.name!r}")

    def __repr__(self) -> str:
        return f"<method {self.name!r}: {self.doc}>"


def register_method(method, *, replace: bool = False):
    """File ``method`` (a ``Method`` instance, or a subclass, instantiated with no arguments)
    under its ``name``; a name registered already is a ValueError unless ``replace=True``.
    Returns its argument, so it works as a class decorator."""
    obj = method() if isinstance(method, type) else method
    if not isinstance(obj, Method):
        raise TypeError(f"register_method takes a tome_fx.Method, got {type(obj).__name__}")
    name = obj.name
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a method's name must be an identifier, got {name!r}")
    if not isinstance(obj.options, tuple) or not all(isinstance(o, str) for o in obj.options):
        raise TypeError(f"method {name!r}: options must be a tuple of names, got {obj.options!r}")
    shared = sorted(set(obj.options) & {*OptimizeCall.common_names(), "method", "model"})
    if shared:
        raise ValueError(f"method {name!r}: options {', '.join(shared)} are optimize's own "
                         "arguments")
    if name in _METHODS and not replace:
        raise ValueError(f"method {name!r} is registered already "
                         f"({type(_METHODS[name]).__name__}); pass replace=True to replace it")
    _METHODS[name] = obj
    return method


def method_names() -> list[str]:
    """The registered methods' names, sorted."""
    return sorted(_METHODS)


def get_method(name) -> Method:
    """The method registered as ``name``; ValueError listing the registered names otherwise."""
    if not isinstance(name, str) or name not in _METHODS:
        known = ", ".join(repr(n) for n in method_names())
        raise ValueError(f"method must be one of {known}, got {name!r}")
    return _METHODS[name]
