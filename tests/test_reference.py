"""Check tome_fx against the independent hand-written ToMe oracle in reference_tome.py.

* ``test_reference_r0_matches_timm`` validates the oracle itself (no tome_fx involved).
* ``test_optimize_matches_reference`` compares ``tome_fx.optimize`` to the oracle.
  It also checks that optimize leaves the model's state_dict untouched.
"""
from __future__ import annotations

import copy
import functools
import os
import sys

import pytest
import torch
import timm

import tome_fx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_tome import reference_forward, reference_schedule  # noqa: E402

MODELS = [
    "vit_small_patch16_224",
    "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
]
R_VALUES = [4, 8, 16, (8, -1)]
R_IDS = ["r4", "r8", "r16", "r8_inflect-1"]

ATOL_TOME = 1e-4
ATOL_SELF = 1e-5


@functools.lru_cache(maxsize=None)
def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name)  # random weights, never pretrained
    return model.eval()


@functools.lru_cache(maxsize=None)
def _input() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 3, 224, 224)


@functools.lru_cache(maxsize=None)
def _reference(name: str, r) -> tuple:
    model = _model(name)
    margins: list = []
    sched = reference_schedule(r, len(model.blocks))
    out = reference_forward(model, _input(), sched, margins=margins)
    return out, sched, (min(margins) if margins else float("inf"))


def _optimize(model, r, x):
    import tome_fx  # imported lazily so the oracle self-check never depends on it

    return tome_fx.optimize(model, r=r, example_inputs=(x,))


# ---------------------------------------------------------------------------
# schedule helper sanity (pure python)
# ---------------------------------------------------------------------------
def test_reference_schedule():
    assert reference_schedule(4, 3) == [4, 4, 4]
    assert reference_schedule([1, 2], 4) == [1, 2, 0, 0]
    sched = reference_schedule((8, -1), 12)
    assert sched[0] == 16 and sched[-1] == 0
    assert all(a >= b for a, b in zip(sched, sched[1:]))
    assert reference_schedule((8, 0), 12) == [8] * 12


# ---------------------------------------------------------------------------
# the oracle reproduces timm exactly when nothing is merged
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS, ids=MODELS)
def test_reference_r0_matches_timm(name):
    model = _model(name)
    x = _input()
    with torch.no_grad():
        expected = model(x)
    got = reference_forward(model, x, [0] * len(model.blocks))
    diff = (got - expected).abs().max().item()
    assert got.shape == expected.shape
    assert diff <= ATOL_SELF, f"{name}: reference(r=0) vs timm max abs diff {diff:.3e}"


# ---------------------------------------------------------------------------
# tome_fx vs the oracle
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("r", R_VALUES, ids=R_IDS)
@pytest.mark.parametrize("name", MODELS, ids=MODELS)
def test_optimize_matches_reference(name, r):
    pristine = _model(name)
    x = _input()
    expected, sched, margin = _reference(name, r)

    # optimize a copy, so a mutating optimize cannot corrupt the cached model
    # that the reference (and the other cases) read from
    model = copy.deepcopy(pristine)
    optimized = _optimize(model, r, x)
    with torch.no_grad():
        got = optimized(x)
    assert isinstance(got, torch.Tensor), f"optimized model returned {type(got).__name__}"
    assert got.shape == expected.shape, f"shape {tuple(got.shape)} != {tuple(expected.shape)}"
    diff = (got - expected).abs().max().item()
    assert diff <= ATOL_TOME, (
        f"{name} r={r!r} (schedule {sched}): tome_fx vs reference max abs diff {diff:.3e}; "
        f"smallest merge-decision score gap in the reference was {margin:.2e}"
    )
    _assert_same_state(pristine, model)


def _assert_same_state(pristine, model):
    before = pristine.state_dict()
    after = model.state_dict()
    assert set(after.keys()) == set(before.keys()), (
        f"state_dict keys changed: +{sorted(set(after) - set(before))[:5]} "
        f"-{sorted(set(before) - set(after))[:5]}"
    )
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"optimize modified parameters/buffers: {changed[:10]}"


def test_siglip_attention_pooling_gets_the_size_term():
    """timm SigLIP's attention-pooling head (a learned query attending to the tokens) is a
    consumer of merged tokens: its keys get log(size); nothing else changes. Budget 0.5 met,
    r=0 exact, and the pooled output equals the hand-written reference with size-weighted
    attention pooling (reference_tome._attention_pool)."""
    from flops import counted_flops

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_siglip_224", depth=4).eval()
    x = torch.randn(2, 3, 224, 224)
    fast = tome_fx.optimize(model, flops_budget=0.5, example_inputs=(x,))
    ratio = counted_flops(fast, x) / counted_flops(model, x)
    assert 0.49 <= ratio <= 0.5 and fast.tome.flops == counted_flops(fast, x)
    assert not fast.tome.skipped and fast.tome_counts["merges"] >= 2
    # every attention after the first merge, the pooling head included, gets the size term
    first = next(i for i, r in enumerate(fast.tome.r) if r > 0)
    assert fast.tome_counts["size_bias"] == 4 - first
    assert any("attention pooling" in n for n in fast.tome.notes)
    zero = tome_fx.optimize(model, r=0, example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(zero(x), model(x))
        want = reference_forward(model, x, fast.tome.r)
        assert (want - model(x)).abs().max() > 1e-3  # merging moves the output: not vacuous
        assert (fast(x) - want).abs().max() <= 1e-5
