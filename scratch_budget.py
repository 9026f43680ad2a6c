import sys; sys.path.insert(0, "tests")
import torch, tome_fx
from mask_models import MiniBert, bert_inputs
ids, mask = bert_inputs()
for head in ["pooler", "mean"]:
    m = MiniBert(head=head).eval()
    try:
        f = tome_fx.optimize(m, flops_budget=0.6, example_inputs=(ids, mask))
        print(f.tome)
    except Exception as e:
        print("ERR", type(e).__name__, e)
