"""The QAT graph: capture → ``prepare_qat_pt2e`` → train / eval switches → trained ranges by layer name.

What torchao gives and what is added here:

* :func:`equalized_graph` is the start of a per-tensor QAT job with ``QuantConfig.cle``: the float model
  captured, its BNs folded and its layer pairs equalized (the PTQ pipeline's own steps), with trainable
  weights. QAT then trains the equalized conv weights directly (no BN left to fold while training).
* :func:`build_qat_graph` captures the model with :func:`mobilequant.capture.capture` (dynamic batch, stable
  layer names) and calls torchao's ``prepare_qat_pt2e``, which replaces each conv → BN by its QAT pattern
  (weights scaled by ``γ / running std``, BN on the conv output with *batch* statistics while training).
* :func:`set_mode` wraps torchao's ``move_exported_model_to_train/eval`` (an exported graph has no
  ``.train()``) and re-applies the BN freeze, because moving to train rewrites every BN back to training.
  Freezing BN sets the ``training`` argument of each ``aten.batch_norm`` node to False — the recipe of
  torchao's QAT tutorial: the BN then normalises with, and stops updating, its running statistics.
* :func:`shift_biases` carries a PTQ result's bias correction into the QAT graph (``start="ptq"``): each
  layer's bias — or, in a QAT conv-BN pattern, its BN's β — moves by the same per-channel shift.
* :func:`tensor_key` / :func:`trained_qparams` name every fake-quant by the quantization table's
  ``(layer, role)`` so trained scales can be carried to the converted graph (``mobilequant.qat.convert``).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e import (
    FakeQuantizeBase,
    LearnableFakeQuantize,
    disable_observer,
    enable_range_learning,
    move_exported_model_to_eval,
    move_exported_model_to_train,
)
from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer import Quantizer

from ..capture import MQ_NAME, capture, layer_name
from ..fusion import BN_OPS, CONV_OPS, DEAD_VARIANCE, fold_conv_bn
from ..quant.ptq import is_captured
from ..quant.quantizer import FUSED_INTO

__all__ = [
    "WeightFakeQuant",
    "equalized_graph",
    "build_qat_graph",
    "set_mode",
    "fake_quant_modules",
    "weight_fake_quants",
    "silence_dead_channels",
    "shift_biases",
    "freeze_observers",
    "observers_paused",
    "enable_scale_learning",
    "tensor_key",
    "trained_qparams",
]

aten = torch.ops.aten
_TRAINING_ARG = 5  # aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, ...)


def equalized_graph(model: nn.Module, example_input: torch.Tensor) -> GraphModule:
    """``model`` captured, BN folded and cross-layer equalized (ReLU6 as a per-channel clamp: exact).

    The float graph computes what ``model`` computes (``mobilequant.quant.cle``); its weights and biases
    are trainable parameters, so a QAT job can start from it (and :func:`build_qat_graph` takes it as is).
    Layer names are the captured model's, so a PTQ result with ``cle=True`` of the same model matches it.
    """
    from ..quant.cle import equalize

    with _rng_untouched():
        gm = capture(copy.deepcopy(model), example_input, dynamic_batch=True)
    fold_conv_bn(gm)
    gm, _ = equalize(gm)
    for p in gm.parameters():
        p.requires_grad_(True)
    return gm


def build_qat_graph(model: nn.Module, example_input: torch.Tensor, quantizer: Quantizer,
                    dropout: float | None = None) -> GraphModule:
    """Capture a copy of ``model`` (dynamic batch) and prepare it for QAT with ``quantizer``.

    ``model`` may also be a graph that is already captured (:func:`equalized_graph`); it is copied, not
    re-captured. ``dropout`` overrides the probability of every ``nn.Dropout`` first (a captured graph
    has none left). The graph comes back in eval mode (BN on running statistics, dropout off);
    :func:`set_mode` switches it.
    """
    model = copy.deepcopy(model).eval()
    if dropout is not None:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = float(dropout)
    with _rng_untouched():
        gm = model if is_captured(model) else capture(model, example_input, dynamic_batch=True)
        literals = _literals(gm)
        prepared = prepare_qat_pt2e(gm, quantizer)
        prepared._mq_literals = literals
        move_exported_model_to_eval(prepared)
        _restore_literals(prepared)
    return prepared


# torchao's train / eval switches (and its QAT conv-BN rewrite) match patterns with ignore_literals=True and
# write the pattern's own literals back: every dropout becomes p=0.5 and every BN momentum 0.1, eps 1e-5
# (a TODO in torchao's export_utils / qat_utils), and the new nodes have no metadata. The captured values
# (and dropout layer names) are recorded once, in graph order, and written back after each rewrite.
_DROPOUT = aten.dropout.default
_BN_MOMENTUM_ARG, _BN_EPS_ARG, _DROPOUT_P_ARG = 6, 7, 1


def _literals(gm: GraphModule) -> dict[str, list]:
    bn = [(n.args[_BN_MOMENTUM_ARG], n.args[_BN_EPS_ARG]) for n in _bn_nodes(gm)
          if n.target == aten.batch_norm.default]
    drops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == _DROPOUT]
    return {"bn": bn, "dropout": [n.args[_DROPOUT_P_ARG] for n in drops],
            "dropout_names": [n.meta.get(MQ_NAME) for n in drops]}


def _restore_literals(gm: GraphModule) -> None:
    want = gm._mq_literals
    bns = [n for n in _bn_nodes(gm) if n.target == aten.batch_norm.default]
    drops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == _DROPOUT]
    if len(bns) != len(want["bn"]) or len(drops) != len(want["dropout"]):
        raise RuntimeError(f"QAT graph rewrite changed the number of BN / dropout nodes "
                           f"({len(bns)}/{len(drops)}, captured {len(want['bn'])}/{len(want['dropout'])})")
    for n, (momentum, eps) in zip(bns, want["bn"]):
        args = list(n.args)
        args[_BN_MOMENTUM_ARG], args[_BN_EPS_ARG] = momentum, eps
        n.args = tuple(args)
    for n, p, name in zip(drops, want["dropout"], want["dropout_names"]):
        args = list(n.args)
        args[_DROPOUT_P_ARG] = p
        n.args = tuple(args)
        if name is not None:  # the rewritten node lost its stable layer name too
            n.meta[MQ_NAME] = name
    gm.recompile()


def _bn_nodes(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in BN_OPS]


def _rng_untouched():
    """torchao's graph rewrites trace patterns on ``torch.randn`` inputs; keep them off the global RNG, so
    a mode switch does not shift the dropout stream (a resumed run must draw what the original drew)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


def set_mode(gm: GraphModule, train: bool, bn_frozen: bool = False) -> None:
    """Train (dropout on, BN on batch statistics unless ``bn_frozen``) or eval mode, in place."""
    with _rng_untouched():
        _set_mode(gm, train, bn_frozen)


def _set_mode(gm: GraphModule, train: bool, bn_frozen: bool) -> None:
    if not train:
        move_exported_model_to_eval(gm)
        _restore_literals(gm)
        return
    move_exported_model_to_train(gm)
    for n in _bn_nodes(gm):
        if n.target == aten.batch_norm.default:
            args = list(n.args)
            args[_TRAINING_ARG] = not bn_frozen
            n.args = tuple(args)
    _restore_literals(gm)  # recompiles


def fake_quant_modules(gm: GraphModule) -> Iterator[tuple[str, FakeQuantizeBase]]:
    """Every fake-quant module of a prepared graph, by submodule name (shared ones once)."""
    seen: set[int] = set()
    for name, m in gm.named_modules():
        if isinstance(m, FakeQuantizeBase) and id(m) not in seen:
            seen.add(id(m))
            yield name, m


@dataclass
class WeightFakeQuant:
    """A weight fake-quant of a conv / linear: its module, the layer, the raw parameter it scales."""

    module_name: str
    module: FakeQuantizeBase
    layer: str  # stable layer name of the conv / linear
    weight_param: str | None  # the raw (unfolded) weight parameter, when the graph shows it
    depthwise: bool


