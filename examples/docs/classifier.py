import timm, torch, tome_fx

# Any classifier; a small ViT with random weights here (nothing downloaded).
model = timm.create_model("vit_tiny_patch16_224", img_size=96, depth=4).eval()
x = torch.randn(2, 3, 96, 96)

fast = tome_fx.optimize(model, flops_budget=0.5, example_inputs=x)  # or r=8: tokens per block
print(fast.tome)                     # per block: tokens in -> out, r, FLOPs; skipped sites
with torch.no_grad():
    logits = fast(x)                 # same inputs and outputs as the model
