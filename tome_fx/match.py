"""Find attention->MLP blocks in a traced graph.

Matching anchors on one op, the attention core (an SDPA call, or a softmax between two matmuls),
and walks def-use edges outward: back to the keys, forward to the residual add after attention,
then to the point whose value feeds both the MLP and its residual (the merge point). Nothing is
changed; what was found goes into ``node.meta["tome"]``. A site that cannot be rewritten safely
becomes a ``Refusal`` with a reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from numbers import Number

import torch
import torch.fx as fx

from . import graph as gu

Node = fx.Node


@dataclass(frozen=True)
class Core:
    """An attention core: where its keys are, where a key bias goes."""

    anchor: Node  # SDPA call or softmax
    kind: str  # "sdpa" | "softmax"
    query: Node
    keys: Node
    keys_transposed: bool  # keys node holds K^T (explicit attention without a visible transpose)
    out: Node  # attention output (SDPA or attn @ v)
    logits: Node | None  # softmax input (explicit attention) where the bias is added
    tokens: int
    heads: int
    nodes: frozenset = field(default_factory=frozenset)  # nodes inside the core (token mixing)
    mask: Node | None = None  # padding mask (SDPA attn_mask, or the term added to the logits)
    cross: bool = False  # queries from elsewhere than the keys (attention pooling): no block


@dataclass(frozen=True)
class Block:
    index: int
    core: Core
    stream_in: Node  # residual stream entering the attention
    attn_add: Node  # residual add after attention
    merge_at: Node  # value feeding the MLP and its residual; merged tokens replace it
    mlp_add: Node
    norm: str  # "pre" | "post"
    token_dim: int  # token dimension of the stream at merge_at
    stream: int = 0  # first block of the token stream it is in (a CLIP tower: ``gu.chains``)

    @property
    def name(self) -> str:
        return site_name(self.core.anchor)


def site_name(node: Node) -> str:
    """The module path of an attention site (e.g. ``blocks.3.attn``), else the node name."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return f"{path} ({node.name})"
    return node.name


@dataclass(frozen=True)
class Refusal:
    site: str
    reason: str


@dataclass
class Matches:
    blocks: list[Block]
    cores: list[Core]  # all usable attention cores, including ones in refused blocks
    refusals: list[Refusal]
    prefix: int  # protected prefix tokens
    cross: list[str] = field(default_factory=list)  # cross-attention sites (attention pooling)


class _Refuse(Exception):
    pass


def _scalar(gm, a, shapes) -> bool:
    if isinstance(a, Number):
        return True
    if isinstance(a, Node):
        s = shapes.get(a)
        if a.op == "get_attr" or gu.is_tensor_shape(s):
            return gu.is_tensor_shape(s) and all(d == 1 for d in s)
        return not gu.has_tensor(s)  # a python number computed in the graph
    return False


def _strip_scaling(gm, node: Node, shapes, stop: set = frozenset()) -> tuple[Node, list[Node]]:
    """Walk back from logits through multiplications/divisions by scalars."""
    passed = []
    while not gu.is_matmul(node):
        if gu.is_call(node, gu.SCALE, ("mul", "div", "__mul__", "__truediv__")):
            tensors = [a for a in node.args[:2] if not _scalar(gm, a, shapes)]
            if len(tensors) != 1:
                raise _Refuse(f"attention logits are combined with a tensor at {node.name} "
                              "(relative position bias or mask)")
            passed.append(node)
            node = tensors[0]
        elif gu.is_dropout(gm, node) or gu.is_call(node, gu.CAST, ("float", "to", "type_as")):
            passed.append(node)
            node = node.args[0]
        else:
            what = node.target if node.op != "call_module" else type(gu.module_of(gm, node)).__name__
            raise _Refuse(f"attention logits pass through {getattr(what, '__name__', what)} at "
                          f"{node.name} (relative position bias, mask or other term)")
    return node, passed


def _keys_from_kt(node: Node, shapes) -> tuple[Node, bool]:
    """Given K^T, return (node holding keys, whether that node is still transposed)."""
    if node.op == "call_method" and node.target in ("transpose", "transpose_"):
        dims = {d % len(shapes[node]) for d in node.args[1:3]}
        if dims == {len(shapes[node]) - 1, len(shapes[node]) - 2}:
            return node.args[0], False
    if gu.is_call(node, gu.TRANSPOSE):
        dims = {d % len(shapes[node]) for d in node.args[1:3]}
        if dims == {len(shapes[node]) - 1, len(shapes[node]) - 2}:
            return node.args[0], False
    if node.op == "call_method" and node.target == "mT":
        return node.args[0], False
    return node, True


