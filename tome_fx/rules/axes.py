"""Which dimensions of a source tensor each dimension of a later tensor indexes.

ToMeSD merges within a 2-D grid, so a block's tokens must be the ``h x w`` positions of a
``[B, C, h, w]`` tensor, row-major: not frames whose grid was moved into the batch (temporal
attention: ``[B*F, C, h, w] -> [B*h*w, F, C]``, where ``F`` may equal ``h*w`` by chance), nor
frames x grid. ``trace_axes`` follows the source's dimensions through the def-use paths to a
node: each dimension is a tuple of atoms ``(name, size)``; layout ops (view, reshape, flatten,
permute, transpose) regroup atoms, ops that keep a position's meaning (element-wise, norms,
linear layers on the last dimension, attention on the queries' positions) copy them, anything
else forgets them. A split atom becomes ``name/k`` parts that are never the whole.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from .. import graph as gu

Node = fx.Node
aten = gu.aten
RESHAPE = {aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten,
           aten.squeeze, aten.unsqueeze}
RESHAPE_METHODS = ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze")
# ops that move values between positions of a dimension whose size they keep
MOVES = {aten.gather, aten.index_select, aten.index, aten.scatter, aten.scatter_add, aten.flip,
         aten.roll, aten.sort, aten.argsort, aten.cumsum, aten.cumprod, aten.topk, aten.expand,
         aten.repeat, aten.index_put, aten.slice, aten.select, aten.narrow, aten.cat, aten.stack}
MOVE_METHODS = ("gather", "index_select", "scatter", "flip", "roll", "sort", "argsort", "cumsum",
                "expand", "repeat", "__getitem__", "narrow", "index_put")
ATTENTION = {getattr(aten, n) for n in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "scaled_dot_product_attention") if hasattr(aten, n)}
MATRIX = {aten.mm: 0, aten.bmm: 0, aten.matmul: 0, aten.linear: 0, aten.addmm: 1,
          aten.baddbmm: 1}


def _atoms(dims) -> list:
    return [a for d in dims for a in d if a[1] != 1]


def _regroup(dims, out_shape) -> tuple | None:
    """``dims``' atoms in order, grouped into ``out_shape`` (splitting an atom where a group ends
    inside it); None when the sizes do not line up."""
    atoms, out = _atoms(dims), []
    for size in out_shape:
        group, prod = [], 1
        while prod < size and atoms:
            name, n = atoms[0]
            if size % (prod * n) == 0:
                group.append(atoms.pop(0))
                prod *= n
            elif n % (size // prod) == 0:  # the group ends inside this atom: split it
                k = size // prod
                group.append((f"{name}/{n // k}", k))
                atoms[0] = (f"{name}%{n // k}", n // k)
                prod = size
            else:
                return None
        if prod != size:
            return None
        out.append(tuple(group))
    return tuple(out) if not atoms else None


def _permuted(node: Node, dims, rank: int):
    if gu.is_call(node, gu.TRANSPOSE, ("transpose",)):
        a, b = (gu.arg(node, 1, "dim0"), gu.arg(node, 2, "dim1"))
        order = list(range(rank))
        order[a % rank], order[b % rank] = order[b % rank], order[a % rank]
    else:
        order = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
    return tuple(dims[i % rank] for i in order)


def _through(node: Node, known: dict, shapes, gm) -> tuple | None:
    """The atoms of ``node``'s dimensions from its inputs' (``known``), or None."""
    out = shapes.get(node)
    if isinstance(out, (tuple, list)) and out and gu.is_tensor_shape(out[0]) \
            and not gu.is_tensor_shape(out):
        out = out[0]  # norms and attention that return (output, statistics...)
    ins = [(i, known[i]) for i in node.all_input_nodes if i in known]
    if not gu.is_tensor_shape(out) or not ins:
        return None
    pk = gu.packet(node)
    if pk is aten.cat:
        return _joined(node, known, shapes, out)
    first, dims = ins[0]
    if node.op == "call_function" and node.target is operator.getitem:
        return dims if node.args[1] == 0 else None
    if pk is aten.slice:
        return _sliced(node, known, shapes, out)
    if gu.is_call(node, RESHAPE, RESHAPE_METHODS):
        return _regroup(dims, out)
    if gu.is_call(node, {aten.permute, aten.transpose}, ("permute", "transpose")) or \
            gu.is_call(node, gu.TRANSPOSE):
        return _permuted(node, dims, len(dims))
    if pk in MOVES or (node.op == "call_method" and node.target in MOVE_METHODS):
        return None
    if pk in MATRIX or gu.is_linear(gm, node) or gu.is_sdpa(node) or pk in ATTENTION:
        src = node.args[MATRIX.get(pk, 0)]  # the positions of the queries (left matrix)
        if src in known and len(_shape(shapes[src])) == len(out):
            return tuple(known[src][:-1]) + ((("?", out[-1]),),)
        return None
    same = [(i, d) for i, d in ins if _shape(shapes.get(i)) == out]
    if same:  # element-wise and norms: the input known best
        i, d = max(same, key=lambda x: sum(a[0] != "?" for a in _atoms(x[1])))
        if ("parts", i) in known:  # still the concatenation's parts, position by position
            known[("parts", node)] = known[("parts", i)]
        return d
    if gu.is_conv(gm, node) and len(_shape(shapes[first])) == len(out):  # where sizes are kept
        return tuple(d if n == m else (("?", m),) for d, n, m in zip(dims, shapes[first], out))
    return None


def _joined(node: Node, known: dict, shapes, out) -> tuple | None:
    d = gu.arg(node, 1, "dim", 0) % len(out)
    parts, start = [], 0
    for x in node.args[0]:
        size = _shape(shapes.get(x))[d]
        parts.append((start, start + size, known.get(x)))
        start += size
    known[("parts", node)] = (d, parts)
    base = next((p[2] for p in parts if p[2] is not None), None)
    return None if base is None else base[:d] + ((("?", out[d]),),) + base[d + 1:]


def _sliced(node: Node, known: dict, shapes, out) -> tuple | None:
    """A full slice keeps the atoms; a slice of exactly one part of a concatenation (a model
    that joins text and image tokens and splits them again) takes that part's."""
    src, d = node.args[0], gu.arg(node, 1, "dim", 0) % len(out)
    start, end = gu.arg(node, 2, "start", 0) or 0, gu.arg(node, 3, "end", None)
    size = _shape(shapes[src])[d]
    if not isinstance(start, int) or not isinstance(end, (int, type(None))):
        return None  # a symbolic bound
    end = size if end is None or end > size else end
    if start == 0 and end == size:
        return known.get(src)
    d_parts, parts = known.get(("parts", src), (None, ()))
    if d_parts == d:
        return next((p[2] for p in parts if (p[0], p[1]) == (start, end)), None)
    return None


