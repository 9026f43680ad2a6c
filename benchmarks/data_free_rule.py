"""What should ``auto`` do without real data? Measured on the two trained models we have.

    taskset -c 1 python benchmarks/data_free_rule.py cifar     # -> benchmarks/results/data_free_cifar.json
    HF_HUB_OFFLINE=1 taskset -c 0 python benchmarks/data_free_rule.py minilm

For each budget: ``auto`` calibrated on random inputs (what a model without data gets: randn
images, uniform random token ids), ``auto`` on real inputs, and the paper's constant r, each
scored on real held-out data (CIFAR-10: the 10,000 test images, top-1 and agreement; MiniLM:
300 sentences, embedding cosine and nearest-neighbour agreement, batches in the seeded order and
sorted by length). The committed results were measured before the data-free rule existed, when
``auto`` compared shapes on whatever ``example_inputs`` it got; ``calibration=`` is that same
computation now. The conclusion (the data-free rule is constant r) is in ``benchmarks/EVAL.md``,
"Without real data".
"""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))
import tome_fx  # noqa: E402

OUT = ROOT / "benchmarks" / "results"


def plan_on(model, budget, inputs, strategy, real):
    """auto on random inputs compares shapes on them (calibration=); constant needs none."""
    if strategy == "auto":
        return tome_fx.optimize(model, flops_budget=budget, calibration=inputs)
    return tome_fx.optimize(model, flops_budget=budget, example_inputs=real, strategy=strategy)


def cifar():
    import cifar_vit as cv

    model = cv.load_model()
    x, y = cv.load_test(None)
    cal_u8, _ = cv.load_train_uint8(cv.calibration_indices(256))
    real = (cv.normalize(cal_u8),)
    rand = (torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
    rand2 = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
    orig = cv.predict(model, x, 500)
    rows = []
    for b in (0.9, 0.8, 0.7, 0.6, 0.5):
        for name, cal, strat in [("auto-random256", rand, "auto"), ("auto-random2", rand2, "auto"),
                                 ("auto-real", real, "auto"), ("constant", real, "constant")]:
            m = plan_on(model, b, cal, strat, real)
            p = cv.predict(m, x, 500)
            row = dict(b=b, name=name, r=list(m.tome.r), ratio=m.tome.ratio,
                       acc=float((p == y).float().mean()) * 100,
                       agree=float((p == orig).float().mean()) * 100)
            print(row, flush=True)
            rows.append(row)
    return rows


def minilm():
    import eval_minilm as em

    model, tok = em.load()
    texts = em.sentences(300)
    rows = []
    for by_length in (False, True):
        enc, back = em.batches(tok, texts, 32, by_length)
        ref = em.embed(model, enc, back)
        ex = enc[len(enc) // 2]
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, tok.vocab_size, ex["input_ids"].shape, generator=g)
        rnd = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        for b in (0.9, 0.75, 0.6, 0.5):
            for name, cal, strat in [("auto-random", rnd, "auto"), ("auto-real", ex, "auto"),
                                     ("constant", ex, "constant"), ("decreasing", ex, "decreasing")]:
                m = plan_on(model, b, cal, strat, ex)
                c = em.compare(ref, em.embed(m, enc, back))
                row = dict(by_length=by_length, b=b, name=name, r=list(m.tome.r),
                           ratio=m.tome.ratio, **c)
                print(row, flush=True)
                rows.append(row)
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    which = sys.argv[1]
    rows = {"cifar": cifar, "minilm": minilm}[which]()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"data_free_{which}.json").write_text(json.dumps(rows, indent=1))