def _check_mask(mask: Node, dep: set) -> None:
    """A mask must come from the model inputs to be a padding mask; whether it really is one
    (a per-token function of a [batch, tokens] input) is checked where it meets merged tokens."""
    if mask not in dep:
        raise _Refuse("attention mask is a fixed pattern, not derived from the inputs (causal, "
                      "windowed or positional): merging would break it")


def _peel_mask(gm, logits: Node, shapes, dep: set) -> tuple[Node, Node | None, Node | None]:
    """``logits + mask`` or ``logits.masked_fill(mask, v)`` in front of a softmax:
    returns (scores, mask, the node applying it)."""
    if gu.is_add(logits) or gu.is_masked_fill(logits):
        a, b = logits.args[0], logits.args[1]
        if isinstance(a, Node) and isinstance(b, Node):
            for scores, mask in ((a, b), (b, a)) if gu.is_add(logits) else ((a, b),):
                try:
                    _strip_scaling(gm, scores, shapes)
                except _Refuse:
                    continue
                if mask not in dep:  # a learned table (relative position bias) or fixed pattern
                    break
                return scores, mask, logits
    return logits, None, None


CROSS_FROM_INPUT = ("cross-attention: queries and keys have different token counts, and the queries "
                    "come from the input (class attention, spatial-reduction keys, encoder-decoder "
                    "attention): not a block to merge in; it reads merged tokens only as keys")


def _cross(n_queries: int, n_keys: int) -> bool:
    """Cross-attention: the queries are other tokens than the keys (attention pooling with a
    learned latent or probe, class attention, spatial-reduction keys)."""
    return n_queries != n_keys


def _core_softmax(gm, sm: Node, shapes, dep: set = frozenset()) -> Core:
    dim = gu.arg(sm, 1, "dim", None) if sm.op != "call_module" else gu.module_of(gm, sm).dim
    s = shapes.get(sm)
    if not gu.is_tensor_shape(s) or dim is None or dim % len(s) != len(s) - 1:
        raise _Refuse("softmax is not over the last dimension of a tensor")
    logits_in = sm.args[0]
    scores, mask, applies = _peel_mask(gm, logits_in, shapes, dep)
    qk, passed = _strip_scaling(gm, scores, shapes)
    if applies is not None:
        passed.append(applies)
    kt = qk.args[1]
    keys, transposed = _keys_from_kt(kt, shapes)
    # forward: softmax -> (dropout) -> @ v
    node, inner = sm, []
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise _Refuse("attention probabilities are used outside the attention product")
        u = users[0]
        if gu.is_matmul(u) and u.args[0] is node:
            out = u
            break
        if gu.is_dropout(gm, u) or gu.is_call(u, gu.CAST, ("to", "type_as", "float")):
            inner.append(u)
            node = u
            continue
        raise _Refuse(f"softmax output goes to {u.name}, not to a product with values")
    ks = shapes[keys]
    tokens = ks[-1] if transposed else ks[-2]
    heads = ks[1] if len(ks) == 4 else 1
    queries = shapes.get(qk.args[0])
    cross = gu.is_tensor_shape(queries) and len(queries) >= 2 and _cross(queries[-2], tokens)
    return Core(sm, "softmax", qk.args[0], keys, transposed, out, logits_in, tokens, heads,
                frozenset([qk, sm, out, *passed, *inner]), mask, cross=cross)


def _core_sdpa(gm, node: Node, shapes, dep: set = frozenset()) -> Core:
    q, k = node.args[0], node.args[1]
    mask = gu.arg(node, 3, "attn_mask", None)
    causal = gu.arg(node, 5, "is_causal", False)
    if causal is not False:
        raise _Refuse("causal attention: a merged token would mix future positions")
    if isinstance(mask, Node):
        _check_mask(mask, dep)
    elif mask is not None:
        raise _Refuse("attention mask is not a tensor computed in the graph")
    ks = shapes[k]
    heads = ks[1] if len(ks) == 4 else 1
    return Core(node, "sdpa", q, k, False, node, None, ks[-2], heads, frozenset([node]), mask,
                cross=_cross(shapes[q][-2], ks[-2]))


