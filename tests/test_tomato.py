"""ToMato (issue 7): 4-neighbour components, merge once, padding, exact counts, models.

References here are written separately from tome_fx/kernels/tomato.py: a Python union-find for the
components, Kruskal's loop for the count mode, per-component Python means for the merge, and an
explicit per-head softmax for the attention similarity.
"""
import functools
import math

import pytest
import torch

import tome_fx
from cases import case, timm_model
from flops import counted_flops
from models import TinyTransformer
from tome_fx.kernels.tomato import (components, count_components, edge_similarity, grid_edges,
                            labels_for_count, merge_components, tomato_merge)


# ---------------------------------------------------------------------------------------------
# independent references
# ---------------------------------------------------------------------------------------------

def ref_edges(h, w):
    """4-neighbour pairs of a row-major h x w grid, by coordinates."""
    out = []
    for i in range(h):
        for j in range(w):
            if j + 1 < w:
                out.append((i * w + j, i * w + j + 1))
            if i + 1 < h:
                out.append((i * w + j, (i + 1) * w + j))
    return out


class UnionFind:
    def __init__(self, n):
        self.parent = list(range(n))

    def find(self, a):
        while self.parent[a] != a:
            a = self.parent[a]
        return a

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a == b:
            return False
        self.parent[max(a, b)] = min(a, b)
        return True

    def labels(self):
        n = len(self.parent)
        roots = [self.find(i) for i in range(n)]
        first = {}
        for i, r in enumerate(roots):
            first.setdefault(r, i)
        return [first[r] for r in roots]


def ref_labels(h, w, kept_pairs):
    uf = UnionFind(h * w)
    for a, b in kept_pairs:
        uf.union(a, b)
    return uf.labels()


def ref_merge(x, labels, prefix):
    """Per-component means (all sizes 1), components ordered by first patch; sizes."""
    groups = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab, []).append(i)
    rows, sizes = [x[i] for i in range(prefix)], [1.0] * prefix
    for lab in sorted(groups):
        members = groups[lab]
        rows.append(sum(x[prefix + i] for i in members) / len(members))
        sizes.append(float(len(members)))
    return torch.stack(rows), sizes


def _pairs(u, v, keep_row):
    return [(int(a), int(b)) for a, b, k in zip(u, v, keep_row) if k]


# ---------------------------------------------------------------------------------------------
# components
# ---------------------------------------------------------------------------------------------

def test_grid_edges_are_the_4_neighbours_without_wrap():
    for h, w in [(1, 1), (1, 4), (3, 1), (3, 4), (5, 7)]:
        u, v = grid_edges(h, w)
        assert sorted(zip(u.tolist(), v.tolist())) == sorted(ref_edges(h, w))
        assert len(u) == h * (w - 1) + (h - 1) * w


@pytest.mark.parametrize("h,w", [(1, 1), (1, 6), (6, 1), (3, 4), (8, 8), (14, 14), (2, 31), (32, 32)])
def test_components_match_union_find(h, w):
    g = torch.Generator().manual_seed(h * 100 + w)
    u, v = grid_edges(h, w)
    for p in (0.0, 0.3, 0.5, 0.6, 0.8, 1.0):
        keep = torch.rand(3, len(u), generator=g) < p
        labels = components(u, v, keep, h * w)
        for b in range(3):
            assert labels[b].tolist() == ref_labels(h, w, _pairs(u, v, keep[b])), (h, w, p, b)


def test_components_long_snake():
    """A serpentine path through every patch: diameter h*w - 1, the worst case for plain label
    propagation; the fixed ceil(log2 m) rounds must still finish it (also with shuffled grid
    numbering, i.e. the path visits indices in random order)."""
    h, w = 9, 11
    u, v = grid_edges(h, w)
    pairs = set()
    for i in range(h):
        for j in range(w - 1):
            pairs.add((i * w + j, i * w + j + 1))
        if i + 1 < h:
            col = w - 1 if i % 2 == 0 else 0
            pairs.add((i * w + col, (i + 1) * w + col))
    keep = torch.tensor([[(a, b) in pairs for a, b in zip(u.tolist(), v.tolist())]])
    labels = components(u, v, keep, h * w)
    assert labels.tolist() == [[0] * (h * w)]
    # comb: every row linked only through the first column (long chains hanging off a spine)
    comb = {(a, b) for a, b in ref_edges(h, w) if b == a + 1 or a % w == 0}
    keep = torch.tensor([[(a, b) in comb for a, b in zip(u.tolist(), v.tolist())]])
    assert components(u, v, keep, h * w).tolist() == [[0] * (h * w)]


