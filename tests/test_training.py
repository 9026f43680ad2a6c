"""Train mode of a rewritten module: it comes back in the mode the model was given in, its
dropout runs under ``.train()`` and stops under ``.eval()`` with one merge schedule for both,
on either frontend; where the training forward cannot be captured, ``.train()`` says why."""
import random
import warnings

import numpy as np
import pytest
import torch

import tome_fx
from cases import timm_model

HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(**HF, vocab_size=100, hidden_dropout_prob=0.2,
                                attention_probs_dropout_prob=0.2))


def _differ(module, *args, **kwargs) -> bool:
    out = [module(*args, **kwargs) for _ in range(2)]
    out = [getattr(o, "last_hidden_state", o) for o in out]
    return not torch.equal(out[0], out[1])


def test_export_path_dropout_follows_the_mode():
    model = _bert().train()
    ids = {"input_ids": torch.randint(2, 100, (2, 12)),
           "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    fast = tome_fx.optimize(model, r=2, example_inputs=ids)
    assert fast.tome.frontend == "export" and fast.tome_counts["merges"] == 2
    assert fast.training and model.training  # returned in the mode given; the model untouched
    assert _differ(fast, **ids)  # hidden and attention dropout run
    fast(**ids).last_hidden_state.square().mean().backward()
    assert all(p.grad is not None for n, p in fast.named_parameters() if "pooler" not in n)
    ref = tome_fx.optimize(model.eval(), r=2, example_inputs=ids)
    assert not ref.training and ref.tome.r == fast.tome.r  # one schedule for both modes
    fast.eval()
    with torch.no_grad():
        assert not _differ(fast, **ids)
        assert torch.equal(fast(**ids).last_hidden_state, ref(**ids).last_hidden_state)
        assert _differ(ref.train(), **ids)  # optimized in eval mode, then trained


def test_fx_path_attention_dropout_follows_the_mode():
    """timm's fused attention chooses ``dropout_p`` by ``self.training`` in Python: the trace
    records the choice, switched by the mode (``train_switch``)."""
    model = timm_model("vit_tiny_patch16_224", depth=2, img_size=32, patch_size=8,
                       attn_drop_rate=0.3).train()
    x = torch.randn(2, 3, 32, 32)
    fast = tome_fx.optimize(model, r=2, example_inputs=x)
    assert fast.tome.frontend == "fx" and fast.training and "train_switch" in fast.code
    assert _differ(fast, x)
    ref = tome_fx.optimize(model.eval(), r=2, example_inputs=x)
    assert ref.tome.r == fast.tome.r
    with torch.no_grad():
        assert torch.equal(fast.eval()(x), ref(x))


def test_training_forward_that_is_not_captured_warns_with_the_reason():
    """wav2vec2's SpecAugment draws its mask with numpy: a graph would freeze one mask, so the
    train-mode graph is not used, and ``.train()`` says so. The caller's random streams are
    left as they were."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    model = Wav2Vec2Model(Wav2Vec2Config(
        **HF, conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
        num_feat_extract_layers=2, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        mask_time_prob=0.5, mask_time_length=2, layerdrop=0.0))
    x = torch.randn(2, 4000)
    np.random.seed(1)
    random.seed(1)
    states = np.random.get_state()[1].copy(), random.getstate()
    with pytest.warns(UserWarning, match=r"training forward of Wav2Vec2Model is not captured: "
                                         r"it draws random numbers in Python \(numpy"):
        fast = tome_fx.optimize(model.train(), r=2, example_inputs=x)
    assert np.array_equal(np.random.get_state()[1], states[0]) and random.getstate() == states[1]
    assert fast.training
    assert any(n.startswith("train mode: it draws random") for n in fast.tome.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast.eval()  # only .train() warns
    with pytest.warns(UserWarning, match="not captured"):
        fast.train()


def test_random_ops_beyond_dropout_fall_back_with_the_reason():
    """Stochastic depth draws ``bernoulli_`` per sample: not a dropout probability to switch."""
    model = timm_model("vit_tiny_patch16_224", depth=2, img_size=32, patch_size=8,
                       drop_path_rate=0.2)
    fast = tome_fx.optimize(model, r=2, example_inputs=torch.randn(2, 3, 32, 32))
    assert not fast.training
    with pytest.warns(UserWarning, match=r"draws random numbers beyond dropout \(bernoulli_"):
        fast.train()