def _descendant_add(start: Node, depth: int = 40) -> tuple[Node, Node]:
    """First add downstream of ``start`` whose other operand does not come from ``start``."""
    desc, frontier = {start}, [start]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if gu.is_add(u):
                    others = [a for a in u.args[:2] if isinstance(a, Node) and a not in desc]
                    if len(others) == 1 and any(a in desc for a in u.args[:2]):
                        return u, others[0]
                if u not in desc:
                    desc.add(u)
                    nxt.append(u)
        frontier = nxt
    raise _Refuse("no residual add after the attention")


def _find_mlp_add(gm, s: Node) -> Node:
    for u in s.users:
        if not gu.is_add(u) or s not in u.args[:2]:
            continue
        other = u.args[1] if u.args[0] is s else u.args[0]
        if not isinstance(other, Node):
            continue
        branch = gu.ancestors_within(other, 40)
        if s in branch and any(gu.is_linear(gm, n) for n in branch if n is not s):
            return u
    raise _Refuse("no MLP residual branch after the attention")


def _token_dim(shape, tokens: int) -> int:
    if not gu.is_tensor_shape(shape) or len(shape) != 3:
        raise _Refuse(f"residual stream is not 3-D (shape {shape})")
    dims = [d for d in range(2) if shape[d] == tokens]
    if not dims:
        raise _Refuse(f"the attention sees {tokens} tokens but the residual stream is shaped "
                      f"{shape}: windowed or regrouped attention, where merging would mix windows")
    if len(dims) != 1:
        raise _Refuse(f"cannot tell the token dimension of a stream shaped {shape}; "
                      "use example inputs whose batch size differs from the token count")
    return dims[0]


def _block(gm, index: int, core: Core, shapes) -> Block:
    attn_add, stream_in = _descendant_add(core.out)
    if stream_in not in gu.ancestors_within(core.keys, 40):
        raise _Refuse("the residual around the attention is not the attention's input")
    shape = shapes.get(stream_in)
    part = gu.window_partition(stream_in, core.keys, shapes, core.tokens)
    if part is not None:  # before the MLP is looked for: windows are why, not what follows
        raise _Refuse(f"windowed attention: the block regroups the tokens of the residual "
                      f"stream {list(shape)} into windows of {core.tokens} ({part.name}: "
                      f"{list(shapes[part])}); merging would mix windows")
    if gu.is_tensor_shape(shape) and len(shape) != 3:
        raise _Refuse(f"residual stream is not 3-D (shape {shape}): the tokens stay a grid")
    s, norm = attn_add, "pre"
    while len(s.users) == 1 and gu.is_norm(gm, next(iter(s.users))):
        s, norm = next(iter(s.users)), "post"
    mlp_add = _find_mlp_add(gm, s)
    tdim = _token_dim(shapes.get(s), core.tokens)
    if shapes.get(stream_in) != shapes.get(s):
        raise _Refuse("the stream changes shape across the attention")
    return Block(index, core, stream_in, attn_add, s, mlp_add, norm, tdim)


def find_prefix(gm, stream_in: Node, shapes, dependent: set, token_dim: int) -> int:
    """Protected prefix: the leading run of tokens of the first block's stream that do not
    come from the input (class, distillation and register tokens: parameters concatenated
    along the tokens), wherever they are concatenated (HF DINOv2 inserts its registers after
    the class token: ``cat(x[:, :1], registers, x[:, 1:])``)."""
    lead = gu.fixed_lead(stream_in, shapes, dependent, token_dim)
    return lead if lead < shapes[stream_in][token_dim] else 0  # no input tokens: nothing to say


_MASKING = ({torch.where}, ("masked_fill", "masked_fill_"))
_POSITIONAL = {torch.arange, torch.tril, torch.triu, torch.eye, torch.outer}


def _positional(node: Node, dependent: set) -> bool:
    """An input-independent tensor that varies over positions: it comes from a parameter or
    buffer (a table), or from arange/tril/triu/eye. Uniform fills (zeros/ones) do not count."""
    if node in dependent:
        return False
    for a in gu.ancestors_within(node, 30):
        if a.op == "get_attr" or gu.is_call(a, _POSITIONAL, ("tril", "triu")):
            return True
    return False


