"""Fusion: fold BatchNorm into the preceding convolution, matched on the captured ATen graph.

The pattern is the chain ``conv(x, W, b) → batch_norm(·, γ, β, μ, σ²)`` where the conv output has no
other user; the activation that follows (ReLU, ReLU6, none for a linear bottleneck, ...) is recorded but
left in the graph — the quantizer fuses it with the conv when it annotates. Matching is on graph nodes
and ATen targets, never on module types (a BatchNorm that secretly owns an activation, like timm's
``BatchNormAct2d``, would otherwise lose it).

Folding (computed in float64, stored in float32)::

    s  = γ / sqrt(σ² + eps)
    W' = W · s        (per output channel)
    b' = (b − μ) · s + β

The folded weights are written as new parameters on the graph module (the user's model is untouched)
and the BN node is removed. ``linear → batch_norm`` (a BatchNorm1d after a classifier's linear layer, on
N×C) folds the same way, one scale per output feature.

Before folding, a ReLU (or ReLU6) that reads only a concatenation is moved onto the concatenation's
inputs: ``relu(cat(a, b)) = cat(relu(a), relu(b))`` exactly, and an input that is already the output of
such an activation (or a pooling / concatenation of one) needs none. ShuffleNetV1's stride-2 units end
in ``relu(cat(avgpool(x), conv-BN(x)))``: TFLite's int8 concatenation needs one scale on all of its
inputs, so the signed conv-BN range was forced onto ``x`` (a ReLU output) and half of its codes went to
negative values that never occur. Moved, the ReLU fuses into the conv and every concat input is
non-negative (ShuffleNetV1 g3, per-channel mse, simulated int8 on the 10k test split: drop 0.59 →
0.27 pp). ``prepare_pt2e`` folds conv-BN too, but with a private helper that does not
check the conv's other users; after :func:`fold_conv_bn` it has nothing left to do.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from .capture import MQ_NAME, layer_name

__all__ = [
    "CONV_OPS",
    "BN_OPS",
    "FoldedConvBN",
    "FusionReport",
    "activation_kind",
    "clamp_bounds",
    "fold_conv_bn",
    "move_activation_before_concat",
]

aten = torch.ops.aten

CONV_OPS = frozenset({aten.conv1d.default, aten.conv2d.default})
_POOL_OPS = frozenset({aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
                       aten.max_pool2d_with_indices.default})
_CAT_OPS = frozenset({aten.cat.default, aten.concat.default})
DEAD_VARIANCE = 1e-8  # a BN channel whose running variance is at most this is constant on its data
BN_OPS = frozenset({aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default})


_CLAMP_OPS = frozenset({aten.hardtanh.default, aten.hardtanh_.default, aten.clamp.default, aten.clamp_.default})


def clamp_bounds(node: Node) -> tuple[float | None, float | None] | None:
    """``(lo, hi)`` of a clamp-like activation with number bounds (``None``: unbounded on that side):
    ReLU ``(0, None)``, ``hardtanh(x, lo, hi)`` (``nn.Hardtanh``, ReLU6), ``clamp(x, min, max)``;
    ``None`` for any other node (per-channel ``clamp.Tensor`` bounds included)."""
    if node.op != "call_function":
        return None
    t = node.target
    if t in (aten.relu.default, aten.relu_.default):
        return 0.0, None
    if t not in _CLAMP_OPS:
        return None
    hardtanh = t in (aten.hardtanh.default, aten.hardtanh_.default)
    names, default = (("min_val", "max_val"), (-1.0, 1.0)) if hardtanh else (("min", "max"), (None, None))
    bounds = []
    for i, (name, d) in enumerate(zip(names, default), start=1):
        b = node.args[i] if len(node.args) > i else node.kwargs.get(name, d)
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float))):
            return None
        bounds.append(None if b is None else float(b))
    return bounds[0], bounds[1]


def activation_kind(node: Node) -> str | None:
    """What a clamp-like activation node computes: ``"relu"``, ``"relu6"`` or ``None`` (anything else,
    other clamp bounds included: see :func:`clamp_bounds`).

    ReLU6 appears as ``hardtanh(x, 0, 6)`` (``nn.ReLU6``, ``F.relu6``) or ``clamp(x, 0, 6)``.
    """
    bounds = clamp_bounds(node)
    if bounds == (0.0, 6.0):
        return "relu6"
    if bounds == (0.0, None):
        return "relu"
    return None


def _follower_kind(node: Node) -> str:
    """Name of the activation after a folded conv-BN, ``"none"`` for a linear bottleneck."""
    users = list(node.users)
    if len(users) != 1:
        return "none"
    (user,) = users
    kind = activation_kind(user) or ("clamp" if clamp_bounds(user) is not None else None)
    if kind:
        return kind
    if user.op == "call_function" and isinstance(user.target, torch._ops.OpOverload):
        name = user.target._schema.name.split("::")[-1].rstrip("_")
        if name in ("hardswish", "hardsigmoid", "sigmoid", "silu", "gelu", "tanh", "leaky_relu", "elu"):
            return name
    return "none"


@dataclass(frozen=True)
class FoldedConvBN:
    """One folded pair, by layer name, and the activation that follows (``none``: linear bottleneck)."""

    conv: str
    bn: str
    activation: str
    constant_channels: tuple[int, ...] = ()  # zero running variance: folded to their constant output β


@dataclass(frozen=True)
class FusionReport:
    folded: tuple[FoldedConvBN, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()  # (bn layer, why it stays)
    moved_activations: tuple[str, ...] = ()  # activations moved onto the inputs of the concat they read

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for f in self.folded:
            kinds[f.activation] = kinds.get(f.activation, 0) + 1
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))
        moved = f"; {len(self.moved_activations)} activations moved before a concat" if self.moved_activations else ""
        return f"folded {len(self.folded)} conv-BN ({detail}); {len(self.skipped)} BN left{moved}"


def _bn_arguments(bn: Node) -> dict:
    schema = bn.target._schema
    values = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(bn.args):
            values[arg.name] = bn.args[i]
        elif arg.name in bn.kwargs:
            values[arg.name] = bn.kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
    return values


def _tensor(gm: GraphModule, node) -> torch.Tensor | None:
    if node is None:
        return None
    if not (isinstance(node, Node) and node.op == "get_attr"):
        raise ValueError(f"{node} is not a constant")
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def _set_param(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    *path, leaf = target.split(".")
    mod = gm.get_submodule(".".join(path)) if path else gm
    if leaf in mod._buffers:
        del mod._buffers[leaf]
    if hasattr(mod, leaf) and leaf not in mod._parameters:
        delattr(mod, leaf)
    mod.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))


def _free_target(gm: GraphModule, wanted: str) -> str:
    *path, leaf = wanted.split(".")
    mod = gm.get_submodule(".".join(path)) if path else gm
    name, k = leaf, 0
    while getattr(mod, name, None) is not None:
        k += 1
        name = f"{leaf}_fused{k}"
    return ".".join([*path, name])


def _within(node, kind: str) -> bool:
    """True when ``node``'s values already lie in ``kind``'s output range (relu: ≥ 0; relu6: [0, 6])."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    produced = activation_kind(node)
    if produced is not None:
        return produced == kind or produced == "relu6"
    if node.target is operator.getitem and node.args[1] == 0 and isinstance(node.args[0], Node):
        return node.args[0].target == aten.max_pool2d_with_indices.default and _within(node.args[0], kind)
    if node.target in _POOL_OPS:
        return _within(node.args[0], kind)
    if node.target in _CAT_OPS:
        return all(_within(x, kind) for x in node.args[0])
    return False


