"""``run_audit``: may this artifact ship, and if not, which layer to fix?

The pipeline (each step a plain function of the one before, see :mod:`mobilequant.audit.compare`)::

    open the artifact  →  check it belongs to the model / fits the data  →  fused float layers
    →  match them to the artifact's tensors (name map)  →  one-layer segments  →  batches:
       float reference | artifact intermediates | each layer alone  →  errors per layer
    →  end-to-end metrics  →  weight / channel health  →  gate  →  AuditReport
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..capture import capture, keeps_caller_state
from ..fusion import move_activation_before_concat
from ..errors import CheckFailed, InputError, UsageError
from .artifact import artifact_provenance, constant_tensors, content_target, open_artifact
from .compare import build_segments, check_shapes, compare_batches, layer_results, match_layers
from .endtoend import chance_warning, end_to_end
from .gate import evaluate_gate
from .health import (HealthThresholds, dead_activation_findings, float_weight_findings, kernel_mismatch_findings,
                     kernel_norms, quantized_weight_findings)
from .layers import fused_layers
from .metrics import ErrorStats, Metric, sqnr_db
from .reference import FloatReference
from .report import AuditReport, Gate, GateFailure

__all__ = ["run_audit", "DEFAULT_IMAGES"]

DEFAULT_IMAGES = 1000
_BATCH_BYTES = 768 << 20  # memory for one batch of intermediates
_COPIES = 4  # float reference, artifact values, segment outputs, layout / dtype conversions
_WEIGHT_MISMATCH_DB = 10.0  # int8 kernels sit 35-50 dB from their float source; another checkpoint is < 0 dB


def _export_for_audit(source, target: str, out_dir, calibration_data, recipe):
    """Quantize (if needed) and export ``source`` (nn.Module or QuantResult) so the real file can be audited."""
    import tempfile

    from ..export import export, get_target
    from ..quant import QuantResult

    spec = get_target(target)
    model = source.float_model if isinstance(source, QuantResult) else source
    if calibration_data is None and spec.quantized and not isinstance(source, QuantResult):
        from ..data import calibration_set

        cfg = getattr(model, "preprocess", None)
        if cfg is None:
            raise UsageError("auditing a model needs calibration_data (or a model with `preprocess`)")
        cal = calibration_set(cfg=cfg)  # the shipped Fashion-MNIST training subset: disjoint from the test split
        calibration_data = [cal.images[i:i + 64] for i in range(0, len(cal), 64)]
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="mobilequant-audit-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = getattr(model, "model_name", None) or type(model).__name__
    try:
        return export(source, target, out_dir / f"{name}-{spec.name}{spec.suffix}", recipe,
                      calibration_data=calibration_data), None
    except CheckFailed as e:  # the file is written and kept; the audit says why it fails
        if getattr(e, "artifact", None) is None:
            raise
        return e.artifact, f"export verification failed: {e}"


def _resolve_artifact(artifact):
    """(path, name map or None, metadata dict from the Artifact object) for a path or an export.Artifact."""
    if isinstance(artifact, (str, os.PathLike)):
        return str(artifact), None, {}
    path = getattr(artifact, "path", None)
    if path is None:
        raise UsageError(f"artifact must be a path or an export Artifact, got {type(artifact).__name__}")
    return str(path), getattr(artifact, "name_map", None), dict(getattr(artifact, "metadata", None) or {})


def _resolve_model(model, quant_result, meta: dict) -> nn.Module:
    if model is None and quant_result is not None:
        model = quant_result.float_model
    if model is None:
        name = meta.get("model_name")
        if not name:
            raise UsageError("no float model given and the artifact does not name one; pass model=... "
                             "(or --model/--weights)")
        from ..weights import default_model, list_default_weights

        if name not in list_default_weights():
            raise UsageError(f"the artifact was made from {name!r}, which has no shipped weights; "
                             "pass the float model it was exported from (model=..., or --model/--weights)")
        model = default_model(name)
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch nn.Module, got {type(model).__name__}")
    return model.eval()


def _resolve_data(data, model: nn.Module, images: int | None):
    from ..data import ImageData, fit_labels, load_data

    if not isinstance(data, ImageData):
        cfg = getattr(model, "preprocess", None)
        if cfg is None:
            raise UsageError("data given by name needs a model with `preprocess`; pass an ImageData instead")
        data = load_data(data, cfg, "test")
    if len(data) == 0:
        raise InputError(f"no images in {data.source}")
    if images is not None:
        if images < 1:
            raise UsageError(f"images must be at least 1, got {images}")
        data = data.spread(images)
    return fit_labels(data, model)


def _check_belongs(model: nn.Module, meta: dict, quant_result, graph, data) -> list[str]:
    """Raise InputError when artifact, model and data cannot belong together; return softer warnings."""
    warnings = []
    mname, aname = getattr(model, "model_name", None), meta.get("model_name")
    if aname and mname and aname != mname:
        raise InputError(f"the artifact was exported from {aname!r} but the model is {mname!r}: "
                         "they do not belong together")
    a_sha = meta.get("quant_table_sha256")
    if quant_result is not None and a_sha:
        q_sha = quant_result.table.sha256()
        if q_sha != a_sha:
            raise InputError(f"the artifact's quantization table (sha256 {a_sha[:12]}…) is not the given "
                             f"QuantResult's ({q_sha[:12]}…): the artifact was exported from another quantization")
    want = tuple(getattr(getattr(model, "preprocess", None), "input_size", ()) or ())
    if want and tuple(data.input_size) != want:
        raise InputError(f"the data has {'×'.join(map(str, data.input_size))} images but the model takes "
                         f"{'×'.join(map(str, want))} ({data.source}); preprocess it for this model")
    shape = graph.input_info().shape
    c, h, w = data.input_size
    if shape and tuple(shape[1:]) not in ((c, h, w), (h, w, c)):
        sides = [d for d in shape[1:] if d != c]  # the file's H and W, whichever its layout
        hint = (f"; it was exported for {sides[0]}×{sides[1]} inputs: audit it with --resolution {sides[0]} "
                "(resolution= in Python) so that the model is built and the data preprocessed for that size"
                if len(sides) == 2 and sides[0] == sides[1] and sides[0] != h else "")
        raise InputError(f"the artifact's input is {tuple(shape)} but the data has {c}×{h}×{w} images: "
                         f"data and artifact do not fit{hint}")
    if not aname:
        warnings.append("the artifact carries no mobilequant metadata: model and quantization provenance not checked")
    return warnings


def _check_weights_hash(path: str, model: nn.Module, meta: dict, shipped: bool) -> None:
    """The file records the sha256 of the float weights it was exported from (``weights_sha256``): a model
    with other weights is not its reference, and every figure against it would blame the file for the
    difference (a file exported with ``--weights edited.pt`` failed the default audit at "drop 24.50 pp",
    with no hint). Refused, naming the checkpoint to pass. Not for fine-tuned files (QAT): their weights
    are the fine-tuning's, and the report says what the shipped reference means for them."""
    recorded = meta.get("weights_sha256")
    if not isinstance(recorded, str) or meta.get("fine_tuned"):
        return
    aname, mname = meta.get("model_name"), getattr(model, "model_name", None)
    if aname and mname and aname != mname:
        return  # another architecture: _check_belongs says so, which is the better message
    from ..export.artifact import weights_sha256

    own = weights_sha256(model)
    if own == recorded:
        return
    ckpt = meta.get("weights_file")
    which = f"the checkpoint it was exported from ({ckpt})" if ckpt else "the checkpoint it was exported from"
    given = (f"{meta.get('model_name')}'s shipped weights" if shipped else "the model's weights")
    raise InputError(f"{path} was exported from other weights than {given} (weights_sha256 {recorded[:12]}… in the "
                     f"file, {own[:12]}… for the model): pass {which} with --weights (Python: model=...)")


