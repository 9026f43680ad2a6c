"""Shared checks for the model zoo (tests/zoo/test_*.py): ``check_*`` functions assert the
zoo's properties on one registry case (``tests/cases.py``)."""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten

import tome_fx
from cases import Case, built, inputs
from flops import counted_flops

def tensors(out) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def max_diff(a, b) -> float:
    ta, tb = tensors(a), tensors(b)
    assert len(ta) == len(tb) and all(x.shape == y.shape for x, y in zip(ta, tb))
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(ta, tb))


def check_reasons(case: Case, plan):
    """A rewritten case skips nothing; every skip of the others gives one of its reasons."""
    if case.outcome == "rewritten":
        assert plan.skipped == (), plan.skipped
        return
    assert plan.skipped, f"{case.id} is expected to be {case.outcome}"
    if case.reason:
        for s in plan.skipped:
            assert any(r in s.reason for r in case.reason), (s.site, s.reason)


def _expected_plan(case: Case, model, plan, merged: bool = True):
    """Blocks and protected tokens as the config says. A prefix grown from reads by position
    (a pooler reading token 0) shows only once something merges."""
    if case.blocks is not None:
        assert len(plan.blocks) == case.blocks(model)
    if case.prefix is not None and (merged or case.blocks is not None):
        assert plan.protected == case.prefix(model)


def check_r0(case: Case):
    """r=0 leaves the output unchanged at batch 1 and 3; the plan has the config's blocks and
    protected tokens, and skips only what the case expects."""
    model = built(case)
    fast = tome_fx.optimize(model, r=0, example_inputs=inputs(case, 3))
    assert fast.tome_counts["merges"] == 0
    _expected_plan(case, model, fast.tome, merged=False)
    if case.outcome == "rewritten":
        assert fast.tome.skipped == ()
    with torch.no_grad():
        for batch in (1, 3):
            x = inputs(case, batch)
            assert max_diff(fast(*x), model(*x)) <= 1e-5


def check_refused(case: Case, r: int = 4):
    """Refused sites say why; where nothing merges the output is the original's, where some
    blocks merge they do and the outputs are finite."""
    model = built(case)
    fast = tome_fx.optimize(model, r=r, example_inputs=inputs(case, 2))
    check_reasons(case, fast.tome)
    merged = fast.tome_counts["merges"]
    with torch.no_grad():
        x = inputs(case, 3)
        y = fast(*x)
        if case.outcome == "refused":
            assert merged == 0 and max_diff(y, model(*x)) <= 1e-5
        else:
            assert merged > 0 and all(torch.isfinite(t).all() for t in tensors(y))


def check_budget(case: Case, budget: float = 0.5):
    """flops_budget reached as measured by FlopCounterMode, merges happened, outputs finite at
    batch 1 and 3, and a backward pass reaches the same parameters as in the original."""
    model = built(case)
    x1 = inputs(case, 1)
    fast = tome_fx.optimize(model, flops_budget=budget, example_inputs=x1)
    plan = fast.tome
    _expected_plan(case, model, plan)
    check_reasons(case, plan)
    merging = sum(1 for r in plan.r if r > 0)
    assert merging > 0 and fast.tome_counts["merges"] == merging
    assert fast.tome_counts["size_bias"] >= merging - 1  # every attention after a merge
    original = counted_flops(model, *x1)
    measured = counted_flops(fast, *x1)
    assert plan.flops == measured  # the cost model's prediction is exact
    assert budget - 0.01 <= measured / original <= budget, (plan.r, measured / original)

    with torch.no_grad():
        for batch in (1, 3):
            x = inputs(case, batch)
            y, ref = fast(*x), model(*x)
            assert all(torch.isfinite(t).all() for t in tensors(y))
            shapes, want = [t.shape for t in tensors(y)], [t.shape for t in tensors(ref)]
            assert [len(s) for s in shapes] == [len(s) for s in want]
            if shapes != want:  # a feature output keeps its (merged) token dimension, and says so
                assert any("holds merged tokens" in n for n in plan.notes), (shapes, want)

    x3 = inputs(case, 3)
    model_grads = _grads(model, x3)
    fast_grads = _grads(fast, x3)
    # the same parameters receive gradients (names can differ where capture used a stand-in)
    numel = lambda grads: sorted(g.numel() for g in grads.values())  # noqa: E731
    assert fast_grads and numel(fast_grads) == numel(model_grads)
    assert all(torch.isfinite(g).all() for g in fast_grads.values())
    assert any(g.abs().sum() > 0 for g in fast_grads.values())


def _grads(module, x) -> dict:
    """Gradients of every parameter, in eval mode: graphs captured by torch.export keep eval
    behaviour, and training-only paths (wav2vec2's SpecAugment embedding) must not count."""
    module.zero_grad(set_to_none=True)
    loss = sum(t.float().square().mean() for t in tensors(module(*x)) if t.is_floating_point())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return grads
