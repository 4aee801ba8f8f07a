"""The QAT quantizer: the PTQ :class:`~mobilequant.quant.MobileQuantizer` with fake-quant constructors.

PT2E's design is that PTQ and QAT differ only by the constructor in each ``QuantizationSpec`` (observer vs
fake-quant wrapping an observer), so the annotation rules — TFLite int8 scheme, ReLU6 ranges, shared and
fixed parameters, int32 bias — are the PTQ quantizer's own code. :func:`qat_quantizer` is the one place
that builds it.

Until ``MobileQuantizer`` takes ``is_qat=`` (requested in ``docs/notes/qat_needs.md``),
:class:`_InterimQATQuantizer` subclasses it with the three QAT differences:

* fake-quant constructors (``FakeQuantize``, or ``LearnableFakeQuantize`` for learned scales) around
  moving-average observers: activations EMA 0.01 with the PTQ ReLU6 mode; weights averaging 1.0, i.e. the
  range of the current weights at every step (a min/max observer would never shrink while weights move);
* ``conv → batch_norm → [ReLU/ReLU6]`` chains: the BN stays in the graph for torchao's QAT conv-BN
  pattern (BN statistics while training), so the output spec goes after the BN / fused activation;
* the BN's ``add_(num_batches_tracked, 1)`` is bookkeeping, not an ADD to quantize; ``validate`` accepts BN.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e import (
    FakeQuantize,
    LearnableFakeQuantize,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
)
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, Quantizer

from ..capture import find_unsupported_ops, layer_name
from ..errors import InputError
from ..fusion import BN_OPS, CONV_OPS
from ..quant.config import QuantConfig
from ..quant.observers import ReLU6FixedObserver, make_activation_observer
from ..quant.quantizer import FUSED_INTO, MobileQuantizer

__all__ = ["qat_quantizer", "ACT_AVERAGING", "is_bn_bookkeeping"]

aten = torch.ops.aten
Q_KEY = "quantization_annotation"
ACT_AVERAGING = 0.01  # EMA constant of activation ranges during QAT (torch's default for QAT observers)


def qat_quantizer(config: QuantConfig, learn_scales: bool = False) -> Quantizer:
    """The quantizer ``prepare_qat_pt2e`` gets: the PTQ rules with fake-quant constructors.

    The one-line switch once ``MobileQuantizer`` supports QAT:
    ``return MobileQuantizer(config, is_qat=True, learn_scales=learn_scales)``.
    """
    return _InterimQATQuantizer(config, learn_scales=learn_scales)


def is_bn_bookkeeping(node: Node) -> bool:
    """``add_(num_batches_tracked, 1)``: a BN's step counter in the training graph, not a tensor ADD."""
    return (node.op == "call_function" and node.target == aten.add_.Tensor
            and isinstance(node.args[0], Node) and node.args[0].op == "get_attr")


def _fake_quant(observer, learn: bool):
    if learn:
        # LSQ (Esser et al. 2020): the gradient of the scale is normalised by sqrt(numel · qmax).
        return LearnableFakeQuantize.with_args(observer=observer, use_grad_scaling=True)
    return FakeQuantize.with_args(observer=observer)


class _InterimQATQuantizer(MobileQuantizer):
    """``MobileQuantizer`` annotations with fake-quant constructors and conv-BN chains (see module doc)."""

    def __init__(self, config: QuantConfig | None = None, learn_scales: bool = False):
        super().__init__(config)
        cfg = self.config
        self.is_qat = True
        self.learn_scales = learn_scales
        act_obs = make_activation_observer("moving_average", averaging_constant=ACT_AVERAGING)
        self.act_spec = dataclasses.replace(
            self.act_spec, observer_or_fake_quant_ctr=_fake_quant(act_obs, learn_scales))
        if cfg.relu6 == "fixed":
            relu6_ctr = FakeQuantize.with_args(observer=ReLU6FixedObserver)  # fixed: never learned
        else:
            relu6_obs = make_activation_observer("moving_average", relu6=cfg.relu6, averaging_constant=ACT_AVERAGING)
            relu6_ctr = _fake_quant(relu6_obs, learn_scales)
        self.relu6_spec = dataclasses.replace(self.relu6_spec, observer_or_fake_quant_ctr=relu6_ctr)
        qmax = cfg.weight_qmax
        if cfg.per_channel:
            w_obs = MovingAveragePerChannelMinMaxObserver.with_args(
                averaging_constant=1.0, ch_axis=0, dtype=torch.int8, qscheme=torch.per_channel_symmetric,
                quant_min=-qmax, quant_max=qmax)
        else:
            w_obs = MovingAverageMinMaxObserver.with_args(
                averaging_constant=1.0, dtype=torch.int8, qscheme=torch.per_tensor_symmetric,
                quant_min=-qmax, quant_max=qmax)
        self.weight_spec = dataclasses.replace(
            self.weight_spec, observer_or_fake_quant_ctr=_fake_quant(w_obs, learn_scales))

    def annotate(self, model: GraphModule) -> GraphModule:
        for node in model.graph.nodes:
            if is_bn_bookkeeping(node):
                node.meta[Q_KEY] = QuantizationAnnotation(_annotated=True)
        return super().annotate(model)

    def _annotate_weighted(self, node: Node) -> None:
        users = list(node.users)
        bn = users[0] if len(users) == 1 and users[0].target in BN_OPS and node.target in CONV_OPS else None
        if bn is None:
            return super()._annotate_weighted(node)
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        inputs = {x: self._input_spec(x), w: self.weight_spec}
        if isinstance(b, Node):
            inputs[b] = self._bias_spec(x, w, node)
        node.meta[Q_KEY] = QuantizationAnnotation(input_qspec_map=inputs, _annotated=True)
        out_spec = self._output_or_fused_activation(bn)
        bn.meta[Q_KEY] = QuantizationAnnotation(output_qspec=out_spec, _annotated=True)
        if out_spec is None:  # the activation after the BN carries the output; it belongs to the conv
            act = next(iter(bn.users))
            act.meta[FUSED_INTO] = layer_name(node)
        else:
            bn.meta[FUSED_INTO] = layer_name(node)

    def validate(self, model: GraphModule) -> None:
        if self.config.float_fallback:
            return
        bad = find_unsupported_ops(model, self.supported_ops() | BN_OPS)
        if bad:
            listed = ", ".join(f"{name} ({op})" for name, op in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise InputError(f"{len(bad)} op(s) have no TFLite int8 kernel rule: {listed}{more}; "
                             "use float_fallback=True to keep them in float")