def _check_sidecar(path: str, actual: str) -> tuple[dict | None, list[GateFailure]]:
    """What the ``.verify.json`` report export wrote beside the file says, and the gate failures it makes:
    a file whose sha256 is not the one export verified (changed after export: tampered, corrupted, or
    another file under its name), and a file whose export checks failed (the ``.failed`` file export writes
    beside the output); ``actual``: the file's sha256. ``(None, [])`` without a report: nothing to compare."""
    from ..export.artifact import sidecar_path

    report_path = sidecar_path(path)
    if not report_path.is_file():
        return None, []
    name = report_path.name
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        report = None
        reason = getattr(e, "strerror", None) or type(e).__name__
    recorded = report.get("artifact_sha256") if isinstance(report, dict) else None
    passed = report.get("passed") if isinstance(report, dict) else None
    if not isinstance(recorded, str) or not isinstance(passed, bool):
        why = reason if report is None else "no artifact_sha256 / passed"
        return ({"sidecar": name, "passed": None, "sha256_matches": None},
                [GateFailure("export_verification", "artifact",
                             f"{path}: its {name} is not an export verification report ({why}): whether the "
                             "file is the one export verified cannot be told")])
    failures = []
    if actual != recorded:
        failures.append(GateFailure("artifact_changed", "artifact",
                                    f"{path} changed after export's verification: sha256 {actual}, its {name} "
                                    f"says {recorded}"))
    if not passed:
        failed = [c.get("name", "?") for c in report.get("checks") or [] if isinstance(c, dict) and not c.get("passed")]
        failures.append(GateFailure("export_verification", "artifact",
                                    f"{path} failed export's own checks ({', '.join(failed) or 'see ' + name}): "
                                    f"it is the file export refused to write as its output"))
    return {"sidecar": name, "passed": passed, "sha256_matches": actual == recorded}, failures


