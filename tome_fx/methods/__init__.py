"""Merging methods: each is a kernel and an insertion rule, handed to ``pipeline.rewrite``.

A method object has:

* ``prepare(ctx) -> {block: reason}``: blocks it refuses on this graph (may raise ValueError for
  arguments that do not fit the model);
* ``enabled(ctx, disabled, dropping) -> set[int]``: the blocks it merges in this round;
* ``insert(ctx, enabled) -> list[MergeSite]``: splice its merge calls (``passes.merge``);
* ``drop_blocker(ctx, disabled) -> str | None``: why unread tokens must not be dropped;
* ``notes`` and ``describe(plan, ctx) -> Plan``: what the plan says about the method.
"""
from .tomato import ToMato
from .tome import ToMe

__all__ = ["ToMe", "ToMato"]