def _two_region_keys(h, w, prefix, split):
    """Keys [1, 2, N, 4]: patches left of column ``split`` get key a, the rest key b."""
    a, b = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    rows = [torch.tensor([0, 0, 1.0, 0])] * prefix
    for i in range(h):
        for j in range(w):
            rows.append(a if j < split else b)
    k = torch.stack(rows)
    return torch.stack([k, k])[None]  # two identical heads


def test_two_regions_give_two_groups_plus_protected():
    h, w, prefix = 4, 6, 2
    keys = _two_region_keys(h, w, prefix, split=2)
    torch.manual_seed(0)
    x = torch.randn(1, prefix + h * w, 5)
    out, size = tomato_merge(x, keys, None, None, prefix, (h, w), "keys", 0.5)
    assert out.shape == (1, prefix + 2, 5)
    assert size[0, :, 0].tolist() == [1.0, 1.0, 8.0, 16.0]
    assert torch.equal(out[0, :prefix], x[0, :prefix])  # protected tokens untouched
    left = [prefix + i * w + j for i in range(h) for j in range(2)]
    right = [prefix + i * w + j for i in range(h) for j in range(2, w)]
    assert torch.allclose(out[0, 2], x[0, left].mean(0), atol=1e-6)
    assert torch.allclose(out[0, 3], x[0, right].mean(0), atol=1e-6)


def test_no_merge_across_a_row_wrap():
    """Last patch of row 0 and first of row 1 identical, everything else distinct: they are not
    neighbours, so nothing merges; the same pair one row apart (vertical neighbours) merges."""
    h, w, prefix = 3, 4, 1
    n = prefix + h * w
    keys = torch.eye(n)[None, None]  # orthogonal keys: cosine 0 between all distinct tokens
    keys[0, 0, prefix + w] = keys[0, 0, prefix + w - 1]  # patch (1, 0) == patch (0, w-1)
    x = torch.randn(1, n, 3)
    out, size = tomato_merge(x, keys, None, None, prefix, (h, w), "keys", 0.5)
    assert out.shape[1] == n and torch.equal(out, x) and torch.all(size == 1)
    keys = torch.eye(n)[None, None]
    keys[0, 0, prefix + 2 * w - 1] = keys[0, 0, prefix + w - 1]  # (1, w-1) == (0, w-1)
    out, size = tomato_merge(x, keys, None, None, prefix, (h, w), "keys", 0.5)
    assert out.shape[1] == n - 1 and size.max() == 2


def test_merge_matches_python_reference():
    g = torch.Generator().manual_seed(3)
    h, w, prefix = 5, 6, 1
    u, v = grid_edges(h, w)
    x = torch.randn(4, prefix + h * w, 7, generator=g)
    keep = torch.rand(4, len(u), generator=g) < 0.6
    labels = components(u, v, keep, h * w)
    out, size = merge_components(x, torch.ones(4, prefix + h * w, 1), labels, prefix)
    counts = [len(set(ref_labels(h, w, _pairs(u, v, keep[b])))) for b in range(4)]
    assert out.shape[1] == prefix + max(counts)
    for b in range(4):
        ref_x, ref_s = ref_merge(x[b], ref_labels(h, w, _pairs(u, v, keep[b])), prefix)
        k = len(ref_s)
        assert torch.allclose(out[b, :k], ref_x, atol=1e-6)
        assert size[b, :k, 0].tolist() == ref_s
        assert torch.all(size[b, k:] == 0) and torch.all(out[b, k:] == 0)  # padding


