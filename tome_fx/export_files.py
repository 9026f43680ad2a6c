"""The files ``export`` writes: format from the suffix, writing a traced program as ONNX or
``.pt2``, loading it back as a function of tensors, and comparing its outputs."""
from __future__ import annotations

import contextlib
import importlib
import io
import os

import torch
from torch.utils._pytree import tree_flatten_with_path

from .errors import ExportError, MissingExtraError
from .graph.dims import axis_names

FORMATS = {".onnx": "onnx", ".pt2": "pt2"}
ONNX_EXTRA = ("onnx", "onnxscript", "onnxruntime")
ONNX_INLINE_LIMIT = 1_800_000_000  # bytes of weights kept inside the .onnx (protobuf: < 2 GB)


def export_format(path, format: str | None = None) -> str:
    """``"onnx"`` or ``"pt2"``: ``format`` if given (it must agree with a known suffix), else
    from the file name's suffix; ValueError otherwise."""
    by_suffix = FORMATS.get(os.path.splitext(str(path))[1].lower())
    if format is None:
        if by_suffix is None:
            raise ValueError(f"cannot tell the export format from {str(path)!r}: the file name "
                             "must end in .onnx or .pt2")
        return by_suffix
    if format not in FORMATS.values():
        raise ValueError(f"format must be 'onnx' or 'pt2', got {format!r}")
    if by_suffix not in (None, format):
        raise ValueError(f"format={format!r} does not match the file name {str(path)!r}")
    return format


def require_onnx() -> None:
    """MissingExtraError (one line, naming the ``export`` extra) unless the ONNX packages
    import."""
    missing = []
    for name in ONNX_EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(f"ONNX export needs onnx, onnxscript and onnxruntime "
                                f"({', '.join(missing)} missing): pip install -e \".[export]\"")


def output_tensors(out) -> list[torch.Tensor]:
    return [t for _, t in tree_flatten_with_path(out)[0] if isinstance(t, torch.Tensor)]


@contextlib.contextmanager
def quiet():
    """torch.onnx and onnxscript print progress and optimizer messages; hold them back."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def write_file(ep, path: str, fmt: str, inputs: list[str], outputs: list[str], tensors) -> None:
    if fmt == "pt2":
        torch.export.save(ep, path)
        return
    weights = sum(t.numel() * t.element_size() for t in ep.state_dict.values())
    with quiet():
        program = torch.onnx.export(ep, tensors, input_names=inputs, output_names=outputs,
                                    dynamo=True, verbose=False)
        names = axis_names(ep, inputs, tensors)  # symbols (s95) -> batch, sequence, ...
        program.rename_axes({str(symbol): name for symbol, name in names.items()})
        program.save(path, external_data=weights > ONNX_INLINE_LIMIT)


def load_runner(path: str, fmt: str, names: list[str]):
    """Load the written file: a function of the input tensors returning its output tensors."""
    if fmt == "pt2":
        fn = torch.export.load(path).module()
        return lambda tensors: output_tensors(fn(*tensors))
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}

    def run(tensors):
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors) if n in wanted}
        return [torch.from_numpy(o) for o in session.run(None, feed)]

    return run


def max_diff(got: list, want: list, where: str) -> float:
    if len(got) != len(want):
        raise ExportError(f"{where}: the file returns {len(got)} tensors, the module {len(want)}")
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        if tuple(g.shape) != tuple(w.shape):
            raise ExportError(f"{where}: output {i} has shape {tuple(g.shape)} in the file, "
                              f"{tuple(w.shape)} from the module")
        if w.numel():
            d = (g.double() - w.detach().cpu().double()).abs()
            d = torch.where(torch.isnan(g) & torch.isnan(w.cpu()), 0.0, d.nan_to_num(float("inf")))
            worst = max(worst, d.max().item())
    return worst
