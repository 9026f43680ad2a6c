"""The authors' ToDo, written for the tests from their description (Smith et al. 2024,
ImprovedTokenMerge ``merge.py``): an attention processor on every ``BasicTransformerBlock.attn1``
that computes keys and values from the downsampled (or bipartite-merged) normalised hidden
states, the level picked by the channel width (320: level 1, 640: level 2, or here the widths
given), and a forward pre-hook that reads the latent's size and the timestep."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULTS = dict(ratio=0.5, sx=2, sy=2, use_rand=True, merge_method="downsample",
                downsample_method="nearest-exact", downsample_factor=2,
                timestep_threshold_switch=0.2, timestep_threshold_stop=0.0,
                secondary_merge_method="similarity", downsample_factor_level_2=1,
                ratio_level_2=0.5)


def _resize(x, cur_h, cur_w, new_h, new_w, method):
    b = x.shape[0]
    img = x.reshape(b, cur_h, cur_w, -1).permute(0, 3, 1, 2)
    step = cur_h // new_h
    if method == "max_pool":
        img = F.max_pool2d(img, step, step)
    elif method == "avg_pool":
        img = F.avg_pool2d(img, step, step)
    else:
        img = F.interpolate(img, size=(new_h, new_w), mode=method)
    return img.permute(0, 2, 3, 1).reshape(b, new_h * new_w, -1)


def _bipartite(x, w, h, sx, sy, r):
    """Top-left destinations (no randomness), the most similar ``r`` sources averaged in;
    and how many tokens each merged token holds."""
    b, n, c = x.shape
    if r <= 0:
        return x, x.new_ones(b, n)
    hs, ws = h // sy, w // sx
    flag = torch.zeros(h, w, dtype=torch.int64)
    flag[:hs * sy:sy, :ws * sx:sx] = -1
    order = flag.reshape(-1).argsort(stable=True)
    n_dst = hs * ws
    dst_i, src_i = order[:n_dst], order[n_dst:]
    m = x / x.norm(dim=-1, keepdim=True)
    score = m[:, src_i] @ m[:, dst_i].transpose(1, 2)
    best, target = score.max(-1)
    r = min(r, src_i.numel())
    rank = best.argsort(-1, descending=True)
    keep, gone = rank[:, r:], rank[:, :r]
    src, dst = x[:, src_i], x[:, dst_i]
    unm = src.gather(1, keep[..., None].expand(-1, -1, c))
    moved = src.gather(1, gone[..., None].expand(-1, -1, c))
    where = target.gather(1, gone)[..., None].expand(-1, -1, c)
    dst = dst.scatter_reduce(1, where, moved, reduce="mean")
    held = x.new_ones(b, n_dst).scatter_add(1, where[..., 0], x.new_ones(b, r))
    return torch.cat([unm, dst], 1), torch.cat([x.new_ones(b, unm.shape[1]), held], 1)


class ReferenceToDo:
    """``ReferenceToDo(unet, widths=(c1, c2), **args).apply()``: the processors and the hook."""

    def __init__(self, unet, widths, prop=False, **args):
        """``prop``: merged keys carry their sizes, ``log(size)`` added to the logits of an
        explicit softmax (proportional attention)."""
        self.unet, self.widths, self.prop = unet, widths, prop
        self.args = {**DEFAULTS, **args}
        self.info = {}

    def apply(self):
        for mod in self.unet.modules():
            if type(mod).__name__ == "BasicTransformerBlock":
                mod.attn1.set_processor(_Processor(self))

        def hook(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            self.info["size"] = tuple(sample.shape[-2:])
            self.info["t"] = float(torch.as_tensor(t).flatten()[0])
        self.unet.register_forward_pre_hook(hook, with_kwargs=True)
        return self.unet

    def reduce(self, x):
        """(keys/values input, sizes or None)."""
        a, (height, width) = self.args, self.info["size"]
        ds = int(math.ceil(math.sqrt(height * width // x.shape[1])))
        if x.shape[-1] == self.widths[0]:
            factor, ratio = a["downsample_factor"], a["ratio"]
        elif x.shape[-1] == self.widths[1]:
            factor, ratio = a["downsample_factor_level_2"], a["ratio_level_2"]
        else:
            return x, None
        u = self.info["t"] / 1000
        if u <= a["timestep_threshold_stop"]:
            return x, None
        method = a["merge_method"] if u > a["timestep_threshold_switch"] \
            else a["secondary_merge_method"]
        cur_h, cur_w = height // ds, width // ds
        if method == "downsample" and factor > 1:
            return _resize(x, cur_h, cur_w, cur_h // factor, cur_w // factor,
                           a["downsample_method"]), None
        if method == "similarity" and ratio > 0:
            assert not a["use_rand"], "the reference merges without randomness"
            return _bipartite(x, math.ceil(width / ds), math.ceil(height / ds), a["sx"],
                              a["sy"], int(x.shape[1] * ratio))
        return x, None


class _Processor:
    def __init__(self, owner):
        self.owner = owner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **_):
        assert encoder_hidden_states is None and attention_mask is None
        b = hidden_states.shape[0]
        q = attn.to_q(hidden_states)
        kv, size = self.owner.reduce(hidden_states)
        k, v = attn.to_k(kv), attn.to_v(kv)
        heads = attn.heads
        split = lambda t: t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa
        q, k, v = split(q), split(k), split(v)
        if self.owner.prop and size is not None:
            logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + size.log()[:, None, None]
            out = logits.softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, -1, heads * (out.shape[-1]))
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor
