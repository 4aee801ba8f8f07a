"""Export: quantized or float model → verified TFLite / ONNX file (:class:`Artifact`).

``export(quant_result_or_model, target, out_path, recipe)`` is the pipeline the CLI calls::

    resolve recipe → read and check the data (forms, shapes, NaN / Inf, labels) → list unsupported ops
    (all at once, before any work) → [quantize] → rewrite for the
    runtime → lower (litert-torch / torch.onnx dynamo) → name map + metadata → atomic write
    → verify in the real runtime → write (a file that fails is written as <name>.failed<suffix>; CheckFailed)

Targets (:data:`TARGETS`): ``tflite-int8``, ``tflite-fp16``, ``tflite-fp32``, ``onnx-int8``, ``onnx-fp16``,
``onnx-fp32``. Recipes: :func:`load_recipe` (``export_recipes/*.yaml``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .. import __version__
from ..capture import capture, keeps_caller_state
from ..errors import CheckFailed, InputError, UsageError
from ..fusion import fold_conv_bn
from .artifact import (METADATA_KEY, Artifact, atomic_write, atomic_write_all, load_artifact, metadata_json,
                       sidecar_path, weights_sha256)
from .recipes import TARGETS, Recipe, Target, default_recipe, get_target, list_recipes, load_recipe
from .support import check_exportable, supported_ops
from .verify import Census, Check, VerificationReport

__all__ = [
    "export",
    "Artifact",
    "load_artifact",
    "Recipe",
    "Target",
    "TARGETS",
    "load_recipe",
    "default_recipe",
    "resolve_recipe",
    "list_recipes",
    "supported_ops",
    "Census",
    "Check",
    "VerificationReport",
]


def resolve_recipe(recipe=None, target: str | None = None, overrides=()) -> Recipe:
    """The recipe an export runs: ``recipe`` (a :class:`Recipe`, a built-in name or a path) with
    ``overrides`` applied, or ``target``'s built-in one. Without ``target`` the recipe's own target is
    taken (every recipe names one); a ``target`` that differs from it is refused."""
    if recipe is None:
        if target is None:
            raise UsageError("export needs a target or a recipe")
        result = default_recipe(target)
    elif isinstance(recipe, Recipe):
        result = recipe
    else:
        result = load_recipe(recipe)
    if overrides:
        result = result.replace(list(overrides))
    if target is not None and get_target(target).name != result.target:
        named = "" if recipe is None or isinstance(recipe, Recipe) else f" {recipe}"
        raise UsageError(f"target {get_target(target).name} differs from the target of recipe{named}: "
                         f"{result.target} (leave the target out to take the recipe's)")
    return result


def _read_images(data, what: str, limit: int, expected, expected_from: str):
    """At most ``limit`` images of ``data`` (any form :func:`~mobilequant.quant.ptq.image_batches` reads,
    checked as it reads them): ``(image batches, labels or None)``; labels only when every batch has them."""
    from ..quant.ptq import image_batches

    xs, ys, n = [], [], 0
    for x, y in image_batches(data, what, expected, expected_from):
        xs.append(x[: limit - n])
        ys.append(None if y is None else y[: limit - n])
        n += len(xs[-1])
        if n >= limit:
            break
    labels = torch.cat(ys) if ys and all(y is not None for y in ys) else None
    return xs, labels


def _synthetic_images(shape: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    """Deterministic smooth test images (low-frequency noise) when no data is given."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    low = torch.randn(n, c, max(2, h // 4), max(2, w // 4), generator=g)
    return torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)


def _float_graph(model: nn.Module, example: torch.Tensor):
    gm = capture(model, example)
    fold_conv_bn(gm, constant_channels=False)  # a float file computes the module on any input
    return gm


def _checked_float_graph(model: nn.Module, example: torch.Tensor, spec: Target, float_fallback: bool = False):
    """The captured, BN-folded float graph, after listing every op (and op form) the target cannot take,
    all at once (:func:`.support.check_exportable`)."""
    gm = _float_graph(model, example)
    check_exportable(gm, spec, float_fallback=float_fallback)
    return gm


