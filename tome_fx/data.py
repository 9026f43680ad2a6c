"""Real inputs: image folders, ``.npz`` arrays and text files, preprocessed as the model's own
config says, for calibration (``optimize(calibration=...)``) and evaluation (``tome_fx.sweep``).

    data = tome_fx.load_data("cifar_test/", model)          # class sub-folders give labels
    calib, rest = data.split(256)                           # seeded: 256 to plan, the rest to score

Preprocessing comes from the model: timm ``resolve_data_config`` + ``create_transform``, a
HuggingFace directory's image processor or tokenizer. A source without a config (a ``.pt2``, a
pickled module) needs ``mean``, ``std`` (and ``input_size`` unless it records one). Every
problem with the data is a one-line ``DataError``.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .errors import TomeError, one_line

TEXT_SUFFIXES = (".txt",)
MAX_TEXT_TOKENS = 128  # longest tokenised sentence; longer ones are truncated


class DataError(TomeError, ValueError):
    """Data that cannot be used with this model (missing, unreadable, wrong shape or kind)."""


@dataclass(frozen=True)
class Data:
    """Inputs (preprocessed images, or sentences and their tokenizer) and optional labels."""

    source: str
    kind: str  # "images" or "text"
    images: torch.Tensor | None = None  # [N, C, H, W], preprocessed
    texts: tuple[str, ...] | None = None
    labels: torch.Tensor | None = None  # [N] int64
    classes: tuple[str, ...] | None = None
    tokenizer: Callable | None = None  # list[str] -> dict of [B, L] tensors

    @classmethod
    def from_tensors(cls, images: torch.Tensor, labels: torch.Tensor | None = None,
                     source: str = "tensors") -> "Data":
        """Preprocessed model inputs ``[N, ...]`` (and labels ``[N]``) already in memory."""
        if labels is not None and len(labels) != len(images):
            raise DataError(f"{len(labels)} labels for {len(images)} inputs")
        return cls(source, "images", images=images,
                   labels=None if labels is None else torch.as_tensor(labels).long())

    def __len__(self) -> int:
        return len(self.images) if self.kind == "images" else len(self.texts)

    def subset(self, index) -> "Data":
        index = torch.as_tensor(index, dtype=torch.long)
        return dataclasses.replace(
            self, images=None if self.images is None else self.images[index],
            texts=None if self.texts is None else tuple(self.texts[i] for i in index.tolist()),
            labels=None if self.labels is None else self.labels[index])

    def split(self, n: int, seed: int = 0) -> tuple["Data", "Data"]:
        """(a seeded random ``n`` items, the rest in their order): calibration and evaluation."""
        picked, rest = split_index(len(self), n, seed, self.source)
        return self.subset(picked), self.subset(rest)

    def inputs(self, start: int = 0, stop: int | None = None):
        """Model inputs of items ``start:stop``: ``(images,)`` or the tokenizer's dict (padded
        to the longest sentence of the slice)."""
        if self.kind == "images":
            return (self.images[start:stop],)
        return self.tokenizer(list(self.texts[start:stop]))

    def batches(self, size: int) -> Iterator[tuple[Any, slice]]:
        """(model inputs, the slice of items they hold) per batch of ``size``, in order."""
        for i in range(0, len(self), size):
            yield self.inputs(i, i + size), slice(i, min(i + size, len(self)))


def split_index(total: int, n: int, seed: int = 0, source: str = "the data"):
    """(``n`` seeded random positions of ``total``, sorted; the others): ``Data.split``."""
    if not 0 < n < total:
        raise DataError(f"cannot take {n} calibration inputs from {source}: it has "
                        f"{total} and some must be left to evaluate")
    picked = torch.from_numpy(np.random.default_rng(seed).permutation(total)[:n])
    rest = torch.ones(total, dtype=torch.bool)
    rest[picked] = False
    return picked.sort().values, rest.nonzero().flatten()


@dataclass(frozen=True)
class Listing:
    """The items of a data path, found but not decoded (``open_data``): ``len``, ``split`` and
    ``subset`` as ``Data`` has them, ``load()`` decodes the items kept (a process of a
    distributed sweep decodes only its share)."""

    source: str
    kind: str
    items: tuple  # per item what ``decode`` takes (an image file, an array), or a sentence
    decode: Callable | None = None  # item -> preprocessed [C, H, W] tensor
    labels: torch.Tensor | None = None
    classes: tuple[str, ...] | None = None
    tokenizer: Callable | None = None
    bar: Callable | None = None

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, index) -> "Listing":
        index = torch.as_tensor(index, dtype=torch.long)
        return dataclasses.replace(self, items=tuple(self.items[i] for i in index.tolist()),
                                   labels=None if self.labels is None else self.labels[index])

    def split(self, n: int, seed: int = 0) -> tuple["Listing", "Listing"]:
        picked, rest = split_index(len(self), n, seed, self.source)
        return self.subset(picked), self.subset(rest)

    def load(self) -> Data:
        if self.kind == "text":
            return Data(self.source, "text", texts=self.items, tokenizer=self.tokenizer)
        progress = self.bar(len(self), "load images") if self.bar else None
        out = []
        for item in self.items:
            out.append(self.decode(item))
            if progress is not None:
                progress.update()
        if progress is not None:
            progress.close()
        return Data(self.source, "images", images=torch.stack(out), labels=self.labels,
                    classes=self.classes)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

def load_data(path, model=None, *, mean=None, std=None, input_size=None, model_dir=None,
              tokenizer=None, limit: int | None = None, bar: Callable | None = None) -> Data:
    """Read ``path``: a folder of images (class sub-folders give labels, as torchvision's
    ``ImageFolder``; a flat folder has none), a ``.npz`` with ``images`` (uint8 ``[N, H, W, C]``)
    and optional ``labels``, or a ``.txt`` file of one sentence per line for a HuggingFace text
    model (tokenised with ``tokenizer``, a transformers tokenizer, or the one in ``model_dir``).
    ``mean``/``std``/``input_size`` (C, H, W) override or stand in for the model's config. ``limit`` keeps the first N items; ``bar(total, desc)``
    makes a progress bar (tqdm) for decoding."""
    return open_data(path, model, mean=mean, std=std, input_size=input_size, model_dir=model_dir,
                     tokenizer=tokenizer, limit=limit, bar=bar).load()


def open_data(path, model=None, *, mean=None, std=None, input_size=None, model_dir=None,
              tokenizer=None, limit: int | None = None, bar: Callable | None = None) -> Listing:
    """``load_data``'s ``Listing``: the items found, their labels, how to decode them; the
    same checks and errors, except those of an item's contents (raised when it is decoded)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"no such data file or folder: {path}")
    text = os.path.isfile(path) and path.endswith(TEXT_SUFFIXES)
    wants_text = takes_text(model)
    if text and not wants_text:
        raise DataError(f"{path} is a text file (one sentence per line), but the model takes "
                        f"images: give it images (a folder or a .npz)")
    if not text and wants_text:
        raise DataError(f"the model takes text (a HuggingFace text model): give it a .txt file "
                        f"of one sentence per line, not {path}")
    if text:
        return _text(path, tokenizer if tokenizer is not None else model_dir, limit)
    transform, channels = image_transform(model, mean=mean, std=std, input_size=input_size,
                                          model_dir=model_dir)
    if os.path.isdir(path):
        items, labels, classes = _folder(path)
        decode = lambda file: transform(_open(file, channels))  # noqa: E731
    elif path.endswith(".npz"):
        items, labels, classes = _npz(path, channels)
        decode = lambda array: transform(_picture(array))  # noqa: E731
    else:
        raise DataError(f"unsupported data {path}: expected a folder of images, a .npz with "
                        f"'images', or a .txt file of sentences")
    labels = None if labels is None else torch.as_tensor(labels[:limit], dtype=torch.long)
    return Listing(path, "images", tuple(items[:limit]), decode, labels, classes, bar=bar)


