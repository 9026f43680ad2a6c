"""Train mode of a rewritten module: it comes back in the mode the model was given in, its
dropout runs under ``.train()`` and stops under ``.eval()`` with one merge schedule for both,
on either frontend, and so does HuggingFace's SpecAugment; where the training forward cannot be
captured, ``.train()`` says why."""
import copy
import os
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import tome_fx
from cases import timm_model
from models import TinyTransformer

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


class NumpyNoise(nn.Module):
    """A training-only augmentation drawn with numpy, before a small transformer."""

    def __init__(self):
        super().__init__()
        self.encoder = TinyTransformer(dim=32, depth=2)

    def forward(self, x):
        if self.training:
            x = x + torch.from_numpy(np.random.rand(x.shape[0], x.shape[1], 1)).to(x.dtype)
        return self.encoder(x)


def test_python_drawn_randomness_falls_back_with_the_reason():
    """A graph would freeze numbers drawn by numpy or ``random``: the train-mode graph is not
    used, and ``.train()`` says so. The caller's random streams are left as they were."""
    np.random.seed(1)
    random.seed(1)
    states = np.random.get_state()[1].copy(), random.getstate()
    with pytest.warns(UserWarning, match=r"training forward of NumpyNoise is not captured: "
                                         r"it draws random numbers in Python \(numpy"):
        fast = tome_fx.optimize(NumpyNoise().train(), r=2, example_inputs=torch.randn(2, 17, 16))
    assert np.array_equal(np.random.get_state()[1], states[0]) and random.getstate() == states[1]
    assert fast.training
    assert any(n.startswith("train mode: it draws random") for n in fast.tome.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast.eval()  # only .train() warns
    with pytest.warns(UserWarning, match="not captured"):
        fast.train()


def _wav2vec2(**config):
    """wav2vec2 whose SpecAugment masks time spans (at least two) and feature spans at the
    example length; no LayerDrop (a random branch: not capturable)."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    spec_augment = dict(mask_time_prob=0.3, mask_time_length=2, mask_time_min_masks=2,
                        mask_feature_prob=0.3, mask_feature_length=4, mask_feature_min_masks=1)
    return Wav2Vec2Model(Wav2Vec2Config(
        **HF, conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
        num_feat_extract_layers=2, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        layerdrop=0.0, **spec_augment | config))


def _loss(out):
    hidden = out.last_hidden_state
    return (hidden * torch.linspace(-1, 1, hidden.numel()).view_as(hidden)).sum()


_PADDED = torch.ones(2, 40, dtype=torch.long)
_PADDED[1, 25:] = 0
_EXPLICIT = torch.zeros(2, 40, dtype=torch.bool)
_EXPLICIT[:, 5:9] = True


@pytest.mark.parametrize("config,call", [
    ({}, {}), ({}, {"attention_mask": _PADDED}), ({}, {"mask_time_indices": _EXPLICIT}),
    ({"mask_time_prob": 0.0}, {}), ({"mask_feature_prob": 0.0, "mask_time_min_masks": 5}, {}),
    ({"apply_spec_augment": False}, {"mask_time_indices": _EXPLICIT}), ({"eval": True}, {})],
    ids=["time+feature", "padding", "explicit", "feature-only", "min-masks", "off", "eval"])
def test_spec_augment_stand_in_is_huggingfaces(config, call):
    """Capture's ``_mask_hidden_states`` computes HF's, draws included (same numpy seed)."""
    from tome_fx.capture.specaug import swap_spec_augment

    model = _wav2vec2(**{k: v for k, v in config.items() if k != "eval"})
    model.train(not config.get("eval"))
    swapped = copy.deepcopy(model)
    assert swap_spec_augment(swapped) == 1
    hidden = torch.randn(2, 40, 32)
    np.random.seed(0)
    want = model._mask_hidden_states(hidden.clone(), **call)
    np.random.seed(0)
    got = swapped._mask_hidden_states(hidden, **call)
    assert torch.equal(got, want)
    assert config or not torch.equal(got, hidden)  # the default case masks something


def test_spec_augment_runs_under_train_and_stops_under_eval(tmp_path):
    """wav2vec2's SpecAugment draws its masks on every call under ``.train()`` (through
    ``tome_fx::spec_augment_mask``, not frozen by the graph) and trains ``masked_spec_embed``;
    under ``.eval()`` it masks nothing. One graph, one schedule, both modes; the same after
    ``torch.save`` and ``torch.load`` in a fresh process (the op is registered on import)."""
    model = _wav2vec2().train()
    x = torch.randn(2, 1600)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "training forward is not captured" warning
        fast = tome_fx.optimize(model, r=2, example_inputs=x)
    assert fast.training and model.training and fast.tome_counts["merges"] == 2
    assert not any(n.startswith("train mode") for n in fast.tome.notes)
    assert _differ(fast, x)
    _loss(fast(x)).backward()
    assert fast.masked_spec_embed.grad.abs().sum() > 0
    torch.save(fast, tmp_path / "fast.pt")
    fast.eval().zero_grad(set_to_none=True)
    with torch.no_grad():
        assert not _differ(fast, x)
        torch.save((x, fast(x).last_hidden_state), tmp_path / "io.pt")
    _loss(fast(x)).backward()
    assert fast.masked_spec_embed.grad is None  # as in the model: SpecAugment is off
    code = ("import torch; m = torch.load('fast.pt', weights_only=False); "
            "x, want = torch.load('io.pt'); assert m.training, 'not training'; "
            "a, b = (m(x).last_hidden_state for _ in range(2)); "
            "assert not torch.equal(a, b), 'train calls equal'; "
            "torch.testing.assert_close(m.eval()(x).last_hidden_state, want)")  # threads may differ
    root = os.path.dirname(os.path.dirname(tome_fx.__file__))  # the tome_fx under test
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr[-2000:]


def test_spec_augment_draws_as_huggingface():
    """At r=0 with dropout off, the rewritten module's training forward is the model's own for
    the same numpy seed (the masks are HF's draws, padding included), and its eval forward the
    model's eval forward."""
    model = _wav2vec2(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                      feat_proj_dropout=0.0).train()
    inputs = {"input_values": torch.randn(2, 1600),
              "attention_mask": torch.ones(2, 1600, dtype=torch.long)}
    inputs["attention_mask"][1, 1000:] = 0
    fast = tome_fx.optimize(model, r=0, example_inputs=inputs)
    for seed in (1, 2):
        np.random.seed(seed)
        got = fast(**inputs).last_hidden_state
        np.random.seed(seed)
        assert torch.equal(got, model(**inputs).last_hidden_state)
    with torch.no_grad():
        got = fast.eval()(**inputs).last_hidden_state
        want = model.eval()(**inputs).last_hidden_state
    assert ((got - want).norm() / want.norm()).item() <= 1e-4


def test_random_ops_beyond_dropout_fall_back_with_the_reason():
    """Stochastic depth draws ``bernoulli_`` per sample: not a dropout probability to switch."""
    model = timm_model("vit_tiny_patch16_224", depth=2, img_size=32, patch_size=8,
                       drop_path_rate=0.2)
    fast = tome_fx.optimize(model, r=2, example_inputs=torch.randn(2, 3, 32, 32))
    assert not fast.training
    with pytest.warns(UserWarning, match=r"draws random numbers beyond dropout \(bernoulli_"):
        fast.train()