def _flattened_from(gm, layer) -> tuple[int, int, int] | None:
    """(C, H, W) of the 4-D tensor a linear layer reads flattened (through views, flattens, dropout), if any."""
    nodes = {n.name: n for n in gm.graph.nodes}
    node = nodes.get(layer.input_nodes[0]) if layer.input_nodes else None
    for _ in range(8):
        val = None if node is None else node.meta.get("val")
        shape = tuple(getattr(val, "shape", ()))
        if len(shape) == 4:
            return tuple(int(d) for d in shape[1:])
        args = [a for a in getattr(node, "args", ()) if isinstance(a, torch.fx.Node)]
        if len(args) != 1:
            return None
        node = args[0]
    return None


def _check_weights(matches, graph, meta: dict, gm) -> tuple[dict, dict[str, float]]:
    """Artifact kernels per layer, and the SQNR of each dequantized kernel against the model's folded one."""
    qweights, wsqnr = {}, {}
    for m in matches:
        if not m.layer.is_weighted:
            continue
        q = graph.weights(m.tensor)
        if q is None:
            continue
        qweights[m.layer.name] = q
        folded = m.layer.folded_weight()
        if folded is not None and q.codes.shape == folded.shape:
            kernels = [folded]
            chw = _flattened_from(gm, m.layer) if folded.ndim == 2 else None
            if chw is not None and chw[1] * chw[2] > 1 and math.prod(chw) == folded.shape[1]:
                # a linear on a flattened C×H×W map: the TFLite exporter stores its columns in (H, W, C)
                # order (export.rewrites, flatten → linear without a TRANSPOSE)
                o = folded.shape[0]
                kernels.append(folded.reshape(o, *chw).transpose(0, 2, 3, 1).reshape(o, -1))
            wsqnr[m.layer.name] = max(sqnr_db(ErrorStats().update(k[None], q.dequantized()[None]))
                                      for k in kernels)
    cle = bool((meta.get("quant_config") or {}).get("cle", False))
    if wsqnr and not cle:
        low = [n for n, v in wsqnr.items() if v < _WEIGHT_MISMATCH_DB]
        if len(low) > len(wsqnr) / 2:
            raise InputError(f"the artifact's kernels do not match the model's ({len(low)} of {len(wsqnr)} layers "
                             f"below {_WEIGHT_MISMATCH_DB:g} dB, e.g. {low[0]}): artifact and model do not belong "
                             "together (different weights?)")
    return qweights, wsqnr