def test_attention_similarity_matches_explicit_softmax():
    g = torch.Generator().manual_seed(5)
    b, heads, h, w, prefix, d = 2, 3, 3, 4, 1, 8
    n = prefix + h * w
    q, k = torch.randn(b, heads, n, d, generator=g), torch.randn(b, heads, n, d, generator=g)
    u, v = grid_edges(h, w)
    sim = edge_similarity("qk", (q, k), u, v, prefix)
    probs = torch.stack([torch.stack([torch.softmax(q[i, hh] @ k[i, hh].T / math.sqrt(d), -1)
                                      for hh in range(heads)]) for i in range(b)])
    for i in range(b):
        for e, (a, c) in enumerate(ref_edges(h, w)):
            pa, pc = a + prefix, c + prefix
            want = sum((probs[i, hh, pa, pc] + probs[i, hh, pc, pa]) / 2 for hh in range(heads))
            e_idx = list(zip(u.tolist(), v.tolist())).index((a, c))
            assert sim[i, e_idx].item() == pytest.approx(want.item() / heads, abs=1e-6)
    # explicit-softmax cores hand the probabilities over directly: same similarity
    assert torch.allclose(edge_similarity("probs", probs, u, v, prefix), sim, atol=1e-6)
    # ... also laid out [B*H, N, N] (batch-major), and the merges agree with the q/k route
    x = torch.randn(b, n, 5, generator=g)
    want = tomato_merge(x, (q, k), None, 5, prefix, (h, w), "qk")
    for p in (probs, probs.reshape(b * heads, n, n)):
        got = tomato_merge(x, p, None, 5, prefix, (h, w), "probs")
        assert torch.allclose(got[0], want[0], atol=1e-6) and torch.equal(got[1], want[1])


# ---------------------------------------------------------------------------------------------
# count (budget) mode
# ---------------------------------------------------------------------------------------------

def ref_kruskal(h, w, sim_row, target):
    """Join the strongest edges, skipping ones inside a component, until ``target`` remain."""
    uf, count = UnionFind(h * w), h * w
    for e in sorted(range(len(sim_row)), key=lambda e: -sim_row[e]):
        if count == target:
            break
        a, b = ref_edges_cache(h, w)[e]
        count -= uf.union(a, b)
    return uf.labels()


@functools.lru_cache(maxsize=None)
def ref_edges_cache(h, w):
    u, v = grid_edges(h, w)
    return list(zip(u.tolist(), v.tolist()))


def test_count_mode_exact_and_equals_kruskal():
    g = torch.Generator().manual_seed(7)
    h, w = 4, 5
    u, v = grid_edges(h, w)
    sim = torch.rand(3, len(u), generator=g)
    for target in range(1, h * w + 1):
        labels = labels_for_count(sim, u, v, h * w, target)
        assert count_components(labels).tolist() == [target] * 3
        for b in range(3):
            assert labels[b].tolist() == ref_kruskal(h, w, sim[b].tolist(), target), target


def test_count_mode_with_ties():
    h, w = 6, 6
    u, v = grid_edges(h, w)
    sim = torch.randint(0, 3, (4, len(u))).float()  # many equal similarities
    for target in (1, 5, 17, 36):
        assert count_components(labels_for_count(sim, u, v, h * w, target)).tolist() == [target] * 4


def test_count_mode_traces_without_graph_breaks():
    """The count mode has static shapes: dynamo captures it as one graph (threshold mode's
    output size depends on the data, which dynamo cannot capture without scalar outputs)."""
    x, q, k = torch.randn(2, 17, 8), torch.randn(2, 2, 17, 4), torch.randn(2, 2, 17, 4)

    def f(x, q, k):
        return tomato_merge(x, (q, k), None, 6, 1, (4, 4), "qk", None, None)

    torch._dynamo.reset()
    exp = torch._dynamo.explain(f)(x, q, k)
    torch._dynamo.reset()
    assert exp.graph_count == 1 and exp.graph_break_count == 0, exp.break_reasons


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------

def _sizes(gm, x):
    """Sizes the ToMato merge produces on ``x``."""
    import torch.fx as fx

    got = []

    class Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.meta.get("tome", {}).get("role") == "size":
                got.append(out)
            return out

    with torch.no_grad():
        Rec(gm).run(x)
    return got[0]


def _per_image(fast, x):
    with torch.no_grad():
        return torch.cat([fast(x[i:i + 1]) for i in range(x.shape[0])])


