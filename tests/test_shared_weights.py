"""One copy of the weights (issue 38): the module ``optimize`` returns computes with the model's
own ``nn.Parameter`` objects (the same storage, as ``torch.compile``), for every method and both
capture frontends, and ``optimize`` still changes nothing in the model: its parameter values, its
buffers, its mode, its structure. Buffers are the result's own copies (``capture`` docstring)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import tome_fx
from cases import timm_model
from models import Block, SoftmaxAttention

HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
          vocab_size=100)


def _vit():
    return timm_model("vit_tiny_patch16_224", depth=2, img_size=32, patch_size=8), \
        (torch.randn(2, 3, 32, 32),), {}


def _bert(cls_name="BertForMaskedLM"):
    """A small HuggingFace BERT (torch.export path); ``BertForMaskedLM`` ties its decoder to the
    word embeddings (two names, one parameter)."""
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(transformers.BertConfig(**HF)).eval()
    ids = {"input_ids": torch.randint(2, 100, (2, 12)),
           "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    return model, (), ids


def _unet():
    from diffusion_models import sd15

    return sd15(), None, None  # tome_fx.diffusion's default inputs, on an 8x8 latent


def graph_of(module: nn.Module) -> nn.Module:
    """The rewritten GraphModule: the module itself, a DiffusionModule's ``.graph``, or (a
    wrapper holding several captures) the first of its ``.graphs`` (a list or a dict)."""
    if isinstance(module, torch.fx.GraphModule):
        return module
    graph = getattr(module, "graph", None)
    if not isinstance(graph, nn.Module) or next(graph.parameters(), None) is None:
        graphs = getattr(module, "graphs", None) or ()
        graphs = list(graphs.values() if isinstance(graphs, dict) else graphs)
        graph = graphs[0] if graphs else graph
    return graph if isinstance(graph, nn.Module) else module


def storages(module: nn.Module) -> set[int]:
    return {p.data_ptr() for p in module.parameters()}


def _state(model: nn.Module) -> tuple:
    return (copy.deepcopy(model.state_dict()), model.training, str(model),
            [type(m) for m in model.modules()])


def _assert_unchanged(model: nn.Module, before: tuple) -> None:
    state, training, text, classes = before
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())  # parameters and buffers
    assert model.training == training and str(model) == text
    assert [type(m) for m in model.modules()] == classes


def _call(module, args, kwargs, unet_inputs=None):
    with torch.no_grad():
        out = module(**unet_inputs) if unet_inputs is not None else module(*args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return getattr(out, "last_hidden_state", getattr(out, "sample", getattr(out, "logits", out)))


CASES = [
    pytest.param(_vit, dict(r=2), id="tome-vit-fx"),
    pytest.param(_vit, dict(r=2, prop_attn="fold"), id="tome-vit-fx-fold"),
    pytest.param(_bert, dict(r=2), id="tome-bert_mlm-tied-export"),
    pytest.param(_bert, dict(r=2, prop_attn="fold"), id="tome-bert_mlm-tied-export-fold"),
    pytest.param(_vit, dict(method="tomato", sim_threshold=0.8), id="tomato-vit"),
    pytest.param(_vit, dict(method="tomato", sim_threshold=0.8, prop_attn="fold"),
                 id="tomato-vit-fold"),
    pytest.param(_unet, dict(method="tomesd", ratio=0.5), id="tomesd-sd15"),
]


@pytest.mark.parametrize("build,options", CASES)
def test_result_holds_the_models_parameters(build, options):
    model, args, kwargs = build()
    unet_inputs = None
    if args is None:
        from tome_fx.diffusion import default_inputs

        unet_inputs = default_inputs(model, size=(4, 8, 8),
                                     generator=torch.Generator().manual_seed(0))
    reference = _call(model, args, kwargs, unet_inputs)
    before = _state(model)
    inputs = unet_inputs if unet_inputs is not None else (args if not kwargs else kwargs)
    fast = tome_fx.optimize(model, example_inputs=inputs, **options)
    graph = graph_of(fast)
    mine, theirs = storages(model), storages(graph)
    assert theirs and theirs <= mine  # every parameter the graph computes with is the model's
    assert len(theirs) == len(mine)  # and none is left as a second copy (tied ones stay tied)
    owned = {id(p) for p in model.parameters()}
    assert all(id(p) in owned for p in graph.parameters())  # the same nn.Parameter objects
    _assert_unchanged(model, before)
    assert torch.equal(_call(model, args, kwargs, unet_inputs), reference)
    got = _call(fast, args, kwargs, unet_inputs)
    assert got.shape == reference.shape and torch.isfinite(got).all()
    # a deep copy is a copy: its own weights, the same outputs (a wrapper's graph only: a
    # DiffusionModule may capture again for its copy, which takes long)
    twin = copy.deepcopy(graph)
    assert not storages(twin) & mine
    if graph is fast:
        assert torch.equal(_call(twin, args, kwargs), got)


def test_r0_rewrite_equals_the_model():
    model, args, _ = _vit()
    fast = tome_fx.optimize(model, r=0, example_inputs=args)
    assert storages(fast) == storages(model)
    assert (_call(fast, args, {}) - _call(model, args, {})).abs().max() <= 1e-5


def test_an_exported_program_lends_its_parameters():
    """``optimize(ExportedProgram)`` (the export path): the result holds the program's
    parameters, and at r=0 computes the model."""
    model, args, kwargs = _bert("BertModel")
    ep = torch.export.export(model, args, kwargs, strict=False)
    fast = tome_fx.optimize(ep, r=0, example_inputs=kwargs)
    held = {v.data_ptr() for v in ep.state_dict.values() if isinstance(v, nn.Parameter)}
    assert storages(fast) and storages(fast) <= held
    assert (_call(fast, args, kwargs) - _call(model, args, kwargs)).abs().max() <= 1e-5


def test_training_the_result_trains_the_model():
    """As with torch.compile: one set of weights, so a step on the result is a step on the
    model (a deep copy of the result trains on its own)."""
    model, (x,), _ = _vit()
    fast = tome_fx.optimize(model, r=2, example_inputs=(x,)).train()
    weight = model.get_parameter("blocks.0.attn.qkv.weight")
    was = weight.detach().clone()
    opt = torch.optim.SGD(fast.parameters(), lr=0.1)
    fast(x).square().mean().backward()
    opt.step()
    assert weight.grad is not None and not torch.equal(weight, was)
    assert not model.training  # the mode is the result's own


class _BatchNormStem(nn.Module):
    """Batch norm on a convolutional stem, then attention blocks over the patches."""

    def __init__(self, dim=32):
        super().__init__()
        self.embed, self.norm = nn.Conv2d(3, dim, 4, 4), nn.BatchNorm2d(dim)
        self.blocks = nn.Sequential(*[Block(SoftmaxAttention(dim, 4), dim) for _ in range(2)])
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        return self.head(self.blocks(self.norm(self.embed(x)).flatten(2).transpose(1, 2)).mean(1))


def test_batch_norm_in_train_mode_keeps_the_running_stats():
    torch.manual_seed(0)
    model = _BatchNormStem().train()
    x = torch.randn(4, 3, 32, 32)
    before = _state(model)
    fast = tome_fx.optimize(model, r=4, example_inputs=(x,))
    assert fast.training and fast.tome_counts["merges"] >= 1
    _assert_unchanged(model, before)  # the probe in train mode updated capture's copy only
    assert storages(fast) <= storages(model)
    fast(x)  # the result's batch statistics are its own buffers
    assert torch.equal(model.norm.running_mean, before[0]["norm.running_mean"])
    assert model.norm.num_batches_tracked.item() == 0