@keeps_caller_state
def export(
    source,
    target: str | None = None,
    out_path: str | Path | None = None,
    recipe: Recipe | str | Path | None = None,
    *,
    calibration_data: Iterable | None = None,
    verify_data=None,
    model_name: str | None = None,
    example_input: torch.Tensor | None = None,
    overrides: Iterable[str] = (),
    seed: int = 0,
    model_spec: str | None = None,
    weights_file: str | None = None,
) -> Artifact:
    """Export ``source`` (a :class:`~mobilequant.quant.QuantResult` or an ``nn.Module``) to ``out_path``.

    * int8 targets take a ``QuantResult``, or a model plus ``calibration_data`` (quantized with the
      recipe's settings); float targets take either (a ``QuantResult``'s float model is exported).
    * ``calibration_data`` and ``verify_data`` take every form :func:`mobilequant.quant.ptq.image_batches`
      reads: an N×C×H×W tensor or float array, an ``(images, labels)`` pair, an ``ImageData``, or batches
      of those (a list, a generator, a DataLoader). Both are read and checked before any work: the model's
      input shape (``example_input``'s, else the first data's), float values without NaN / Inf, and
      verification labels within the model's classes (:func:`mobilequant.data.fit_labels`).
    * ``verify_data``: the images of the checks; without it the calibration data, else deterministic
      synthetic images, are used (no accuracy check).
    * Returns the :class:`Artifact`. The file is verified before it is written: when a check fails
      ``out_path`` is left as it was, the file is written as ``<name>.failed<suffix>`` beside it, and
      :class:`CheckFailed` is raised (its ``artifact`` is the failed file).
    * The file's metadata records what it was made from (:mod:`.artifact`): ``model_spec`` (how the model
      was named, e.g. ``net.py:build``) and ``weights_file`` (the checkpoint's file name) are recorded by
      their base names only; the weights themselves by their sha256 (``weights_sha256``).
    """
    from ..quant import QuantResult, quantize

    recipe = resolve_recipe(recipe, target, overrides)
    spec = recipe.spec
    if out_path is None:
        raise UsageError("export needs an output path")
    out_path = Path(out_path)
    if out_path.suffix != spec.suffix:
        raise UsageError(f"{spec.name} writes {spec.suffix} files; got output path {str(out_path)!r}")

    source_qr = isinstance(source, QuantResult) and spec.quantized  # quantized before export, not by the recipe
    if isinstance(source, QuantResult):
        qr, model = source, source.float_model
        example = source.example_input if example_input is None else example_input
    elif isinstance(source, nn.Module):
        qr, model, example = None, source, example_input
    else:
        raise UsageError(f"export takes a QuantResult or an nn.Module, got {type(source).__name__}")
    if spec.quantized and qr is None and calibration_data is None:
        raise UsageError(f"{spec.name} needs a QuantResult or calibration_data to quantize the model")
    model = model.eval()
    # The data, read and checked before any work: forms, dtypes, NaN / Inf, each against the model's input
    # shape (example_input, else the first data given), and verification labels against the model's classes.
    settings = recipe.verification
    example_from = ("the shape of example_input" if example_input is not None
                    else "the input shape the QuantResult was calibrated on" if example is not None else "")
    if example is None:  # the model's own input size (model.preprocess), when it has one
        from ..quant.ptq import model_input_size

        size, size_from = model_input_size(model)
        if size is not None:
            example, example_from = torch.zeros(1, *size), size_from
    calib, taken_from = None, None  # taken_from: the data the example image comes from
    if calibration_data is not None:  # read once: quantization and, by default, verification use them
        wanted = max(1, recipe.quantization.num_calibration if spec.quantized and qr is None else 0,
                     settings.num_images if verify_data is None and settings.enabled else 0)
        expected = None if example is None else tuple(example.shape[1:])
        calib, calib_labels = _read_images(calibration_data, "calibration", wanted, expected, example_from)
        if not calib:
            raise InputError("calibration set is empty: at least one batch of images is needed")
        if example is None:
            example, example_from = calib[0][:1], "the shape of the calibration data"
            taken_from = "calibration"
    verify_x = verify_labels = None
    if verify_data is not None:
        expected = None if example is None else tuple(example.shape[1:])
        xs, verify_labels = _read_images(verify_data, "verify_data", settings.num_images, expected, example_from)
        if not xs:
            raise InputError("verify_data is empty: at least one image is needed")
        verify_x = torch.cat(xs)
        if example is None:
            example, taken_from = verify_x[:1], "verify_data"
    elif calib is not None:
        verify_x, verify_labels = torch.cat(calib)[: settings.num_images], calib_labels
        verify_labels = None if verify_labels is None else verify_labels[: settings.num_images]
    if verify_labels is not None and settings.enabled:  # labels the model cannot have: refused, not misses
        from ..data import ImageData, fit_labels

        source = "verify_data" if verify_data is not None else "calibration data"
        verify_labels = fit_labels(ImageData(verify_x, verify_labels, source), model).labels
    if example is None:
        pre = getattr(model, "preprocess", None)
        if pre is None:
            raise UsageError("give example_input (the model has no .preprocess to take the input size from)")
        example = torch.zeros(1, *pre.input_size)
    example = example[:1].detach().float()
    name = model_name or getattr(model, "model_name", None) or type(model).__name__
    torch.manual_seed(seed)

    # Every unsupported op, before anything is written. A QuantResult's ops were checked by its quantizer,
    # not the forms only its TFLite lowering lacks.
    if spec.quantized and qr is not None:
        float_graph = None
        check_exportable(qr.export_graph, spec, ops=False)
    else:
        try:
            float_graph = _checked_float_graph(model, example, spec, recipe.quantization.float_fallback)
        except InputError as e:  # an N×H×W×C image set the example was taken from
            from ..quant.ptq import channels_last_error

            hint = None if taken_from is None else channels_last_error(e, taken_from, tuple(example.shape[1:]))
            if hint is None:
                raise
            raise hint from None

    weights = weights_sha256(model)  # of the float model as given: quantization below does not change it
    if spec.quantized and qr is None:
        qr = quantize(model, calib, recipe.quantization.to_quant_config(), example_input=example)

    metadata = {
        "format_version": 1,
        "format": spec.format,
        "model_name": name,
        "model_spec": _base_name_spec(model_spec),
        "weights_file": None if weights_file is None else Path(weights_file).name,
        "weights_sha256": weights,
        "target": spec.name,
        "recipe": _recorded_recipe(recipe, qr if source_qr else None).file_settings(),  # the same bytes
        # however many images were verified
        "recipe_overrides": list(recipe.overrides),
        "mobilequant_version": __version__,
        "versions": _converter_versions(spec),
        "quant_table_sha256": qr.table.sha256() if spec.quantized else None,
        "quant_config": qr.config.to_dict() if spec.quantized else None,
        "input_shape": _file_input_shape(example, recipe.io.layout),
        "input_layout": recipe.io.layout,
        "io_dtype": recipe.io.dtype,
        "class_names": _class_names(model),
        "preprocess": _preprocess(model, recipe.io.layout),
    }
    if qr is not None and qr.fine_tuned:  # QAT: not the weights model_name ships with
        metadata["fine_tuned"] = qr.fine_tuned
    if spec.format == "tflite":
        data, graph, info_extra = _to_tflite(spec, recipe, qr, float_graph, example, metadata)
    else:
        data, graph, info_extra = _to_onnx(spec, qr, float_graph, example, metadata)
    artifact = Artifact(path=out_path, target=spec.name, metadata=json.loads(metadata_json(metadata)),
                        name_map=dict(metadata["name_map"]), census=info_extra["census"],
                        rewrites=list(metadata.get("rewrites", [])))
    # What quantization found and did, for the caller's summary (an int8 file's; a float file has none):
    # ``findings``, the QuantResult's Finding objects (dead channels, repaired ranges, float fallbacks);
    # ``cle_summary``, one line on cross-layer equalization, or None when it did not run.
    if spec.quantized:
        artifact.findings = list(qr.findings)
        artifact.cle_summary = qr.cle.summary() if qr.cle is not None else None
    # Verified from the bytes before anything is written: the output path only ever receives a file that
    # passed (a release pipeline keeps its last good file when a new export fails, and an interrupted
    # verification leaves nothing behind). A failed file goes beside it as <name>.failed<suffix>.
    failed_path = out_path.with_name(f"{out_path.stem}.failed{out_path.suffix}")
    if recipe.verification.enabled:
        artifact.verification = _verify(artifact, data, spec, recipe, qr, model, verify_x, verify_labels,
                                        example, info_extra, seed)
    passed = artifact.verification is None or artifact.verification.passed
    if not passed:
        artifact.path = failed_path
    sidecar = sidecar_path(artifact.path)
    if artifact.verification is not None:  # the file and its report as a pair: both written, then both renamed
        # the file's name, not the path as given: the report lies beside it, and two identical exports give
        # identical reports wherever they were written
        report = {"artifact": artifact.path.name, "artifact_sha256": hashlib.sha256(data).hexdigest(),
                  **artifact.verification.to_dict(), "census": artifact.census.to_dict(),
                  "verification_settings": dataclasses.asdict(recipe.verification)}
        text = json.dumps(report, indent=1, sort_keys=True) + "\n"
        atomic_write_all([(artifact.path, data), (sidecar, text.encode())])
    else:  # a report left by an earlier export would describe another file
        atomic_write(artifact.path, data)
        sidecar.unlink(missing_ok=True)
    if passed:  # an earlier export's failed file is not this one's
        failed_path.unlink(missing_ok=True)
        sidecar_path(failed_path).unlink(missing_ok=True)
    else:
        first = artifact.verification.failed[0]
        err = CheckFailed(f"{out_path}: {first} — not written there; the failed file is {failed_path.name} "
                          f"(report {sidecar.name})")
        err.artifact = artifact
        raise err
    return artifact


