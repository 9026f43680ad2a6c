"""The merge kernel against a per-token brute force, and the small ops."""
import pytest
import torch

from tome_fx.kernels import tokens
from tome_fx.kernels import tome as ops
from tome_fx.schedule import parse_r


def brute_merge(x, keys, size, r, prefix):
    """One sample at a time, Python lists, the algorithm as written in the paper."""
    out_x, out_s = [], []
    for b in range(x.shape[0]):
        n = x.shape[1]
        metric = keys[b].mean(0)  # [N, d], keys are [H, N, d]
        pos = list(range(prefix, n))
        a = [p for p in pos if p % 2 == 0]
        bb = [p for p in pos if p % 2 == 1]
        r_eff = min(r, (n - prefix) // 2)
        best = []
        for i in a:
            sims = [torch.cosine_similarity(metric[i], metric[j], dim=0).item() for j in bb]
            j = max(range(len(bb)), key=lambda k: sims[k])
            best.append((sims[j], i, bb[j]))
        chosen = sorted(best, key=lambda t: -t[0])[:r_eff]
        merged_a = {i for _, i, _ in chosen}
        groups = {j: [j] for j in bb}
        for _, i, j in chosen:
            groups[j].append(i)
        tokens, sizes = [], []
        for p in range(prefix):
            tokens.append(x[b, p]); sizes.append(size[b, p])
        for i in a:
            if i not in merged_a:
                tokens.append(x[b, i]); sizes.append(size[b, i])
        for j in bb:
            s = sum(size[b, k] for k in groups[j])
            tokens.append(sum(x[b, k] * size[b, k] for k in groups[j]) / s)
            sizes.append(s)
        out_x.append(torch.stack(tokens)); out_s.append(torch.stack(sizes))
    return torch.stack(out_x), torch.stack(out_s)


@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("r", [1, 3, 6, 50])
def test_merge_matches_brute_force(prefix, r):
    torch.manual_seed(prefix * 100 + r)
    x = torch.randn(2, 17, 8, dtype=torch.float64)
    keys = torch.randn(2, 3, 17, 4, dtype=torch.float64)
    size = torch.randint(1, 4, (2, 17, 1)).to(torch.float32)
    got_x, got_s = ops.tome_merge(x, keys, size, r, prefix)
    ref_x, ref_s = brute_merge(x, keys, size.double(), r, prefix)
    assert got_x.shape == ref_x.shape
    assert torch.allclose(got_x, ref_x, atol=1e-6)
    assert torch.allclose(got_s.double(), ref_s)


def test_merge_r0_and_none_size():
    x = torch.randn(2, 9, 4)
    keys = torch.randn(2, 2, 9, 3)
    y, s = ops.tome_merge(x, keys, None, 0, 1)
    assert torch.equal(y, x) and torch.equal(s, torch.ones(2, 9, 1))


def test_merge_transposed_keys():
    x = torch.randn(2, 9, 4)
    keys = torch.randn(2, 2, 9, 3)
    a = ops.tome_merge(x, keys, None, 3, 1)
    b = ops.tome_merge(x, keys.transpose(-1, -2), None, 3, 1, True)
    assert torch.equal(a[0], b[0])


def test_merge_low_precision():
    x = torch.randn(2, 33, 16)
    keys = torch.randn(2, 4, 33, 8)
    ref, _ = ops.tome_merge(x, keys, None, 8, 1)
    for dtype in (torch.float16, torch.bfloat16):
        got, size = ops.tome_merge(x.to(dtype), keys.to(dtype), None, 8, 1)
        assert got.dtype == dtype and size.dtype == torch.float32
        assert (got.float() - ref).abs().max() < 0.05


def test_size_bias_and_mask():
    size = torch.tensor([[[1.0], [2.0], [4.0]]])
    bias = tokens.size_bias(size, 4, torch.zeros(1, dtype=torch.float16))
    assert bias.shape == (1, 1, 1, 3) and bias.dtype == torch.float16
    assert torch.allclose(bias.float().flatten(), torch.log(torch.tensor([1.0, 2.0, 4.0])), atol=1e-3)
    keep = torch.tensor([True, False, True])
    combined = tokens.add_attn_bias(keep, bias.float())
    assert combined[0, 0, 0, 1] == float("-inf") and combined[0, 0, 0, 2] == bias.float()[0, 0, 0, 2]


def test_weighted_mean():
    x = torch.tensor([[[1.0], [3.0]]])
    size = torch.tensor([[[3.0], [1.0]]])
    assert tokens.weighted_mean(x, size, 1).item() == pytest.approx(1.5)
    assert tokens.weighted_mean(x.transpose(0, 1), size, 0).item() == pytest.approx(1.5)


@pytest.mark.parametrize("r, n, expected", [
    (3, 4, [3, 3, 3, 3]),
    ([1, 2], 4, [1, 2, 0, 0]),
    ((8, -1), 12, [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]),
    ((4, 0), 3, [4, 4, 4]),
    ((4, 1), 5, [0, 2, 4, 6, 8]),
])
def test_parse_r(r, n, expected):
    assert parse_r(r, n) == expected


def test_parse_r_too_long():
    with pytest.raises(ValueError, match="3 entries but the model has 2 blocks"):
        parse_r([1, 2, 3], 2)