@pytest.mark.parametrize("similarity,threshold", [("attention", 0.02), ("keys", 0.8)])
def test_cifar_threshold_batch_equals_single(similarity, threshold, cifar):
    model, x, _ = cifar
    x = x[:12]
    fast = tome_fx.optimize(model, method="tomato", sim_threshold=threshold,
                            similarity=similarity, example_inputs=(x,))
    plan = fast.tome
    assert plan.method == "tomato" and plan.grid == (8, 8) and plan.protected == 1
    assert plan.sim_threshold == threshold and plan.merge_block == 0
    assert fast.tome_counts == {"merges": 1, "size_bias": 5, "weighted_pool": 0,
                                "mask_follow": 0, "drop_unread": 1, "unmerge": 0}
    size = _sizes(fast, x)[..., 0]
    counts = (size > 0).sum(1)
    assert counts.min() < counts.max() <= 65  # images really differ, so padding is exercised
    assert torch.all(size.sum(1) == 65) and torch.all(size[:, 0] == 1)
    with torch.no_grad():
        batched = fast(x)
    assert (batched - _per_image(fast, x)).abs().max().item() <= 1e-5


def test_cifar_budget_exact_counts_and_flops(cifar):
    model, x, _ = cifar
    x = x[:8]
    fast = tome_fx.optimize(model, method="tomato", flops_budget=0.6, example_inputs=(x,))
    plan = fast.tome
    n_out = plan.blocks[0].tokens_out
    size = _sizes(fast, x)[..., 0]
    assert size.shape == (8, n_out) and torch.all(size > 0) and torch.all(size.sum(1) == 65)
    with torch.no_grad():
        out = fast(x)
    assert plan.flops == counted_flops(fast, x)
    assert plan.flops_original == counted_flops(model, x)
    assert plan.ratio <= 0.6
    # the fewest merges meeting the budget: one token more would break it
    assert plan.budget == 0.6 and plan.sim_threshold is None
    assert (out - _per_image(fast, x)).abs().max().item() <= 1e-5
    assert fast.tome_counts["drop_unread"] == 1 and plan.blocks[-1].tokens_out == 1
    # without the drop the same budget needs more merges
    kept = tome_fx.optimize(model, method="tomato", flops_budget=0.6, example_inputs=(x,),
                            drop_unread=False)
    assert kept.tome_counts["drop_unread"] == 0 and kept.tome.blocks[-1].dropped == 0
    assert kept.tome.blocks[0].tokens_out < n_out
    assert kept.tome.flops == counted_flops(kept, x) and kept.tome.ratio <= 0.6


def test_cifar_budget_not_priced_with_the_drop_is_not_dropped(monkeypatch, cifar):
    """If the cost model's rewrite could not drop the unread tokens, its FLOPs hold only for a
    rewrite without the drop: ToMato then does not drop either, and says why."""
    from tome_fx.cost import CostModel

    model, x, _ = cifar
    x = x[:4]
    build = CostModel.build.__func__
    monkeypatch.setattr(CostModel, "build", classmethod(
        lambda cls, *a, **kw: build(cls, *a, **{**kw, "drop": False})))
    fast = tome_fx.optimize(model, method="tomato", flops_budget=0.7, example_inputs=(x,))
    assert fast.tome_counts["drop_unread"] == 0 and fast.tome.blocks[-1].dropped == 0
    assert any("cost model's rewrite could not drop" in n for n in fast.tome.notes)
    assert fast.tome.flops == counted_flops(fast, x) and fast.tome.ratio <= 0.7


def test_cifar_budget_met_by_the_drop_alone_is_exact(cifar):
    """At 0.9 dropping the unread tokens after the last attention is enough: no merge, and the
    outputs are the original's."""
    model, x, _ = cifar
    x = x[:4]
    fast = tome_fx.optimize(model, method="tomato", flops_budget=0.9, example_inputs=(x,))
    assert fast.tome_counts["merges"] == 0 and fast.tome_counts["drop_unread"] == 1
    assert fast.tome.blocks[0].tokens_out == 65 and fast.tome.ratio <= 0.9
    assert any("only the 1 protected token(s)" in n for n in fast.tome.notes)
    with torch.no_grad():
        assert (fast(x) - model(x)).abs().max().item() <= 1e-5


def test_cifar_threshold_inf_is_exact(cifar):
    model, x, _ = cifar
    x = x[:4]
    for similarity in ("attention", "keys"):
        fast = tome_fx.optimize(model, method="tomato", sim_threshold=float("inf"),
                                similarity=similarity, example_inputs=(x,))
        with torch.no_grad():
            assert (fast(x) - model(x)).abs().max().item() <= 1e-5
        assert fast.tome.blocks[0].tokens_out == 65


@pytest.mark.parametrize("name,prefix,px", [("deit_tiny_patch16_224", 1, 224),
                                            ("deit_tiny_distilled_patch16_224", 2, 112)])