def _base_name_spec(spec: str | None) -> str | None:
    """A model spec as a file records it: ``file.py:factory`` with the file's name only (no directory of
    the machine it was exported on); a zoo name or ``pkg.module:factory`` as given."""
    if spec is None:
        return None
    spec = str(spec)
    if ":" not in spec:
        return spec
    where, factory = spec.rsplit(":", 1)
    return f"{Path(where).name}:{factory}" if where.endswith(".py") or "/" in where or "\\" in where else spec


def _class_names(model: nn.Module) -> list[str] | None:
    names = getattr(model, "class_names", None)
    return None if names is None else [str(n) for n in names]


def _recorded_recipe(recipe, qr):
    """The recipe a file records: with a ``QuantResult`` given, its quantization section is the settings
    that result was made with (a per-tensor ``QuantResult`` exported with the default recipe had recorded
    ``per_channel: true``, contradicting its own ``quant_config``)."""
    if qr is None:
        return recipe
    from .recipes import QuantizationSettings

    return dataclasses.replace(recipe, quantization=QuantizationSettings.from_quant_config(qr.config))


def _file_input_shape(example: torch.Tensor, layout: str) -> list[int]:
    """The file's input tensor shape for one image: ``io.layout=NHWC`` files take ``[1, H, W, C]``."""
    c, h, w = (int(d) for d in example.shape[1:4]) if example.dim() == 4 else (None, None, None)
    if layout == "NHWC" and c is not None:
        return [1, h, w, c]
    return [1, *(int(d) for d in example.shape[1:])]


