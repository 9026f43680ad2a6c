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
