"""Cross-layer equalization (CLE) on the captured, BN-folded graph.

Nagel, van Baalen, Blankevoort, Welling, "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019, §4.1. For two layers ``y = f(W1 x + b1)``, ``z = W2 y`` where ``f`` is
positive-homogeneous per channel (``f(x / s) = f(x) / s`` for ``s > 0``), scaling output channel ``i`` of
the first layer by ``1 / s_i`` and input channel ``i`` of the second by ``s_i`` leaves ``z`` unchanged.
With ``r1_i`` the range (max |w|) of output channel ``i`` of ``W1`` and ``r2_i`` that of input channel
``i`` of ``W2``::

    s_i = sqrt(r1_i · r2_i) / r2_i          so that  r1_i / s_i = r2_i · s_i = sqrt(r1_i · r2_i)

which maximises the summed per-channel precision of both layers under per-tensor weight quantization —
the point of CLE for targets that only take per-tensor weights (some DSPs). A depthwise layer is the
typical beneficiary: its output channel ``i`` feeds only input channel ``i`` of the pointwise layer
after it, and its channel ranges differ by orders of magnitude after BN folding.

Pairs are found on the graph, never by module type: ``conv|linear → op* → conv|linear`` where each
intermediate result has exactly one user and every op in between commutes with a positive
per-channel scale: ReLU, clamps (``hardtanh`` / ReLU6 / ``clamp``, see below), average and max pooling,
a spatial ``mean`` and a flatten into a linear layer. Pairs overlap along chains (``dw`` is the
second layer of ``expand → dw`` and the first of ``dw → project``), so all pairs are equalized in
turn, repeatedly, until no scale moves by more than ``tol`` or ``iterations`` passes are done.

ReLU6 is not scale-equivariant: ``min(max(x / s, 0), 6) ≠ min(max(x, 0), 6) / s``. It is equivariant to
``min(max(x / s, 0), 6 / s)`` though, i.e. a clamp whose ceiling moves with the channel's scale. The
treatments (``relu6=``):

* ``"clamp"`` (default, exact): rescale and replace ``hardtanh(x, lo, hi)`` by one
  ``aten.clamp.Tensor(x, lo / s, hi / s)`` with per-channel bounds (graph constants). The float model
  computes exactly what it did. Costs: the op after the conv is no longer a ReLU6 (a backend needs a
  per-channel MINIMUM: TFLite has one, with the input's quantization parameters), and the fixed
  [0, 6] activation range no longer applies — the per-tensor activation range becomes
  ``[0, max_i 6 / s_i]``, i.e. CLE moves the imbalance from the weights into this activation.
* ``"relu"`` (the paper's choice for MobileNetV2): replace ReLU6 by ReLU before equalizing. Every
  backend handles it, but the float function changes wherever a pre-activation exceeds 6.
* ``"skip"``: leave pairs joined by a clamp alone (exact, but no equalization across ReLU6 — almost
  every MobileNetV2 pair).

(Equalizing only channels with ``s_i ≥ 1`` and keeping the ReLU6 is not exact either: the clip at 6
would then apply to ``x / s_i`` and let through values in ``(6 / s_i, 6]`` that used to be clipped.)

Measured on torchvision's ImageNet MobileNetV2 1.0 (BN folded, 37 pairs; 96 crops of scikit-image photos,
no ImageNet labels here, so against the float model): ``"clamp"`` keeps the float logits within 1e-5
(SQNR 113 dB) while ``"relu"`` moves them to 23 dB SQNR and changes the top-1 class on 5 % of the crops.
Per-tensor int8 weights, float activations — logit SQNR / top-1 agreement with float: plain 10.3 dB / 65 %,
CLE clamp 15.7 dB / 86 %, CLE clamp + bias correction 25.0 dB / 98 %, CLE relu + bias correction
20.6 dB / 94 % (per-channel int8 weights, no CLE: 18.2 dB / 95 %). For int8 activations the quantizer must
treat ``conv → clamp.Tensor`` like ``conv → ReLU6``: one quantized output after the clamp (range
``[0, max_i 6 / s_i]``, zero point −128), not a separate range on the conv output, which would include
the negative pre-activations.

Shipped Fashion-MNIST MobileNetV2 0.5 (float 89.49 % on the 10k test split; 512 calibration images):
per-tensor int8 weights alone give 10.00 % (chance), with CLE clamp 88.91 %, + bias correction 89.04 %
(per-channel weights 89.39 %). Full int8 (per-tensor weights, minmax activations): 10.00 % without CLE;
with CLE clamp 87.27 %, + bias correction 89.32 % when ``conv → clamp`` is quantized as one fused op
(per-channel weights without CLE: 89.01 %). ``"relu"`` is as good on this checkpoint (its float accuracy
moves only to 89.46 %), but on a shorter-trained checkpoint of the same model that relies on the clip it
took float accuracy from 71.2 % to 10.0 %, where ``"clamp"`` (+ bias correction) kept 70.8 %.

:func:`equalize` rewrites the graph module in place (new weight tensors: tensors shared with the
user's model are never written) and returns it with an :class:`EqualizationReport`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from ..capture import layer_name
from ..errors import UsageError, did_you_mean
from ..fusion import CONV_OPS

__all__ = ["RELU6_TREATMENTS", "PairScales", "EqualizationReport", "equalize", "channel_ranges"]

aten = torch.ops.aten

RELU6_TREATMENTS = ("clamp", "relu", "skip")

_LINEAR_OPS = frozenset({aten.linear.default})
_LAYER_OPS = CONV_OPS | _LINEAR_OPS
_RELU_OPS = frozenset({aten.relu.default, aten.relu_.default})
_SCALAR_CLAMP_OPS = frozenset({aten.hardtanh.default, aten.hardtanh_.default, aten.clamp.default,
                               aten.clamp_.default})
_TENSOR_CLAMP_OPS = frozenset({aten.clamp.Tensor})
_POOL_OPS = frozenset({aten.avg_pool1d.default, aten.avg_pool2d.default, aten.max_pool1d.default,
                       aten.max_pool2d.default, aten.adaptive_avg_pool1d.default,
                       aten.adaptive_avg_pool2d.default})
_FLATTEN_OPS = frozenset({aten.flatten.using_ints, aten.view.default, aten.reshape.default,
                          aten._unsafe_view.default})
_IDENTITY_OPS = frozenset({aten.dropout.default, aten.clone.default, aten.alias.default})


@dataclass(frozen=True)
class PairScales:
    """One equalized pair: ``W1[i] /= s_i``, ``b1[i] /= s_i``, ``W2[:, i] *= s_i`` (all passes together).

    ``precision_*`` is the paper's objective (its eq. 8), normalised to [0, 1]: the mean over channels
    of ``(r1_i / max r1) · (r2_i / max r2)``, the product of the fractions of the per-tensor int8 grid
    that channel ``i`` uses in each layer. 1 means every channel uses the whole grid in both layers.
    """

    first: str
    second: str
    kind: str  # e.g. "dwconv→conv", "conv→dwconv", "conv→linear"
    between: tuple[str, ...]  # layer names of the ops in between (activation, pooling, flatten)
    scales: tuple[float, ...]
    precision_before: float
    precision_after: float


@dataclass(frozen=True)
class EqualizationReport:
    pairs: tuple[PairScales, ...]
    skipped: tuple[tuple[str, str, str], ...]  # (first, second, why)
    iterations: int
    converged: bool
    relu6: str

    def summary(self) -> str:
        if not self.pairs:
            return f"CLE: no pair equalized ({len(self.skipped)} skipped)"
        before = sum(p.precision_before for p in self.pairs) / len(self.pairs)
        after = sum(p.precision_after for p in self.pairs) / len(self.pairs)
        state = "converged" if self.converged else "not converged"
        return (f"CLE: {len(self.pairs)} pairs, {self.iterations} passes ({state}), relu6={self.relu6}; "
                f"mean per-tensor precision {before:.3f} -> {after:.3f}; {len(self.skipped)} skipped")


# ---------------------------------------------------------------------------------------------------
# Tensors on the graph module


def _get(gm: GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _replace(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    """Point ``target`` at a new tensor, keeping it a parameter or a buffer (never writes in place)."""
    *path, leaf = target.split(".")
    mod = gm.get_submodule(".".join(path)) if path else gm
    if leaf in mod._parameters:
        mod._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:
        setattr(mod, leaf, value)


def _new_constant(gm: GraphModule, stem: str, value: torch.Tensor, before: Node, like: Node | None) -> Node:
    name, k = stem, 0
    while hasattr(gm, name):
        k += 1
        name = f"{stem}_{k}"
    gm.register_buffer(name, value)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    val = like.meta.get("val") if like is not None else None
    if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode"):
        node.meta["val"] = val.fake_mode.from_tensor(value, static_shapes=True)
    return node


# ---------------------------------------------------------------------------------------------------
# Pair discovery


@dataclass
class _Layer:
    node: Node
    weight: str  # get_attr target
    bias: str | None
    groups: int
    is_linear: bool

    @property
    def name(self) -> str:
        return layer_name(self.node)

    def kind(self, gm: GraphModule) -> str:
        if self.is_linear:
            return "linear"
        w = _get(gm, self.weight)
        return "dwconv" if self.groups > 1 and w.shape[1] == 1 else ("gconv" if self.groups > 1 else "conv")


@dataclass
class _Pair:
    first: _Layer
    second: _Layer
    between: list[Node]
    expand: int  # features of the second layer per channel of the first (flatten of C×H×W)


def _as_layer(node: Node, attr_users: dict[str, int]) -> _Layer | None:
    if node.op != "call_function" or node.target not in _LAYER_OPS:
        return None
    w = node.args[1] if len(node.args) > 1 else None
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not (isinstance(w, Node) and w.op == "get_attr"):
        return None
    if b is not None and not (isinstance(b, Node) and b.op == "get_attr"):
        return None
    if any(attr_users.get(str(a.target), 0) != 1 for a in (w, b) if a is not None):
        return None  # a shared tensor: rescaling it for one layer would change the other
    is_linear = node.target in _LINEAR_OPS
    groups = 1 if is_linear else (node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1))
    return _Layer(node, str(w.target), None if b is None else str(b.target), int(groups), is_linear)


def _rank(node: Node) -> int | None:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


def _feature_shape(node: Node) -> tuple[int, ...] | None:
    """The traced shape without the (possibly symbolic) batch dimension."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 1:
        return None
    try:
        return tuple(int(d) for d in val.shape[1:])
    except TypeError:  # a symbolic size other than the batch
        return None