def _preprocess(model: nn.Module, layout: str) -> dict | None:
    """The model's preprocessing (:class:`~mobilequant.models.PreprocessConfig`) as plain JSON: what an app
    does to a camera frame before it feeds the file — with the file's input layout (an ``io.layout=NHWC``
    file of an NCHW model takes NHWC) and ``pixel_scale``, the factor from uint8 pixels to the [0, 1]
    units ``mean`` / ``std`` are in."""
    pre = getattr(model, "preprocess", None)
    if pre is None or not dataclasses.is_dataclass(pre):
        return None
    out = json.loads(json.dumps(dataclasses.asdict(pre)))  # tuples → lists
    if "layout" in out:
        out["layout"] = layout
    out["pixel_scale"] = 1 / 255
    # how mobilequant.data.preprocess resamples and crops: another resampler (Pillow's default bicubic)
    # moved the ImageNet MobileNetV2's float top-1 on 14.5 % of 62 photos
    out["resample"] = "Pillow Image.Resampling.BILINEAR (antialiased when shrinking)"
    out["resize_rounding"] = "round(side * resize / shorter side), at least 1"
    out["crop"] = "centre; an odd margin's extra pixel is cut (or padded) at the bottom / right"
    out["grey_from_rgb"] = "ITU-R 601 luma 0.299 R + 0.587 G + 0.114 B (Pillow convert('L'))"
    return out


