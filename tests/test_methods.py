"""Methods as plug-ins (issue 40): optimize(method=NAME) looks NAME up in the registry, so a
method is added with register_method and no edit of api.py or pipeline.py."""
import dataclasses
import types

import pytest
import torch

import tome_fx
from models import CausalSelfAttention, Encoder, TinyTransformer
from tome_fx.methods import registry

BUILT_IN = {"tome", "tomato", "tomesd"}


@pytest.fixture
def fresh_registry(monkeypatch):
    """A copy of the registry: what a test registers is gone after it."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))


class FixedR(tome_fx.Method):
    """A third-party method: the default method with r=k, recording the call it got."""

    name = "toy"
    options = ("k",)
    doc = "ToMe at a fixed r=k"
    calls: list = []

    def optimize(self, model, call):
        self.check_options(call)
        self.calls.append(call)
        ref = dataclasses.replace(call, r=call.options["k"], options={})
        return tome_fx.get_method(registry.DEFAULT_METHOD).optimize(model, ref)


def _model():
    torch.manual_seed(0)
    return TinyTransformer(depth=2).eval(), torch.randn(2, 17, 16)


def test_built_in_methods_are_registered():
    assert BUILT_IN <= set(tome_fx.method_names())
    assert tome_fx.method_names() == sorted(tome_fx.method_names())
    for name in BUILT_IN:
        method = tome_fx.get_method(name)
        assert isinstance(method, tome_fx.Method) and method.name == name and method.doc


def test_unknown_method_lists_the_registered_names():
    names = ", ".join(repr(n) for n in sorted(tome_fx.method_names()))
    with pytest.raises(ValueError) as err:
        tome_fx.get_method("nope")
    assert str(err.value) == f"method must be one of {names}, got 'nope'"
    model, x = _model()
    with pytest.raises(ValueError) as err:
        tome_fx.optimize(model, r=1, example_inputs=(x,), method="nope")
    assert str(err.value) == f"method must be one of {names}, got 'nope'"
    assert {"'tome'", "'tomato'", "'tomesd'"} <= set(names.split(", "))


def test_a_registered_method_runs_through_optimize(fresh_registry):
    tome_fx.register_method(FixedR)
    assert "toy" in tome_fx.method_names()
    model, x = _model()
    FixedR.calls.clear()
    fast = tome_fx.optimize(model, method="toy", k=2, example_inputs=(x,), prop_attn="fold")
    ref = tome_fx.optimize(model, r=2, example_inputs=(x,), prop_attn="fold")
    assert fast.tome.r == ref.tome.r and sum(fast.tome.r) > 0
    with torch.no_grad():
        assert torch.equal(fast(x), ref(x))
    (call,) = FixedR.calls
    assert call.options == {"k": 2} and call.prop_attn == "fold"
    assert call.given == {"example_inputs", "prop_attn"}  # the common arguments set


def test_a_name_is_registered_once(fresh_registry):
    tome_fx.register_method(FixedR)
    with pytest.raises(ValueError, match=r"^method 'toy' is registered already .FixedR.; pass "
                                         r"replace=True to replace it$"):
        tome_fx.register_method(FixedR())
    other = type("Other", (FixedR,), {"doc": "another toy"})
    assert tome_fx.register_method(other, replace=True) is other
    assert tome_fx.get_method("toy").doc == "another toy"
    with pytest.raises(ValueError, match="^method 'tome' is registered already"):
        tome_fx.register_method(type("T", (FixedR,), {"name": "tome"}))


@pytest.mark.parametrize("bad, exc, text", [
    (types.SimpleNamespace(name="x", options=()), TypeError,
     "register_method takes a tome_fx.Method, got SimpleNamespace"),
    (type("Blank", (FixedR,), {"name": ""}), ValueError,
     "a method's name must be an identifier, got ''"),
    (type("Listed", (FixedR,), {"options": ["k"]}), TypeError,
     "method 'toy': options must be a tuple of names, got ['k']"),
    (type("Shadow", (FixedR,), {"options": ("k", "r", "method")}), ValueError,
     "method 'toy': options method, r are optimize's own arguments"),
])
def test_bad_methods_are_refused(fresh_registry, bad, exc, text):
    with pytest.raises(exc) as err:
        tome_fx.register_method(bad)
    assert str(err.value) == text
    assert "toy" not in tome_fx.method_names()


def test_unknown_options_name_the_method(fresh_registry):
    tome_fx.register_method(FixedR)
    model, x = _model()
    with pytest.raises(TypeError, match=r"^unexpected arguments for method='toy': j, m$"):
        tome_fx.optimize(model, method="toy", k=1, m=0, j=0, example_inputs=(x,))
    with pytest.raises(TypeError, match=r"^unexpected arguments for method='tome': bar, foo$"):
        tome_fx.optimize(model, r=1, foo=1, bar=2, example_inputs=(x,))
    with pytest.raises(ValueError, match=r"^planned= takes a ToMe plan .method='tome'., not "
                                         r"method='tomato'$"):
        tome_fx.optimize(model, method="tomato", planned=tome_fx.explain(model, (x,)))


def test_command_line_methods_come_from_the_registry():
    from tome_fx.cli import diffusion
    from tome_fx.cli.main import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command in ("report", "bench"):
        method = next(a for a in sub.choices[command]._actions if a.dest == "method")
        assert list(method.choices) == tome_fx.method_names()
    with pytest.raises(ValueError, match=r"^--method tomato has no command-line options yet: use "
                                         r"tome_fx.optimize\(model, method='tomato', ...\)"):
        diffusion.uses_tomesd(types.SimpleNamespace(method="tomato"), None)


def test_an_unmet_budget_warns_at_the_callers_line():
    """The plug-in layer between optimize and the rewrite keeps the warning on the user's line."""
    model, x = Encoder(lambda d: CausalSelfAttention(d, 4), depth=1).eval(), torch.randn(2, 10, 16)
    with pytest.warns(UserWarning, match=r"^flops_budget=0.5 is not met") as caught:
        tome_fx.optimize(model, flops_budget=0.5, example_inputs=(x,))
    assert caught[0].filename == __file__


def test_an_unsafe_graph_nothing_can_switch_off_is_an_error(monkeypatch):
    """A rule that leaves an unsafe node the pipeline cannot trace to a merge (no site, no
    blame) stops with a one-line RewriteError naming the node; it looped forever before."""
    from tome_fx import pipeline
    from tome_fx.capture import capture
    from tome_fx.checks.token_flow import Flow
    from tome_fx.errors import RewriteError
    from tome_fx.rules import ToMe

    model, x = _model()
    flow = pipeline.check_token_flow

    def unsafe(ctx):
        found = flow(ctx)
        out = next(n for n in ctx.gm.graph.nodes if n.op == "output")
        return Flow(**{**found.__dict__, "unsafe": [(out.args[0], "a test's unsafe node")]})

    monkeypatch.setattr(pipeline, "check_token_flow", unsafe)
    nothing = ToMe(lambda n: [0] * n)  # merges nowhere: no site to switch off
    with pytest.raises(RewriteError, match="no merge is left to switch off") as err:
        pipeline.rewrite(capture(model, x), nothing)
    assert "\n" not in str(err.value)