def _transparent(node: Node, channels: int) -> tuple[str, int] | None:
    """How a node between two layers treats per-channel scales: ``("act", 1)``, ``("clamp", 1)``,
    ``("flatten", k)`` (features per channel) — or ``None`` when it does not commute with them."""
    if node.op != "call_function":
        return None
    t = node.target
    if t in _RELU_OPS or t in _POOL_OPS or t in _IDENTITY_OPS:
        if t is aten.dropout.default and len(node.args) > 2 and node.args[2]:
            return None  # dropout in training mode
        return ("act", 1)
    if t in _SCALAR_CLAMP_OPS or t in _TENSOR_CLAMP_OPS:
        return ("clamp", 1)
    if t is aten.mean.dim:
        rank = _rank(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else None
        if rank is None or not dims:
            return None
        dims = {d % rank for d in dims}
        return ("act", 1) if 0 not in dims and 1 not in dims else None
    if t in _FLATTEN_OPS:
        src, dst = _feature_shape(node.args[0]), _feature_shape(node)
        if src is None or dst is None or len(dst) != 1 or len(src) < 1 or src[0] != channels:
            return None  # only [N, C, *spatial] -> [N, C * prod(spatial)] keeps channels in blocks
        per_channel = math.prod(src[1:])
        return ("flatten", per_channel) if dst[0] == channels * per_channel else None
    return None


def _find_pairs(gm: GraphModule) -> tuple[list[_Pair], list[tuple[str, str, str]]]:
    attr_users: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            attr_users[str(node.target)] = attr_users.get(str(node.target), 0) + len(node.users)
    pairs, skipped = [], []
    for node in gm.graph.nodes:
        first = _as_layer(node, attr_users)
        if first is None:
            continue
        channels = _get(gm, first.weight).shape[0]
        cur, between, expand = node, [], 1
        while True:
            users = list(cur.users)
            if len(users) != 1:
                break  # output used twice (residual, concat...): a scale would leak into the other use
            (user,) = users
            if user.args and user.args[0] is cur:
                second = _as_layer(user, attr_users)
                if second is not None:
                    if _input_channels(gm, second) == channels * expand and (expand == 1 or second.is_linear):
                        pairs.append(_Pair(first, second, between, expand))
                    else:
                        skipped.append((first.name, second.name, "channel counts do not match"))
                    break
            how = _transparent(user, channels) if user.args and user.args[0] is cur else None
            if how is None or (how[0] == "flatten" and expand != 1):
                break
            between.append(user)
            expand *= how[1]
            cur = user
    return pairs, skipped


def _input_channels(gm: GraphModule, layer: _Layer) -> int:
    w = _get(gm, layer.weight)
    return w.shape[1] if layer.is_linear else w.shape[1] * layer.groups


# ---------------------------------------------------------------------------------------------------
# Ranges and scaling


def channel_ranges(weight: torch.Tensor, groups: int = 1, is_linear: bool = False, *,
                   axis: str = "out", expand: int = 1) -> torch.Tensor:
    """Per-channel max |w| of a conv / linear weight, along output (``axis="out"``) or input channels.

    Input channel ``i`` of a grouped conv (weight ``[out, in / groups, *k]``) is column ``i mod
    (in / groups)`` of the output channels of group ``i // (in / groups)``. With ``expand`` k > 1 (a
    linear layer after a flatten) input channel ``i`` is the block of features ``[i·k, (i+1)·k)``.
    """
    w = weight.detach().abs()
    if axis == "out":
        return w.reshape(w.shape[0], -1).amax(1)
    return _per_input_channel(w, groups, is_linear, expand).amax(1)


def _per_input_channel(w: torch.Tensor, groups: int, is_linear: bool, expand: int) -> torch.Tensor:
    """``w`` rearranged as ``[input channel, everything it multiplies]``."""
    if is_linear:
        out, feats = w.shape
        return w.reshape(out, feats // expand, expand).permute(1, 0, 2).reshape(feats // expand, -1)
    out, cpg = w.shape[0], w.shape[1]
    opg = out // groups
    return w.reshape(groups, opg, cpg, -1).permute(0, 2, 1, 3).reshape(groups * cpg, -1)


def _scale_input_channels(w: torch.Tensor, s: torch.Tensor, groups: int, is_linear: bool,
                          expand: int) -> torch.Tensor:
    if is_linear:
        return w * s.repeat_interleave(expand)[None, :]
    out, cpg = w.shape[0], w.shape[1]
    per_group = s.reshape(groups, 1, cpg)  # [group, 1, column]
    shaped = w.reshape(groups, out // groups, cpg, -1) * per_group[..., None]
    return shaped.reshape(w.shape)


def _precision(r1: torch.Tensor, r2: torch.Tensor) -> float:
    top1, top2 = float(r1.max()), float(r2.max())
    if top1 == 0 or top2 == 0:
        return 0.0
    return float((r1 / top1 * r2 / top2).mean())


class _Work:
    """Float64 copies of every tensor CLE rescales; written back (in the original dtype) once at the end,
    so repeated passes do not accumulate float32 rounding."""

    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self.tensors: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}

    def __getitem__(self, target: str) -> torch.Tensor:
        if target not in self.tensors:
            t = _get(self.gm, target).detach()
            self.dtypes[target] = t.dtype
            self.tensors[target] = t.double()
        return self.tensors[target]

    def __setitem__(self, target: str, value: torch.Tensor) -> None:
        self[target]  # noqa: B018 - records the dtype on first use
        self.tensors[target] = value

    def write_back(self) -> None:
        for target, value in self.tensors.items():
            _replace(self.gm, target, value.to(self.dtypes[target]).contiguous())


def _pair_ranges(work: _Work, pair: _Pair) -> tuple[torch.Tensor, torch.Tensor]:
    r1 = channel_ranges(work[pair.first.weight], axis="out")
    r2 = channel_ranges(work[pair.second.weight], pair.second.groups, pair.second.is_linear, axis="in",
                        expand=pair.expand)
    return r1, r2


def _apply(work: _Work, pair: _Pair, s: torch.Tensor) -> None:
    """``W1[i] /= s_i``, ``b1[i] /= s_i``, clamp bounds ``/= s_i``, ``W2[:, i] *= s_i``."""
    w1 = work[pair.first.weight]
    work[pair.first.weight] = w1 / s.reshape((-1,) + (1,) * (w1.dim() - 1))
    if pair.first.bias is not None:
        work[pair.first.bias] = work[pair.first.bias] / s
    for node in pair.between:
        if node.target in _TENSOR_CLAMP_OPS:
            for i in (1, 2):
                bound = node.args[i] if len(node.args) > i else None
                if isinstance(bound, Node):
                    t = work[str(bound.target)]
                    work[str(bound.target)] = t / s.reshape(t.shape)
    work[pair.second.weight] = _scale_input_channels(work[pair.second.weight], s, pair.second.groups,
                                                     pair.second.is_linear, pair.expand)


def _clamp_bounds(node: Node) -> tuple[float | None, float | None]:
    t = node.target
    hardtanh = t in (aten.hardtanh.default, aten.hardtanh_.default)
    names = ("min_val", "max_val") if hardtanh else ("min", "max")
    default = (-1.0, 1.0) if hardtanh else (None, None)
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get(names[0], default[0])
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get(names[1], default[1])
    return (None if lo is None else float(lo)), (None if hi is None else float(hi))


def _prepare_between(gm: GraphModule, pair: _Pair, treatment: str, channels: int) -> str | None:
    """Make the ops between a pair scale-equivariant per channel; the reason why not, if impossible."""
    for i, node in enumerate(pair.between):
        if node.target not in _SCALAR_CLAMP_OPS:
            continue
        lo, hi = _clamp_bounds(node)
        if lo in (0.0, None) and hi in (0.0, None):
            continue  # clamp(x, 0) is a ReLU: equivariant as it is
        if treatment == "skip":
            return "clamp between (relu6='skip')"
        if treatment == "relu":
            if lo != 0.0:
                return f"clamp [{lo}, {hi}] is no ReLU6 (relu6='relu' only replaces those)"
            new = _replace_node(gm, node, aten.relu.default, (node.args[0],))
        else:
            rank = _rank(node) or _rank(pair.first.node) or 4
            shape = (channels,) + (1,) * max(rank - 2, 0)
            bounds = []
            for j, value in enumerate((lo, hi)):
                if value is None:
                    bounds.append(None)
                    continue
                tensor = torch.full(shape, value, dtype=torch.float32)
                stem = f"_mq_cle_{node.name}_{'min' if j == 0 else 'max'}"
                bounds.append(_new_constant(gm, stem, tensor, node, pair.first.node.args[1]))
            new = _replace_node(gm, node, aten.clamp.Tensor, (node.args[0], *bounds))
        pair.between[i] = new
    return None


def _replace_node(gm: GraphModule, old: Node, target, args: tuple) -> Node:
    with gm.graph.inserting_after(old):
        new = gm.graph.call_function(target, args)
    new.meta.update(old.meta)  # keeps the stable layer name (mq_name) and the traced value
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)
    return new


def equalize(gm: GraphModule, iterations: int = 100, *, relu6: str = "clamp",
             tol: float = 1e-4) -> tuple[GraphModule, EqualizationReport]:
    """Equalize every layer pair of ``gm`` (see the module docstring), in place; return it and a report.

    ``iterations``: passes over all pairs at most; stops earlier once no scale of a pass differs from
    1 by more than ``tol``. ``relu6``: ``"clamp"`` (exact), ``"relu"`` (the paper) or ``"skip"``.
    """
    if relu6 not in RELU6_TREATMENTS:
        raise UsageError(f"unknown CLE relu6 treatment {relu6!r}{did_you_mean(str(relu6), RELU6_TREATMENTS)}; "
                         f"choose from {', '.join(RELU6_TREATMENTS)}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise UsageError(f"CLE iterations must be a positive integer, got {iterations!r}")
    found, skipped = _find_pairs(gm)
    pairs = []
    for pair in found:
        channels = _get(gm, pair.first.weight).shape[0]
        why = _prepare_between(gm, pair, relu6, channels)
        if why:
            skipped.append((pair.first.name, pair.second.name, why))
        else:
            pairs.append(pair)

    work = _Work(gm)
    before = [_pair_ranges(work, p) for p in pairs]
    total = [torch.ones(r1.numel(), dtype=torch.float64) for r1, _ in before]
    passes, converged = 0, not pairs
    for passes in range(1, iterations + 1):
        moved = 0.0
        for k, pair in enumerate(pairs):
            r1, r2 = _pair_ranges(work, pair)
            live = (r1 > 0) & (r2 > 0)  # a dead channel (all-zero weights) keeps its scale 1
            s = torch.where(live, torch.sqrt(r1 * r2) / torch.where(live, r2, 1.0), 1.0)
            _apply(work, pair, s)
            total[k] *= s
            moved = max(moved, float((s - 1).abs().max()))
        if moved <= tol:
            converged = True
            break

    report_pairs = []
    for pair, (r1a, r2a), s in zip(pairs, before, total):
        r1b, r2b = _pair_ranges(work, pair)
        report_pairs.append(PairScales(
            first=pair.first.name,
            second=pair.second.name,
            kind=f"{pair.first.kind(gm)}→{pair.second.kind(gm)}",
            between=tuple(layer_name(n) for n in pair.between),
            scales=tuple(float(v) for v in s),
            precision_before=_precision(r1a, r2a),
            precision_after=_precision(r1b, r2b),
        ))
    work.write_back()
    if found:
        gm.graph.lint()
        gm.recompile()
    report = EqualizationReport(tuple(report_pairs), tuple(skipped), passes if pairs else 0, converged, relu6)
    return gm, report