def _converter_versions(spec: Target) -> dict[str, str]:
    """The versions of torch and of the packages that converted the file (the same in one environment)."""
    from importlib import metadata as md

    names = ["torch"] + (["litert-torch"] + (["ai-edge-quantizer"] if spec.precision == "fp16" else [])
                         if spec.format == "tflite" else ["onnx", "onnxscript"])
    versions = {}
    for dist in names:
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "unknown"
    return versions


def _to_tflite(spec, recipe, qr, float_graph, example, metadata):
    from .names import tflite_name_map, tflite_tensor_names
    from .rewrites import rewrite_for_tflite
    from .tflite import lower_to_tflite
    from .tflite_file import dynamic_batch, read_tflite, rename_tensors
    from .verify import tflite_census

    graph = copy.deepcopy(qr.export_graph) if spec.quantized else float_graph
    rewrites = rewrite_for_tflite(graph, quantized=spec.quantized)
    lowered = lower_to_tflite(graph, example, quantized=spec.quantized, io_dtype=recipe.io.dtype,
                              layout=recipe.io.layout)
    plain = read_tflite(lowered.to_bytes(), "converted model")
    name_map, tensor_layer = tflite_name_map(graph, plain, quantized=spec.quantized)
    names = tflite_tensor_names(plain, tensor_layer)
    renamed = {layer: names[i] for i, layer in tensor_layer.items() if plain.tensors[i].name == name_map.get(layer)}
    metadata["name_map"] = dict(sorted(renamed.items()))
    metadata["rewrites"] = [str(r) for r in rewrites]
    data = dynamic_batch(rename_tensors(lowered.to_bytes({METADATA_KEY: metadata_json(metadata)}), names))
    if spec.precision == "fp16":
        data = _tflite_fp16_weights(data)
    info = read_tflite(data, "converted model")
    census = tflite_census(info, spec.quantized, recipe.io.layout, int(example.shape[1]), rewrites)
    extra = []
    for r in rewrites:  # parameters that only the rewrites define (see rewrites.py)
        if r.kind == "hardsigmoid":
            extra += [((3.0 / 127.0,), (0,)), ((1.0 / 6.0 / 127.0,), (0,))]
    mids = []
    for node in graph.graph.nodes:
        if node.meta.get("mq_rewrite_internal") and node.target == torch.ops.aten.hardtanh.default:
            q = next(iter(node.users))
            mids.append(((float(q.args[1]),), (int(q.args[2]),)))
    if spec.quantized:
        extra += _converter_scalar_params(graph, info, data)
    return data, graph, {"census": census, "info": info, "tensor_layer": tensor_layer, "extra": extra + mids}


