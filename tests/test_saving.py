"""A rewritten module survives ``copy.deepcopy`` and ``torch.save``/``torch.load`` whole: the same
outputs, plan, counts and example inputs, the merge tags source tracking reads, and it still
exports. Both frontends (fx, torch.export), ToMe and ToMato, padding masks, unmerge."""
import copy
import functools
import io

import pytest
import torch

import tome_fx
from cases import timm_model
from mask_models import PaddedEncoder


@functools.lru_cache(maxsize=None)  # built once; tests copy before changing
def _padded():
    model = PaddedEncoder(depth=2).eval()
    x, pad = torch.randn(3, 20, 32), torch.zeros(3, 20, dtype=torch.bool)
    pad[1, 14:] = pad[2, 7:] = True
    return tome_fx.optimize(model, r=3, example_inputs=(x, pad)), (x, pad), {}


@functools.lru_cache(maxsize=None)
def _features():  # class token protected, tokens unmerged at the output
    model = timm_model("vit_tiny_patch16_224", depth=2, img_size=32, patch_size=4,
                       num_classes=0, global_pool="")
    x = torch.randn(2, 3, 32, 32)
    return tome_fx.optimize(model, r=8, example_inputs=x), (x,), {}


@functools.lru_cache(maxsize=None)
def _tomato():
    model = timm_model("vit_tiny_patch16_224", depth=2, img_size=32, patch_size=4)
    x = torch.randn(2, 3, 32, 32)
    return tome_fx.optimize(model, method="tomato", flops_budget=0.8, example_inputs=x,
                            drop_unread=False), (x,), {}


