"""What a target can take, checked on the captured graph before any work: ATen ops, and op forms that
litert-torch lowers to no TFLite builtin.

* :func:`supported_ops`: the quantizer's ops (:data:`mobilequant.quant.quantizer.OP_RULES`) for every
  target; float targets also take ops that have no int8 rule but lower to builtins in both converters
  (:data:`FLOAT_ONLY_OPS`).
* :func:`unsupported_forms`: ops whose *arguments* decide whether TFLite has a builtin for them. Measured
  with litert-torch 0.10 (float files): ``avg_pool2d`` with ``count_include_pad=False`` and padding becomes
  ``STABLEHLO_REDUCE_WINDOW`` + ``DIV`` unless the padding is TFLite's SAME padding (then it is
  ``AVERAGE_POOL_2D``, which excludes padding from the count), ``divisor_override`` a
  ``STABLEHLO_REDUCE_WINDOW``; an ``adaptive_avg_pool2d`` whose output does not divide its input (uneven
  windows; capture spells the even ones as ``avg_pool2d``) ~50 SLICE / ADD / GATHER_ND ops in NCHW between
  TRANSPOSEs, float in an int8 file. StableHLO ops run in LiteRT's reference kernels only, not in XNNPACK,
  GPU or NNAPI delegates, so these are refused for TFLite targets, naming the layer (verification also
  fails any file that has such ops: ``builtin_ops`` in :mod:`.verify`).
* :func:`check_exportable`: both, as one :class:`~mobilequant.errors.InputError` listing every problem.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from ..capture import find_unsupported_ops, layer_name, node_arg
from ..errors import InputError
from .recipes import Target, get_target

__all__ = ["FLOAT_ONLY_OPS", "supported_ops", "unsupported_forms", "check_exportable", "FLOAT_FALLBACK_OPTION"]

aten = torch.ops.aten

# Ops with no int8 rule that both converters lower to builtin float ops (verified per op by the tests):
# unfolded batch norms, SiLU / GELU, PReLU (TFLite: RELU, MUL, SUB; ONNX: PRelu), ConvTranspose2d
# (TRANSPOSE_CONV / ConvTranspose: in an int8 graph both converters leave it in float, so it has no int8
# rule), GroupNorm (TFLite: see rewrites.py) and LayerNorm.
FLOAT_ONLY_OPS = frozenset({
    aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
    aten.silu.default, aten.silu_.default, aten.gelu.default,
    aten.prelu.default, aten.conv_transpose2d.input, aten.group_norm.default, aten.layer_norm.default,
})

# How a command-line user leaves ops without an int8 rule in float inside an int8 file.
FLOAT_FALLBACK_OPTION = "--set quantization.float_fallback=true"


def supported_ops(target: str | Target) -> frozenset:
    """ATen ops the exporter lowers for ``target`` (the zoo's ops; checked on every family by the tests)."""
    from ..quant.quantizer import OP_RULES

    spec = get_target(target) if isinstance(target, str) else target
    return frozenset(OP_RULES) | (frozenset() if spec.quantized else FLOAT_ONLY_OPS)


def _pair(v) -> tuple[int, int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return (int(v[0]), int(v[-1])) if v else (0, 0)


def _same_padding(n: int, k: int, s: int, p: int) -> bool:
    """Whether torch's symmetric padding ``p`` (floor mode) is TFLite's SAME padding for size ``n``."""
    out = (n + 2 * p - k) // s + 1
    same_out = -(-n // s)
    return out == same_out and max((same_out - 1) * s + k - n, 0) == 2 * p


def _avg_pool_form(node: Node) -> str | None:
    kernel = _pair(node.args[1])
    stride = _pair(node_arg(node, 2, "stride", None) or kernel)
    padding = _pair(node_arg(node, 3, "padding", 0))
    ceil_mode = bool(node_arg(node, 4, "ceil_mode", False))
    count_include_pad = bool(node_arg(node, 5, "count_include_pad", True))
    if node_arg(node, 6, "divisor_override", None) is not None:
        return "avg_pool2d with divisor_override: no TFLite builtin (STABLEHLO_REDUCE_WINDOW)"
    if count_include_pad or padding == (0, 0):
        return None
    val = node.args[0].meta.get("val") if isinstance(node.args[0], Node) else None
    size = tuple(int(d) for d in val.shape[2:]) if val is not None and val.dim() == 4 else None
    if not ceil_mode and size is not None and all(
            _same_padding(n, k, s, p) for n, k, s, p in zip(size, kernel, stride, padding)):
        return None
    return ("avg_pool2d with count_include_pad=False and padding: TFLite's AVERAGE_POOL_2D leaves padding out "
            "of the count only with SAME padding (stride 1, padding (kernel-1)/2), this one would be "
            "STABLEHLO_REDUCE_WINDOW ops; use count_include_pad=True")


def _adaptive_pool_form(node: Node) -> str | None:
    val = node.args[0].meta.get("val") if isinstance(node.args[0], Node) else None
    out = node.meta.get("val")
    if val is None or out is None or val.dim() != 4 or tuple(out.shape[2:]) == (1, 1):
        return None
    h, w = (int(d) for d in val.shape[2:])
    oh, ow = (int(d) for d in out.shape[2:])
    return (f"adaptive_avg_pool2d from {h}×{w} to {oh}×{ow}: uneven windows have no TFLite builtin "
            f"(SLICE / ADD / GATHER_ND in NCHW); use an output size that divides {h}×{w}, or 1×1")


_TFLITE_FORMS = {
    aten.avg_pool2d.default: _avg_pool_form,
    aten.adaptive_avg_pool2d.default: _adaptive_pool_form,
}


def unsupported_forms(gm: GraphModule, target: str | Target) -> list[tuple[str, str]]:
    """``(layer, why)`` for every op whose form ``target`` has no builtin for (TFLite targets only)."""
    spec = get_target(target) if isinstance(target, str) else target
    if spec.format != "tflite":
        return []
    out = []
    for node in gm.graph.nodes:
        check = _TFLITE_FORMS.get(node.target) if node.op == "call_function" else None
        why = check(node) if check is not None else None
        if why:
            out.append((layer_name(node), why))
    return out


def check_exportable(gm: GraphModule, target: str | Target, *, float_fallback: bool = False,
                     ops: bool = True) -> None:
    """Raise one :class:`InputError` listing every op (``ops``) and op form ``target`` cannot take.

    ``float_fallback`` (int8 targets): ops that float targets take are accepted; the quantizer leaves them
    in float inside the int8 file."""
    spec = get_target(target) if isinstance(target, str) else target
    floats = supported_ops(f"{spec.format}-fp32")
    bad = find_unsupported_ops(gm, floats if spec.quantized and float_fallback else supported_ops(spec)) if ops else []
    forms = unsupported_forms(gm, spec)
    if not bad and not forms:
        return
    listed = [f"{name} ({op})" for name, op in bad] + [f"{name} ({why})" for name, why in forms]
    hint = ""
    float_ok = sorted({op for _, op in bad} & {str(o) for o in floats})
    if spec.quantized and float_ok:
        hint = (f"; {', '.join(float_ok)} export to float targets ({spec.format}-fp16, {spec.format}-fp32), "
                f"or stay in float inside the int8 file with {FLOAT_FALLBACK_OPTION}")
    raise InputError(f"{len(listed)} op(s) cannot be exported to {spec.name}: {', '.join(listed)}{hint}")
