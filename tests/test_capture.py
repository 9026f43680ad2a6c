"""Capture: concrete args and traceable stand-ins for torch.nn attention modules."""
import pytest
import torch
import torch.nn as nn

from tome_fx.capture import capture
from tome_fx.capture.fx import TraceableEncoderLayer, TraceableMultiheadAttention


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_mha_standin_matches(batch_first, need_weights):
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    mask = torch.randn(7, 7)
    ref = mha(x, x, x, key_padding_mask=pad, attn_mask=mask, need_weights=need_weights)
    got = TraceableMultiheadAttention(mha).eval()(
        x, x, x, key_padding_mask=pad, attn_mask=mask, need_weights=need_weights
    )
    assert torch.allclose(got[0], ref[0], atol=1e-5)
    if need_weights:
        assert torch.allclose(got[1], ref[1], atol=1e-6)


def test_mha_cross_attention_kdim():
    mha = nn.MultiheadAttention(32, 4, kdim=16, vdim=8, batch_first=True).eval()
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 9, 16), torch.randn(2, 9, 8)
    ref = mha(q, k, v, need_weights=False)[0]
    got = TraceableMultiheadAttention(mha).eval()(q, k, v, need_weights=False)[0]
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_standin(norm_first):
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, norm_first=norm_first).eval()
    x = torch.randn(2, 11, 32)
    assert torch.allclose(TraceableEncoderLayer(layer).eval()(x), layer(x), atol=1e-5)


def test_capture_exposes_attention_and_keeps_model():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64), 2, enable_nested_tensor=False)
    x = torch.randn(9, 2, 32)
    cap = capture(enc, (x,))
    sdpa = [n for n in cap.graph_module.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert len(sdpa) == 2
    assert torch.allclose(cap.graph_module(x), enc.eval()(x), atol=1e-5)
    assert isinstance(enc.layers[0].self_attn, nn.MultiheadAttention)  # the user's model is intact


def test_concrete_defaults_filled():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, scale=2.0, mask=None, flag=False):
            y = self.fc(x) * scale
            if mask is not None:
                y = y + mask
            return -y if flag else y

    x = torch.randn(2, 4)
    m = M()
    cap = capture(m, (x,))  # would raise on `if mask is not None` without concrete defaults
    assert torch.equal(cap.graph_module(x), m(x))
    assert [n.target for n in cap.graph_module.graph.nodes if n.op == "placeholder"][0] == "x"