def test_deit_tiny(name, prefix, px):
    model = timm_model(name, img_size=px)
    torch.manual_seed(1)
    x = torch.randn(2, 3, px, px)
    side = px // 16
    inf = tome_fx.optimize(model, method="tomato", sim_threshold=float("inf"), example_inputs=(x,))
    with torch.no_grad():
        ref = model(x)
        assert (inf(x) - ref).abs().max().item() <= 1e-5
    fast = tome_fx.optimize(model, method="tomato", flops_budget=0.7, example_inputs=(x,),
                            similarity="keys")
    plan = fast.tome
    assert plan.protected == prefix and plan.grid == (side, side) and plan.ratio <= 0.7
    size = _sizes(fast, x)[..., 0]
    assert size.shape == (2, plan.blocks[0].tokens_out) and torch.all(size[:, :prefix] == 1)
    assert torch.all(size.sum(1) == side * side + prefix)
    with torch.no_grad():
        out = fast(x)
    assert torch.isfinite(out).all() and out.shape == ref.shape


def test_avg_pool_model_ignores_padding():
    """No class token, mean pooling: padded size-0 tokens must not change the mean."""
    model = timm_model("vit_tiny_patch16_224", global_pool="avg", class_token=False, img_size=64)
    torch.manual_seed(2)
    x = torch.randn(4, 3, 64, 64)
    x[0] = x[0].mean()  # a flat image: its patches merge much more than the noisy ones
    fast = tome_fx.optimize(model, method="tomato", sim_threshold=0.5, similarity="keys",
                            example_inputs=(x,))
    assert fast.tome.protected == 0 and fast.tome_counts["weighted_pool"] == 1
    assert fast.tome_counts["drop_unread"] == 0
    assert "unread tokens are not dropped: no protected prefix token" in fast.tome.notes[-1]
    size = _sizes(fast, x)[..., 0]
    assert (size == 0).any()  # padding present
    with torch.no_grad():
        assert (fast(x) - _per_image(fast, x)).abs().max().item() <= 1e-5


def _connected(patches: set, w: int) -> bool:
    """Whether grid cells (row-major indices, width ``w``) form one 4-connected region."""
    todo, seen = [min(patches)], {min(patches)}
    while todo:
        i = todo.pop()
        near = [i - w, i + w] + ([i - 1] if i % w else []) + ([i + 1] if (i + 1) % w else [])
        for j in near:
            if j in patches and j not in seen:
                seen.add(j)
                todo.append(j)
    return seen == patches


@pytest.mark.parametrize("mode", [dict(sim_threshold=0.5), dict(flops_budget=0.7)],
                         ids=["threshold", "count"])
def test_track_sources_follows_tomato(mode):
    """Each merged token holds one 4-connected region of patches (size-0 padding holds none);
    every patch is in exactly one token; outputs are the module's."""
    model = timm_model("vit_tiny_patch16_224", global_pool="avg", class_token=False, img_size=64)
    torch.manual_seed(2)
    x = torch.randn(3, 3, 64, 64)
    x[0] = x[0].mean()  # a flat image merges far more: padding in threshold mode
    fast = tome_fx.optimize(model, method="tomato", similarity="keys", example_inputs=(x,), **mode)
    tracked = tome_fx.track_sources(fast, x)
    with torch.no_grad():
        assert torch.equal(tracked.output, fast(x))
    s = tracked.sources[0]
    size = _sizes(fast, x)[..., 0]
    assert s.shape == (3, size.shape[1], 16) and torch.equal(s.sum(-1), size)
    assert torch.all(s.sum(1) == 1)
    for b in range(3):
        for row in s[b]:
            patches = set(row.nonzero().flatten().tolist())
            assert not patches or _connected(patches, 4)
    if "sim_threshold" in mode:
        assert (size == 0).any()


@pytest.mark.parametrize("mode", [dict(sim_threshold=0.3), dict(flops_budget=0.8)],
                         ids=["threshold", "count"])