def takes_text(model) -> bool:
    """A HuggingFace text model: a vocabulary and no image size in its config."""
    config = getattr(model, "config", None)
    return (getattr(config, "vocab_size", None) is not None
            and getattr(config, "image_size", None) is None)


def image_transform(model=None, *, mean=None, std=None, input_size=None,
                    model_dir=None) -> tuple[Callable, int]:
    """(PIL image -> [C, H, W] tensor, C) from the model's config, flags overriding it."""
    from timm.data import create_transform, resolve_data_config

    given = {k: tuple(v) for k, v in (("mean", mean), ("std", std), ("input_size", input_size))
             if v is not None}
    if "input_size" in given and len(given["input_size"]) != 3:
        raise DataError(f"images need an input size C,H,W, got {given['input_size']}")
    if model_dir is not None and os.path.exists(os.path.join(model_dir, "preprocessor_config.json")) \
            and not given:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(model_dir)
        channels = getattr(getattr(model, "config", None), "num_channels", 3)
        return (lambda img: processor(images=img, return_tensors="pt")["pixel_values"][0]), channels
    if _timm_config(model) is not None:
        built = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if "input_size" not in given and isinstance(built, (tuple, list)) and len(built) == 2:
            # built at another size than its pretrained config says (timm img_size=)
            given["input_size"] = (_timm_config(model)["input_size"][0], *built)
        size = given.get("input_size") or _timm_config(model).get("input_size", (3,))
        _check_channels(given, size[0])
        cfg = resolve_data_config(given, model=model)
        return create_transform(**cfg), cfg["input_size"][0]
    if "mean" not in given or "std" not in given or "input_size" not in given:
        missing = [f"--{k.replace('_', '-')}" for k in ("mean", "std", "input_size") if k not in given]
        raise DataError(f"the model carries no preprocessing config (no timm pretrained_cfg or "
                        f"HuggingFace image processor): say how its images were normalised with "
                        f"{', '.join(missing)}")
    _check_channels(given, given["input_size"][0])
    # resize to the input size, no crop: exactly ToTensor + Normalize at the model's size
    return (create_transform(input_size=given["input_size"], mean=given["mean"], std=given["std"],
                             crop_pct=1.0, interpolation="bicubic"), given["input_size"][0])


