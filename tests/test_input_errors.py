"""Inputs a model cannot take are one line naming why: ``CaptureError`` for example inputs
(the model runs on them once before capture), ``ShapeError`` for calls of the result; and torch
prints nothing while capture tries."""
import functools
import logging

import pytest
import torch

import tome_fx
from cases import timm_model


@functools.lru_cache(maxsize=None)
def _vit():
    return timm_model("vit_tiny_patch16_224", depth=2, img_size=32, patch_size=8)


@pytest.mark.parametrize("x,says", [
    (torch.randn(2, 3, 64, 64), "AssertionError: Input height (64) doesn't match model (32); "
                                "VisionTransformer takes [batch, 3, 32, 32]"),
    (torch.randn(2, 1, 32, 32), "to have 3 channels, but got 1 channels instead; "
                                "VisionTransformer takes [batch, 3, 32, 32]"),
    (torch.randn(2, 3, 32, 32).half(), "the inputs are torch.float16 and the model's parameters "
                                       "torch.float32 (convert one to the other's dtype)"),
    (torch.randn(3, 32, 32), "the input has no batch dimension (add one: x[None])"),
], ids=["size", "channels", "fp16", "no-batch"])
def test_example_inputs_the_model_cannot_take(x, says, capsys):
    with pytest.raises(tome_fx.CaptureError) as info:
        tome_fx.optimize(_vit(), r=2, example_inputs=x)
    msg = str(info.value)
    assert msg.startswith("VisionTransformer fails on the example inputs (")
    assert says in msg and "\n" not in msg
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("x,says", [
    (torch.randn(3, 32, 32), r"has shape \(3, 32, 32\) but the module was captured for "
                             r"\(any, 3, 32, 32\) \(4 dimensions\)"),
    (torch.randn(2, 3, 64, 64), "dimension 2 is fixed at 32"),
], ids=["no-batch", "size"])
def test_calls_the_module_cannot_take(x, says, capsys):
    """A traced (fx) module checks its inputs first: no fx traceback, no IndexError."""
    fast = tome_fx.optimize(_vit(), r=2, example_inputs=torch.randn(2, 3, 32, 32))
    assert fast.tome.frontend == "fx"
    with pytest.raises(tome_fx.ShapeError, match=says) as info:
        fast(x)
    assert "\n" not in str(info.value) and capsys.readouterr().err == ""
    assert fast(torch.randn(5, 3, 32, 32)).shape == (5, 1000)  # any batch


def test_refused_capture_prints_nothing(capsys, caplog):
    """ViLT's forward branches on data (export refuses it): one CaptureError line, and none of
    the partial graphs or warnings torch.export prints on its way."""
    from transformers import ViltConfig, ViltModel

    model = ViltModel(ViltConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, image_size=32, patch_size=8,
                                 vocab_size=100, max_position_embeddings=40)).eval()
    inputs = {"input_ids": torch.randint(0, 100, (2, 8)), "pixel_values": torch.randn(2, 3, 32, 32)}
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    disabled = logger.disabled
    with caplog.at_level(logging.DEBUG), pytest.raises(tome_fx.CaptureError) as info:
        tome_fx.optimize(model, r=2, example_inputs=inputs)
    assert str(info.value).startswith("cannot trace ViltModel with torch.fx: ")
    assert "torch.export failed on ViltModel" in str(info.value) and "\n" not in str(info.value)
    out = capsys.readouterr()
    assert out.out == "" and out.err == "" and caplog.records == []
    assert logger.disabled == disabled  # torch's logging is back as it was