def weight_fake_quants(gm: GraphModule) -> list[WeightFakeQuant]:
    """The weight fake-quants: a fake-quant node feeding argument 1 of a conv / linear."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (*CONV_OPS, aten.linear.default):
            continue
        fq = node.args[1]
        if not (isinstance(fq, Node) and fq.op == "call_module"):
            continue
        mod = gm.get_submodule(str(fq.target))
        if not isinstance(mod, FakeQuantizeBase):
            continue
        src = fq.args[0]
        param = None
        if isinstance(src, Node) and src.op == "get_attr":  # linear, or conv without BN
            param = str(src.target)
        elif isinstance(src, Node) and src.target == aten.mul.Tensor:  # QAT conv-BN: weight · (γ / σ)
            w = src.args[0]
            if isinstance(w, Node) and w.op == "get_attr":
                param = str(w.target)
        groups = node.args[6] if node.target in CONV_OPS and len(node.args) > 6 else 1
        depthwise = False
        if param is not None and node.target in CONV_OPS and groups > 1:
            depthwise = gm.get_parameter(param).shape[1] == 1
        out.append(WeightFakeQuant(str(fq.target), mod, layer_name(node), param, depthwise))
    return out


def silence_dead_channels(gm: GraphModule) -> list[tuple[str, int]]:
    """Zero, and keep at zero while training, the conv weights of BN channels with zero running variance.

    Such a channel is the constant β on all training data: typically a depthwise channel whose single
    input channel is a ReLU that never fires, while its own weights are not zero. Folded, its weight is
    ``W · γ / sqrt(var + eps)`` ≈ 300 × ``W``: harmless while the input stays at exactly zero, but QAT
    moves the weights before it, a few inputs start to leak, and every leak — or a single rounding flip
    of the input between the fake-quant graph and the converted one — moves that output by hundreds of
    codes. Measured on the shipped MobileNetV2 0.5 at 4-bit weights: one epoch of QAT gave 90.76 % in
    the fake-quant graph and 89.95 % after conversion, the difference coming from two such channels of
    the first depthwise layer. Zeroing the weights leaves the float function unchanged on the training
    data (the channel's input was zero) and a gradient hook keeps them at zero, so the channel stays the
    constant β through training, conversion and export.

    Returns ``(layer, channels silenced)`` per conv. Call once on a freshly built graph (hooks are not
    part of the state dict; a resumed job calls it again on its rebuilt graph).
    """
    weights = {wf.layer: wf.weight_param for wf in weight_fake_quants(gm)}
    out = []
    for bn in _bn_nodes(gm):
        conv = _conv_before(bn)
        var_node = bn.args[4] if len(bn.args) > 4 else None
        if conv is None or not (isinstance(var_node, Node) and var_node.op == "get_attr"):
            continue
        param = weights.get(layer_name(conv))
        if param is None:
            continue
        dead = gm.get_buffer(str(var_node.target)).reshape(-1) <= DEAD_VARIANCE
        w = gm.get_parameter(param)
        if not bool(dead.any()) or dead.numel() != w.shape[0]:
            continue
        keep = (~dead).to(w.dtype).reshape(-1, *([1] * (w.dim() - 1)))
        with torch.no_grad():
            w.mul_(keep)
        w.register_hook(lambda grad, keep=keep: grad * keep.to(grad.device))
        out.append((layer_name(conv), int(dead.sum())))
    return out


def _behind_observers(node) -> Node | None:
    """The ``get_attr`` a value comes from through its fake-quant / observer modules (None: no constant)."""
    while isinstance(node, Node) and node.op == "call_module" and node.args:
        node = node.args[0]
    return node if isinstance(node, Node) and node.op == "get_attr" else None


def _bn_after(conv: Node) -> Node | None:
    """The BN of a QAT conv-BN pattern (``conv → div [→ add bias] → batch_norm``), from its conv."""
    node, hops = conv, 0
    while hops < 4 and len(node.users) == 1:
        node, hops = next(iter(node.users)), hops + 1
        if node.op == "call_function" and node.target in BN_OPS:
            return node
    return None


def shift_biases(gm: GraphModule, shifts: dict[str, torch.Tensor]) -> list[str]:
    """Subtract ``shifts[layer]`` (per output channel) from each layer's bias, in place; returns the layers
    of ``shifts`` the graph has no bias for.

    This is how a QAT job starts from a bias-corrected PTQ result (``start="ptq"``): the PTQ graph's
    biases are the float ones minus the correction, so the same shift is applied here. A conv / linear
    with a bias (the equalized graph, a classifier) shifts it; a conv of torchao's QAT conv-BN pattern has
    none, and its BN's β moves instead — BN adds β after normalising, so the conv-BN output moves by
    exactly the shift with running statistics (as in the folded PTQ conv) and with batch statistics alike.
    """
    done: set[str] = set()
    shifted: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _WEIGHTED or layer_name(node) not in shifts:
            continue
        layer = layer_name(node)
        bias = _behind_observers(node.args[2]) if len(node.args) > 2 else None
        if bias is None and node.target in CONV_OPS:
            bn = _bn_after(node)
            bias = _behind_observers(bn.args[2]) if bn is not None and len(bn.args) > 2 else None
        if bias is None or str(bias.target) in done:
            continue  # no bias to move (reported), or one shared bias moved once
        target = operator.attrgetter(str(bias.target))(gm)  # a parameter or a buffer
        shift = shifts[layer].reshape(-1)
        if shift.numel() != target.numel():
            raise ValueError(f"bias correction of {layer}: {shift.numel()} channels, the QAT graph's bias has "
                             f"{target.numel()}")
        with torch.no_grad():
            target.sub_(shift.to(device=target.device, dtype=target.dtype))
        done.add(str(bias.target))
        shifted.add(layer)
    return [layer for layer in shifts if layer not in shifted]


def freeze_observers(gm: GraphModule) -> None:
    """Scales and zero points stop following the data (torchao's ``disable_observer`` on every fake-quant)."""
    gm.apply(disable_observer)


class observers_paused:
    """Context: fake-quant observers off (evaluation must not move the ranges), restored on exit."""

    def __init__(self, gm: GraphModule):
        self.mods = [m for _, m in fake_quant_modules(gm)]

    def __enter__(self):
        self.saved = [m.observer_enabled.clone() for m in self.mods]
        for m in self.mods:
            m.observer_enabled[0] = 0
        return self

    def __exit__(self, *exc):
        for m, s in zip(self.mods, self.saved):
            m.observer_enabled.copy_(s)
        return False


def enable_scale_learning(gm: GraphModule) -> list[nn.Parameter]:
    """LSQ: turn on range learning of every ``LearnableFakeQuantize`` and return the learned parameters.

    A ReLU6 output keeps its zero point (−128, so 0.0 stays exact as in PTQ); only its scale learns.
    Weight zero points are 0 by construction (symmetric).
    """
    params: list[nn.Parameter] = []
    for _, m in fake_quant_modules(gm):
        if not isinstance(m, LearnableFakeQuantize):
            continue
        enable_range_learning(m)
        params.append(m.scale)
        relu6 = getattr(m.activation_post_process, "relu6", None)
        symmetric = m.qscheme in (torch.per_channel_symmetric, torch.per_tensor_symmetric)
        if relu6 is not None or symmetric:
            m.zero_point.requires_grad_(False)
        else:
            params.append(m.zero_point)
    return params


# ---------------------------------------------------------------------------------------------------
# Tensors by stable name


_WEIGHTED = (*CONV_OPS, aten.linear.default)


def tensor_key(node: Node) -> tuple[str, str] | None:
    """The :class:`~mobilequant.quant.QuantTable` ``(name, role)`` of the tensor an observer / fake-quant
    node (``call_module``) looks at; None for a bias or another constant.

    A weight is named after the conv / linear that reads it, an activation after the layer it belongs to
    (``FUSED_INTO`` for a fused activation or a BN output), the graph input by its placeholder name —
    the table's rules, so PTQ and QAT graphs of one model give the same keys.
    """
    for user in node.users:
        if user.op == "call_function" and user.target in _WEIGHTED and len(user.args) > 1 and user.args[1] is node:
            return layer_name(user), "weight"
    src = node.args[0] if node.args else None
    if not isinstance(src, Node) or src.op == "get_attr":
        return None
    if src.op == "placeholder":
        return str(src.target), "input"
    if FUSED_INTO not in src.meta and src.target in BN_OPS:
        conv = _conv_before(src)
        if conv is not None:
            return layer_name(conv), "output"
    return src.meta.get(FUSED_INTO) or layer_name(src), "output"


def _conv_before(bn: Node) -> Node | None:
    """The conv of a QAT conv-BN pattern (``conv → div [→ add bias] → batch_norm``).

    torchao's BN rewrites (conv-BN fusion, train / eval switches) create new BN nodes without the
    original metadata, so a linear bottleneck's output (a BN with nothing after it) is named by its conv.
    """
    node, hops = bn.args[0], 0
    while isinstance(node, Node) and node.target not in CONV_OPS and hops < 4 and node.args:
        node, hops = node.args[0], hops + 1
    return node if isinstance(node, Node) and node.target in CONV_OPS else None


def trained_qparams(gm: GraphModule) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """``(name, role) → (scale, zero_point)`` of every fake-quant of a prepared QAT graph."""
    out: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(str(node.target))
        if not isinstance(mod, FakeQuantizeBase):
            continue
        key = tensor_key(node)
        if key is None or key in out:
            continue
        scale, zp = mod.calculate_qparams()
        out[key] = (scale.detach().reshape(-1).to(torch.float32).cpu().clone(),
                    zp.detach().reshape(-1).to(torch.int64).cpu().clone())
    return out
