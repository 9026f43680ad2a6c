import sys; sys.path.insert(0, "tests")
import torch, tome_fx
from test_masks import FixedMask, CausalPadded, bert_inputs
ids, mask = bert_inputs()
print(tome_fx.explain(FixedMask().eval(), example_inputs=(ids, mask)))
f = tome_fx.optimize(CausalPadded().eval(), r=4, example_inputs=(ids, mask)); print(f.tome)