def _check_channels(given: dict, channels: int) -> None:
    for key in ("mean", "std"):
        values = given.get(key)
        if values is not None and len(values) not in (1, channels):
            raise DataError(f"--{key} has {len(values)} values ({key}=), but the model takes "
                            f"{channels}-channel images: give one value per channel")


def _timm_config(model):
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    return cfg if isinstance(cfg, dict) and "mean" in cfg else None


def _folder(path: str):
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    subdirs = sorted(e.name for e in os.scandir(path) if e.is_dir())
    if subdirs:
        try:
            classes, to_index = find_classes(path)
            found = make_dataset(path, to_index, extensions=IMG_EXTENSIONS, allow_empty=True)
        except (FileNotFoundError, OSError) as exc:
            raise DataError(f"cannot read image folder {path}: {one_line(exc)}") from exc
        files, labels = [f for f, _ in found], np.array([c for _, c in found], dtype=np.int64)
    else:
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.lower().endswith(IMG_EXTENSIONS))
        classes, labels = None, None
    if not files:
        raise DataError(f"no images in {path} (looked for {', '.join(IMG_EXTENSIONS)} files"
                        f"{' in its sub-folders' if subdirs else ''})")
    return files, labels, None if classes is None else tuple(classes)


def _open(file: str, channels: int):
    from PIL import Image

    try:
        with Image.open(file) as img:
            return img.convert("L" if channels == 1 else "RGB")
    except Exception as exc:
        raise DataError(f"cannot read image {file}: {one_line(exc)}") from exc


def _npz(path: str, channels: int):
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:
        raise DataError(f"cannot read {path} as a .npz archive: {one_line(exc)}") from exc
    images = arrays.get("images")
    if images is None:
        raise DataError(f"{path} has no 'images' array (it has: {', '.join(arrays) or 'none'})")
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) == 0:
        raise DataError(f"{path}: 'images' must be uint8 [N, H, W, C] (or [N, H, W]) with N > 0, "
                        f"got {images.dtype} {list(images.shape)}")
    have = 1 if images.ndim == 3 else images.shape[-1]
    if have != channels:
        raise DataError(f"{path}: images have {have} channel(s), the model takes {channels}")
    labels = arrays.get("labels")
    if labels is not None and (labels.ndim != 1 or len(labels) != len(images)
                               or not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"{path}: 'labels' must be {len(images)} integers (one per image), got "
                        f"{labels.dtype} {list(labels.shape)}")
    if labels is not None and len(labels) and labels.min() < 0:
        raise DataError(f"{path}: labels must be >= 0, got {int(labels.min())}")
    classes = arrays.get("classes")
    return images, labels, None if classes is None else tuple(str(c) for c in classes)


def _picture(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


def _text(path: str, tokenizer, limit) -> Listing:
    try:
        with open(path, encoding="utf-8") as f:
            texts = tuple(line.strip() for line in f if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} as UTF-8 text: {one_line(exc)}") from exc
    if not texts:
        raise DataError(f"no sentences in {path} (one per line expected)")
    if tokenizer is None:
        raise DataError("a text file needs the model's tokenizer: pass tokenizer= (or "
                        "model_dir=, a HuggingFace directory)")
    tok = tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tokenizer)
        except Exception as exc:
            raise DataError(f"cannot load the tokenizer of {tokenizer}: {one_line(exc)}") from exc

    def tokenize(batch: list[str]) -> dict:
        enc = tok(batch, padding="longest", truncation=True, max_length=MAX_TEXT_TOKENS,
                  return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    return Listing(path, "text", texts[:limit], tokenizer=tokenize)
