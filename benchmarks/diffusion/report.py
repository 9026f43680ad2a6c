"""The quality benchmark's report: metrics with bootstrap intervals, the table, the pictures."""
from __future__ import annotations

import json
import platform

import numpy as np
import torch
from scipy import stats

from rows import rows

BOOT = dict(n_resamples=1000, confidence_level=0.95, method="percentile")


def vit_outputs(images_uint8: torch.Tensor, vit) -> tuple[np.ndarray, np.ndarray]:
    """Pre-head features (the class token into ``mlp_head``) and predicted classes."""
    import cifar_vit
    return vit_normalized((cifar_vit.normalize(images_uint8[b:b + 500].permute(0, 2, 3, 1))
                           for b in range(0, len(images_uint8), 500)), vit)


def vit_normalized(batches, vit) -> tuple[np.ndarray, np.ndarray]:
    """``vit_outputs`` of batches already normalised as the ViT expects."""
    feats, preds = [], []
    hook = vit.mlp_head.register_forward_hook(lambda m, a, out: feats.append(a[0]))
    with torch.no_grad():
        for x in batches:
            preds.append(vit(x).argmax(-1))
    hook.remove()
    return torch.cat(feats).double().numpy(), torch.cat(preds).numpy()


def psd_root(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet(a: np.ndarray, mu: np.ndarray, sigma: np.ndarray, root: np.ndarray | None = None) -> float:
    """FID's formula: |mu_a - mu|^2 + tr(S_a + S - 2 (S_a S)^(1/2)). The trace of the root from
    the eigenvalues of S^(1/2) S_a S^(1/2) (similar to S_a S, symmetric): as
    ``scipy.linalg.sqrtm`` to rounding and ~100x faster, which the bootstrap needs."""
    mu_a, s_a = a.mean(0), np.cov(a, rowvar=False)
    root = psd_root(sigma) if root is None else root
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s_a @ root), 0, None)).sum()
    return float(((mu_a - mu) ** 2).sum() + np.trace(s_a) + np.trace(sigma) - 2 * cross)


def interval(values: np.ndarray, statistic=np.mean, **kw) -> dict:
    """The statistic and its 95% percentile-bootstrap interval over images."""
    values = np.asarray(values)
    ci = stats.bootstrap((values,), statistic, random_state=0, vectorized=False, **{**BOOT, **kw})
    lo, hi = ci.confidence_interval
    return {"value": float(statistic(values)), "lo": float(lo), "hi": float(hi)}