def move_activation_before_concat(gm: GraphModule) -> tuple[str, ...]:
    """Rewrite every ``act(cat(xs))`` (act = ReLU or ReLU6, the concat's only reader) as
    ``cat(act(x) for x in xs)``, skipping inputs already in the activation's range; return the moved
    activations' layer names. Exact in float (both are elementwise); see the module docstring for why."""
    moved = []
    for act in list(gm.graph.nodes):
        kind = activation_kind(act)
        cat = act.args[0] if kind else None
        if not (isinstance(cat, Node) and cat.op == "call_function" and cat.target in _CAT_OPS
                and len(cat.users) == 1):
            continue
        inputs = []
        for i, x in enumerate(cat.args[0]):
            if _within(x, kind):
                inputs.append(x)
                continue
            with gm.graph.inserting_after(x):
                new = gm.graph.call_function(aten.relu.default if kind == "relu" else aten.hardtanh.default,
                                             (x,) if kind == "relu" else (x, 0.0, 6.0))
            new.meta = {k: v for k, v in act.meta.items() if k in ("nn_module_stack", "stack_trace")}
            if "val" in x.meta:
                new.meta["val"] = x.meta["val"]
            new.meta[MQ_NAME] = f"{layer_name(act)}.in{i}"
            inputs.append(new)
        cat.args = (inputs, *cat.args[1:])
        act.replace_all_uses_with(cat)
        moved.append(layer_name(act))
        gm.graph.erase_node(act)
    return tuple(moved)


