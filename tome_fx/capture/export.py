"""The second capture path: ``torch.export`` (non-strict) for models fx cannot trace.

HuggingFace transformers v5 models are the main case: their Python (``**kwargs`` plumbing,
output dataclasses, mask builders) defeats symbolic tracing, while ``torch.export`` runs the
real code under fake tensors. The result is an ATen-level graph (``aten.linear``,
``aten.scaled_dot_product_attention``, ``aten.view`` ...); ``tome_fx.graph`` recognises those
ops, so the same block finder and passes run on it.

What the returned GraphModule is:

* ``ep.module()`` (parameters as ``get_attr``) turned into a ``TomeModule`` (a GraphModule
  that pickles whole, export's guards included; ``.train()``/``.eval()`` work); it keeps
  export's pytree calling convention, so it takes the inputs the model was exported with
  (positional or keyword, as in ``example_inputs``) and returns the model's own output
  structure (a HuggingFace ``ModelOutput`` stays one).
* The batch dimension of every input tensor is exported as dynamic (``Dim.AUTO``), so one
  module serves every batch size. Export specialises a dimension whose example size is 1, so a
  batch of one is exported repeated to a batch of two. Where the model pins the batch size,
  export keeps it static and a note says so.
* Inputs of another shape than the graph was captured for raise ``tome_fx.ShapeError``, one
  line naming the input, both shapes and what to do (``check_inputs``, the graph's first node),
  instead of export's ``AssertionError: Guard failed``; a token count past a position table
  (``capture.positions``) is one too, naming the table, instead of an IndexError.
* Token counts stay baked into view/reshape/expand arguments; the shape repair pass
  (``passes/shapes.py``) makes them follow merges.
* Export records one mode: capture exports the model in train mode with its dropout
  switched by ``.train()``/``.eval()`` (``capture.train``), or in eval mode where that
  graph is not the model's in both modes.
* An SDPA mask computed from shapes and constants only that keeps every position (v5 builds an
  all-true mask for unmasked encoders) is removed; a real mask, or any term that reads a
  parameter or buffer, stays (and is the matcher's business).
"""
from __future__ import annotations

import copy
import inspect
import math

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_leaves, tree_map

from .. import graph as gu
from ..errors import CaptureError, one_line
from ..graph.module import TomeModule, parameter_memo, shared_parameters
from .guards import add_input_check, dynamic_sizes, export_spec, unlifted
from .guards import input_check_hook  # noqa: F401 - where compiling finds it
from .positions import bounded, position_limits
from .train import add_train_switches


def is_exported_program(obj) -> bool:
    export = getattr(torch, "export", None)
    return export is not None and isinstance(obj, export.ExportedProgram)


def exported_inputs(ep) -> tuple:
    """(args, kwargs) an ExportedProgram was exported with."""
    example = getattr(ep, "example_inputs", None)
    if not example:
        raise ValueError("the ExportedProgram carries no example inputs; pass example_inputs=")
    return tuple(example[0]), dict(example[1])


def interpolates(model: nn.Module, kwargs: dict) -> bool:
    """Whether the model takes any image size: timm ``dynamic_img_size=True``, HF called
    with ``interpolate_pos_encoding=True``, or a model capture was told takes any
    (``capture(..., image_sizes=True)``: diffusion models, whose latent has any size)."""
    return bool(kwargs.get("interpolate_pos_encoding") is True
                or getattr(model, "_tome_image_sizes", False) is True
                or any(getattr(m, "dynamic_img_size", False) is True for m in model.modules()))