def _table(node: Node, shapes) -> bool:
    """Shaped like a table over positions: several non-trivial dims (not a scalar fill)."""
    return gu.is_tensor_shape(shapes.get(node)) and sum(d > 1 for d in shapes[node]) >= 2


def _position_term(gm, anchor: Node, shapes, dependent: set) -> str | None:
    """Why an attention's logits depend on token positions, or None.

    A mask or logits term that does not depend on the model's input is indexed by token
    position: a relative-position-bias table, a causal or window mask. Merged tokens have no
    single position, so such attention is refused (masks that come from the input, like
    padding masks, are a separate question).
    """
    if gu.is_sdpa(anchor):
        mask = gu.arg(anchor, 3, "attn_mask", None)
        terms = [mask] if isinstance(mask, Node) else []
        for t in terms:  # a sum of masks: look at each term (an input mask + a bias table)
            if gu.is_add(t) and len(terms) < 8:
                terms += [a for a in t.all_input_nodes if a not in terms]
        terms += [t for t in gu.addends(mask) if _table(t, shapes)] if terms else []
        for t in terms:
            if _positional(t, dependent):
                return (f"attention mask term {t.name} does not depend on the input: a bias or "
                        "mask indexed by token position (relative position bias, causal or "
                        "window mask); merged tokens have no single position")
        return None
    node = anchor.args[0] if anchor.args else None
    for _ in range(20):
        if not isinstance(node, Node) or gu.is_matmul(node):
            return None
        terms = [t for a in node.all_input_nodes for t in (a, *gu.addends(a))
                 if _positional(t, dependent) and _table(t, shapes)]
        if terms and (gu.is_add(node) or gu.is_call(node, *_MASKING)):
            return (f"attention logits are combined at {node.name} with {terms[0].name}, which "
                    "does not depend on the input: a bias or mask indexed by token position "
                    "(relative position bias, causal or window mask); merged tokens have no "
                    "single position")
        nxt = [a for a in node.all_input_nodes if a in dependent]
        node = nxt[0] if len(nxt) == 1 else None
    return None


def find_blocks(gm: fx.GraphModule, shapes: dict) -> Matches:
    blocks, cores, refusals, cross = [], [], [], []
    dep = gu.data_dependent(gm, shapes)
    for node in gm.graph.nodes:
        if gu.is_sdpa(node):
            build = _core_sdpa
        elif gu.is_softmax(gm, node):
            build = _core_softmax
        else:
            continue
        try:
            positional = _position_term(gm, node, shapes, dep)
            if positional:
                raise _Refuse(positional)
            core = build(gm, node, shapes, dep)
        except (_Refuse, IndexError, KeyError, TypeError, AttributeError) as exc:
            reason = str(exc) if isinstance(exc, _Refuse) else f"unrecognised attention layout ({exc})"
            refusals.append(Refusal(site_name(node), reason))
            node.meta["tome"] = {"role": "refused", "reason": reason}
            continue
        cores.append(core)
        if core.cross:  # a consumer of the tokens (keys, values), not a block to merge in
            node.meta["tome"] = {"role": "cross_attention", "kind": core.kind}
            if core.query in dep:  # queries from the input: reported, checked by token flow
                refusals.append(Refusal(site_name(node), CROSS_FROM_INPUT))
            else:  # attention pooling: learned queries
                cross.append(site_name(node))
            continue
        try:
            block = _block(gm, len(blocks), core, shapes)
        except _Refuse as exc:
            refusals.append(Refusal(site_name(node), str(exc)))
            node.meta["tome"] = {"role": "refused", "reason": str(exc)}
            continue
        blocks.append(block)
        node.meta["tome"] = {"role": "attention", "block": block.index, "kind": core.kind,
                             "tokens": core.tokens, "heads": core.heads}
        block.merge_at.meta["tome"] = {"role": "merge_point", "block": block.index,
                                       "norm": block.norm}
    heads = gu.chains([(b.stream_in, b.merge_at) for b in blocks])
    blocks = [replace(b, stream=h) for b, h in zip(blocks, heads)]
    prefix = 0
    if blocks:
        prefix = find_prefix(gm, blocks[0].stream_in, shapes, dep, blocks[0].token_dim)
    return Matches(blocks, cores, refusals, prefix, cross)
