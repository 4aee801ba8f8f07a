"""Float16 weights: the torch reference of the ``tflite-fp16`` / ``onnx-fp16`` targets.

Decision: float16 here means what TFLite's float16 post-training quantization means — **conv / linear
weights stored in float16; biases, computation and I/O in float32** (the CPU kernels dequantize the
weights once; a GPU delegate may compute in half). :func:`to_float16` returns a :class:`Float16Result`
whose ``graph`` is the captured, BN-folded model with every conv / linear weight rounded to and *stored
as* float16, with an explicit ``aten.to(float32)`` cast where it is used, and
``graph.meta["mq_precision"] == "float16"``. ``result.graph(x)`` is the reference the exported files are
checked against.

What the exporter writes (both toolchains fold a ``float16 constant → cast`` back into float32, so the
files are not made from this graph but from the float graph):

* TFLite: the float32 conversion, then ai-edge-quantizer's float-casting weight-only recipe
  (``litert_torch.generative.quantize.quant_recipes.full_fp16_recipe()``): float16 weight tensors +
  ``DEQUANTIZE``, float32 biases — the same split as here; measured on a small conv / depthwise /
  residual / linear net, the file's outputs equal ``result.graph`` within 3e-8;
* ONNX: float16 conv / matmul weight initializers + ``Cast(to=FLOAT)``, float32 biases and float32
  graph inputs / outputs — the same split again.

A weight whose magnitude exceeds the float16 range (65504) cannot be stored and raises
:class:`InputError` naming the layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.fx import GraphModule

from ..capture import capture, keeps_caller_state, layer_name
from ..errors import InputError
from ..fusion import CONV_OPS, FusionReport, fold_conv_bn

__all__ = ["Float16Result", "to_float16", "FP16_MAX"]

FP16_MAX = float(torch.finfo(torch.float16).max)
PRECISION_KEY = "mq_precision"
_WEIGHTED = CONV_OPS | {torch.ops.aten.linear.default}


@dataclass
class Float16Result:
    graph: GraphModule  # float32 in / out; weights stored as float16, cast to float32 where used
    float_model: nn.Module
    example_input: torch.Tensor
    fusion: FusionReport = field(default_factory=FusionReport)
    precision: str = "float16"
    num_constants: int = 0  # how many weight tensors are stored in float16

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.graph(x)


@keeps_caller_state
def to_float16(model: nn.Module, example_input: torch.Tensor) -> Float16Result:
    """Capture ``model``, fold conv-BN and store its conv / linear weights in float16."""
    gm = capture(model, example_input)
    fusion = fold_conv_bn(gm, constant_channels=False)  # a float file computes the module on any input
    n = store_constants_fp16(gm)
    return Float16Result(gm, model, example_input, fusion, num_constants=n)


def _is_weight(node) -> bool:
    """A constant read as the weight (argument 1) of a conv / linear."""
    return bool(node.users) and all(
        u.op == "call_function" and u.target in _WEIGHTED and len(u.args) > 1 and u.args[1] is node
        for u in node.users
    )


def store_constants_fp16(gm: GraphModule) -> int:
    """Rewrite every float32 conv / linear weight as float16 + cast to float32; return how many."""
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "get_attr" or not _is_weight(node):
            continue
        *path, leaf = str(node.target).split(".")
        owner = gm.get_submodule(".".join(path)) if path else gm
        value = getattr(owner, leaf)
        value = value.detach() if isinstance(value, torch.Tensor) else value
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
            continue
        if value.numel() and float(value.abs().max()) > FP16_MAX:
            user = next(iter(node.users))
            raise InputError(
                f"{layer_name(user)}: constant {node.target} exceeds the float16 range (|x| > {FP16_MAX:g})"
            )
        half = value.detach().to(torch.float16)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(half, requires_grad=False)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = half
        else:
            setattr(owner, leaf, half)
        with graph.inserting_after(node):
            cast = graph.call_function(torch.ops.aten.to.dtype, (node, torch.float32))
        node.replace_all_uses_with(cast, delete_user_cb=lambda u: u is not cast)
        if "val" in node.meta:
            node.meta["val"] = node.meta["val"].to(torch.float16)
            cast.meta["val"] = node.meta["val"].to(torch.float32)
        cast.meta["mq_name"] = f"{node.target}.to_float32"
        count += 1
    gm.meta[PRECISION_KEY] = "float16"
    graph.lint()
    gm.recompile()
    return count