@functools.lru_cache(maxsize=None)
def _bert():  # torch.export path: padding mask followed, tokens unmerged at the output
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, vocab_size=100)).eval()
    ids = torch.randint(2, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    return tome_fx.optimize(model, r=2, example_inputs=inputs), (), inputs


CASES = {"fx-padding": _padded, "fx-unmerge": _features, "fx-tomato": _tomato,
         "export-bert": _bert}


def _saved(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _tensor(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def _tags(module):
    return [(n.name, n.meta.get("tome")) for n in module.graph.nodes]


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_keeps_the_module_whole(case, how):
    fast, args, kwargs = CASES[case]()
    assert fast.tome_counts["merges"] > 0
    if case.startswith("export"):
        assert fast.tome.frontend == "export" and fast.tome_counts["mask_follow"] > 0
        assert fast.tome_counts["unmerge"] == 2  # the output, and the pooler's h[:, 0]
    copied = _saved(fast) if how == "torch.save" else copy.deepcopy(fast)
    with torch.no_grad():
        assert torch.equal(_tensor(copied(*args, **kwargs)), _tensor(fast(*args, **kwargs)))
    assert str(copied.tome) == str(fast.tome) and copied.tome_counts == fast.tome_counts
    got, want = copied.tome_inputs, fast.tome_inputs
    assert all(torch.equal(a, b) for a, b in zip(got[0], want[0]))
    assert got[1].keys() == want[1].keys()
    assert all(torch.equal(got[1][k], want[1][k]) for k in want[1])
    assert _tags(copied) == _tags(fast) and copied.code == fast.code
    assert copied.training == fast.training
    if case != "fx-tomato":  # source tracking reads the merges' block tags
        tracked = tome_fx.track_sources(copied, *args, **kwargs)
        ref = tome_fx.track_sources(fast, *args, **kwargs)
        assert tracked.sources.keys() == ref.sources.keys()
        assert all(torch.equal(tracked.sources[k], ref.sources[k]) for k in ref.sources)


@pytest.mark.parametrize("case", ["fx-unmerge", "export-bert"])
def test_loaded_module_exports(case, tmp_path):
    """``tome_fx.export`` of a loaded module: its recorded example inputs came back with it."""
    fast, args, kwargs = CASES[case]()
    done = tome_fx.export(_saved(fast), tmp_path / "fast.pt2", verbose=False)
    assert max(done.max_diff.values()) <= 1e-4  # (above the tolerance it raises)


def test_loaded_module_keeps_its_shape_checks():
    """The input checks are part of the graph: a loaded module still refuses another shape
    with the one-line ShapeError (and export's own guards come back with an export capture)."""
    fast, args, kwargs = _bert()
    loaded = _saved(fast)
    with pytest.raises(tome_fx.ShapeError, match="input_ids has 600 tokens; the model's "
                       "position table holds 512"):
        loaded(input_ids=torch.randint(0, 100, (2, 600)),
               attention_mask=torch.ones(2, 600, dtype=torch.long))
    assert hasattr(loaded, "_guards_fn") == hasattr(fast, "_guards_fn")


def test_saved_module_loads_in_train_mode_and_trains():
    fast, args, kwargs = _features()
    fast = copy.deepcopy(fast).train()
    loaded = _saved(fast)
    assert loaded.training
    loaded(*args).square().mean().backward()
    assert all(p.grad is not None for p in loaded.parameters() if p.requires_grad)


def test_compiled_module_pickles():
    """torch pickles a compiled module as its module and compile options, compiled again when
    called; deepcopy gives the module itself (torch forwards ``__deepcopy__`` to it)."""
    from models import TinyTransformer

    model = TinyTransformer(dim=32, depth=2).eval()
    x = torch.randn(2, 17, 16)
    fast = tome_fx.optimize(model, r=3, example_inputs=x, compile={"backend": "eager"})
    loaded = _saved(fast)
    assert type(loaded) is type(fast) and str(loaded.tome) == str(fast.tome)
    with torch.no_grad():
        assert torch.equal(loaded(x), fast(x))
    copied = copy.deepcopy(fast)
    assert str(copied.tome) == str(fast.tome)
    with torch.no_grad():
        assert torch.equal(copied(x), fast(x))


def test_loaded_padded_batch_merges_each_sample_as_alone():
    """The padding kernels (``key_padding``, per-sample merge plans) come back whole: in the
    loaded module a padded sentence's output is its output alone."""
    fast, _, inputs = _bert()
    assert "key_padding" in fast.code
    loaded = _saved(fast)
    real = int(inputs["attention_mask"][1].sum())
    alone = {k: v[1:2, :real] for k, v in inputs.items()}
    with torch.no_grad():
        got = loaded(**inputs).last_hidden_state[1, :real]
        want = loaded(**alone).last_hidden_state[0]
    assert ((got - want).norm() / want.norm()).item() <= 1e-4


def test_tomesd_module_round_trip():
    """A diffusers model rewritten by ToMeSD (random destinations, keyed by the timestep)."""
    pytest.importorskip("diffusers")
    from diffusion_models import dit
    from tome_fx.diffusion import default_inputs

    model = dit()
    inputs = default_inputs(model)
    fast = tome_fx.optimize(model, method="tomesd", ratio=0.5, use_rand=True)
    assert fast.tome_counts["merges"] > 0
    with torch.no_grad():
        want = fast(**inputs).sample
        for copied in (_saved(fast), copy.deepcopy(fast)):
            assert torch.equal(copied(**inputs).sample, want)
            assert str(copied.tome) == str(fast.tome) and copied.tome_counts == fast.tome_counts
            assert _tags(copied.graph) == _tags(fast.graph)


def test_every_graph_call_is_saved_by_name():
    """Every function a rewritten graph calls (kernels, checks, ATen ops) is pickled by its
    qualified name, which finds the same function again."""
    from tome_fx.graph.module import _Named, _resolve, _target

    for make in CASES.values():
        for n in make()[0].graph.nodes:
            if n.op == "call_function":
                named = _target(n.target)
                assert isinstance(named, _Named) and _resolve(named.name) is n.target, n.target