def _converter_scalar_params(graph, info, data: bytes) -> list[tuple[tuple[float, ...], tuple[int, ...]]]:
    """Parameters of the int8 constants the converter makes for a graph's number operands (``40.0 * x``).

    The quantizer leaves a number operand of add / mul / sub unquantized; litert-torch stores it as a
    one-element int8 tensor with parameters of its own, which no quant-table entry has. Such a tensor is
    accepted when it holds one of the graph's numbers to within half a quantization step."""
    from .tflite_file import WEIGHTED_OPS, tensor_values

    aten = torch.ops.aten
    arithmetic = (aten.add.Tensor, aten.add_.Tensor, aten.mul.Tensor, aten.mul_.Tensor, aten.sub.Tensor,
                  aten.sub_.Tensor, aten.rsub.Scalar)
    numbers = {float(a) for node in graph.graph.nodes if node.op == "call_function" and node.target in arithmetic
               for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)}
    if not numbers:
        return []
    operands = {t for op in info.ops if op.name not in WEIGHTED_OPS for t in op.inputs}
    params = []
    for t in info.tensors:
        if not (t.constant and t.quantized and t.index in operands and len(t.scales) == 1
                and int(np.prod(t.shape or (1,))) == 1):
            continue
        code = tensor_values(data, t.index)
        if code is None:
            continue
        value = (float(code.reshape(-1)[0]) - t.zero_points[0]) * t.scales[0]
        if any(abs(value - n) <= 0.5 * t.scales[0] * (1 + 1e-6) for n in numbers):
            params.append(((float(t.scales[0]),), (int(t.zero_points[0]),)))
    return params


def _tflite_fp16_weights(data: bytes) -> bytes:
    """float16 weights + DEQUANTIZE (TFLite's float16 layout) with ai-edge-quantizer's float casting.

    litert-torch constant-folds float16 constants that are cast to float32, so a float16-constant graph
    comes out as float32; ai-edge-quantizer (installed with litert-torch) rewrites the converted file.
    """
    import contextlib
    import io

    from ai_edge_quantizer import quantizer as aeq
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    q = aeq.Quantizer(bytes(data))
    q.add_weight_only_config(regex=".*", operation_name="*", num_bits=16,
                             algorithm_key=AlgorithmName.FLOAT_CASTING)
    from .tflite import root_logging_kept

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), root_logging_kept():
        result = q.quantize()
    from .tflite_file import inline_buffers

    return inline_buffers(bytes(result.quantized_model))


def _to_onnx(spec, qr, float_graph, example, metadata):
    import onnx

    from .names import onnx_name_map
    from .onnx import activations_to_uint8, clamps_on_codes, lower_to_onnx
    from .verify import onnx_census

    graph = qr.graph if spec.quantized else float_graph
    proto, program = lower_to_onnx(graph, example, precision=spec.precision)
    metadata["name_map"] = dict(sorted(onnx_name_map(proto, program, graph, spec.quantized).items()))
    if spec.quantized:  # after the name map (node provenance); both keep the names of the layers' tensors
        activations_to_uint8(proto)
        clamps_on_codes(proto)
    metadata["rewrites"] = []
    for node in proto.graph.node:  # exporter debug info: stack traces with local paths (not deterministic)
        del node.metadata_props[:]
    del proto.metadata_props[:]
    proto.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_KEY, value=metadata_json(metadata)))
    proto.producer_name = "mobilequant"
    proto.producer_version = __version__
    return proto.SerializeToString(), graph, {"census": onnx_census(proto), "proto": proto}


def _refused_by_runtime(error: Exception, spec, qr):
    """The check a file fails when its runtime will not load or run it. XNNPACK refuses int8 ops whose
    requantization scale ratio is outside what its kernels take — measured: a QAT job of a random-weight
    MobileNetV1 at 64 px whose classifier's output scale fell to 2⁻²³ (outputs ~0): "failed to prepare",
    which had escaped export as a RuntimeError traceback. The smallest activation scale is named."""
    from .verify import Check

    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    runtime = "LiteRT (XNNPACK)" if spec.format == "tflite" else "ONNX Runtime"
    detail = ""
    if qr is not None:
        acts = [e for e in qr.table if e.role != "weight" and e.dtype == "int8" and e.scale]
        if acts:
            low = min(acts, key=lambda e: min(e.scale))
            detail = (f"smallest activation scale {min(low.scale):.3g} at {low.name} ({low.role}): a layer whose "
                      "values are ~0 on the calibration data gives scales a kernel cannot take")
    return Check("runs_in_runtime", False, f"{runtime} refused the file: {first}", "the file loads and runs",
                 detail)


