"""Model sources for the command line: ``timm:NAME``, ``torch.save`` files, ``.pt2`` archives,
HuggingFace model directories. Every failure is a one-line ``SourceError``."""
from __future__ import annotations

import io
import os
import pickle
import pickletools
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..capture import default_inputs
from ..capture.merged import refuse_merged
from ..errors import TomeError, one_line

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SEED = 0  # random weights and random inputs are drawn from this seed, so runs repeat


class SourceError(TomeError, ValueError):
    """A model source that cannot be loaded (missing, unreadable, refused)."""


@dataclass
class Source:
    name: str  # as the user wrote it
    model: nn.Module  # runs the original model
    target: Any  # what the tome_fx API is given: the module, or an ExportedProgram
    example_inputs: tuple | None = None  # recorded inputs (an ExportedProgram's)

    @property
    def model_class(self) -> str:
        return type(self.model).__name__


def parse_input_size(text: str | None) -> tuple[int, ...] | None:
    """``"3,224,224"`` -> (3, 224, 224): one sample's shape (no batch dimension).

    Images are C,H,W; a model over token vectors takes e.g. ``16,64`` (tokens, features).
    ValueError naming the text otherwise.
    """
    if text is None:
        return None
    try:
        dims = tuple(int(p) for p in text.split(","))
    except ValueError:
        dims = ()
    if not dims or min(dims) <= 0:
        raise ValueError(f"--input-size must be positive integers separated by commas, one "
                         f"sample's shape (e.g. 3,224,224 for C,H,W), got {text!r}")
    return dims


def load(source: str, *, trust_pickle: bool = False, checkpoint: str | None = None,
         input_size: tuple[int, ...] | None = None) -> Source:
    """Load a model source. ``input_size`` (C, H, W) sizes timm models built by name."""
    if checkpoint is not None and not source.startswith("timm:"):
        raise SourceError("--checkpoint needs a timm:NAME source (the architecture to load it into)")
    if source.startswith("timm:"):
        model = _timm(source[len("timm:"):], input_size)
        if checkpoint is not None:
            load_checkpoint(model, checkpoint, source)
        return Source(source, model, model)
    if not os.path.exists(source):
        raise SourceError(f"no such file or directory: {source} (sources: timm:NAME, a .pt/.pth "
                          f"file from torch.save, a .pt2 archive, a HuggingFace model directory)")
    if os.path.isdir(source):
        return _huggingface(source)
    if source.endswith(".pt2"):
        return _exported(source)
    if source.endswith(TORCH_SUFFIXES):
        model = _torch_file(source, trust_pickle)
        refuse_merged(model, source)  # torch.save of what optimize returned
        return Source(source, model, model)
    raise SourceError(f"unsupported model source {source!r}: expected timm:NAME, a "
                      f"{'/'.join(TORCH_SUFFIXES)} file, a .pt2 archive or a HuggingFace directory")


# ---------------------------------------------------------------------------------------------

def _timm(name: str, input_size) -> nn.Module:
    if input_size is not None and len(input_size) != 3:
        raise ValueError(f"--input-size for a timm model is C,H,W (three integers), "
                         f"got {','.join(map(str, input_size))}")
    import timm

    kwargs = {}
    if input_size is not None:
        kwargs["img_size"] = tuple(input_size[1:])
        if input_size[0] != 3:
            kwargs["in_chans"] = input_size[0]
    torch.manual_seed(SEED)
    try:
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError:  # the architecture takes no img_size: build it at its own size
            if not kwargs:
                raise
            torch.manual_seed(SEED)
            model = timm.create_model(name, pretrained=False)
    except Exception as exc:  # timm raises RuntimeError for unknown names
        raise SourceError(f"cannot build timm model {name!r}: {one_line(exc)}") from exc
    return model.eval()


def _state_dict_of(obj: Any) -> Mapping | None:
    """The tensor mapping in ``obj`` (itself, or under 'state_dict'/'model'), else None."""
    for cand in (obj, *(obj.get(k) for k in ("state_dict", "model") if isinstance(obj, Mapping))):
        if isinstance(cand, Mapping) and cand and all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in cand.items()):
            return cand
    return None