def _kernel_elements(graph) -> int:
    """Elements of the file's constant weight tensors (2-D or more, float or 8-bit): one copy of every
    conv / linear kernel in a file of any tool."""
    kinds = (np.floating, np.int8, np.uint8)
    return sum(int(np.prod(shape)) for shape, dtype, _q in constant_tensors(graph)
               if len(shape) >= 2 and any(np.issubdtype(dtype, k) for k in kinds))


def _check_kernel_count(model: nn.Module, graph) -> None:
    """Without a name map nothing ties the file's layers to the model's: a file of ShuffleNetV2 audited
    against MobileNetV2 passed (both answer alike on most Fashion-MNIST images). The kernels' total size is
    the architecture's fingerprint: another network's file differs from the model's by far more than the
    few percent any converter adds or folds away."""
    own = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    found = _kernel_elements(graph)
    if own and abs(found - own) > 0.1 * own:
        raise InputError(f"the artifact's kernels hold {found:,} weights, the model's {own:,}: artifact and model "
                         "do not belong together (another architecture or width?)")


def _float_precision(graph, target: str) -> str | None:
    """``fp32`` / ``fp16`` for a file that computes in float with float weights; ``None`` otherwise —
    int8 files, and float files holding int8 weights (dynamic-range or weight-only quantization by other
    tools, whose content reads as float)."""
    precision = target.rsplit("-", 1)[-1]
    if precision not in ("fp32", "fp16"):
        return None
    int8 = any(q or dtype in (np.int8, np.uint8) for _shape, dtype, q in constant_tensors(graph))
    return None if int8 else precision


def _deployed_logits(path, images: torch.Tensor, num_threads: int, batch: int) -> np.ndarray:
    """The artifact's outputs as an app gets them: the whole file in its runtime (XNNPACK for LiteRT)."""
    from ..runtime import open_runner

    runner = open_runner(path, num_threads=num_threads)
    outs = [np.asarray(runner.run(images[s:s + batch])) for s in range(0, len(images), batch)]  # bounded memory
    return np.concatenate([o.reshape(len(o), -1) for o in outs])


def _reference_graph(model: nn.Module, example: torch.Tensor, meta: dict, quant_result):
    """The float graph the artifact was quantized from, with stable names.

    Without cross-layer equalization that is the captured model itself (BN kept, so the health checks
    see γ). With CLE the artifact's weights and activations are rescaled per channel, so the reference
    must be the equalized graph: ``quant_result.float_graph`` when the quant stage provides it, else the
    same deterministic steps the quant stage runs (capture → fold conv-BN → ``quant.cle.equalize``).
    """
    if not bool((meta.get("quant_config") or {}).get("cle", False)):
        return None
    graph = getattr(quant_result, "float_graph", None) if quant_result is not None else None
    if graph is not None:
        return graph
    from ..fusion import fold_conv_bn
    from ..quant.cle import equalize

    gm = capture(model, example, dynamic_batch=False)
    fold_conv_bn(gm)
    gm, _ = equalize(gm)
    return gm