def _builtin_kernels_note(data: bytes, xs: np.ndarray, layout: str, ref: np.ndarray) -> str:
    """The file in LiteRT's built-in int8 kernels, measured against the simulation and reported, not gated.

    The checks run the file as LiteRT runs it by default on a CPU, with XNNPACK, whose int8 arithmetic the
    quantizer matches (weights on their grid, HARD_SWISH and LeakyReLU scales snapped to its kernels). The
    built-in kernels — what an app gets without XNNPACK — requantize with another fixed-point rounding:
    each op stays within one step of exact int8 arithmetic, and the network amplifies those steps (the
    shipped MobileNetV2 0.5: 99.35 % top-1 agreement with the simulation on 2,000 images, against 100 % with
    XNNPACK)."""
    from ._run import run_tflite_bytes

    try:
        out = run_tflite_bytes(data, xs, layout, builtin_kernels=True)
    except (RuntimeError, ValueError) as e:
        return f"LiteRT's built-in kernels (no XNNPACK) refuse the file: {str(e).strip().splitlines()[0]}"
    if out.shape != ref.shape:
        return f"LiteRT's built-in kernels (no XNNPACK): outputs of shape {out.shape[1:]}, the simulation's {ref.shape[1:]}"
    agree = 100.0 * float(np.mean(out.argmax(1) == ref.argmax(1)))  # per image, or per pixel of a dense output
    return (f"LiteRT's built-in kernels (no XNNPACK delegate): top-1 agreement with the simulation {agree:.2f} % "
            f"of {len(xs)} images — measured, not gated: the checks above run XNNPACK, LiteRT's default CPU "
            "path; the built-in kernels round requantization differently (docs/artifacts.md)")


def _verify(artifact, data, spec, recipe, qr, model, x, labels, example, extra, seed):
    from ._run import onnx_runtime_ops, run_onnx_model, run_tflite_bytes
    from .verify import (numeric_checks, onnx_integer_check, onnx_param_check, perturbed_simulation,
                         structure_checks, tflite_param_check)

    settings = recipe.verification
    if x is None:
        x = _synthetic_images(tuple(example.shape[1:]), settings.num_images, seed)
    report = VerificationReport(target=spec.name, num_images=len(x))
    self_ref = None
    with torch.no_grad():
        if spec.quantized:
            ref = torch.cat([qr.graph(x[i:i + 256]) for i in range(0, len(x), 256)]).numpy()
            noisy = perturbed_simulation(qr.graph)
            torch.manual_seed(seed)
            # several draws of the noise on a small set (≥ ~1,000 simulated images, at most 8 draws): one
            # draw's self-agreement is itself noisy there (numeric_checks)
            draws = min(8, max(1, math.ceil(1000 / max(len(x), 1))))
            self_ref = np.stack([torch.cat([noisy(x[i:i + 256]) for i in range(0, len(x), 256)]).numpy()
                                 for _ in range(draws)])
        else:
            ref = torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)]).numpy()
    xs = x.numpy()
    try:
        out = run_tflite_bytes(data, xs, recipe.io.layout) if spec.format == "tflite" else run_onnx_model(data, xs)
    except (RuntimeError, ValueError) as e:  # the runtime refuses the file: a check that fails, not a crash
        report.checks.append(_refused_by_runtime(e, spec, qr))
    else:
        report.checks += numeric_checks(spec.precision, out, ref, None if labels is None else labels.numpy(),
                                        settings, self_ref=self_ref)
        if spec.quantized and spec.format == "tflite":
            report.notes.append(_builtin_kernels_note(data, xs, recipe.io.layout, ref))
    report.checks += structure_checks(artifact.census, spec.quantized,
                                      float_fallback=spec.quantized and qr.config.float_fallback)
    if spec.quantized:
        if spec.format == "tflite":
            report.checks.append(tflite_param_check(extra["info"], extra["tensor_layer"], qr.table,
                                                    settings.scale_rtol, extra["extra"]))
        else:
            report.checks.append(onnx_param_check(extra["proto"], qr.table, settings.scale_rtol))
            report.checks.append(onnx_integer_check(onnx_runtime_ops(data)))
    return report
