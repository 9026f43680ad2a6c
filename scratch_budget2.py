import sys; sys.path.insert(0, "tests")
import torch, tome_fx
from mask_models import MiniBert, bert_inputs
for lengths in [(24, 23, 3), (24, 22, 2), (21, 4, 5)]:
    ids, mask = bert_inputs(lengths=lengths)
    m = MiniBert(head="mean").eval()
    try:
        f = tome_fx.optimize(m, flops_budget=0.5, example_inputs=(ids, mask))
        print(f.tome.r, f.tome.ratio)
        f2 = tome_fx.optimize(m, r=20, example_inputs=(ids, mask)); print(f2.tome.r)
    except Exception as e:
        print("ERR", type(e).__name__, e)
