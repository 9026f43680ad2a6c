"""torch.compile of rewritten modules: one graph, no recompiles, dynamic batch, static tokens.

Graph-break and recompile checks use dynamo with a counting eager backend (no code generation);
one test runs inductor on a tiny model for numerical equality. No timing here: speed is measured
by benchmarks/bench_speed.py.
"""
import pytest
import timm
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

import tome_fx
from tome_fx.compiling import compile_module
from cases import ZOO, built
from models import TinyTransformer


def _vit(**kw):
    torch.manual_seed(0)
    cfg = dict(img_size=64, depth=3, embed_dim=64, num_heads=2)
    cfg.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **cfg).eval()


def _image(batch):
    return torch.randn(batch, 3, 64, 64)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _symbols(graph_module) -> set:
    """Free symbols in the shapes of every value of a dynamo graph."""
    found = set()
    for n in graph_module.graph.nodes:
        value = n.meta.get("example_value")
        if isinstance(value, torch.Tensor):
            for s in value.shape:
                if isinstance(s, torch.SymInt):
                    found |= {str(x) for x in s.node.expr.free_symbols}
    return found


def _counting():
    """A dynamo backend that counts compiles and keeps each graph: (counter, graphs)."""
    graphs = []

    def keep(g, example_inputs):
        graphs.append(g)
        return g.forward

    return CompileCounterWithBackend(keep), graphs