def fold_conv_bn(gm: GraphModule, constant_channels: bool = True) -> FusionReport:
    """Fold every ``conv → batch_norm`` chain of ``gm`` in place (after moving ReLUs that read a concat
    onto its inputs); report what was folded, left or moved.

    ``constant_channels``: a channel with zero running variance is folded to its constant output β (for
    int8: see below). Float exports fold it literally instead, so the float file computes the module's
    function on any input, not only on data like the BN statistics' (the shipped MobileNetV2 0.5 has two
    such channels: its fp32 file was 3.3 off the module on noise images, and failed its own check)."""
    moved = move_activation_before_concat(gm)
    folded, skipped = [], []
    obsolete: set[str] = set()
    for bn in list(gm.graph.nodes):
        if bn.op != "call_function" or bn.target not in BN_OPS:
            continue
        conv = bn.args[0]
        why = _why_not_foldable(conv, bn)
        if why:
            skipped.append((layer_name(bn), why))
            continue
        args = _bn_arguments(bn)
        if args.get("training", False):
            skipped.append((layer_name(bn), "batch norm in training mode"))
            continue
        w_node = conv.args[1]
        b_node = conv.args[2] if len(conv.args) > 2 else None
        w = _tensor(gm, w_node)
        b = _tensor(gm, b_node)
        mean = _tensor(gm, args["running_mean"]).double()
        var = _tensor(gm, args["running_var"]).double()
        gamma = _tensor(gm, args["weight"])
        beta = _tensor(gm, args["bias"])
        gamma = torch.ones_like(mean) if gamma is None else gamma.double()
        beta = torch.zeros_like(mean) if beta is None else beta.double()
        scale = gamma / torch.sqrt(var + float(args["eps"]))
        # A channel with zero running variance was constant on the data its statistics came from (its
        # input channels never fire, typically): its output is β. Folded literally its kernel would be
        # W · γ / sqrt(eps) ≈ 300 × W, whose range dominates a per-tensor weight scale (the per-tensor
        # collapse of MobileNetV2 0.5: 63 % top-1; 91 % with these channels folded to β) and whose bias
        # scale (input scale × weight scale) rounds β away. Folded to β it computes the same on that data.
        constant = var <= DEAD_VARIANCE if constant_channels else torch.zeros_like(var, dtype=torch.bool)
        scale = torch.where(constant, torch.zeros_like(scale), scale)
        new_w = (w.double() * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
        new_b = ((torch.zeros_like(mean) if b is None else b.double()) - mean) * scale + beta
        new_b = new_b.to(w.dtype)

        # Write new parameters; never modify tensors that the user's model may share.
        w_target = str(w_node.target) if len(w_node.users) == 1 else _free_target(gm, str(w_node.target))
        _set_param(gm, w_target, new_w.detach().clone())
        if b_node is not None and len(b_node.users) == 1:
            b_target = str(b_node.target)
        else:
            b_target = _free_target(gm, w_target.rsplit(".", 1)[0] + ".bias" if "." in w_target else "bias")
        _set_param(gm, b_target, new_b.detach().clone())
        with gm.graph.inserting_before(conv):
            new_w_node = gm.graph.get_attr(w_target) if w_target != w_node.target else w_node
            new_b_node = gm.graph.get_attr(b_target) if b_node is None or b_target != b_node.target else b_node
        for new_node, value in ((new_w_node, new_w), (new_b_node, new_b)):
            if "val" in w_node.meta and new_node is not w_node:
                new_node.meta["val"] = w_node.meta["val"].fake_mode.from_tensor(value, static_shapes=True)
        conv_args = list(conv.args) + [None] * (3 - len(conv.args))
        conv_args[1], conv_args[2] = new_w_node, new_b_node
        conv.args = tuple(conv_args)

        # Replace the BN output(s) with the conv output.
        if bn.target == aten.batch_norm.default:
            bn.replace_all_uses_with(conv)
        else:  # native BN returns (out, mean, invstd): only item 0 may be used
            for user in list(bn.users):
                if user.target is operator.getitem and user.args[1] == 0:
                    user.replace_all_uses_with(conv)
                    gm.graph.erase_node(user)
        conv.meta.setdefault("mq_folded", []).append(layer_name(bn))
        if not bn.users:
            gm.graph.erase_node(bn)
        folded.append(FoldedConvBN(layer_name(conv), layer_name(bn), _follower_kind(conv),
                                   tuple(int(i) for i in constant.nonzero().reshape(-1))))
        for name in ("weight", "bias", "running_mean", "running_var"):
            if isinstance(args.get(name), Node):
                obsolete.add(str(args[name].target))
        obsolete.add(str(w_node.target))
    gm.graph.eliminate_dead_code()
    _delete_unreferenced(gm, obsolete)
    gm.recompile()
    return FusionReport(tuple(folded), tuple(skipped), moved)


def _delete_unreferenced(gm: GraphModule, targets: set[str]) -> None:
    """Drop the folded BN tensors (and BN counters) no graph node reads any more."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    prefixes = {t.rsplit(".", 1)[0] for t in targets if "." in t}
    targets |= {f"{p}.num_batches_tracked" for p in prefixes}
    for target in targets - used:
        *path, leaf = target.split(".")
        try:
            mod = gm.get_submodule(".".join(path)) if path else gm
        except AttributeError:
            continue
        for store in (mod._parameters, mod._buffers):
            store.pop(leaf, None)


def _why_not_foldable(conv, bn: Node) -> str | None:
    if isinstance(conv, Node) and conv.op == "call_function" and conv.target == aten.linear.default:
        val = conv.meta.get("val")
        if val is None or val.dim() != 2:  # BatchNorm1d after a linear on N×C: the features are the channels
            return "input is a linear layer whose output is not N×C"
    elif not (isinstance(conv, Node) and conv.op == "call_function" and conv.target in CONV_OPS):
        return "input is not a convolution"
    if len(conv.users) != 1:
        return "convolution output has other users"
    w_node = conv.args[1]
    if not (isinstance(w_node, Node) and w_node.op == "get_attr"):
        return "convolution weight is not a constant"
    b_node = conv.args[2] if len(conv.args) > 2 else None
    if b_node is not None and not (isinstance(b_node, Node) and b_node.op == "get_attr"):
        return "convolution bias is not a constant"
    if bn.target == aten._native_batch_norm_legit_no_training.default:
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in bn.users):
            return "batch norm statistics outputs are used"
    return None