def _shape(s):
    return s[0] if isinstance(s, (tuple, list)) and s and gu.is_tensor_shape(s[0]) else s


def trace_axes(source: Node, target: Node, shapes, gm, names=None) -> tuple | None:
    """The atoms of ``target``'s dimensions, ``source``'s dimensions named ``names`` (default
    ``b, c, h, w``, or ``b, c, f, h, w`` for 5-D), through the nodes between them; None if they
    are lost on the way."""
    s = shapes[source]
    if names is None:
        names = ("b", "c", "f", "h", "w") if len(s) == 5 else ("b", "c", "h", "w")[-len(s):]
    known = {source: tuple(((n, k),) for n, k in zip(names, s))}
    for n in gu.between(source, target):
        got = _through(n, known, shapes, gm)
        if got is not None and len(got) == len(_shape(shapes[n])):
            known[n] = got
    return known.get(target)


def is_layout(node: Node) -> bool:
    """A view, reshape, permute or slice: it moves the values, computes none."""
    return (gu.is_call(node, RESHAPE | {aten.permute, aten.transpose, aten.slice, aten.expand},
                       RESHAPE_METHODS + ("permute", "transpose", "expand"))
            or gu.is_call(node, gu.TRANSPOSE) or gu.is_index(node))


def token_atoms(dims, dim: int = 1) -> tuple:
    """The atoms of dimension ``dim`` that are not size 1."""
    return tuple(a for a in dims[dim] if a[1] != 1)


def is_grid(dims, h: int, w: int) -> bool:
    """Whether the tokens (dimension 1) are the source's ``h`` then ``w`` positions."""
    return token_atoms(dims) == (("h", h), ("w", w))


def patch_of(dims, h: int, w: int) -> int:
    """``p`` when the tokens (dimension 1) are the ``h/p x w/p`` grid of ``p x p`` patches cut
    from the source by a reshape (Lumina-Next patchifies so), 1 for the plain grid, else 0."""
    atoms = token_atoms(dims)
    if atoms == (("h", h), ("w", w)):
        return 1
    if len(atoms) != 2 or not atoms[0][0].startswith("h/"):
        return 0
    p = atoms[0][0][2:]
    ok = p.isdigit() and atoms == ((f"h/{p}", h // int(p)), (f"w/{p}", w // int(p)))
    return int(p) if ok else 0


def from_batch(dims) -> bool:
    """Whether the tokens come from the source's batch (frames moved out of it)."""
    return any(a[0].split("/")[0].split("%")[0] == "b" for a in token_atoms(dims))