def paired(images: torch.Tensor, reference: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    from torchmetrics.functional.image import (peak_signal_noise_ratio,
                                               structural_similarity_index_measure)
    x, y = images.float() / 255, reference.float() / 255
    psnr = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")
    return psnr.clamp(max=100).numpy(), ssim.numpy()  # identical images: 100 dB, not inf


def report(args):
    import cifar_vit
    vit = cifar_vit.load_model()
    test_images, _ = cifar_vit.load_test()
    ref, _ = vit_normalized(test_images.split(500), vit)
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    root = psd_root(sigma)
    # the floor at this sample size: as many real training images as samples per row
    train, _ = cifar_vit.load_train_uint8(np.random.default_rng(0).choice(50000, args.images, replace=False))
    floor_feats, _ = vit_outputs(train.permute(0, 3, 1, 2), vit)

    runs = {r.name: torch.load(args.work / f"{r.slug}.pt") for r in rows()
            if (args.work / f"{r.slug}.pt").exists()}
    base = runs["unmerged"]
    outputs = {name: vit_outputs(run["images"], vit) for name, run in runs.items()}
    base_pred = outputs["unmerged"][1]
    out = []
    for row in rows():
        if row.name not in runs:
            continue
        run = runs[row.name]
        feats, pred = outputs[row.name]
        labels = run["labels"].numpy()
        n = len(labels)
        fd = lambda idx: frechet(feats[idx.astype(int)], mu, sigma, root)  # noqa: E731
        entry = {"row": row.name, "family": row.family, "kind": row.kind, "options": row.options,
                 "images": n, "flop_ratio": run["flops"] / base["flops"],
                 "cpu_s_per_image": run["cpu_s"] / n,
                 "class_accuracy": interval((pred == labels).astype(float)),
                 # resampled images repeat: the distance is biased up on a resample, so the
                 # basic (reverse percentile) interval, which subtracts that shift
                 "frechet": interval(np.arange(n), fd, n_resamples=200, method="basic")}
        if row.name != "unmerged":
            psnr, ssim = paired(run["images"], base["images"])
            entry.update(psnr=interval(psnr), ssim=interval(ssim),
                         same_class=interval((pred == base_pred).astype(float)))
        out.append(entry)
        print(row.name, json.dumps({k: v for k, v in entry.items() if k != "options"}), flush=True)
    result = {"benchmark": "benchmarks/diffusion/quality.py", "steps": base["steps"],
              "guidance": base["guidance"], "images_per_row": len(base["labels"]),
              "sampler": "DDIM eta 0", "threads": base["threads"], "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__,
              "frechet_real_floor": frechet(floor_feats, mu, sigma),
              "frechet_note": "Frechet distance in the pre-head features of the shared CIFAR-10 ViT "
                              "(128-D), to the 10,000 test images; not Inception FID",
              "rows": out}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "diffusion_quality.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "diffusion_quality.md").write_text(table(result) + "\n\n" + best(result) + "\n")
    grid(runs, args.out / "diffusion_quality_grid.png")
    plot(result, args.out / "diffusion_quality.png")
    print(table(result))
    print(best(result))


def _fmt(m: dict | None, digits: int) -> str:
    if m is None:
        return "-"
    return f"{m['value']:.{digits}f} [{m['lo']:.{digits}f}, {m['hi']:.{digits}f}]"


def table(result: dict) -> str:
    from tabulate import tabulate
    body = [[e["row"], f"{e['flop_ratio']:.3f}", f"{e['cpu_s_per_image']:.3f}",
             _fmt(e.get("psnr"), 2), _fmt(e.get("ssim"), 3), _fmt(e.get("same_class"), 3),
             _fmt(e["class_accuracy"], 3), _fmt(e["frechet"], 2)] for e in result["rows"]]
    head = ["row", "FLOP ratio", "CPU s / image", "PSNR (dB)", "SSIM", "same class",
            "class accuracy", "Frechet (ViT)"]
    return tabulate(body, head, tablefmt="github")


def best(result: dict) -> str:
    """At each matched FLOP budget: the row with the best paired PSNR and the one with the
    lowest Frechet distance, each with its interval."""
    lines = []
    for b in sorted({e["options"].get("flops_budget") for e in result["rows"]} - {None}, reverse=True):
        rows_b = [e for e in result["rows"] if e["options"].get("flops_budget") == b]
        top = max(rows_b, key=lambda e: e["psnr"]["value"])
        low = min(rows_b, key=lambda e: e["frechet"]["value"])
        lines.append(f"- budget {b:g}: best PSNR {top['row']} ({_fmt(top['psnr'], 2)} dB, FLOP "
                     f"ratio {top['flop_ratio']:.3f}); lowest Frechet {low['row']} "
                     f"({_fmt(low['frechet'], 2)}, FLOP ratio {low['flop_ratio']:.3f})")
    return "\n".join(lines)


def grid(runs: dict, path, columns: int = 10):
    """Rows = methods, columns = the first ``columns`` images (one per class, same noise)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid
    names = [r.name for r in rows() if r.name in runs]
    fig, axes = plt.subplots(len(names), 1, figsize=(columns * 0.55 + 1.8, len(names) * 0.6))
    for ax, name in zip(np.atleast_1d(axes), names):
        strip = make_grid(runs[name]["images"][:columns], nrow=columns, padding=1, pad_value=255)
        ax.imshow(strip.permute(1, 2, 0).numpy())
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=0.25, right=0.99, top=0.99, bottom=0.01, hspace=0.05)
    fig.savefig(path, dpi=100)  # 32x32 images: more pixels only make the file larger
    plt.close(fig)


def plot(result: dict, path):
    """PSNR and the Frechet distance against the counted FLOP ratio, one line per family."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    families = {}
    for e in result["rows"]:
        families.setdefault(e["family"], []).append(e)
    for i, (family, entries) in enumerate(families.items()):
        entries = sorted(entries, key=lambda e: e["flop_ratio"])
        x = [e["flop_ratio"] for e in entries]
        style = dict(color=f"C{i % 10}", marker="s" if "authors" in family else "o",
                     ms=4, capsize=2, label=family)  # one colour per family in both panels
        for ax, key in ((a, "psnr"), (b, "frechet")):
            if key not in entries[0]:  # the unmerged row has no paired metric
                continue
            y = np.array([e[key]["value"] for e in entries])
            err = np.array([[max(0.0, e[key]["value"] - e[key]["lo"]),
                             max(0.0, e[key]["hi"] - e[key]["value"])] for e in entries]).T
            ax.errorbar(x, y, yerr=err, **style)
    base = next(e["frechet"] for e in result["rows"] if "psnr" not in e)
    b.axhspan(base["lo"], base["hi"], color="C0", alpha=0.12, lw=0,
              label="unmerged, 95% interval")
    b.set_title(f"real-image floor ({result['images_per_row']} training images): "
                f"{result['frechet_real_floor']:.2f}", fontsize=8)
    a.set(xlabel="FLOP ratio (counted)", ylabel="PSNR to unmerged (dB)")
    b.set(xlabel="FLOP ratio (counted)", ylabel="Frechet distance, ViT features (lower is better)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.invert_xaxis()
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
