import torch, tome_fx
from transformers import BertConfig, BertForSequenceClassification

config = BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)
model = BertForSequenceClassification(config).eval()   # random weights, from a config
ids = torch.randint(1000, (2, 128))
mask = torch.ones(2, 128, dtype=torch.long)
mask[1, 90:] = 0                                        # the second sentence is padded

# fx cannot trace transformers v5 models: tome_fx captures them with torch.export instead.
fast = tome_fx.optimize(model, flops_budget=0.5,
                        example_inputs={"input_ids": ids, "attention_mask": mask})
print(fast.tome)                                        # the pooler's token 0 is protected
logits = fast(input_ids=ids, attention_mask=mask).logits  # any batch, any length up to 512