def _dynamic_dims(model: nn.Module, args: tuple, kwargs: dict, every: bool,
                  images: bool | None = None):
    """``dynamic_shapes`` keyed like ``model.forward``'s signature, as ``Dim.AUTO`` (export
    keeps a dimension static where the model pins it): the batch of every input tensor, and
    with ``every`` the token dimensions too: a sequence (dimension 1 of ``[B, N]`` ids or masks
    and ``[B, N, C]`` embeddings) and, for a model that interpolates its position embedding,
    an image's height and width."""
    auto = torch.export.Dim.AUTO
    images = every and (interpolates(model, kwargs) if images is None else images)

    def spec(x):
        if isinstance(x, torch.Tensor):
            dims = {0} if x.dim() > 0 else set()
            if every and x.dim() in (2, 3):
                dims.add(1)
            if images and x.dim() == 4:
                dims |= {2, 3}
            return {d: auto for d in sorted(dims)} or None
        if isinstance(x, (tuple, list)):
            return type(x)(spec(v) for v in x)
        if isinstance(x, dict):
            return {k: spec(v) for k, v in x.items()}
        return None

    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: spec(value) for name, value in bound.arguments.items()}


def _dynamic_batch(graph: fx.Graph, inputs=None) -> bool:
    """Whether some input placeholder (of ``inputs`` names, default all) has a symbolic batch."""
    for n in graph.nodes:
        val = n.meta.get("val") if n.op == "placeholder" else None
        if inputs is not None and n.name not in inputs:
            continue
        if isinstance(val, torch.Tensor) and val.dim() > 0 and isinstance(val.shape[0], torch.SymInt):
            return True
    return False


def _batch_of_one(args: tuple, kwargs: dict) -> bool:
    leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]
    return bool(leaves) and all(t.shape[0] == 1 for t in leaves)


def _repeated(args: tuple, kwargs: dict, batch: int):
    """The inputs with their one sample repeated to ``batch``."""
    return tree_map(lambda t: t.expand(batch, *t.shape[1:]).clone()
                    if isinstance(t, torch.Tensor) and t.dim() > 0 else t, (args, kwargs))


def _takes_another_size(ep, args: tuple, kwargs: dict) -> bool:
    """Whether the program runs 4-D inputs 8 larger in height and width (export can keep an
    image size symbolic yet guard it to one value, e.g. ``h // 2 == 8`` from a position table)."""
    bigger = tree_map(lambda t: torch.zeros(*t.shape[:2], t.shape[2] + 8, t.shape[3] + 8,
                                            dtype=t.dtype, device=t.device)
                      if isinstance(t, torch.Tensor) and t.dim() == 4 else t, (args, kwargs))
    try:
        with torch.no_grad():
            ep.module()(*bigger[0], **bigger[1])
    except Exception:  # noqa: BLE001 - a guard (or the model) refuses it
        return False
    return True