@keeps_caller_state
def run_audit(
    artifact,
    data,
    *,
    model: nn.Module | None = None,
    quant_result=None,
    name_map: Mapping[str, str] | None = None,
    max_drop: float | None = 0.5,
    min_sqnr: float | None = None,
    fail_on_dead_kernels: bool = False,
    images: int | None = DEFAULT_IMAGES,
    batch_size: int = 250,
    layer_checks: bool = True,
    thresholds: HealthThresholds = HealthThresholds(),
    metrics: Mapping[str, Metric] | None = None,
    progress: bool | None = None,
    num_threads: int = 1,
    target: str | None = None,
    recipe=None,
    calibration_data=None,
    out_dir: str | os.PathLike | None = None,
) -> AuditReport:
    """Audit an exported artifact against its float model on ``data``.

    ``artifact``: a ``.tflite`` / ``.onnx`` path or an ``export.Artifact`` — or an ``nn.Module`` /
    ``QuantResult`` together with ``target`` (e.g. ``"tflite-int8"``): it is then exported first
    (``recipe``, ``calibration_data`` — default: the shipped calibration subset — and ``out_dir``,
    default a new temporary directory, go to ``export.export``) and the written file is audited.
    ``data``: an ``ImageData``
    (labels optional) or a data spec (``"builtin"`` = the Fashion-MNIST test split, a folder, a
    ``.npz``), preprocessed for the model. ``model``: the float model (default: ``quant_result``'s, else
    the shipped weights named in the artifact's metadata). ``name_map``: stable layer name → tensor name
    (default: the Artifact's, else the one embedded in the file). Gate: ``max_drop`` (pp), ``min_sqnr``
    (dB, isolated, per layer), ``fail_on_dead_kernels``. ``images``: how many images to use (spread evenly over
    ``data``; ``None``: all). Class-folder labels are fitted to the model (``data.fit_labels``). ``layer_checks=False`` skips the per-layer comparison (end to end and weight
    health only). Raises :class:`~mobilequant.errors.InputError` for a file that is not an artifact,
    an artifact that does not belong to the model, or data that does not fit.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    from ..quant import QuantResult

    if isinstance(artifact, (nn.Module, QuantResult)):  # model + target: export first, audit the real file
        if target is None:
            raise UsageError("auditing a model (not a file) needs target=..., e.g. 'tflite-int8'")
        if isinstance(artifact, QuantResult):
            quant_result = artifact if quant_result is None else quant_result
        model = artifact.float_model if isinstance(artifact, QuantResult) and model is None else (
            artifact if model is None else model)
        artifact, export_note = _export_for_audit(artifact, target, out_dir, calibration_data, recipe)
        timings["export"] = time.perf_counter() - t_start
    elif target is not None:
        raise UsageError("target= is for auditing a model; an artifact file already has its target")
    else:
        export_note = None
    t_load = time.perf_counter()
    path, given_map, given_meta = _resolve_artifact(artifact)
    graph = open_artifact(path, num_threads=num_threads)
    meta = {**artifact_provenance(graph), **given_meta}
    actual, stale = content_target(graph), None
    if meta.get("target") and meta["target"] != actual:
        # e.g. ONNX Runtime's quantize_static copies the float file's metadata_props into its int8 file: the
        # model named there still holds, the name map and quantization table do not describe this file
        stale = (f"the artifact's mobilequant metadata was written for its export as {meta['target']}, but the "
                 f"file is {actual}: another tool changed it after export; the metadata's name map and "
                 "quantization table are not used (per-layer checks skipped)")
        meta = {k: v for k, v in meta.items() if k not in ("name_map", "quant_table_sha256", "quant_config")}
        meta["target"] = actual
        given_map = None
    shipped = model is None and quant_result is None
    model = _resolve_model(model, quant_result, meta)
    if not stale:
        _check_weights_hash(path, model, meta, shipped)  # before any work: the model is not the file's
    from ..export.artifact import file_sha256

    sha256 = file_sha256(path)
    verification, sidecar_failures = _check_sidecar(path, sha256)
    data = _resolve_data(data, model, images)
    warnings = (_check_belongs(model, meta, quant_result, graph, data) + ([export_note] if export_note else [])
                + ([stale] if stale else []))
    if shipped and meta.get("fine_tuned"):
        warnings.append(f"the artifact was fine-tuned ({meta['fine_tuned']}) from {meta.get('model_name')}; it is "
                        "compared with that model's shipped weights, before fine-tuning: per-layer values include "
                        "the weight changes (pass the fine-tuned float model for per-layer checks of the file alone)")
    if name_map is None:
        name_map = given_map if given_map is not None else meta.get("name_map")
    t = time.perf_counter()
    timings["load"] = t - t_load

    # Batches hold every layer's float reference and artifact values (and copies while comparing): bound
    # the batch so that a 224×224 model does not need gigabytes (32×32 Fashion-MNIST: 250 fit in ~100 MB).
    per_image = max(graph.activation_elements(), 1) * 4 * _COPIES
    batch = max(1, min(batch_size, len(data), _BATCH_BYTES // per_image))
    example = data.images[:batch]
    gm = capture(model, example, dynamic_batch=False)  # static: much quicker; FloatReference pads the last batch
    move_activation_before_concat(gm)  # as the quant stage does before it folds (exact in float)
    layers = fused_layers(gm)  # the user's model as written (BN kept): health checks
    ref_gm = _reference_graph(model, example, meta, quant_result)
    ref_layers = layers if ref_gm is None else fused_layers(ref_gm)  # what the artifact was quantized from
    if ref_gm is not None:
        warnings.append("the artifact was quantized after cross-layer equalization: per-layer checks compare it "
                        "with the equalized float graph (same function, rescaled channels)")
    matches, unmapped, unknown = [], [l.name for l in ref_layers], []
    # keyed by argument name, as the exporter's name map has them (capture.layer_name): torch.export renames
    # the node of an argument called ``input`` (nn.Sequential's) to ``input_1``, the argument keeps its name
    placeholders = [str(n.target) for n in (ref_gm if ref_gm is not None else gm).graph.nodes
                    if n.op == "placeholder"]
    input_tensors = [t for k, t in (name_map or {}).items() if k in placeholders and graph.has_tensor(t)]
    if layer_checks and name_map:
        out_node = next(n for n in (ref_gm if ref_gm is not None else gm).graph.nodes if n.op == "output").args[0]
        out_node = out_node[0] if isinstance(out_node, (tuple, list)) else out_node
        matches, unmapped, unknown = match_layers(ref_layers, name_map, graph, placeholders,
                                                  output=(out_node.name, graph.output_info().name))
        if unknown:
            raise InputError(f"{len(unknown)} name-map entries of the artifact are not in the model or the file "
                             f"(e.g. {unknown[0]}): artifact and model do not belong together")
        n_matched = len(matches)
        matches, misfits = check_shapes(matches, graph)
        if n_matched and len(misfits) > n_matched / 2:
            raise InputError(f"{len(misfits)} of {n_matched} layers do not fit their tensors in the artifact "
                             f"({misfits[0]}): artifact and model do not belong together")
        warnings += misfits
    elif layer_checks and not stale:
        warnings.append("the artifact has no name map (stable layer name → tensor): per-layer checks skipped; "
                        "re-export it with this mobilequant")
    if not name_map:
        _check_kernel_count(model, graph)
    qweights, wsqnr = _check_weights(matches, graph, meta, ref_gm if ref_gm is not None else gm)

    reference = FloatReference(ref_gm if ref_gm is not None else gm, ref_layers, [m.layer.name for m in matches] +
                               [l.name for l in ref_layers if l.activation in ("relu", "relu6")], batch=batch)
    if matches and graph.target == "tflite":
        note = graph.check_intermediates(data.images[:8].numpy(), [m.tensor for m in matches])
        if note:
            warnings.append(note)
    from tqdm.auto import tqdm

    # None: tqdm shows bars on a terminal only — also for progress=True: in a CI log (stderr a file or a
    # pipe) a bar is a line of carriage returns
    bar_off = True if progress is False else None
    with tqdm(total=len(matches), desc="audit: cutting layers", unit="layer", disable=bar_off, leave=False) as bar:
        segments = build_segments(graph, matches, input_tensors, progress=bar) if matches else {}
    timings["prepare"] = time.perf_counter() - t

    batches = (data.images[s:s + batch] for s in range(0, len(data), batch))
    with tqdm(total=len(data), desc="audit", unit="img", disable=bar_off, leave=False) as bar:
        res = compare_batches(graph, reference, matches, segments, batches, progress=bar, input_tensors=input_tensors)
    timings.update(res.timings)

    f_logits, q_logits = np.concatenate(res.float_logits), np.concatenate(res.quant_logits)
    # The gate judges the file as it ships: run whole, as the export summary and the benchmarks run it.
    # The per-layer run keeps every intermediate readable (LiteRT then delegates op by op, ONNX Runtime
    # gets extra graph outputs), and its integer kernels can round a few near-tie images differently.
    t = time.perf_counter()
    deployed = _deployed_logits(path, data.images, num_threads, batch)
    timings["end_to_end"] = time.perf_counter() - t
    if deployed.shape == q_logits.shape:
        flips = int((deployed.argmax(1) != q_logits.argmax(1)).sum())
        if flips:
            warnings.append(f"end to end: the file run whole; the per-layer run, which keeps every intermediate "
                            f"tensor, decides {flips} of {len(data)} images differently")
        q_logits = deployed
    else:
        warnings.append(f"end to end: the file run whole gives outputs of shape {deployed.shape[1:]}, the "
                        f"per-layer run {q_logits.shape[1:]}: end-to-end figures from the per-layer run")
    e2e = end_to_end(f_logits, q_logits, None if data.labels is None else data.labels.numpy())
    chance = chance_warning(e2e, f_logits.shape[1])
    if chance:
        warnings.append(chance)
    results = layer_results(matches, res, segments, metrics)
    for r in results:
        r.accumulated.setdefault("weight_sqnr_db", wsqnr.get(r.name, math.nan))

    float_findings = float_weight_findings(layers, thresholds)
    cle = bool((meta.get("quant_config") or {}).get("cle", False))
    findings = float_findings + quantized_weight_findings(ref_layers, qweights, thresholds, cle_applied=cle)
    findings += kernel_mismatch_findings(ref_layers, wsqnr, thresholds)
    float_dead = dead_activation_findings(ref_layers, res.float_channel_max, "float", len(data), order=layers)
    exclude = {f.layer: set(f.channels) for f in float_dead}
    findings += float_dead + dead_activation_findings([m.layer for m in matches], res.quant_channel_max,
                                                      "quantized", len(data), exclude, ref_layers)

    gate = Gate(max_drop, min_sqnr, fail_on_dead_kernels)
    failures = sidecar_failures + evaluate_gate(gate, e2e, results, findings,
                                                float_precision=_float_precision(graph, actual))
    timings["total"] = time.perf_counter() - t_start
    recipe_meta = meta.get("recipe")
    return AuditReport(
        artifact={"path": path, "target": meta.get("target", actual), "format": graph.target,
                  "sha256": sha256, "model_name": meta.get("model_name"),
                  "quant_table_sha256": meta.get("quant_table_sha256"),
                  "recipe": (recipe_meta.get("name") or None) if isinstance(recipe_meta, dict) else None,
                  "mobilequant_version": meta.get("mobilequant_version"),
                  "verification": verification},
        data={"source": data.source, "images": len(data), "labels": data.labels is not None},
        gate=gate, end_to_end=e2e, layers=results, findings=findings, failures=failures,
        unmapped_layers=[n for n in unmapped if n not in {m.layer.name for m in matches}],
        kernel_norms={k: [float(x) for x in v] for k, v in kernel_norms(layers, ("depthwise",)).items()},
        warnings=warnings, timings_s=timings)
