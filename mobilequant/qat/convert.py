"""A trained QAT graph → a :class:`~mobilequant.quant.QuantResult` with the trained scales / zero points.

The conversion is the PTQ pipeline's own, run on the trained weights, with every range pinned to what
training learned::

    trained weights + BN statistics → float model → capture (unless already a captured graph)
      → fold conv-BN → prepare_pt2e(MobileQuantizer)
      → observe a few images (only for tensors QAT had no fake-quant for) → pin each observer to the
      trained (scale, zero point) of the same (layer, role) → repair degenerate ranges → convert_pt2e
      (QDQ form, folded form) → fold int32 bias for litert → QuantTable

so a QAT result has exactly the structure of a PTQ result (same fusion, int32 bias q/dq, the
litert-lowerable ``export_graph``) and the exporter treats both the same.

Why not ``convert_pt2e`` on the QAT graph itself (torchao's standard path): measured here on
MobileNetV2 0.5, its ``_fold_conv_bn_qat`` re-exports 96 conv-BN pattern graphs on every call (~10–15 s on
one CPU core, 85 % of it in ``torch.export`` of the patterns; twice per job for the two graph forms),
and it leaves the folded BN bias in float with no int32 q/dq, because the conv had no bias to annotate
before folding. The numbers carried over are the same either way: the fake-quant scales and zero
points, and weights that fold to the same integers (BN folded in float64 here, float32 in torchao; a
weight can only round differently when it sits within float32 rounding of a bin edge).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.fx import GraphModule
from torchao.quantization.pt2e.observer import FixedQParamsObserver, ObserverBase
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from ..capture import capture
from ..fusion import fold_conv_bn
from ..quant.config import QuantConfig
from ..quant.observers import pin_qparams
from ..quant.ptq import (Finding, QuantResult, calibrate, fold_bias_qdq, fusion_findings, is_captured,
                         kernel_findings, repair_degenerate_ranges, snap_weights_to_grid)
from ..quant.quantizer import MobileQuantizer, snap_to_kernels
from ..quant.table import QuantTable
from .graph import tensor_key, trained_qparams

__all__ = ["convert_trained", "trained_float_model"]


def trained_float_model(prepared: GraphModule, float_model: nn.Module) -> nn.Module:
    """A copy of ``float_model`` holding the trained weights and BN statistics of ``prepared``.

    The prepared graph keeps the module paths of the captured model as its parameter / buffer names
    (BN's ``num_batches_tracked`` is not captured by an inference graph and is kept from the model).
    """
    model = copy.deepcopy(float_model).eval()
    state = prepared.state_dict()
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise RuntimeError(f"the QAT graph lacks {len(missing)} tensors of the model, e.g. {missing[0]}")
    model.load_state_dict({k: state[k].detach().to("cpu") if k in state else v for k, v in own.items()},
                          strict=True)
    return model


def _pin_trained(prepared: GraphModule, qparams: dict, calibrated: int) -> list[Finding]:
    findings: list[Finding] = []
    done: set[int] = set()
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        obs = prepared.get_submodule(str(node.target))
        if not isinstance(obs, ObserverBase) or isinstance(obs, FixedQParamsObserver) or id(obs) in done:
            continue
        key = tensor_key(node)
        if key is None:  # a bias: derived from its input and weight, pinned below
            continue
        done.add(id(obs))
        if key in qparams:
            pin_qparams(obs, *qparams[key])
        else:
            findings.append(Finding("untrained_range", key[0],
                                    f"no QAT fake-quant for this {key[1]}; range observed on {calibrated} images"))
    return findings


def convert_trained(prepared: GraphModule, float_model: nn.Module, config: QuantConfig,
                    example_input: torch.Tensor, calibration_images: torch.Tensor) -> QuantResult:
    """The PTQ pipeline on the trained weights with the trained ranges (see the module docstring)."""
    qparams = trained_qparams(prepared)
    model = trained_float_model(prepared, float_model)
    gm = copy.deepcopy(model) if is_captured(model) else capture(model, example_input)
    fusion = fold_conv_bn(gm)
    findings = fusion_findings(fusion)
    quantizer = MobileQuantizer(config)
    quantizer.validate(gm)
    ptq_prepared = prepare_pt2e(gm, quantizer)
    n = calibrate(ptq_prepared, [calibration_images], len(calibration_images))
    findings += _pin_trained(ptq_prepared, qparams, n)
    findings += repair_degenerate_ranges(ptq_prepared, config)
    findings += kernel_findings(snap_to_kernels(ptq_prepared))
    qdq_graph = convert_pt2e(copy.deepcopy(ptq_prepared), fold_quantize=False)
    export_graph = snap_weights_to_grid(fold_bias_qdq(copy.deepcopy(qdq_graph)))
    graph = convert_pt2e(ptq_prepared, fold_quantize=True)
    return QuantResult(
        graph=graph, export_graph=export_graph, qdq_graph=qdq_graph, table=QuantTable.from_graph(qdq_graph),
        config=config, quantizer=quantizer, findings=findings, float_model=model, fusion=fusion,
        example_input=example_input, num_calibration_samples=n,
    )
