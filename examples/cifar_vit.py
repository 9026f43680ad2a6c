"""The trained CIFAR-10 ViT of ../shared/models (architecture, weights, data), for examples and tests.

The weights and data live in ``../shared`` relative to the repository root and are read from
there, never copied. ``SHARED`` can be overridden with the ``TOME_FX_SHARED`` environment variable.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TOME_FX_SHARED", ROOT.parent / "shared"))
WEIGHTS = SHARED / "models" / "vit_cifar10.pth"
TEST = SHARED / "data" / "cifar10_test.npz"
TRAIN = SHARED / "data" / "cifar10_train_jpeg.npz"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)


class CifarViT(nn.Module):
    """The architecture of ../shared/models/vit_cifar10.pth (see its README): post-norm
    nn.TransformerEncoder, class token, head on the class token."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, 128, kernel_size=4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 128))
        self.pos_embed = nn.Parameter(torch.zeros(1, 65, 128))
        self.dropout = nn.Dropout(0.1)
        layer = nn.TransformerEncoderLayer(128, 8, 256, dropout=0.1, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)
        self.mlp_head = nn.Sequential(nn.LayerNorm(128), nn.Linear(128, 10))

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.dropout(x + self.pos_embed)
        return self.mlp_head(self.transformer(x)[:, 0])


def available() -> bool:
    return WEIGHTS.exists() and TEST.exists() and TRAIN.exists()


def missing_reason() -> str:
    gone = [str(p) for p in (WEIGHTS, TEST, TRAIN) if not p.exists()]
    return "real-weight material absent: " + ", ".join(gone)


def load_model() -> CifarViT:
    model = CifarViT()
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W]."""
    x = images_uint8.permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def load_test(limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised images [N, 3, 32, 32], labels [N]) from the test set."""
    data = np.load(TEST)
    images, labels = data["images"], data["labels"]
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return normalize(torch.from_numpy(np.ascontiguousarray(images))), torch.from_numpy(labels).long()


def load_train_uint8(indices=None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode training JPEGs once (PIL) -> (uint8 [N, 32, 32, 3], labels [N]); cached by caller."""
    from PIL import Image

    data = np.load(TRAIN)
    raw, offsets, labels = data["jpeg_bytes"], data["offsets"], data["labels"]
    if indices is None:
        indices = np.arange(len(labels))
    indices = np.asarray(indices)
    out = np.empty((len(indices), 32, 32, 3), dtype=np.uint8)
    for k, i in enumerate(tqdm(indices, "decode train JPEGs", disable=not progress, leave=False)):
        blob = raw[offsets[i]:offsets[i + 1]].tobytes()
        out[k] = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    return torch.from_numpy(out), torch.from_numpy(labels[indices]).long()


def calibration_indices(n: int, seed: int = 0) -> np.ndarray:
    """A fixed random subset of the training set, used as calibration inputs (never test data)."""
    return np.random.default_rng(seed).choice(50000, size=n, replace=False)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch: int = 500, bar=None) -> torch.Tensor:
    """Top-1 predictions over ``images`` in batches."""
    preds = []
    for i in range(0, len(images), batch):
        preds.append(model(images[i:i + batch]).argmax(-1))
        if bar:
            bar.update(1)
    return torch.cat(preds)


def write_material(out: Path, calib: int = 256, limit: int | None = None) -> dict:
    """What a user of ``tome-fx sweep`` would have: the model as a ``.pt2`` archive
    (``torch.export.save``, dynamic batch), the test images as a folder of PNGs in class
    sub-folders, and ``calib`` training images (``calibration_indices``) as a flat folder.
    Returns the paths. PNG is lossless: the folders hold exactly the arrays of ``../shared``."""
    from PIL import Image

    out = Path(out)
    data = np.load(TEST)
    classes = [str(c) for c in data["classes"]]
    images, labels = data["images"][:limit], data["labels"][:limit]
    for c in classes:
        (out / "test" / c).mkdir(parents=True, exist_ok=True)
    for i, (img, lab) in enumerate(zip(tqdm(images, "write test PNGs", leave=False), labels)):
        Image.fromarray(img).save(out / "test" / classes[lab] / f"{i:05d}.png")
    (out / "calib").mkdir(parents=True, exist_ok=True)
    cal, _ = load_train_uint8(calibration_indices(calib))
    for i, img in enumerate(cal.numpy()):
        Image.fromarray(img).save(out / "calib" / f"{i:04d}.png")
    x = torch.zeros(2, 3, 32, 32)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(load_model(), (x,), dynamic_shapes=({0: batch},))
    torch.export.save(program, out / "vit_cifar10.pt2")
    return {"model": out / "vit_cifar10.pt2", "test": out / "test", "calib": out / "calib"}


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="write the CIFAR-10 ViT as .pt2 and the images as "
                                            "folders, for tome-fx sweep")
    p.add_argument("out", type=Path)
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="first N test images (default all)")
    a = p.parse_args()
    print(write_material(a.out, a.calib, a.limit))