def export_program(model: nn.Module, args: tuple, kwargs: dict, training: bool = False):
    """torch.export (non-strict) of a deep copy (``model``'s parameters in it, not copied) in
    eval mode (``training``: train mode), the batch and the token dimensions dynamic where the
    model allows (``_dynamic_dims``); failing that the batch only, failing that static. A form
    is kept only if the program runs the given inputs (export's guards can refuse a batch of
    one). A batch of one is exported repeated to two (export specialises a dimension of size
    1), unless the model pins it."""
    work = copy.deepcopy(model, shared_parameters(model)).train(training)
    tries = []
    if _batch_of_one(args, kwargs):
        two = _repeated(args, kwargs, 2)
        tries += [(*two, True), (*two, False)]
    tries += [(args, kwargs, True), (args, kwargs, False), (args, kwargs, None)]
    if interpolates(work, kwargs):  # image sizes first, then the same without them
        tries = [t for a, k, every in tries
                 for t in ([(a, k, every, True), (a, k, every, False)] if every else
                           [(a, k, every, False)])]
    else:
        tries = [(a, k, every, False) for a, k, every in tries]
    for a, k, every, images in tries:
        dims = None if every is None else _dynamic_dims(work, a, k, every, images)
        try:
            ep = torch.export.export(work, a, k, dynamic_shapes=dims, strict=False)
        except Exception as exc:  # noqa: BLE001 - try the next, more static, form
            failure = exc
            continue
        if a is not args and not _dynamic_batch(ep.graph, set(ep.graph_signature.user_inputs)):
            continue
        if images and getattr(work, "_tome_image_sizes", False) \
                and not _takes_another_size(ep, a, k):
            continue  # its guards pin the image size (a position table): exported static
        try:  # export's guards can still refuse the example itself (a batch of one)
            with torch.no_grad():
                ep.module()(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the next, more static, form
            failure = exc
            continue
        return ep
    raise failure


def capture_export(model, args: tuple, kwargs: dict, name: str, notes: list[str],
                   training: bool = False):
    """The GraphModule of torch.export (of ``model`` in train mode with ``training``, dropout
    switched by ``.train()``); raises CaptureError with one line. Its parameters are ``model``'s
    (an ExportedProgram's: those of its ``state_dict``), by identity or, failing that, by name
    (``graph.module.parameter_memo``); its buffers and constants are copies."""
    try:
        ep = (model if is_exported_program(model)
              else export_program(model, args, kwargs, training))
        owner = ({k: v for k, v in ep.state_dict.items() if isinstance(v, nn.Parameter)}
                 if is_exported_program(model) else model)
        module = unlifted(ep)
        module = copy.deepcopy(module, parameter_memo(module, owner))  # not ``ep``'s buffers
    except Exception as exc:  # export raises many kinds; report them as one line
        raise CaptureError(f"torch.export failed on {name}: {one_line(exc)}") from exc
    gm = TomeModule(module, module.graph)  # .train()/.eval() allowed, unlike ep.module()
    add_train_switches(gm)
    gm.eval()
    if not _dynamic_batch(gm.graph):
        batch = next((a.shape[0] for a in (*args, *kwargs.values())
                      if isinstance(a, torch.Tensor) and a.dim() > 0), None)
        notes.append(f"torch.export kept the batch size static ({batch}); call the result "
                     "with that batch size or optimize again for another")
    spec = export_spec(gm, dict(ep.range_constraints))
    spec = bounded(spec, position_limits(gm, args, kwargs, spec, getattr(model, "config", None)))
    free = dynamic_sizes(add_input_check(gm, spec))
    if free:
        notes.append(free)
    drop_assertions(gm)
    dropped = drop_trivial_masks(gm, args, kwargs)
    if dropped:
        notes.append(f"removed {dropped} constant all-keep attention mask argument(s) "
                     "(they mask nothing)")
    unfolded = unfold_row_reshapes(gm, args, kwargs)
    if unfolded:
        notes.append(f"{unfolded} linear layer(s) run on [tokens, batch, channels] instead of "
                     "the rows export folded them into (nn.MultiheadAttention's out-projection)")
    gm.graph.eliminate_dead_code()  # unused values would look like extra consumers
    gm.recompile()
    return gm


_RESHAPES = {torch.ops.aten.reshape, torch.ops.aten.view, torch.ops.aten._unsafe_view}


def unfold_row_reshapes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> int:
    """``reshape(x, [a*b, c]) -> linear -> view([a, b, c'])`` becomes ``linear`` on
    ``[a, b, c]``: the same rows, but the token dimension stays its own dimension (export's
    nn.MultiheadAttention folds tokens and batch into rows around its out-projection, which
    no token count could follow). Returns how many were rewritten."""
    shapes, _ = gu.record_shapes(gm, args, kwargs)
    count = 0
    for n in list(gm.graph.nodes):
        if not gu.is_call(n, _RESHAPES) or len(n.users) != 1:
            continue
        x, user = n.args[0], next(iter(n.users))
        xs, ns = shapes.get(x), shapes.get(n)
        if not (gu.is_tensor_shape(xs) and gu.is_tensor_shape(ns) and len(xs) >= 3
                and list(ns) == [xs[0] * xs[1], math.prod(xs[2:])]):
            continue
        if not gu.is_call(user, {torch.ops.aten.linear}) or user.args[0] is not n \
                or len(user.users) != 1:
            continue
        back = next(iter(user.users))
        out = shapes.get(user)
        if not gu.is_call(back, _RESHAPES) or list(shapes.get(back) or ()) != [xs[0], xs[1], out[1]]:
            continue
        with gm.graph.inserting_before(n):
            rows = [gm.graph.call_function(torch.ops.aten.sym_size.int, (x, d)) for d in (0, 1)]
        n.args = (x, [*rows, ns[1]])
        back.replace_all_uses_with(user)
        gm.graph.erase_node(back)
        count += 1
    return count


_SDPA_TAIL = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _reads_state(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is computed from a parameter or buffer (a learned table, or a buffer
    indexing one): then what it holds depends on training, not on shapes."""
    state = {name for name, _ in gm.named_parameters()} | {name for name, _ in gm.named_buffers()}
    return any(a.op == "get_attr" and a.target in state for a in gu.ancestors_within(node, 10_000))


def drop_trivial_masks(gm: fx.GraphModule, args: tuple, kwargs: dict) -> int:
    """Remove attention masks that mask nothing and are computed from shapes and constants only
    (no input value, no parameter or buffer), evaluated on the example inputs: an SDPA
    ``attn_mask`` that keeps every position (all true, or all zero if float), and an all-zero
    term added to softmax logits (eager attention). Returns how many were removed.

    A term that reads a parameter is never dropped, whatever its values: a relative-position
    table initialised to zeros masks nothing now and is trained later."""
    sdpa_sites, add_sites = [], []
    for n in gm.graph.nodes:
        if gu.is_sdpa(n):
            mask = gu.arg(n, 3, "attn_mask", None)
            if isinstance(mask, fx.Node):
                sdpa_sites.append((n, mask))
        elif gu.is_softmax(gm, n) and isinstance(n.args[0], fx.Node) and gu.is_add(n.args[0]):
            add = n.args[0]
            for i, term in enumerate(add.args[:2]):
                other = add.args[1 - i]
                if isinstance(term, fx.Node) and isinstance(other, fx.Node) and len(add.users) == 1:
                    add_sites.append((n, add, term, other))
    if not sdpa_sites and not add_sites:
        return 0
    kept = gu.record_values(gm, gu.placeholder_values(gm, args, kwargs),
                            {m for _, m in sdpa_sites} | {t for _, _, t, _ in add_sites})
    shapes, _ = gu.record_shapes(gm, args, kwargs)
    dependent = gu.data_dependent(gm, shapes)

    def masks_nothing(node, bool_ok: bool) -> bool:
        m = kept.get(node)
        if node in dependent or not isinstance(m, torch.Tensor) or _reads_state(gm, node):
            return False
        if m.dtype == torch.bool:
            return bool_ok and bool(m.all())
        return bool((m == 0).all())

    count = 0
    for sdpa, mask in sdpa_sites:
        if masks_nothing(mask, bool_ok=True):
            # q, k, v stay positional; what followed the mask becomes keywords (no mask at all)
            kw = {**dict(zip(_SDPA_TAIL, sdpa.args[3:])), **sdpa.kwargs}
            kw.pop("attn_mask")
            sdpa.args, sdpa.kwargs = sdpa.args[:3], kw
            count += 1
    for softmax, add, term, other in add_sites:
        if add in softmax.all_input_nodes and masks_nothing(term, bool_ok=False):
            softmax.replace_input_with(add, other)  # logits + 0 is logits
            count += 1
    return count


def drop_assertions(gm: fx.GraphModule) -> None:
    """Remove export's dtype/device assertions on intermediate values (``.to()`` checks): they
    compute nothing, and as extra users they would hide e.g. attention probabilities' use."""
    for n in list(gm.graph.nodes):
        if gu.is_call(n, {torch.ops.aten._assert_tensor_metadata}) and not n.users:
            gm.graph.erase_node(n)
