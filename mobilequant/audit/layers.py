"""Fused layers of a captured float graph: which nodes one int8 kernel of the artifact computes.

TFLite (and an ONNX QDQ graph run by ONNX Runtime) executes ``conv → BN → ReLU/ReLU6`` as one kernel
with one int8 output tensor; the export name map keys that tensor by the stable name of the group's first
node (the conv). To compare like with like the audit groups the *unfused* float graph the same way, on
the graph (never by module type — STYLE.md's fusion trap):

* a ``batch_norm`` whose input is a conv/linear with no other user joins that conv's group;
* a ReLU / ReLU6 (``relu``, ``hardtanh(0, 6)``, ``clamp(0, 6)``) joins the group of its input when that
  input has no other user and the group is a conv, linear or add;
* every other compute node starts its own group.

A :class:`FusedLayer` keeps the graph node names of the group's inputs and output (for the float
reference), the weights and BN statistics as numpy arrays (for the weight-health checks), and the kind:
``depthwise`` (groups = in channels > 1), ``pointwise`` (1×1, groups 1), ``conv``, ``linear``, or the
op name (``add``, ``mean``, ``adaptive_avg_pool2d``, ...).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.fx import GraphModule, Node

from ..capture import is_structural, layer_name, node_arg
from ..fusion import BN_OPS, CONV_OPS, DEAD_VARIANCE, activation_kind

__all__ = ["FusedLayer", "fused_layers", "WEIGHTED_KINDS"]

aten = torch.ops.aten
_LINEAR_OPS = frozenset({aten.linear.default, aten.addmm.default, aten.mm.default})
_ABSORBS_ACTIVATION = ("conv", "linear", "add")
WEIGHTED_KINDS = ("depthwise", "pointwise", "conv", "linear")


@dataclass(frozen=True, eq=False)
class FusedLayer:
    """One group of float nodes that the artifact computes as one kernel."""

    name: str  # stable name of the first node (the conv / linear / add ...)
    kind: str  # depthwise | pointwise | conv | linear | <op name>
    op: str  # aten op of the first node, e.g. "conv2d"
    members: tuple[str, ...]  # stable names of every node in the group, in order
    output_node: str  # fx node name whose value is the group's output
    input_nodes: tuple[str, ...]  # fx node names of the tensors the group reads (activations only)
    activation: str | None = None  # "relu" | "relu6" | None
    bn: str | None = None  # stable name of the folded BatchNorm
    weight: np.ndarray | None = field(default=None, repr=False)  # float kernel as in torch (O, I/g, kh, kw)
    bias: np.ndarray | None = field(default=None, repr=False)
    bn_gamma: np.ndarray | None = field(default=None, repr=False)
    bn_beta: np.ndarray | None = field(default=None, repr=False)
    bn_mean: np.ndarray | None = field(default=None, repr=False)
    bn_var: np.ndarray | None = field(default=None, repr=False)
    bn_eps: float = 1e-5
    groups: int = 1
    is_tensor: bool = True  # False for a multi-output op (its getitems are the tensors)
    out_shape: tuple[int, ...] = ()  # shape of the group's output in the captured graph (batch first)
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()

    @property
    def is_weighted(self) -> bool:
        return self.kind in WEIGHTED_KINDS

    @property
    def channels(self) -> int:
        return 0 if self.weight is None else int(self.weight.shape[0])

    def folded_weight(self) -> np.ndarray | None:
        """The kernel the artifact quantizes: ``W · γ / sqrt(σ² + eps)`` per channel (zero where σ² = 0)."""
        if self.weight is None:
            return None
        if self.bn_gamma is None:
            return self.weight
        s = self.bn_gamma / np.sqrt(self.bn_var + self.bn_eps)
        s = np.where(self.bn_var <= DEAD_VARIANCE, 0.0, s)  # constant channels fold to β (mobilequant.fusion)
        return self.weight * s.reshape(-1, *([1] * (self.weight.ndim - 1)))


def _const(gm: GraphModule, node) -> np.ndarray | None:
    if not (isinstance(node, Node) and node.op == "get_attr"):
        return None
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj.detach().to(torch.float64).cpu().numpy()


def _tuple(v, n: int = 2) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v) if len(v) > 1 else (int(v[0]),) * n
    return (int(v),) * n


def _kind(node: Node, weight: np.ndarray | None, groups: int) -> str:
    if node.target in CONV_OPS and weight is not None:
        in_per_group = weight.shape[1]
        if groups > 1 and in_per_group == 1:
            return "depthwise"
        if groups == 1 and all(k == 1 for k in weight.shape[2:]):
            return "pointwise"
        return "conv"
    if node.target in _LINEAR_OPS:
        return "linear"
    if node.target is operator.getitem:
        return "getitem"
    name = node.target._schema.name.split("::")[-1] if isinstance(node.target, torch._ops.OpOverload) else str(node.target)
    return name.rstrip("_")


def _activation(gm: GraphModule, node: Node) -> str | None:
    """``activation_kind``, plus cross-layer equalization's ReLU6: ``clamp.Tensor(x, 0, 6 / s)`` with
    per-channel bounds (``mobilequant.quant.cle``), which the artifact keeps inside the layer's output."""
    kind = activation_kind(node)
    if kind is None and node.target is aten.clamp.Tensor and len(node.args) == 3 \
            and all(isinstance(a, Node) and a.op == "get_attr" for a in node.args[1:]):
        lo = _const(gm, node.args[1])
        kind = "relu6" if lo is not None and not np.any(lo) else None
    return kind


