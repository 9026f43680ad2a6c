"""Position tables: a lookup into a parameter or buffer whose index grows with the token count
(GPT-2's ``arange``, RoBERTa's ``cumsum`` over the tokens from ``padding_idx + 1``, BERT's
slice of its position ids) runs out of the table past some length, where the model fails with
an ``IndexError`` or a ``RuntimeError``. ``position_limits`` finds that length in an exported
graph; ``check_inputs`` then refuses longer inputs with a ``ShapeError`` naming the table.

The length is found, not assumed: from the index's largest value at the example length
``n0`` (``n0 - 1 + c`` for positions from ``c``), the table of ``S`` rows holds ``S - c``
tokens, and the lookup's own ops (the graph's ancestors of the index, on inputs grown or cut
along the token dimension) must stay in the table at that length and leave it one token
later. A lookup that never leaves it (token ids, token types, clamped relative buckets) has no
limit."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph.run import placeholder_values
from ..graph.walk import ancestors

MAX_TOKENS = 1 << 16  # a table holding more is not checked (one run of its lookup at that length)
# lookup op -> (table argument, index argument); the indexed dimension of the table
_LOOKUPS = {torch.ops.aten.embedding.default: (0, 1), torch.ops.aten.gather.default: (0, 2),
            torch.ops.aten.index.Tensor: (0, 1)}


@dataclass(frozen=True)
class Limit:
    symbol: str  # the token count's symbol in the spec of ``check_inputs``
    tokens: int  # the most tokens the table holds
    why: str  # "the model's position table holds 38 (...)"


def _lookups(gm: fx.GraphModule):
    """(index node, the table's indexed dimension, the table node, whether an embedding) of
    each lookup."""
    for n in gm.graph.nodes:
        where = _LOOKUPS.get(n.target) if n.op == "call_function" else None
        if where is None:
            continue
        table, index = n.args[where[0]], n.args[where[1]]
        dim = 0
        if n.target == torch.ops.aten.gather.default:
            dim = n.args[1]
        elif n.target == torch.ops.aten.index.Tensor:  # one tensor index, at its dimension
            given = [i for i, x in enumerate(index) if x is not None]
            if len(given) != 1:
                continue
            dim, index = given[0], index[given[0]]
        if isinstance(index, fx.Node) and isinstance(table, fx.Node) and isinstance(dim, int):
            yield index, dim, table, n.target == torch.ops.aten.embedding.default


def _state_name(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The parameter or buffer ``node`` is (or is a view of): ``wpe.weight``."""
    for _ in range(8):
        if node.op == "get_attr":
            return node.target
        inputs = node.all_input_nodes
        if node.op != "call_function" or not inputs:
            return None
        node = inputs[0]
    return None


def _cheap(gm: fx.GraphModule, index: fx.Node, most: int = 200) -> bool:
    """Whether ``index`` is computed from inputs, buffers and shapes in a few ops (positions
    are; an index computed by the network's weights, routing tokens, is not run again)."""
    params = {name for name, _ in gm.named_parameters()}
    up = ancestors(index)
    return len(up) <= most and not any(n.op == "get_attr" and n.target in params for n in up)


def _subgraph(gm: fx.GraphModule, wanted: list[fx.Node]) -> fx.GraphModule:
    """The ops ``wanted`` are computed from (every placeholder kept, in order): what a lookup
    reads, run alone on inputs of another length."""
    need = set().union(*(ancestors(n) for n in wanted))
    graph, copies = fx.Graph(), {}
    for n in gm.graph.nodes:
        if n in need or n.op == "placeholder":
            copies[n] = graph.node_copy(n, lambda x: copies[x])
    graph.output(tuple(copies[n] for n in wanted))
    return fx.GraphModule(gm, graph)


def _resized(values: list, where: list[tuple[int, int]], n0: int, n: int) -> list:
    """``values`` with ``n`` tokens along each (input, dimension) of ``where``: cut, or grown
    by repeating the last token (a real one where the example's longest row is)."""
    out = list(values)
    for i, d in where:
        x = out[i]
        if n <= n0:
            out[i] = x.narrow(d, 0, n)
        else:
            last = x.narrow(d, n0 - 1, 1)
            out[i] = torch.cat([x, last.expand(*[n - n0 if k == d else -1
                                                 for k in range(x.dim())])], d)
    return out


def _largest(sub: fx.GraphModule, inputs: list, k: int, dim: int):
    """(largest index, table rows, index size) of lookup ``k`` on ``inputs``; None where its
    ops fail."""
    try:
        with torch.no_grad():
            out = fx.Interpreter(sub).run(*inputs)
    except Exception:  # noqa: BLE001 - any failure of the lookup's own ops
        return None
    index, table = out[2 * k], out[2 * k + 1]
    if not index.numel() or index.is_floating_point() or index.dtype == torch.bool:
        return None
    return int(index.max()), table.shape[dim], index.numel()


def _config_name(config, rows: int) -> str:
    """``; max_position_embeddings=40``: the config field holding the table's size."""
    fields = config.to_dict() if hasattr(config, "to_dict") else {}
    named = [k for k, v in fields.items() if v == rows and "position" in k and isinstance(v, int)]
    return f"; {named[0]}={rows}" if named else ""


def position_limits(gm: fx.GraphModule, args: tuple, kwargs: dict, spec: tuple,
                    config=None) -> dict[str, Limit]:
    """The lowest ``Limit`` of each token count (a symbol of ``spec``, ``check_inputs``'
    spec of an exported graph) that a position table bounds."""
    where: dict[str, list] = {}  # symbol -> (input, dimension) it sizes, past the batch
    for i, (_, dims) in enumerate(spec):
        for d, size in enumerate(dims or ()):
            if d > 0 and not isinstance(size, int):
                where.setdefault(size[0], []).append((i, d))
    # embeddings first: of two lookups that bound the tokens alike (RoBERTa reads its token
    # types by position too), the message names the position embedding
    lookups = sorted((x for x in _lookups(gm) if _cheap(gm, x[0]) and _state_name(gm, x[2])),
                     key=lambda lookup: not lookup[3])
    if not where or not lookups:
        return {}
    sub = _subgraph(gm, [x for index, _, table, _ in lookups for x in (index, table)])
    values = placeholder_values(gm, args, kwargs)
    limits: dict[str, Limit] = {}
    for k, (index, dim, table, _) in enumerate(lookups):
        val = index.meta.get("val")
        shape = val.shape if isinstance(val, torch.Tensor) else ()
        for symbol in {str(s.node.expr) for s in shape if isinstance(s, torch.SymInt)}:
            limit = _limit(sub, values, where.get(symbol, []), k, dim)
            if limit is None or (symbol in limits and limits[symbol].tokens <= limit[0]):
                continue
            tokens, rows = limit
            name = _state_name(gm, table)
            start = f", positions from row {rows - tokens}" if rows > tokens else ""
            why = (f"the model's position table holds {tokens} ({name}: {rows} rows{start}"
                   f"{_config_name(config, rows)})")
            limits[symbol] = Limit(symbol, tokens, why)
    return limits


def _limit(sub, values: list, where: list, k: int, dim: int):
    """(tokens, rows): the most tokens lookup ``k`` takes along ``where``, None if unbounded
    (or unknown)."""
    if not where:
        return None
    n0 = values[where[0][0]].shape[where[0][1]]
    now = _largest(sub, values, k, dim)
    if now is None or n0 < 1:
        return None
    largest, rows, _ = now
    tokens = rows - (largest - (n0 - 1))  # positions n0 - 1 + c fill the table at rows - c
    if not n0 <= tokens <= MAX_TOKENS:
        return None
    fits = _largest(sub, _resized(values, where, n0, tokens), k, dim)
    over = _largest(sub, _resized(values, where, n0, tokens + 1), k, dim)
    if fits is None or fits[0] >= rows:
        return None
    # one token more: the lookup fails, leaves the table, or stops following the tokens (a
    # slice of position ids as long as the table: the model fails on the sizes after it)
    if over is not None and over[0] < over[1] and over[2] > fits[2]:
        return None
    return tokens, rows


def bounded(spec: tuple, limits: dict[str, Limit]) -> tuple:
    """``spec`` with each token count a table bounds at most the table's tokens, and why
    (``check_inputs`` says it): ``(symbol, low, high, why)``."""
    def dim(size):
        limit = None if isinstance(size, int) else limits.get(size[0])
        if limit is None or (size[2] is not None and size[2] < limit.tokens):
            return size
        return (size[0], size[1], limit.tokens, limit.why)

    return tuple((name, None if dims is None else tuple(dim(s) for s in dims))
                 for name, dims in spec)


def shorter(args: tuple, kwargs: dict, tokens: int = 8):
    """(args, kwargs) with at most ``tokens`` tokens: dimension 1 of every input whose size
    there is the first input's (ids and masks, ``[batch, tokens, ...]``) cut; None if the
    inputs are that short already."""
    first = next((t for t in (*args, *kwargs.values())
                  if isinstance(t, torch.Tensor) and t.dim() >= 2), None)
    n = None if first is None else first.shape[1]
    if n is None or n <= min(tokens, 2):
        return None
    keep = min(tokens, n - 1)

    def cut(t):
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[1] == n:
            return t.narrow(1, 0, keep)
        return t
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def past_table(spec: tuple, given: dict) -> str | None:
    """Why the inputs ``given`` by name are too long for a position table ``spec``
    (``check_inputs``' spec of the same model captured on shorter inputs) bounds:
    ``input_ids has 64 tokens; the model's position table holds 38 (...)``."""
    for name, dims in spec:
        x = given.get(name)
        for d, size in enumerate(dims or ()):
            if isinstance(x, torch.Tensor) and not isinstance(size, int) and len(size) > 3 \
                    and d < x.dim() and x.shape[d] > size[2]:
                return f"{name} has {x.shape[d]} tokens; {size[3]}"
    return None
