"""Lower a torch graph to a TFLite flatbuffer with litert-torch.

``litert_torch.convert`` is used step by step instead of as one call, for three things it does not expose
(all in litert-torch 0.10, pinned in pyproject):

* ``ConvertToTFLConfig.strict_qdq_mode``: ``False`` folds the input quantize / output dequantize of an int8
  graph into the signature (int8 I/O), ``True`` keeps them as QUANTIZE / DEQUANTIZE ops (float I/O);
* the module attribute ``tfl.metadata``, which the flatbuffer exporter writes as ``Model.metadata``
  buffers — how the artifact's provenance JSON gets into the file without re-packing it;
* exporting the same MLIR module twice (once to read the census / name map, once with the metadata).

litert-torch logs on the root logger, whose first message runs ``logging.basicConfig()``; the conversion
leaves the root logger's handlers as it found them (:func:`root_logging_kept`).

The quantization parameters come verbatim from the graph's quantize / dequantize ops; see
``docs/notes/litert_lowering.md`` for what the converter fuses and why the graph is annotated as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import InputError

__all__ = ["LoweredTFLite", "lower_to_tflite"]

INPUT_NAME = "input"
OUTPUT_NAME = "output"


# litert-torch reads its options from environment variables; set for the conversion only, then restored.
#  * no progress tree on stdout;
#  * the min-cut layout partitioner always: by default litert-torch falls back to a greedy partitioner
#    for graphs of more than ~2000 nodes, which quantized graphs (Q/DQ pairs triple the node count)
#    exceed, and the greedy one leaves pairs of TRANSPOSEs around Q/DQ (IGCV3 int8: 113 instead of 65).
_LITERT_ENV = {"LITERT_TORCH_SHOW_PROGRESS": "n", "LAYOUT_OPTIMIZE_PARTITIONER": "MINCUT"}


@contextlib.contextmanager
def _litert_env():
    old = {k: os.environ.get(k) for k in _LITERT_ENV}
    os.environ.update(_LITERT_ENV)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def root_logging_kept():
    """Leave the root logger's handlers as they were. litert-torch logs with ``logging.info`` on the root
    logger, which runs ``logging.basicConfig()`` when it has no handler: the stderr handler that added made
    the caller's own ``logging.basicConfig(...)`` afterwards silently do nothing."""
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()


@dataclass
class LoweredTFLite:
    """A converted MLIR module; ``to_bytes(metadata)`` writes the flatbuffer (deterministically)."""

    module: object
    context: object

    def to_bytes(self, metadata: dict[str, str] | None = None) -> bytes:
        from litert_converter.mlir import ir
        from litert_converter.mlir._mlir_libs import converter_api_ext

        with self.context:
            attrs = self.module.operation.attributes
            if metadata:
                attrs["tfl.metadata"] = ir.DictAttr.get(
                    {k: ir.StringAttr.get(v) for k, v in sorted(metadata.items())})
            elif "tfl.metadata" in attrs:
                del attrs["tfl.metadata"]
            return bytes(converter_api_ext.export_flatbuffer_to_bytes(self.module.operation))


class _ChannelsLast(nn.Module):
    """NHWC input for a model written for NCHW (the permute cancels against the layout transposes).

    Only for modules that are not graphs: a wrapper hides the inner graph's module hierarchy from the
    converter's locations, which the name map needs (see :func:`_channels_last_graph`)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 3, 1, 2))


def _channels_last_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` that takes NHWC input: ``placeholder → permute(0,3,1,2)`` feeds the old users, so
    every other node keeps its meta (and the converter's locations stay those of the model's modules)."""
    import copy

    gm = copy.deepcopy(gm)
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_after(x):
        p = gm.graph.call_function(torch.ops.aten.permute.default, (x, [0, 3, 1, 2]))
    x.replace_all_uses_with(p, delete_user_cb=lambda user: user is not p)
    gm.recompile()
    return gm


def lower_to_tflite(module: nn.Module, example_input: torch.Tensor, *, quantized: bool, io_dtype: str = "float",
                    layout: str = "NCHW") -> LoweredTFLite:
    """Convert ``module`` (a float or PT2E-quantized graph, NCHW) for a batch of one.

    ``quantized`` selects the converter's static Q/DQ mode; ``io_dtype`` ``"int8"`` gives int8 input and
    output tensors (quantized graphs only); ``layout`` ``"NHWC"`` makes the input channels-last.
    """
    try:
        from litert_converter.mlir import passmanager
        from litert_converter.mlir._mlir_libs import converter_api_ext
        from litert_torch import backend
        from litert_torch._convert import core
        from litert_torch._convert import signature as signature_lib
        from litert_torch.backend import inline_consts
    except ImportError as e:  # pragma: no cover - pinned dependency
        raise InputError(f"litert-torch is not usable here ({e}); pip install 'litert-torch>=0.10,<0.11'") from None

    x = example_input[:1].detach()
    if layout == "NHWC":
        module = (_channels_last_graph(module) if isinstance(module, torch.fx.GraphModule)
                  else _ChannelsLast(module))
        x = x.permute(0, 2, 3, 1).contiguous()
    with _litert_env(), root_logging_kept():
        sig = signature_lib.Signature("serving_default", module, (x,), None, None)
        program = core.export_torch_signature(sig)
        program = core._run_convert_passes(program)
        context = backend.export_utils.create_ir_context()
        lowered = backend.export.exported_program_to_mlir(
            program, ir_context=context,
            lowering_context_plugins=[inline_consts.InlineConstsContext(enable_resource_constants=False)],
        )
        n_out = len(lowered.output_signature)
        converter_api_ext.set_signature(
            lowered.module.operation, signature_name="serving_default", input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME] if n_out == 1 else [f"{OUTPUT_NAME}_{i}" for i in range(n_out)],
        )
        merged = converter_api_ext.merge_modules([lowered.module])
        config = converter_api_ext.ConvertToTFLConfig()
        config.model_origin_framework = "PYTORCH"
        if quantized:
            config.qdq_conversion_mode = "STATIC"
            config.strict_qdq_mode = io_dtype != "int8"
        config.unsafe_fuse_dynamic_shaped_broadcast = True
        config.canonicalizing_inf_as_min_max_float = False
        config.enable_x64 = False
        with context:
            converter_api_ext.run_convert_to_tfl_passes(merged, passmanager.PassManager(), config)
    return LoweredTFLite(merged, context)
