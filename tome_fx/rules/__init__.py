"""Insertion rules: each method's kernel and where it goes, handed to ``pipeline.rewrite``.

A rule object has:

* ``prepare(ctx) -> {block: reason}``: blocks it refuses on this graph (may raise ValueError for
  arguments that do not fit the model); ToMeSD replaces the matched blocks with its own sites
  (``rules.local``: one per merged op) here;
* ``enabled(ctx, disabled, dropping) -> set[int]``: the blocks it merges in this round;
* ``insert(ctx, enabled) -> list[MergeSite]``: splice its merge calls (``passes.merge``);
* ``drop_blocker(ctx, disabled) -> str | None``: why unread tokens must not be dropped;
* ``notes`` and ``describe(plan, ctx) -> Plan``: what the plan says about the method;
* optionally ``blame(ctx, node) -> [block]``: the blocks whose merges put merged tokens at an
  unsafe node (default: every merge before it); ToMeSD's merges are local to one op.
"""
from .tomato import ToMato
from .tome import ToMe
from .tomesd import ToMeSD

__all__ = ["ToMe", "ToMato", "ToMeSD"]
