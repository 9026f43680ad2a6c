"""Source tracking (which input tokens each merged token holds), the timing helper, drawing."""
import io
import time

import numpy as np
import pytest
import timm
import torch
import torch.fx as fx

import tome_fx
from tome_fx.kernels import tome as ops
from tome_fx.timing import progress, throughput, timings
from tome_fx.cli.sources import parse_input_size
from tome_fx.track import track_sources
from tome_fx.cli.visualize import group_ids, palette, patch_grid, render


class MergeRecorder(fx.Interpreter):
    """Records (x in, size in, x out, size out) of every tome_merge call."""

    def __init__(self, gm):
        super().__init__(gm)
        self.calls = []

    def call_function(self, target, args, kwargs):
        out = super().call_function(target, args, kwargs)
        if target is ops.tome_merge:
            x, size = args[0], args[2]
            if size is None:
                size = torch.ones(x.shape[0], x.shape[1], 1)
            self.calls.append((x, size, out[0], out[1]))
        return out


@pytest.mark.parametrize("kwargs,prefix", [
    ({}, 1),  # class token
    ({"reg_tokens": 1}, 2),  # class + register token: even prefix
    ({"class_token": False, "global_pool": "avg"}, 0),
])
def test_sources_follow_merges_and_outputs_are_identical(kwargs, prefix):
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4, pretrained=False,
                              **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    # drop_unread=False: the last block merges too (else it keeps only the class token)
    fast = tome_fx.optimize(model, r=[3, 0, 4, 2], example_inputs=(x,), drop_unread=False)
    assert fast.tome.protected == prefix
    tracked = track_sources(fast, x)
    with torch.no_grad():
        assert torch.equal(tracked.output, fast(x))  # tracking changes nothing
        rec = MergeRecorder(fast)
        rec.run(x)
    assert sorted(tracked.sources) == [0, 2, 3]  # block 1 (r=0) has no merge
    n0 = 16 + prefix
    prev = torch.eye(n0).expand(2, -1, -1)
    assert len(rec.calls) == 3
    for block, (x_in, s_in, x_out, s_out) in zip([0, 2, 3], rec.calls):
        s = tracked.sources[block]
        assert s.shape == (2, x_out.shape[1], n0)
        assert torch.all(s.sum(1) == 1)  # every input token is in exactly one token
        assert torch.equal(s.sum(-1), s_out[..., 0])  # a token's size is its number of sources
        assert torch.equal(s[:, :prefix, :prefix], torch.eye(prefix).expand(2, -1, -1))
        # the merge's grouping, read off the sources: token j of the input went into token i
        member = (s @ prev.transpose(1, 2)) == prev.sum(-1)[:, None, :]
        assert torch.all(member.sum(1) == 1)
        m = member.double()
        expect = (m @ (x_in.double() * s_in.double())) / (m @ s_in.double())
        torch.testing.assert_close(x_out.double(), expect, atol=1e-5, rtol=1e-5)
        prev = s
    assert tracked.at(1) is tracked.sources[0] and tracked.at(-1) is None


def test_track_sources_needs_a_graph_module():
    with pytest.raises(TypeError, match="GraphModule"):
        track_sources(torch.nn.Linear(2, 2), torch.randn(1, 2))


def test_group_ids_grid_palette_render():
    s = torch.zeros(3, 5)  # prefix 1, 4 patches in 2 groups
    s[0, 0] = 1
    s[1, [1, 4]] = 1
    s[2, [2, 3]] = 1
    assert group_ids(s, 1).tolist() == [1, 2, 2, 1]
    with pytest.raises(RuntimeError):
        group_ids(torch.ones(2, 5), 1)
    assert patch_grid(196, 224, 224) == (14, 14) and patch_grid(8, 32, 64) == (2, 4)
    with pytest.raises(ValueError):
        patch_grid(7, 32, 32)
    colours = palette(300)
    assert len(set(colours)) == 300 and (255, 255, 255) not in colours
    img = render(np.zeros((8, 8, 3), np.uint8), np.array([[0, 1], [1, 1]]), scale=2)
    arr = np.asarray(img)
    assert arr.shape == (16, 32, 3)
    right = arr[:, 16:]
    assert (right[0, 0] != right[15, 15]).any() and (right[12, 2] == right[15, 15]).all()
    assert (right[7, 0] == 255).all() and (right[0, 7] == 255).all()  # boundary between groups


def test_timing_helper_counts_calls_and_reports_median():
    calls = []

    def fn(x):
        calls.append(1)
        time.sleep(0.01)

    t = timings(fn, (torch.zeros(4, 2),), warmup=2, runs=3)
    assert len(t) == 3 and len(calls) == 5 and min(t) >= 0.01
    ips = throughput(fn, (torch.zeros(4, 2),), warmup=0, runs=3)
    assert 4 / 0.5 < ips <= 4 / 0.01
    with pytest.raises(ValueError):
        timings(fn, (torch.zeros(1),), runs=0)


def test_progress_bar():
    # tqdm on the given stream when asked; nothing when quiet or when the stream is no terminal
    stream = io.StringIO()
    bar = progress(4, "original", quiet=False, file=stream, mininterval=0)
    for _ in range(4):
        bar.update()
    bar.close()
    assert "original" in stream.getvalue() and "4/4" in stream.getvalue()
    for quiet in (True, None):  # None: StringIO is not a terminal
        off_stream = io.StringIO()
        off = progress(4, "x", quiet=quiet, file=off_stream)
        off.update()
        off.close()
        assert off_stream.getvalue() == ""


def test_parse_input_size():
    assert parse_input_size("3,224,224") == (3, 224, 224) and parse_input_size("16,64") == (16, 64)
    assert parse_input_size(None) is None
    for bad in ["3,a,4", "", "3,0,4", "-3"]:
        with pytest.raises(ValueError, match="--input-size"):
            parse_input_size(bad)
