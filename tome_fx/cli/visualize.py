"""Draw ToMe merge groups over an image, as the paper's figures do.

The PNG has two panels of the model's input size (times ``scale``): left the image with the
group boundaries drawn on it, right each group filled with its own colour (distinct per group)
with the same boundaries. Patch tokens are laid out row-major on the patch grid after the
protected prefix tokens, as ViT patch embeddings produce them.
"""
from __future__ import annotations

import colorsys
import math

import numpy as np
import torch

from .sources import SourceError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BOUNDARY = (255, 255, 255)


def normalization(model) -> tuple[tuple, tuple]:
    """(mean, std) the model expects: timm's pretrained_cfg, else ImageNet's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean and std:
        return tuple(mean), tuple(std)
    return IMAGENET_MEAN, IMAGENET_STD


def load_image(path: str, size: tuple[int, int, int], mean, std) -> tuple[torch.Tensor, np.ndarray]:
    """Image resized to ``size`` = (C, H, W): (normalised [1, C, H, W] tensor, uint8 RGB [H, W, 3])."""
    from PIL import Image, UnidentifiedImageError

    if len(size) != 3:
        raise ValueError(f"visualize needs an image model (input C,H,W), the input size is "
                         f"{','.join(map(str, size))}")
    c, h, w = size
    if c not in (1, 3):
        raise ValueError(f"visualize needs a 1- or 3-channel model input, got {c} channels")
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise SourceError(f"no such image file: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise SourceError(f"cannot read image {path}: {exc}") from None
    rgb = img.convert("RGB").resize((w, h), Image.BICUBIC)
    arr = np.asarray(rgb, dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).float().div(255).permute(2, 0, 1)
    if c == 1:
        x = x.mean(0, keepdim=True)
    m = torch.tensor(mean[:c] if c == 3 else [sum(mean) / 3]).view(c, 1, 1)
    s = torch.tensor(std[:c] if c == 3 else [sum(std) / 3]).view(c, 1, 1)
    return ((x - m) / s)[None], arr


def patch_grid(patches: int, height: int, width: int, model=None) -> tuple[int, int]:
    """(rows, cols) of the patch grid: the model's patch_embed.grid_size, else from the aspect."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if isinstance(grid, (tuple, list)) and len(grid) == 2 and grid[0] * grid[1] == patches:
        return int(grid[0]), int(grid[1])
    side = math.sqrt(height * width / patches) if patches else 0
    if side:
        rows, cols = round(height / side), round(width / side)
        if rows * cols == patches:
            return rows, cols
    raise ValueError(f"cannot lay {patches} patch tokens out on a grid for a {height}x{width} input")


def group_ids(sources: torch.Tensor, prefix: int) -> torch.Tensor:
    """For one image's source map [N, N0]: the token (group) holding each patch, [N0 - prefix]."""
    patches = sources[:, prefix:]
    if not torch.all(patches.sum(0) == 1):
        raise RuntimeError("source map is not a partition of the patches")
    return patches.argmax(0)


def palette(k: int) -> list[tuple[int, int, int]]:
    """``k`` distinct, saturated RGB colours (golden-ratio hues, a few brightness levels)."""
    colours, seen, i = [], {BOUNDARY}, 0
    while len(colours) < k:
        hue = (i * 0.618033988749895) % 1.0
        sat = (0.85, 0.6, 0.45)[(i // 7) % 3]
        val = (0.95, 0.75, 0.55)[(i // 21) % 3]
        rgb = tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(hue, sat, val))
        if rgb not in seen:
            seen.add(rgb)
            colours.append(rgb)
        i += 1
    return colours


def render(image: np.ndarray, groups: np.ndarray, scale: int = 2):
    """PIL image [image with boundaries | groups in colour], each panel ``scale`` x the input."""
    from PIL import Image

    h, w = image.shape[:2]
    rows, cols = groups.shape
    hs, ws = h * scale, w * scale
    ys = np.arange(hs) * rows // hs  # patch row of each output pixel
    xs = np.arange(ws) * cols // ws
    pix = groups[ys[:, None], xs[None, :]]
    edge = np.zeros((hs, ws), dtype=bool)
    edge[:, :-1] |= pix[:, :-1] != pix[:, 1:]
    edge[:-1, :] |= pix[:-1, :] != pix[1:, :]
    _, dense = np.unique(pix, return_inverse=True)
    dense = dense.reshape(pix.shape)
    colours = np.array(palette(int(dense.max()) + 1), dtype=np.uint8)
    right = colours[dense]
    left = np.asarray(Image.fromarray(image).resize((ws, hs), Image.NEAREST)).copy()
    left[edge] = BOUNDARY
    right[edge] = BOUNDARY
    return Image.fromarray(np.concatenate([left, right], axis=1))
