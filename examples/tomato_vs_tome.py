"""ToMato vs ToMe top-1 accuracy at equal FLOPs on the real-weight CIFAR-10 ViT (../shared).

    python examples/tomato_vs_tome.py [--limit N] [--budgets 0.8 0.65 0.5] [--out FILE]

Writes a Markdown table (stdout, and ``--out`` if given). FLOPs: tome_fx's cost model (2 per
multiply-add, as torch's FlopCounterMode), as a ratio of the unmerged model's. ToMe and ToMato
budget mode meet the ratio exactly for every image; ToMato threshold mode gives each image its
own token count, so its row reports the mean ratio over the images. ToMe's schedule search
("auto") calibrates on 64 *training* images, never on the test set.

Reusable pieces (for other evaluations): ``load_model()``, ``test_set(limit)``,
``calibration_images()``, ``accuracy(model, x, y)``.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere: this checkout's tome_fx first
sys.path.insert(0, str(ROOT / "tests"))

import tome_fx  # noqa: E402
from tome_fx.cost.tomato import flops_curve  # noqa: E402

SHARED = ROOT.parent / "shared"
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)


def load_model():
    from test_cost import CifarViT  # the architecture of vit_cifar10.pth

    model = CifarViT()
    state = torch.load(SHARED / "models" / "vit_cifar10.pth", map_location="cpu")
    model.load_state_dict(state, strict=True)
    return model.eval()


def _normalise(images_hwc: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images_hwc).permute(0, 3, 1, 2).float() / 255
    return (x - MEAN) / STD


def test_set(limit: int | None = None):
    data = np.load(SHARED / "data" / "cifar10_test.npz")
    images, labels = data["images"], data["labels"]
    if limit:
        images, labels = images[:limit], labels[:limit]
    return _normalise(images), torch.from_numpy(labels)


def calibration_images(n: int = 64) -> torch.Tensor:
    from PIL import Image

    data = np.load(SHARED / "data" / "cifar10_train_jpeg.npz")
    raw, off = data["jpeg_bytes"], data["offsets"]
    imgs = [np.asarray(Image.open(io.BytesIO(raw[off[i]:off[i + 1]].tobytes())).convert("RGB"))
            for i in range(n)]
    return _normalise(np.stack(imgs))


class _TokenCounter(fx.Interpreter):
    """Runs a ToMato module and keeps, per image, the tokens left after the merge (size > 0)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.counts = []

    def run_node(self, n):
        out = super().run_node(n)
        if n.meta.get("tome", {}).get("role") == "size":
            self.counts.append((out[..., 0] > 0).sum(dim=1))
        return out


@torch.no_grad()
def accuracy(model, x, y, batch: int = 500, count_tokens: bool = False):
    """Top-1 accuracy; with ``count_tokens`` also the per-image token counts after the merge."""
    correct, counts = 0, []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        if count_tokens:
            run = _TokenCounter(model)
            out = run.run(xb)
            counts.append(run.counts[0] if run.counts else torch.full((len(xb),), 65))
        else:
            out = model(xb)
        correct += (out.argmax(dim=-1) == y[i:i + batch]).sum().item()
    acc = correct / len(x)
    return (acc, torch.cat(counts)) if count_tokens else acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="first N test images (default all)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.65, 0.5])
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.018, 0.022, 0.026],
                    help="ToMato attention-probability thresholds (threshold-mode rows)")
    ap.add_argument("--key-thresholds", type=float, nargs="*", default=[0.85, 0.92],
                    help="ToMato key-cosine thresholds (threshold-mode rows)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--skip-original", action="store_true",
                    help="do not re-measure the unmerged model (71.72%% on the full set)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = load_model()
    x, y = test_set(args.limit)
    calib = calibration_images()
    rows = []

    def add(method, setting, ratio, acc, tokens, secs):
        rows.append((method, setting, ratio, acc, tokens, secs))
        print(f"{method:22s} {setting:28s} ratio {ratio:.4f} top-1 {100 * acc:.2f}% "
              f"tokens after merge {tokens}  ({secs:.0f} s)", flush=True)

    if not args.skip_original:
        t = time.time()
        add("original", "-", 1.0, accuracy(model, x, y), "65", time.time() - t)
    for b in args.budgets:
        t = time.time()
        fast = tome_fx.optimize(model, flops_budget=b, example_inputs=(calib,))
        add("ToMe", f"flops_budget={b} r={fast.tome.r}", fast.tome.ratio, accuracy(fast, x, y),
            "->".join(str(r.tokens_out) for r in fast.tome.blocks), time.time() - t)
        for sim in ("attention", "keys"):
            t = time.time()
            fast = tome_fx.optimize(model, method="tomato", flops_budget=b, similarity=sim,
                                    example_inputs=(calib,))
            add(f"ToMato ({sim})", f"flops_budget={b}", fast.tome.ratio, accuracy(fast, x, y),
                str(fast.tome.blocks[0].tokens_out), time.time() - t)
    for sim, thresholds in (("attention", args.thresholds), ("keys", args.key_thresholds)):
        if not thresholds:
            continue
        curve, orig = flops_curve(model, (calib[:1],), similarity=sim)
        for thr in thresholds:
            t = time.time()
            fast = tome_fx.optimize(model, method="tomato", sim_threshold=thr, similarity=sim,
                                    example_inputs=(calib,))
            acc, counts = accuracy(fast, x, y, count_tokens=True)
            ratio = float(np.mean([curve(int(c)) for c in counts.tolist()])) / orig
            add(f"ToMato ({sim})", f"sim_threshold={thr}", ratio, acc,
                f"mean {counts.float().mean():.1f} (min {int(counts.min())}, max "
                f"{int(counts.max())})", time.time() - t)
    lines = [f"Top-1 on the CIFAR-10 test set ({len(x)} images), real-weight ViT "
             "(../shared/models/vit_cifar10.pth), FLOP ratio from the cost model.", "",
             "| method | setting | FLOP ratio | top-1 | tokens after merge (block 0 / per block) |",
             "|---|---|---|---|---|"]
    for method, setting, ratio, acc, tokens, _ in rows:
        lines.append(f"| {method} | {setting} | {ratio:.4f} | {100 * acc:.2f}% | {tokens} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