def _activation_inputs(node: Node) -> tuple[str, ...]:
    out = []
    for a in node.all_input_nodes:
        if a.op == "get_attr":
            continue
        out.append(a.name)
    return tuple(out)


def fused_layers(gm: GraphModule) -> list[FusedLayer]:
    """The fused groups of a captured (unfused, float) graph, in graph order."""
    groups: list[dict] = []
    group_of: dict[Node, dict] = {}
    for node in gm.graph.nodes:
        # getitem picks one output of a multi-output op (chunk, split): a tensor of its own in the artifact
        if node.op != "call_function" or (is_structural(node) and node.target is not operator.getitem):
            continue
        src = node.args[0] if node.args and isinstance(node.args[0], Node) else None
        owner = group_of.get(src) if src is not None else None
        joins = False
        if owner is not None and len(src.users) == 1 and owner["end"] is src:
            if node.target in BN_OPS and owner["kind_op"] in ("conv", "linear") and owner["bn"] is None \
                    and owner["act"] is None:
                joins = True
                owner["bn"] = node
            elif _activation(gm, node) and owner["kind_op"] in _ABSORBS_ACTIVATION and owner["act"] is None:
                joins = True
                owner["act"] = node
        if joins:
            owner["members"].append(node)
            owner["end"] = node
            group_of[node] = owner
            continue
        kind_op = "conv" if node.target in CONV_OPS else "linear" if node.target in _LINEAR_OPS else (
            "add" if node.target in (aten.add.Tensor, aten.add_.Tensor) else "other")
        g = {"start": node, "end": node, "members": [node], "bn": None, "act": None, "kind_op": kind_op}
        groups.append(g)
        group_of[node] = g
    return [_make_layer(gm, g) for g in groups]


def _make_layer(gm: GraphModule, g: dict) -> FusedLayer:
    start: Node = g["start"]
    kw: dict = {}
    weight = None
    groups = 1
    if g["kind_op"] == "conv":
        weight = _const(gm, node_arg(start, 1, "weight"))
        groups = int(node_arg(start, 6, "groups", 1))
        kw.update(bias=_const(gm, node_arg(start, 2, "bias")), stride=_tuple(node_arg(start, 3, "stride", 1)),
                  padding=_tuple(node_arg(start, 4, "padding", 0)), dilation=_tuple(node_arg(start, 5, "dilation", 1)))
    elif g["kind_op"] == "linear":
        weight = _const(gm, node_arg(start, 1, "weight"))
        kw.update(bias=_const(gm, node_arg(start, 2, "bias")))
    bn: Node | None = g["bn"]
    if bn is not None:
        kw.update(bn=layer_name(bn), bn_gamma=_const(gm, node_arg(bn, 1, "weight")),
                  bn_beta=_const(gm, node_arg(bn, 2, "bias")), bn_mean=_const(gm, node_arg(bn, 3, "running_mean")),
                  bn_var=_const(gm, node_arg(bn, 4, "running_var")),
                  bn_eps=float(node_arg(bn, 7, "eps", 1e-5)))
        if kw["bn_gamma"] is None:
            kw["bn_gamma"] = np.ones_like(kw["bn_mean"])
        if kw["bn_beta"] is None:
            kw["bn_beta"] = np.zeros_like(kw["bn_mean"])
    act = g["act"]
    val = g["end"].meta.get("val")
    return FusedLayer(
        name=layer_name(start),
        kind=_kind(start, weight, groups),
        op=start.target._schema.name.split("::")[-1] if isinstance(start.target, torch._ops.OpOverload) else
        getattr(start.target, "__name__", str(start.target)),
        members=tuple(layer_name(n) for n in g["members"]),
        output_node=g["end"].name,
        input_nodes=_activation_inputs(start),
        activation=_activation(gm, act) if act is not None else None,
        weight=weight,
        groups=groups,
        is_tensor=val is None or isinstance(val, torch.Tensor),
        out_shape=tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else (),
        **kw,
    )