# (model, example input, r): SDPA pre-norm with class token; explicit softmax; post-norm encoder
CASES = {
    "timm_vit": (lambda: _vit(), lambda b: _image(b), 3),
    "explicit_softmax": (lambda: TinyTransformer().eval(), lambda b: torch.randn(b, 33, 16), 4),
    "nn_encoder": (lambda: built(ZOO["nn.TransformerEncoder-postnorm"]),
                   lambda b: torch.randn(b, 40, 16), 5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_one_graph_no_breaks(name):
    build, inputs, r = CASES[name]
    gm = tome_fx.optimize(build(), r=r, example_inputs=(inputs(2),))
    assert gm.tome_counts["merges"] > 0
    with torch.no_grad():
        info = torch._dynamo.explain(gm)(inputs(2))
    assert info.graph_count == 1, info.break_reasons
    assert info.graph_break_count == 0, info.break_reasons


@pytest.mark.parametrize("name", ["timm_vit", "nn_encoder"])
def test_no_recompiles_and_dynamic_batch(name):
    build, inputs, r = CASES[name]
    gm = tome_fx.optimize(build(), r=r, example_inputs=(inputs(2),))
    counter, graphs = _counting()
    fast = compile_module(gm, {"backend": counter})
    with torch.no_grad():
        for _ in range(3):
            x = inputs(2)
            assert torch.allclose(fast(x), gm(x), atol=1e-5)
        assert counter.frame_count == 1  # same shape: compiled once
        for batch in (3, 5, 4, 2):
            x = inputs(batch)
            assert torch.allclose(fast(x), gm(x), atol=1e-5)
    # the second batch size recompiles once with a symbolic batch; later sizes reuse it
    assert counter.frame_count == 2
    assert _symbols(graphs[0]) == set()
    # only the batch is symbolic: every per-block token count stayed a constant
    assert len(_symbols(graphs[1])) == 1


def test_batch_marked_dynamic_up_front():
    build, inputs, r = CASES["timm_vit"]
    gm = tome_fx.optimize(build(), r=r, example_inputs=(inputs(2),))
    counter = CompileCounter()
    fast = torch.compile(gm, backend=counter, fullgraph=True)
    x = inputs(2)
    torch._dynamo.mark_dynamic(x, 0)  # raises at compile time if anything specialises the batch
    with torch.no_grad():
        fast(x)
        for batch in (3, 6):
            y = inputs(batch)
            assert torch.allclose(fast(y), gm(y), atol=1e-5)
    assert counter.frame_count == 1


def test_inductor_matches_eager():
    model = _vit(depth=2)
    x = _image(3)
    fast = tome_fx.compile(model, r=3, example_inputs=(x,))
    # the plan stays reachable through the compiled wrapper; the last block keeps only the class
    # token after its attention (passes/drop.py), so it merges nothing
    assert fast.tome.r == [3, 0] and fast.tome.blocks[-1].tokens_out == 1
    assert fast.tome_counts["merges"] == 1 and fast.tome_counts["drop_unread"] == 1
    eager = tome_fx.optimize(model, r=3, example_inputs=(x,))
    with torch.no_grad():
        got, want = fast(x), eager(x)
    assert got.shape == want.shape == (3, 1000)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


def test_compile_option_forms():
    model = _vit(depth=1)
    x = _image(2)
    fast = tome_fx.optimize(model, r=2, example_inputs=(x,), compile={"backend": "eager"})
    assert isinstance(fast, torch._dynamo.eval_frame.OptimizedModule)
    with torch.no_grad():
        assert torch.allclose(fast(x), fast._orig_mod(x))
    with pytest.raises(TypeError, match="compile must be True, False or a dict"):
        tome_fx.optimize(model, r=2, example_inputs=(x,), compile="inductor")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    """fp16/bf16 models merge like fp32 (matching runs in fp32) and stay finite."""
    model = _vit(depth=3)
    x = _image(2)
    ref = tome_fx.optimize(model, r=4, example_inputs=(x,))
    # a twin of the model: ``ref`` computes with the model's own parameters (issue 38)
    low = tome_fx.optimize(_vit(depth=3).to(dtype), r=4, example_inputs=(x.to(dtype),))
    assert low.tome.r == ref.tome.r == [4, 4, 0]  # the last block drops unread tokens
    assert low.tome_counts["drop_unread"] == ref.tome_counts["drop_unread"] == 1
    with torch.no_grad():
        want = ref(x)
        got = low(x.to(dtype))
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < 0.05, err


def test_compiled_export_module_raises_shape_error():
    """A wrong input shape is the one-line ShapeError before dynamo runs (in a fullgraph trace
    the check's raise would be a compile error)."""
    from tome_fx.capture.export import export_program

    model = TinyTransformer(depth=2).eval()
    x = torch.randn(2, 32, 16)
    fast = tome_fx.optimize(export_program(model, (x,), {}), r=3, compile={"backend": "eager"})
    with torch.no_grad():
        assert fast(torch.randn(3, 32, 16)).shape == (3, 10)
        assert fast(torch.randn(3, 30, 16)).shape == (3, 10)  # the token count is dynamic
        with pytest.raises(tome_fx.ShapeError, match="dimension 2 is fixed at 16"):
            fast(torch.randn(3, 30, 8))


def _bert_ids():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=128, vocab_size=1000, max_position_embeddings=256)
    model = BertForSequenceClassification(config).eval()
    return model, lambda n: {"input_ids": torch.randint(0, 1000, (2, n))}


def _exported_encoder():
    """A hand-written encoder exported with a dynamic batch and token count (the export path,
    as for HuggingFace models, at a fifth of BERT's graph: dynamo traces it in seconds)."""
    model = TinyTransformer(depth=3).eval()
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens", min=8, max=256)}
    program = torch.export.export(model, (torch.randn(2, 32, 16),), dynamic_shapes=(dims,))
    return program, lambda n: (torch.randn(2, n, 16),)


@pytest.mark.parametrize("name", [
    "exported_encoder",
    pytest.param("hf_bert", marks=pytest.mark.slow),  # the same at BERT's size: ~50 s of tracing
])
def test_lengths_vary_without_a_recompile_per_length(name):
    """A budget schedule on a module captured with a dynamic sequence length: the second length
    recompiles once with a symbolic token count, which serves the lengths after it (a length at
    which some block's merge count reaches 0 or leaves one token unmerged in a set can add one,
    as torch specialises sizes 0 and 1); running the same lengths again compiles nothing."""
    torch.manual_seed(0)
    model, inputs = _exported_encoder() if name == "exported_encoder" else _bert_ids()
    gm = tome_fx.optimize(model, flops_budget=0.6, example_inputs=inputs(32))
    counter, graphs = _counting()
    fast = compile_module(gm, {"backend": counter})

    def run(module, x):
        out = module(**x) if isinstance(x, dict) else module(*x)
        return getattr(out, "logits", out)

    lengths = (32, 48, 64, 100, 128, 80, 40, 56, 72, 96, 112)
    with torch.no_grad():
        for n in lengths:
            x = inputs(n)
            torch.testing.assert_close(run(fast, x), run(gm, x), rtol=0, atol=1e-5)
        compiled = counter.frame_count
        for n in lengths:
            run(fast, inputs(n))
    assert 2 <= compiled <= 3 < len(lengths), compiled
    assert counter.frame_count == compiled
    assert len(_symbols(graphs[1])) == 1  # the token count (the batch stayed 2)