def test_a_merged_model_is_refused(tmp_path, capsys):
    """What optimize returns, the .pt2 tome_fx.export writes of it (loaded as a program or as
    its module) and the CLI on that file: one line saying it is merged already, not a plan of
    the merged graph. The unmerged model exported the same way is taken."""
    from tome_fx import cli
    from tome_fx.capture.merged import merge_evidence

    x = torch.randn(2, 3, 32, 32)
    fast = tome_fx.optimize(_vit(), r=2, example_inputs=x)
    path = str(tmp_path / "fast.pt2")
    tome_fx.export(fast, path, verbose=False)
    program = torch.export.load(path)
    fix = "optimize the original model instead (the one optimize or tome-fx export was given)"
    for model, name, why in (
            (fast, "GraphModule", "its graph calls tome_fx.kernels.tome.tome_merge"),
            (program, "ExportedProgram", "its ops were traced from tome_fx's tome_merge"),
            (program.module(), "GraphModule", "its ops were traced from tome_fx's tome_merge")):
        with pytest.raises(tome_fx.MergedError) as info:
            tome_fx.optimize(model, r=8, example_inputs=x)
        assert str(info.value) == f"{name} is already merged by tome_fx ({why}): {fix}"
    assert cli.main(["report", path, "--r", "8"]) == 2
    assert capsys.readouterr().err == (f"tome-fx: error: {path} is already merged by tome_fx "
                                       f"(its ops were traced from tome_fx's tome_merge): {fix}\n")
    assert merge_evidence(torch.export.export(_vit(), (x,))) is None
    assert tome_fx.optimize(_vit(), r=2, example_inputs=x).tome.r == fast.tome.r


def _text_model(name):
    """A tiny random HuggingFace text model with a 40-row position table."""
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2Model, RobertaConfig,
                              RobertaModel, XLMRobertaConfig, XLMRobertaModel)

    size = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                vocab_size=100, max_position_embeddings=40)
    torch.manual_seed(0)
    if name == "gpt2":
        return GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100,
                                    n_positions=40, bos_token_id=0, eos_token_id=0)).eval()
    config, cls = {"bert": (BertConfig, BertModel), "roberta": (RobertaConfig, RobertaModel),
                   "xlmr": (XLMRobertaConfig, XLMRobertaModel)}[name]
    return cls(config(**size)).eval()


def _ids(n):
    ids = torch.randint(3, 100, (2, n), generator=torch.Generator().manual_seed(n))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


ROBERTA_TABLE = ("embeddings.position_embeddings.weight: 40 rows, positions from row 2; "
                 "max_position_embeddings=40")


@pytest.mark.parametrize("name,holds,table", [
    ("roberta", 38, ROBERTA_TABLE),  # positions from padding_idx + 1: 40 - 1 - 1
    ("gpt2", 40, "wpe.weight: 40 rows; n_positions=40"),
    pytest.param("xlmr", 38, ROBERTA_TABLE, marks=pytest.mark.slow),
    pytest.param("bert", 40, "embeddings.position_embeddings.weight: 40 rows; "
                             "max_position_embeddings=40", marks=pytest.mark.slow),
])
def test_lengths_past_a_position_table(name, holds, table):
    """The optimized module takes the longest input the model takes and refuses one token more
    with a ShapeError naming the table (the model: an IndexError or RuntimeError there), at
    call time and for example inputs already too long."""
    model = _text_model(name)
    fast = tome_fx.optimize(model, r=2, example_inputs=_ids(16))
    with torch.no_grad():
        model(**_ids(holds))
        fast(**_ids(holds))
        with pytest.raises((IndexError, RuntimeError)):
            model(**_ids(holds + 1))
    why = f"the model's position table holds {holds} ({table})"
    for n in (holds + 1, 64):
        with pytest.raises(tome_fx.ShapeError) as info:
            fast(**_ids(n))
        assert str(info.value) == f"input_ids has {n} tokens; {why}"
    with pytest.raises(tome_fx.ShapeError) as info:
        tome_fx.optimize(model, r=2, example_inputs=_ids(64))
    assert str(info.value) == (f"{type(model).__name__} cannot take the example inputs: "
                               f"input_ids has 64 tokens; {why}")