def _pickled_class(path: str) -> str | None:
    """The first class a torch.save archive's pickle names, read without unpickling."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith("data.pkl"))
            data = z.read(name)
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name == "GLOBAL" and not str(arg).startswith(("torch", "collections", "__builtin__")):
                return str(arg).replace(" ", ".")
    except Exception:  # only for the message; a malformed archive fails later with its own error
        return None
    return None


def _looks_like_torch_file(path: str) -> bool:
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"  # a pickle (torch's legacy format)


def _torch_file(path: str, trust_pickle: bool) -> nn.Module:
    if not _looks_like_torch_file(path):
        raise SourceError(f"cannot read {path}: not a torch.save file (neither a zip archive nor a pickle)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise SourceError(f"cannot read {path} as a torch.save file: {one_line(exc)}") from exc
        if not trust_pickle:
            what = _pickled_class(path) or "Python object"
            raise SourceError(
                f"{path} holds a pickled {what}; loading it runs code from the file, so it is "
                f"refused by default: pass --trust-pickle if you trust the file") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except (ImportError, AttributeError) as exc2:
            raise SourceError(f"cannot load {path}: the pickled model's class is not importable "
                              f"here ({one_line(exc2)})") from exc2
        except Exception as exc2:
            raise SourceError(f"cannot read {path} as a torch.save file: {one_line(exc2)}") from exc2
    except Exception as exc:
        raise SourceError(f"cannot read {path} as a torch.save file: {one_line(exc)}") from exc
    if isinstance(obj, nn.Module):
        return obj.eval()
    if _state_dict_of(obj) is not None:
        raise SourceError(
            f"{path} is a state dict (weights only); an architecture is needed: use "
            f"timm:NAME --checkpoint {path}, or save the whole model with torch.save(model)")
    raise SourceError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")


def load_checkpoint(model: nn.Module, path: str, name: str) -> None:
    """Load a state dict into ``model`` strictly; one-line error listing what does not match."""
    if not os.path.exists(path):
        raise SourceError(f"no such checkpoint file: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SourceError(f"cannot read checkpoint {path} (a state dict saved with torch.save "
                          f"is expected): {one_line(exc)}") from exc
    sd = _state_dict_of(obj)
    if sd is None:
        raise SourceError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    own = model.state_dict()
    if not any(k in own for k in sd) and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}  # saved from DataParallel/DDP
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches (checkpoint vs model)", shapes)):
            if keys:
                more = f", ... ({len(keys)} in all)" if len(keys) > 3 else ""
                parts.append(f"{label}: {', '.join(keys[:3])}{more}")
        raise SourceError(f"checkpoint {path} does not match {name}: {'; '.join(parts)}")
    model.load_state_dict(sd, strict=True)


def _exported(path: str) -> Source:
    try:
        ep = torch.export.load(path)
    except Exception as exc:
        raise SourceError(f"cannot read {path} as a torch.export archive: {one_line(exc)}") from exc
    refuse_merged(ep, path)  # a file tome-fx export wrote
    args = tuple(ep.example_inputs[0]) if ep.example_inputs else None
    if args is not None and not all(isinstance(a, torch.Tensor) for a in args):
        args = None
    return Source(path, ep.module(), ep, args)


def _huggingface(path: str) -> Source:
    if not os.path.exists(os.path.join(path, "config.json")):
        raise SourceError(f"{path} is a directory without config.json, not a HuggingFace model directory")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: never reach the hub
    try:
        import transformers
    except ImportError:
        raise SourceError("loading a HuggingFace model directory needs transformers "
                          "(pip install transformers)") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        model = (cls or transformers.AutoModel).from_pretrained(path)
    except Exception as exc:
        raise SourceError(f"cannot load HuggingFace model from {path}: {one_line(exc)}") from exc
    return Source(path, model.eval(), model)


# ---------------------------------------------------------------------------------------------

TEXT_HINT = "a text model (token ids): pass --seq-len N or --data sentences.txt"


def is_text(src: Source) -> bool:
    """A HuggingFace text model: it takes token ids, not a tensor of a size."""
    from ..data import takes_text

    return takes_text(src.model)


def declared_size(src: Source) -> tuple[int, ...]:
    """The (C, H, W) the source declares (timm cfg, a config's image_size, recorded inputs)."""
    if src.example_inputs:
        return tuple(src.example_inputs[0].shape[1:])
    if is_text(src):
        raise ValueError(f"{src.model_class} is {TEXT_HINT}")
    try:
        return tuple(default_inputs(src.model, batch=1)[0].shape[1:])
    except ValueError:
        raise ValueError(f"{src.model_class} declares no input size; pass --input-size C,H,W "
                         f"(one input's shape without the batch)") from None


def token_ids(src: Source, seq_len: int | None, batch: int, seed: int = SEED) -> dict:
    """Random ``input_ids`` (and an all-ones ``attention_mask``) of ``seq_len`` tokens for a
    text model, drawn from ``torch.Generator().manual_seed(seed)``."""
    if seq_len is None:
        raise ValueError(f"{src.model_class} is {TEXT_HINT}")
    config = src.model.config
    longest = getattr(config, "max_position_embeddings", None)
    if seq_len < 1 or (isinstance(longest, int) and seq_len > longest):
        raise ValueError(f"--seq-len must be between 1 and {longest} (the model's positions), "
                         f"got {seq_len}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def example_inputs(src: Source, input_size=None, batch: int | None = None, seed: int = SEED,
                   seq_len: int | None = None):
    """Inputs for a run: an ExportedProgram's recorded ones when nothing overrides them; for a
    text model ``token_ids``; else ``randn(batch, *input_size)`` drawn from
    ``torch.Generator().manual_seed(seed)``."""
    text = is_text(src)
    if text and input_size is not None:
        raise ValueError(f"--input-size is one tensor's shape, but {src.model_class} is {TEXT_HINT}")
    if seq_len is not None and not text:
        raise ValueError(f"--seq-len is for text models; {src.model_class} takes tensors: use "
                         f"--input-size")
    if text:
        return token_ids(src, seq_len, batch or 2, seed)
    if src.example_inputs and input_size is None and (batch is None or batch == len(src.example_inputs[0])):
        return src.example_inputs
    size = tuple(input_size) if input_size is not None else declared_size(src)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch or 2, *size, generator=g),)