def test_padding_mask_follows_the_tomato_merge(mode):
    """ToMato goes through the same pipeline as ToMe: on a padded BERT-style model (grid given)
    the mask follows the merge, padding never joins real tokens, and every sequence gets what
    it would get alone."""
    from mask_models import MiniBert, bert_inputs

    torch.manual_seed(0)
    model = MiniBert(head="mean").eval()
    ids, mask = bert_inputs(3)  # lengths 24, 17, 9 of 24
    fast = tome_fx.optimize(model, method="tomato", similarity="keys", grid=(4, 6),
                            example_inputs=(ids, mask), **mode)
    counts = fast.tome_counts
    assert counts["merges"] == 1 and counts["mask_follow"] > 0 and counts["weighted_pool"] == 2
    tracked = tome_fx.track_sources(fast, ids, mask)
    s = tracked.sources[0] > 0  # [B, N', 24]: which input tokens each token holds
    real = mask.bool()
    mixed = (s & real[:, None, :]).any(-1) & (s & ~real[:, None, :]).any(-1)
    assert not mixed.any(), "a merged token mixes padding and real tokens"
    assert s.any(-1).sum(-1).min() < 24  # tokens were merged
    with torch.no_grad():
        out = fast(ids, mask)
        alone = torch.cat([fast(ids[i:i + 1], mask[i:i + 1]) for i in range(3)])
    assert torch.equal(tracked.output, out) and (out - alone).abs().max() <= 1e-5


def test_tomato_without_a_grid_warns_that_the_budget_is_not_met():
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    x = torch.randn(3, 32, 16)
    with pytest.warns(UserWarning, match="flops_budget=0.8 is not met .the model is unchanged.*grid"):
        fast = tome_fx.optimize(model, method="tomato", flops_budget=0.8, example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))


def test_explicit_softmax_model_with_given_grid():
    """A model without a patch embedding is refused with the reason unless grid= is given;
    with it, explicit-softmax attention hands its probabilities to the merge."""
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    x = torch.randn(3, 32, 16)
    refused = tome_fx.optimize(model, method="tomato", sim_threshold=0.03, example_inputs=(x,))
    assert refused.tome_counts["merges"] == 0
    assert "grid=(h, w)" in refused.tome.skipped[0].reason
    with torch.no_grad():
        assert torch.equal(refused(x), model(x))
    fast = tome_fx.optimize(model, method="tomato", sim_threshold=0.03, grid=(4, 8),
                            example_inputs=(x,))
    assert fast.tome_counts["merges"] == 1 and fast.tome.blocks[0].tokens_out < 33
    with torch.no_grad():
        assert (fast(x) - _per_image(fast, x)).abs().max().item() <= 1e-5
    enc, xe, _ = case("nn.TransformerEncoder-postnorm")
    xe = xe[0]
    fast = tome_fx.optimize(enc, method="tomato", flops_budget=0.8, grid=(5, 8),
                            example_inputs=(xe,))
    assert fast.tome.ratio <= 0.8 and fast.tome_counts["weighted_pool"] == 1


def test_errors_are_one_line():
    model = TinyTransformer().eval()
    x = (torch.randn(2, 32, 16),)
    cases = [
        (dict(method="tomato"), ValueError, "sim_threshold"),
        (dict(method="tomato", sim_threshold=0.1, flops_budget=0.5), ValueError, "either"),
        (dict(method="tomato", sim_threshold=0.1, similarity="cos"), ValueError, "similarity"),
        (dict(method="tomato", sim_threshold=0.1, grid=(3, 3)), ValueError, "grid"),
        (dict(method="tomato", sim_threshold=0.1, block=9, grid=(4, 8)), ValueError, "block=9"),
        (dict(method="tomato", r=4), ValueError, "not r"),
        (dict(method="tomatoes", r=4), ValueError, "method"),
        (dict(r=4, sim_threshold=0.1), TypeError, "sim_threshold"),
        (dict(method="tomato", sim_threshold=0.1, prop_attn=False), ValueError, "prop_attn"),
    ]
    for kw, exc, text in cases:
        with pytest.raises(exc, match=text) as info:
            tome_fx.optimize(model, example_inputs=x, **kw)
        assert "\n" not in str(info.value)


def test_block_choice_and_model_untouched(cifar):
    model, x, _ = cifar
    x = x[:4]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = tome_fx.optimize(model, method="tomato", sim_threshold=0.7, similarity="keys",
                            block=2, example_inputs=(x,))
    rows = fast.tome.blocks
    assert [b.tokens_in for b in rows[:3]] == [65, 65, 65] and rows[2].tokens_out <= 65
    assert fast.tome_counts["size_bias"] == 3  # blocks 3, 4, 5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
