"""Benchmark: mobilequant's int8 / fp16 files against ONNX Runtime's and TensorFlow Lite's own quantizers.

    nice -n 19 /tmp/tfenv/bin/python benchmarks/compare.py                      # everything (~1.5 h, 2 shared cores)
    nice -n 19 python benchmarks/compare.py --quick                            # 1,000 images, core rows
    python benchmarks/compare.py --models mobilenetv2_050 imagenet --out results.md
    python benchmarks/compare.py --models imagenet --photos skimage                # the 12-photo set

One invocation, per model: the same trained float model, the same calibration images and the same
evaluation images for every row. Every figure is measured on the written file in its real runtime
(LiteRT interpreter with XNNPACK for ``.tflite``, ONNX Runtime CPU for ``.onnx``), never on a torch
simulation.

* Fashion-MNIST models (the shipped checkpoints listed in ``mobilequant/weights/manifest.json``):
  calibration on the shipped 512-image subset (``calibration/fashion-mnist-512.npz``), top-1 on the full
  10k test split (``--quick``: 1,000 spread over it), drop vs the float torch model, top-1 agreement with it.
* ``imagenet``: torchvision's ImageNet MobileNetV2 (``mobilequant.models.pretrained``) on crops of real
  photos (``mobilequant.data.photo_crops``, 8 crops per photo): calibrated on the crops of one half of
  the photos, evaluated on the crops of the other half. ``--photos offline`` (the default): the 62 real
  photographs that scikit-image, scikit-learn, matplotlib and Debian's ``opencv-doc`` ship, 31 per half
  (248 crops each; ``pip install -e ".[photos]"`` and ``apt-get install opencv-doc``);
  ``--photos skimage``: scikit-image's 12 photos, 6 per half (48 crops each). No labels: top-1 agreement
  with float, the same on the crops the float model gives top-1 probability ≥ 0.5 and on the whole-photo
  crops alone (one per photo: the standard ImageNet view, shorter side 256, centre 224 — how the issue's
  figures were taken, on ~45 photos), and "float top-1 inside the file's top-5".

Rows (``--quick`` keeps the core rows marked *):

* mobilequant (``mobilequant.export.export`` with recipe overrides), each as tflite-int8 and onnx-int8:
  per-channel mse + bias correction* (the default recipe), the same without bias correction*, minmax*,
  percentile, entropy (with bias correction); ReLU6 ``fixed``*; per-tensor mse without (the naive
  figure) and with bias correction; per-tensor + CLE without and with* bias correction; AdaRound
  (``quantization.adaround=true``) per channel and per tensor + CLE, both with bias correction; the
  output-aware range search (``quantization.range_search=true``) per channel, per channel with AdaRound,
  and per tensor + CLE, all with bias correction; tflite/onnx fp16* and fp32*. Each int8 variant is quantized once and written as both files (the export time of
  both counts the quantization).
* ONNX Runtime ``quantize_static`` (QDQ, int8, after ``quant_pre_process``) on the model's fp32 ONNX
  (``torch.onnx.export`` of the module as written: none of mobilequant's folding or rewrites):
  MinMax* / Percentile / Entropy, per channel* and per tensor*, with a ``CalibrationDataReader`` over the
  same calibration images.
* TensorFlow Lite converter: fp32 ONNX → onnx2tf → SavedModel → ``TFLiteConverter`` with a
  ``representative_dataset`` over the same images, int8 I/O, per channel* and per tensor*
  (``benchmarks/_tf_convert.py``, run as a subprocess). Needs ``tensorflow``, ``tf_keras`` and
  ``onnx2tf`` importable by the interpreter running this script, else the rows are skipped with the
  reason (``pip install -e ".[baselines]" && pip install --no-deps onnx2tf``).
* mobilequant QAT (Fashion-MNIST models only; ``--no-qat`` drops them): ``mobilequant.qat.run_qat`` — the
  PTQ quantizer with fake-quant constructors — fine-tunes the shipped float weights for one pass over a
  stratified ``--qat-images`` subset of the training split (default 8,192; ``--quick`` 2,048), then
  ``mobilequant.export.export(result, ...)`` writes tflite-int8 and onnx-int8 from the QAT result:
  per channel*, and per tensor. Its "export s" is training plus export; "drop" is against the shipped
  float model (the fine-tuned float model's own top-1 is in the notes under the table).

Above the tables: the date, machine and versions (read at run time), and a summary of mobilequant against
the best other tool per model (accuracy drop and error ratio, tflite-int8 latency and size ratios).
``--merge A.json B.json --out X.md`` renders the results of several runs (e.g. two halves of the model
list run side by side on two cores) as one document.

Columns: accuracy / agreement, file size, single-image latency (median of ``--latency-runs`` calls, one
thread: LiteRT + XNNPACK / ORT ``intra_op_num_threads=1``; ``mobilequant.runtime.bench.measure_latency``)
and export wall time. Export time of every route starts from the torch model: mobilequant's rows time
``export()`` (capture, quantize, lower, write; its own verification is switched off here, the benchmark
evaluates the file itself); the ONNX Runtime and TF rows add their own steps to the time of the fp32 ONNX
export they start from.

Not part of the test suite. Run it niced with one torch thread on a shared machine; latency figures
then carry the machine's load (printed with the results).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("mobilequant") is None:  # run from a checkout without an install
    sys.path.insert(0, str(REPO))

IMAGENET = "imagenet"

# mobilequant int8 variants: (label, recipe overrides, core row). The first is the default recipe.
MQ_INT8 = (
    ("per-channel mse + BC (default)", (), True),
    ("per-channel mse, no BC", ("quantization.bias_correction=false",), True),
    ("per-channel minmax + BC", ("quantization.calibration=minmax",), True),
    ("per-channel percentile + BC", ("quantization.calibration=percentile",), False),
    ("per-channel entropy + BC", ("quantization.calibration=entropy",), False),
    ("per-channel mse + BC, ReLU6 fixed", ("quantization.relu6=fixed",), True),
    ("per-tensor mse, no BC (naive)", ("quantization.per_channel=false", "quantization.bias_correction=false"),
     False),
    ("per-tensor mse + BC", ("quantization.per_channel=false",), False),
    ("per-tensor + CLE, no BC", ("quantization.per_channel=false", "quantization.cle=true",
                                 "quantization.bias_correction=false"), False),
    ("per-tensor + CLE + BC", ("quantization.per_channel=false", "quantization.cle=true"), True),
    ("per-channel mse + AdaRound + BC", ("quantization.adaround=true",), False),
    ("per-tensor + CLE + AdaRound + BC", ("quantization.per_channel=false", "quantization.cle=true",
                                          "quantization.adaround=true"), False),
    ("per-channel mse + BC + range search", ("quantization.range_search=true",), False),
    ("per-channel mse + AdaRound + BC + range search", ("quantization.adaround=true",
                                                        "quantization.range_search=true"), False),
    ("per-tensor + CLE + BC + range search", ("quantization.per_channel=false", "quantization.cle=true",
                                              "quantization.range_search=true"), False),
)
# ONNX Runtime quantize_static variants: (label, per channel, CalibrationMethod name, core row, activation
# type). ORT's default activation type is int8; its CPU kernels fuse a QDQ graph fully only with uint8
# activations (docs/benchmarks.md, "ONNX int8 files run as integer kernels"), so one row shows ORT's file
# with those, for latency.
ORT_INT8 = (
    ("per-channel MinMax", True, "MinMax", True, "QInt8"),
    ("per-channel Percentile", True, "Percentile", False, "QInt8"),
    ("per-channel Entropy", True, "Entropy", False, "QInt8"),
    ("per-channel MinMax, uint8 activations", True, "MinMax", False, "QUInt8"),
    ("per-tensor MinMax", False, "MinMax", True, "QInt8"),
    ("per-tensor Percentile", False, "Percentile", False, "QInt8"),
    ("per-tensor Entropy", False, "Entropy", False, "QInt8"),
)


@dataclass
class Row:
    route: str  # mobilequant | onnxruntime | tf converter | torch
    variant: str
    file: str  # tflite-int8, onnx-fp16, ... ("-" for the torch float model)
    top1: float | None = None  # % (labelled data)
    drop_pp: float | None = None  # float top-1 − file top-1
    agreement: float | None = None  # % top-1 agreement with the float torch model
    top5_contains_float: float | None = None  # % of images whose float top-1 is in the file's top-5
    agreement_confident: float | None = None  # % agreement on images the float model gives top-1 p ≥ 0.5
    agreement_whole: float | None = None  # photo crops: % agreement on the whole-photo crop of each photo
    kl: float | None = None  # mean KL(float softmax ‖ file softmax), nats: fidelity without the near-tie noise
    size_bytes: int | None = None
    latency_ms: float | None = None  # median single-image latency, 1 thread
    latency_min_ms: float | None = None  # fastest call (less sensitive to other processes' load)
    export_s: float | None = None
    error: str | None = None
    note: str | None = None  # how the file was run when not as usual (shown next to the variant)


@dataclass
class ModelResult:
    model: str
    params: int
    dataset: str
    num_calibration: int
    num_eval: int
    float_top1: float | None
    num_confident: int = 0  # evaluation images the float model gives top-1 probability ≥ 0.5
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> ModelResult:
        return cls(**{**d, "rows": [Row(**r) for r in d["rows"]]})


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ inputs
def _fashion_model(name: str):
    """(model, calibration ImageData, evaluation ImageData) for a shipped Fashion-MNIST checkpoint."""
    from mobilequant.data import builtin_dataset, calibration_set
    from mobilequant.weights import default_model

    net = default_model(name)
    return net, calibration_set(cfg=net.preprocess), builtin_dataset("fashion-mnist", "test", net.preprocess)


# What the ImageNet model's result says it was measured on, per --photos collection.
PHOTO_DATASETS = {
    "offline": "offline photo crops: 62 photos of scikit-image, scikit-learn, matplotlib, opencv-doc "
               "(disjoint halves)",
    "skimage": "skimage photo crops (disjoint halves)",
}


def _imagenet_model(collection: str):
    """(model, calibration crops, evaluation crops): one half of the photo collection each."""
    from mobilequant.data import photo_crops
    from mobilequant.models.pretrained import load_torchvision_mobilenet_v2

    net = load_torchvision_mobilenet_v2()
    net.model_name = "mobilenetv2_100"
    return (net, photo_crops("calibration", net.preprocess, collection=collection),
            photo_crops("evaluation", net.preprocess, collection=collection))


# ------------------------------------------------------------------------------------------ metrics
def _run_file(path: Path, images, threads: int):
    import numpy as np

    from mobilequant.runtime import open_runner

    runner = open_runner(path, num_threads=threads)
    x = images.numpy()
    return np.concatenate([runner.run(x[i:i + 500]) for i in range(0, len(x), 500)])


def _score(row: Row, logits, float_logits, labels, float_top1, whole=None) -> None:
    """Fill ``row``'s accuracy fields; ``whole`` marks the whole-photo crops (photo crops only)."""
    import numpy as np

    pred, ref = logits.argmax(1), float_logits.argmax(1)
    row.agreement = float((pred == ref).mean() * 100.0)
    # log-softmax written out (numpy has none; the benchmark does not depend on scipy)
    log_p, log_q = (z - z.max(1, keepdims=True) for z in (float_logits, logits))
    log_p, log_q = (z - np.log(np.exp(z).sum(1, keepdims=True)) for z in (log_p, log_q))
    confident = np.exp(log_p.max(1)) >= 0.5  # the float model's top-1 probability
    if confident.any():
        row.agreement_confident = float((pred == ref)[confident].mean() * 100.0)
    if whole is not None:
        row.agreement_whole = float((pred == ref)[whole].mean() * 100.0)
    # mean KL divergence of the file's softmax from the float model's: on unlabelled near-tie crops one
    # flipped decision moves agreement by 1/N, while the KL moves with the size of the output error
    row.kl = float((np.exp(log_p) * (log_p - log_q)).sum(1).mean())
    top5 = np.argsort(-logits, axis=1)[:, :5]
    row.top5_contains_float = float((top5 == ref[:, None]).any(1).mean() * 100.0)
    if labels is not None:
        row.top1 = float((pred == labels).mean() * 100.0)
        row.drop_pp = float_top1 - row.top1


def _measure(row: Row, path: Path, images, float_logits, labels, float_top1, args, whole=None) -> None:
    from mobilequant.errors import InputError
    from mobilequant.runtime.bench import measure_latency

    try:
        logits = _run_file(path, images, args.threads)
    except InputError as e:
        if "XNNPACK" not in str(e):
            raise
        _measure_without_xnnpack(row, path, images, float_logits, labels, float_top1, args, whole)
        return
    _score(row, logits, float_logits, labels, float_top1, whole)
    row.size_bytes = path.stat().st_size
    lat = measure_latency(path, threads=args.threads, runs=args.latency_runs, warmup=10)
    row.latency_ms, row.latency_min_ms = lat.median_ms, lat.min_ms


def _measure_without_xnnpack(row: Row, path: Path, images, float_logits, labels, float_top1, args,
                             whole=None) -> None:
    """A .tflite file the XNNPACK delegate refuses: LiteRT's built-in kernels (no default delegates).

    Accuracy is the file's; the latency is not comparable with the XNNPACK rows (the row says so).
    """
    import numpy as np

    from mobilequant.runtime import TFLiteRunner

    runner = TFLiteRunner(path, num_threads=args.threads, preserve_all_tensors=True)  # no default delegates
    x = images.numpy()
    _score(row, np.concatenate([runner.run(x[i:i + 500]) for i in range(0, len(x), 500)]), float_logits,
           labels, float_top1, whole)
    row.size_bytes = path.stat().st_size
    interp = runner.interpreter
    interp.set_tensor(runner.input.index, np.zeros(runner.input.shape, dtype=runner.input.dtype))
    for _ in range(10):
        interp.invoke()
    times = []
    for _ in range(args.latency_runs):
        t = time.perf_counter()
        interp.invoke()
        times.append((time.perf_counter() - t) * 1e3)
    row.latency_ms, row.latency_min_ms = float(np.median(times)), float(np.min(times))
    row.note = "XNNPACK refuses the file: built-in kernels, latency not comparable"


# ------------------------------------------------------------------------------------------- routes
def _slug(label: str) -> str:
    """``per-channel mse + BC (default)`` → ``per-channel-mse-bc-default``: a variant's part of a file name."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def _selected(variants: list[str], labels: list[str]) -> dict[str, list[str]]:
    """The int8 variant labels each ``--variants`` text selects: a text that is a whole label picks that
    label alone, any other text every label containing it."""
    return {v: ([v] if v in labels else [lab for lab in labels if v in lab]) for v in variants}


def _mobilequant_rows(net, calib, work: Path, measure, full: bool, ctx: dict,
                      variants: list[str] | None = None) -> list[Row]:
    from mobilequant.export import default_recipe, export
    from mobilequant.quant import quantize

    batches = list(calib.batches(64))
    quantized = {}  # label → (QuantResult, seconds): each int8 variant is quantized once for both files
    rows = []
    # the core rows (all rows in a full run), or the default and what --variants names, --quick or not
    named = set() if variants is None else {lab for labs in _selected(variants, [m[0] for m in MQ_INT8]).values()
                                            for lab in labs}
    chosen = [(label, over) for i, (label, over, core) in enumerate(MQ_INT8)
              if (variants is None and (core or full)) or (variants is not None and (i == 0 or label in named))]
    jobs = [(label, target, over) for label, over in chosen for target in ("tflite-int8", "onnx-int8")]
    jobs += [("float16", t, ()) for t in ("tflite-fp16", "onnx-fp16")]
    jobs += [("float32", t, ()) for t in ("tflite-fp32", "onnx-fp32")]
    for i, (label, target, overrides) in enumerate(jobs):
        row = Row("mobilequant", label, target)
        rows.append(row)
        suffix = ".tflite" if target.startswith("tflite") else ".onnx"
        # named after the variant, not its place in this run: the latency_ab.py command of
        # docs/benchmarks.md names the same files whichever variants ran
        path = work / f"mq-{_slug(label)}-{target}{suffix}"
        _log(f"  mobilequant {target} {label}")
        try:
            source, quantize_s = net, 0.0
            if target.endswith("int8"):
                if label not in quantized:
                    t = time.perf_counter()
                    config = default_recipe(target).replace(list(overrides)).quantization.to_quant_config()
                    quantized[label] = quantize(net, batches, config), time.perf_counter() - t
                source, quantize_s = quantized[label]
            t = time.perf_counter()
            export(source, target, path, overrides=[*overrides, "verification.enabled=false"])
            row.export_s = quantize_s + time.perf_counter() - t  # both files count the quantization
            measure(row, path)
        except Exception as e:  # one failing variant must not end the run: the row says why
            row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            _log("    " + traceback.format_exc().strip().splitlines()[-1])
    # What the baselines start from: the model as written (BN not folded, no mobilequant rewrite such as
    # the ReLU moved before a concat), exported as a user would (torch.onnx.export, dynamo).
    try:
        import onnx

        from mobilequant.export.onnx import lower_to_onnx

        t = time.perf_counter()
        proto, _ = lower_to_onnx(net.eval(), calib.images[:2], precision="fp32")
        onnx.save(proto, str(work / "baseline-fp32.onnx"))
        ctx["fp32_onnx"], ctx["fp32_onnx_s"] = work / "baseline-fp32.onnx", time.perf_counter() - t
    except Exception:  # the baseline rows then say they were skipped
        _log("    " + traceback.format_exc().strip().splitlines()[-1])
    return rows


# QAT variants: (label, QuantConfig keyword arguments, recipe overrides recorded in the file, core row)
QAT_VARIANTS = (
    ("per-channel", {}, (), True),
    ("per-tensor", {"per_channel": False}, ("quantization.per_channel=false",), False),
    ("per-tensor + CLE", {"per_channel": False, "cle": True},
     ("quantization.per_channel=false", "quantization.cle=true"), False),
)


def _qat_rows(net, name: str, evald, work: Path, measure, full: bool, args, notes: list[str]) -> list[Row]:
    """QAT through the public API (``run_qat`` → ``export``): one pass over ``args.qat_images`` images."""
    import copy
    import shutil

    import torch

    from mobilequant.export import export
    from mobilequant.qat import QATJobConfig, run_qat
    from mobilequant.quant import QuantConfig

    steps = args.qat_images // args.qat_batch
    rows = []
    for label, qc_kwargs, overrides, core in QAT_VARIANTS:
        if not (core or full):
            continue
        targets = ("tflite-int8", "onnx-int8")
        new = [Row("mobilequant QAT", label, t) for t in targets]
        rows += new
        slug = label.replace(" + ", "-").replace(" ", "-")
        out_dir = work / f"qat-{slug}"
        shutil.rmtree(out_dir, ignore_errors=True)  # our own folder: run_qat refuses a folder with a checkpoint
        _log(f"  mobilequant QAT {label}: {args.qat_images} images, {steps} steps")
        try:
            cfg = QATJobConfig(model=name, out_dir=str(out_dir), epochs=1, batch_size=args.qat_batch,
                               lr=args.qat_lr, augment=False, train_limit=args.qat_images, val_data=None,
                               quant=QuantConfig(**qc_kwargs), freeze_bn_step=steps // 2,
                               freeze_observer_step=(3 * steps) // 4, ckpt_every=max(steps, 1),
                               threads=args.threads, device="cpu", progress=False)
            t = time.perf_counter()
            result = run_qat(cfg, model=copy.deepcopy(net))
            train_s = time.perf_counter() - t
            with torch.no_grad():
                ft = torch.cat([result.float_model(evald.images[i:i + 250]) for i in range(0, len(evald), 250)])
            ft_top1 = float((ft.argmax(1) == evald.labels).float().mean() * 100.0)
            notes.append(f"QAT {label}: {result.steps} steps of {args.qat_batch} ({args.qat_images:,} stratified "
                         f"training images, one pass), lr {args.qat_lr:g}, {train_s:.0f} s; the fine-tuned "
                         f"float model scores {ft_top1:.2f} % on these images.")
        except Exception as e:
            for row in new:
                row.error = f"QAT failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            _log("    " + traceback.format_exc().strip().splitlines()[-1])
            continue
        for row in new:
            suffix = ".tflite" if row.file.startswith("tflite") else ".onnx"
            path = work / f"qat-{slug}-{row.file}{suffix}"
            try:
                t = time.perf_counter()
                export(result, row.file, path, overrides=[*overrides, "verification.enabled=false"],
                       model_name=name)
                row.export_s = train_s + time.perf_counter() - t
                measure(row, path)
            except Exception as e:
                row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                _log("    " + traceback.format_exc().strip().splitlines()[-1])
    return rows


class _Reader:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over our calibration images, in equal batches.

    The batch is the largest divisor of the image count up to 16 (512 and 48 images: 16; 248: 8): ORT's
    histogram calibrators (Percentile, Entropy) stack the batches' outputs and fail on a shorter last
    batch ("inhomogeneous shape", microsoft/onnxruntime#18792).
    """

    def __init__(self, images, input_name: str, batch: int = 16):
        batch = max(b for b in range(1, batch + 1) if len(images) % b == 0)
        self.x, self.name, self.batch, self.pos = images.numpy(), input_name, batch, 0

    def get_next(self):
        if self.pos >= len(self.x):
            return None
        out = {self.name: self.x[self.pos:self.pos + self.batch]}
        self.pos += self.batch
        return out

    def rewind(self):
        self.pos = 0


def _ort_rows(calib, work: Path, measure, full: bool, ctx: dict) -> list[Row]:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Reader, CalibrationDataReader):
        pass

    rows = [Row("onnxruntime", label, "onnx-int8") for label, _, _, core, _ in ORT_INT8 if core or full]
    if "fp32_onnx" not in ctx:
        for row in rows:
            row.error = "skipped: the fp32 ONNX export failed"
        return rows
    src = ctx["fp32_onnx"]
    pre = work / "ort-preprocessed.onnx"
    t = time.perf_counter()
    quant_pre_process(str(src), str(pre))  # ORT's recommended first step (shape inference, optimization)
    pre_s = time.perf_counter() - t
    input_name = onnx.load(str(pre)).graph.input[0].name
    variants = [v for v in ORT_INT8 if v[3] or full]
    for i, (row, (label, per_channel, method, _, activations)) in enumerate(zip(rows, variants)):
        path = work / f"ort-{i:02d}.onnx"
        _log(f"  onnxruntime quantize_static {label}")
        try:
            t = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # ORT's calibrators print progress: keep stdout the tables
                quantize_static(str(pre), str(path), Reader(calib.images, input_name),
                                quant_format=QuantFormat.QDQ, per_channel=per_channel,
                                activation_type=getattr(QuantType, activations), weight_type=QuantType.QInt8,
                                calibrate_method=getattr(CalibrationMethod, method))
            row.export_s = ctx["fp32_onnx_s"] + pre_s + time.perf_counter() - t
            measure(row, path)
        except Exception as e:
            row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            _log("    " + traceback.format_exc().strip().splitlines()[-1])
    return rows


def _tf_missing() -> str | None:
    missing = [m for m in ("tensorflow", "tf_keras", "onnx2tf", "onnx_graphsurgeon", "sng4onnx")
               if importlib.util.find_spec(m) is None]
    if missing:
        return (f"skipped: {', '.join(missing)} not importable by {sys.executable} "
                f"(pip install -e \".[baselines]\" && pip install --no-deps onnx2tf)")
    return None


def _tf_rows(calib, work: Path, measure, ctx: dict) -> list[Row]:
    import numpy as np

    rows = {"fp32": Row("tf converter", "onnx2tf float32", "tflite-fp32"),
            "per_channel": Row("tf converter", "per-channel (default)", "tflite-int8"),
            "per_tensor": Row("tf converter", "per-tensor", "tflite-int8")}
    reason = _tf_missing() or (None if "fp32_onnx" in ctx else "skipped: the fp32 ONNX export failed")
    if reason:
        for row in rows.values():
            row.error = reason
        return list(rows.values())
    calib_path = work / "calibration.npy"
    np.save(calib_path, calib.images.numpy())
    out_dir, result_path = work / "tf", work / "tf.json"
    shape = ",".join(map(str, [1, *calib.images.shape[1:]]))
    _log("  TF: onnx2tf + TFLiteConverter (subprocess)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
           "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("_tf_convert.py")), "--onnx",
                           str(ctx["fp32_onnx"]), "--calibration", str(calib_path), "--input-shape", shape,
                           "--out-dir", str(out_dir), "--json", str(result_path)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not result_path.is_file():
        tail = [line for line in (proc.stderr + proc.stdout).strip().splitlines() if line.strip()][-3:]
        for row in rows.values():
            row.error = "TF route failed: " + " | ".join(tail)[:300]
        _log("    " + " | ".join(tail))
        return list(rows.values())
    result = json.loads(result_path.read_text())
    for key, row in rows.items():
        if key not in result["files"]:
            row.error = "not produced"
            continue
        seconds = result["seconds"]
        row.export_s = ctx["fp32_onnx_s"] + seconds["onnx2tf"] + seconds.get(key, 0.0)
        try:
            measure(row, Path(result["files"][key]))
        except Exception as e:
            row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    return list(rows.values())


# --------------------------------------------------------------------------------------------- model
def run_model(name: str, args, work: Path) -> ModelResult:
    import numpy as np
    import torch

    from mobilequant.data import CROPS_PER_PHOTO
    from mobilequant.models import count_params

    _log(f"{name}: loading")
    net, calib, evald = _imagenet_model(args.photos) if name == IMAGENET else _fashion_model(name)
    if args.eval_images is not None:
        evald = evald.spread(args.eval_images)  # spread over the set, as the library's --num-eval takes them
    with torch.no_grad():
        float_logits = torch.cat([net(evald.images[i:i + 250]) for i in range(0, len(evald), 250)]).numpy()
    labels = None if evald.labels is None else evald.labels.numpy()
    float_top1 = None if labels is None else float((float_logits.argmax(1) == labels).mean() * 100.0)
    # photo crops come photo by photo, the whole photo's crop first (mobilequant.data.photo_crops)
    whole = (np.arange(len(evald)) % CROPS_PER_PHOTO == 0) if name == IMAGENET else None
    res = ModelResult(model=getattr(net, "model_name", name), params=count_params(net),
                      dataset=PHOTO_DATASETS[args.photos] if name == IMAGENET
                      else "Fashion-MNIST test split", num_calibration=len(calib), num_eval=len(evald),
                      float_top1=float_top1)
    torch_row = Row("torch", "float model", "-", top1=float_top1, drop_pp=0.0 if labels is not None else None)
    _score(torch_row, float_logits, float_logits, labels, float_top1, whole)
    res.rows.append(torch_row)
    p_top = torch.from_numpy(float_logits).softmax(1).max(1).values
    res.num_confident = int((p_top >= 0.5).sum())
    full = not args.quick
    ctx: dict = {}
    mwork = work / name
    mwork.mkdir(parents=True, exist_ok=True)

    def measure(row: Row, path: Path) -> None:
        _measure(row, path, evald.images, float_logits, labels, float_top1, args, whole)

    t0 = time.perf_counter()
    res.rows += _mobilequant_rows(net, calib, mwork, measure, full, ctx, args.variants)
    if not args.no_qat and name != IMAGENET:  # QAT needs labelled training data: Fashion-MNIST only
        res.rows += _qat_rows(net, name, evald, mwork, measure, full, args, res.notes)
    if not args.no_ort:
        res.rows += _ort_rows(calib, mwork, measure, full, ctx)
    if not args.no_tf:
        res.rows += _tf_rows(calib, mwork, measure, ctx)
    _log(f"{name}: done in {time.perf_counter() - t0:.0f} s")
    return res


# -------------------------------------------------------------------------------------------- output
def _fmt(v, spec: str, suffix: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{suffix}"


def model_table(res: ModelResult) -> str:
    labelled = res.float_top1 is not None
    head = ["route", "variant", "file"]
    head += ["top-1 %", "drop pp"] if labelled else []
    head += ["agree %"] + ([] if labelled else ["agree % (float p ≥ 0.5)", "agree % (whole photos)",
                                                "float top-1 in top-5 %", "output KL ×1000"])
    head += ["size KiB", "latency ms median / min", "export s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in res.rows:
        if r.error:
            cells = [r.route, r.variant, r.file, f"**{r.error}**"] + [""] * (len(head) - 4)
        else:
            cells = [r.route, r.variant + (f" ({r.note})" if r.note else ""), r.file]
            cells += [_fmt(r.top1, ".2f"), _fmt(r.drop_pp, "+.2f")] if labelled else []
            cells += [_fmt(r.agreement, ".2f")]
            cells += [] if labelled else [_fmt(r.agreement_confident, ".1f"), _fmt(r.agreement_whole, ".1f"),
                                          _fmt(r.top5_contains_float, ".1f"),
                                          _fmt(None if r.kl is None else 1000.0 * r.kl, ".1f")]
            cells += [_fmt(None if r.size_bytes is None else r.size_bytes / 1024, ".1f"),
                      "–" if r.latency_ms is None else f"{r.latency_ms:.3f} / {r.latency_min_ms:.3f}",
                      _fmt(r.export_s, ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _find(res: ModelResult, route: str, variant: str, file: str) -> Row | None:
    for r in res.rows:
        if r.route == route and r.variant == variant and r.file == file and r.error is None:
            return r
    return None


def _noise(r: Row, res: ModelResult) -> str:
    """The drop's own noise: a drop counts images the float model gets right and the file wrong, minus the
    reverse, among the ``d`` images where they disagree; were a disagreement as likely to help as to hurt,
    the drop would scatter by about sqrt(d) images (1σ) around zero."""
    if r.agreement is None or not res.num_eval:
        return ""
    d = round((100.0 - r.agreement) / 100.0 * res.num_eval)
    return f" (1σ noise ±{100.0 * math.sqrt(d) / res.num_eval:.2f} pp: {d} images disagree with float)"


def target_checks(res: ModelResult) -> list[str]:
    """The issues' targets, reported (never asserted): one line each, 'met' / 'MISSED' / 'n/a'."""
    out = []

    def line(ok: bool | None, text: str) -> None:
        out.append(f"- {'n/a' if ok is None else ('met' if ok else 'MISSED')}: {text}")

    pc = [_find(res, "mobilequant", MQ_INT8[0][0], f) for f in ("tflite-int8", "onnx-int8")]
    bc = [_find(res, "mobilequant", "per-tensor + CLE + BC", f) for f in ("tflite-int8", "onnx-int8")]
    if res.float_top1 is not None:
        for r in filter(None, pc):
            line(round(r.drop_pp, 2) <= 0.05, f"per-channel {r.file} drop {r.drop_pp:+.2f} pp ≤ 0.05 pp{_noise(r, res)}")
        baselines = [r for r in res.rows if r.route in ("onnxruntime", "tf converter") and r.error is None
                     and r.file.endswith("int8") and r.variant.startswith("per-channel")]
        for r in filter(None, pc):
            worse = [f"{b.route} {b.variant} {b.top1:.2f} %" for b in baselines if b.top1 > r.top1]
            line(None if not baselines else not worse,
                 f"per-channel {r.file} {r.top1:.2f} % not below the per-channel baselines"
                 + (f" (below: {'; '.join(worse)})" if worse else ""))
        for r in filter(None, bc):
            line(round(r.drop_pp, 2) <= 0.2, f"per-tensor + CLE + BC {r.file} drop {r.drop_pp:+.2f} pp ≤ 0.2 pp{_noise(r, res)}")
        for f in ("tflite-fp16", "onnx-fp16"):
            r = _find(res, "mobilequant", "float16", f)
            if r:
                line(round(r.drop_pp, 2) <= 0.01, f"{f} drop {r.drop_pp:+.2f} pp ≤ 0.01 pp (agreement {r.agreement:.2f} %)")
    else:
        for r in filter(None, pc):
            line(r.agreement >= 90.0, f"per-channel {r.file} agreement {r.agreement:.1f} % ≥ 90 % "
                 f"({_fmt(r.agreement_confident, '.1f')} % on the confident crops, "
                 f"{_fmt(r.agreement_whole, '.1f')} % on the whole photos)")
            line(r.top5_contains_float >= 98.0,
                 f"per-channel {r.file} float top-1 in top-5 {r.top5_contains_float:.1f} % ≥ 98 %")
        for r in filter(None, bc):
            line(r.agreement >= 85.0, f"per-tensor + CLE + BC {r.file} agreement {r.agreement:.1f} % ≥ 85 % "
                 f"({_fmt(r.agreement_confident, '.1f')} % on the confident crops, "
                 f"{_fmt(r.agreement_whole, '.1f')} % on the whole photos)")
    fp32 = _find(res, "mobilequant", "float32", "tflite-fp32")
    tf_int8 = _find(res, "tf converter", "per-channel (default)", "tflite-int8")
    if pc[0] is not None:
        r = pc[0]
        line(None if fp32 is None else r.latency_ms < fp32.latency_ms,
             f"tflite-int8 latency {r.latency_ms:.3f} ms < tflite-fp32 "
             f"{'–' if fp32 is None else f'{fp32.latency_ms:.3f}'} ms (medians)")
        line(None if tf_int8 is None else r.latency_ms <= tf_int8.latency_ms,
             f"tflite-int8 latency {r.latency_ms:.3f} ms ≤ TF converter int8 "
             f"{'–' if tf_int8 is None else f'{tf_int8.latency_ms:.3f}'} ms (medians; minima "
             f"{r.latency_min_ms:.3f} vs {'–' if tf_int8 is None else f'{tf_int8.latency_min_ms:.3f}'} ms)")
    budget = 1.05 * res.params + 64 * 1024
    for r in filter(None, pc + [_find(res, "mobilequant", "per-tensor + CLE + BC", "tflite-int8")]):
        line(r.size_bytes <= budget, f"{r.variant} {r.file} size {r.size_bytes / 1024:.1f} KiB ≤ 1.05 × params + 64 KiB "
             f"= {budget / 1024:.1f} KiB")
    return out


# Versions in the header, read at run time (distribution names as pip knows them).
VERSIONED = ("mobilequant", "torch", "torchao", "litert-torch", "ai-edge-litert", "onnxruntime", "onnx",
             "tensorflow", "tensorflow-cpu", "tf-keras", "onnx2tf", "onnxsim", "numpy")


def machine_info() -> dict:
    import importlib.metadata as md

    import torch

    info = {"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
            "platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
            "torch_threads": torch.get_num_threads()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
        info["memory_gib"] = round(kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    versions = {}
    for dist in VERSIONED:
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    info["versions"] = versions
    git = ["git", "-C", str(REPO)]
    try:
        info["commit"] = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "mobilequant", "benchmarks"],
                               capture_output=True, text=True, check=True).stdout.split("\n")
        info["uncommitted"] = sorted(line[3:] for line in dirty if line.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def header(info: dict, commands: list[str], seconds: float) -> str:
    v = info.get("versions", {})
    code = f"commit `{info['commit']}`" if "commit" in info else "unknown commit"
    if info.get("uncommitted"):
        code += " plus uncommitted changes in " + ", ".join(f"`{p}`" for p in info["uncommitted"])
    lines = [
        f"- **Date**: {info.get('date_utc', '?')} (start); {seconds / 60:.1f} min wall time",
        f"- **Machine**: {info['cpus']} CPU(s) ({info.get('cpu', '?')}), {info.get('memory_gib', '?')} GiB, "
        f"{info['platform']}, Python {info['python']}; load average {info['load_avg_1m']:.2f} at the start",
        "- **Versions**: " + ", ".join(f"{k} {v[k]}" for k in VERSIONED if k in v),
        f"- **Code**: {code}",
        "- **Command**: " + "; ".join(f"`{c}`" for c in commands),
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ ratios
def _loss(r: Row, labelled: bool) -> float:
    """Drop in pp against float (labelled data) or disagreement with float in % (photo crops)."""
    return r.drop_pp if labelled else 100.0 - r.agreement


def _errors(r: Row, labelled: bool) -> float:
    """Top-1 error % (labelled data) or disagreement % with the float model (photo crops)."""
    return 100.0 - r.top1 if labelled else 100.0 - r.agreement


def _ratio(a: float | None, b: float | None, spec: str = ".2f") -> str:
    return "–" if a is None or b is None or b == 0 else f"{a / b:{spec}}"


def _ok(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.error is None]


def ratio_summary(results: list[ModelResult]) -> str:
    """mobilequant against the best other tool, per model: accuracy, then tflite-int8 latency and size."""
    acc = ["| model | mobilequant default (tflite / onnx) | best mobilequant PTQ per-channel | "
           "mobilequant QAT per-channel (tflite / onnx) | best ORT / TF per-channel | "
           "Δ best mobilequant − best other, pp | error ratio best mq / best other | "
           "error ratio default tflite / best other |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    speed = ["| model | mq tflite-int8 median / min ms | TF converter tflite-int8 median / min ms | "
             "latency ratio median | latency ratio min | mq KiB | TF KiB | size ratio | "
             "onnx-int8, mq default / ORT per-channel MinMax: latency ratio (median), size ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        lab = res.float_top1 is not None

        def pick(route, variant, file):
            return _find(res, route, variant, file)

        def fmt(r: Row | None) -> str:
            return "–" if r is None else f"{_loss(r, lab):+.2f}"

        d_t, d_o = pick("mobilequant", MQ_INT8[0][0], "tflite-int8"), pick("mobilequant", MQ_INT8[0][0], "onnx-int8")
        mq_pc = _ok([r for r in res.rows if r.route == "mobilequant" and r.file.endswith("int8")
                     and r.variant.startswith("per-channel")])
        q_t, q_o = pick("mobilequant QAT", "per-channel", "tflite-int8"), pick("mobilequant QAT", "per-channel",
                                                                               "onnx-int8")
        others = _ok([r for r in res.rows if r.route in ("onnxruntime", "tf converter")
                      and r.file.endswith("int8") and r.variant.startswith("per-channel")])
        best_mq = min(mq_pc + [r for r in (q_t, q_o) if r], key=lambda r: _loss(r, lab), default=None)
        best_ptq = min(mq_pc, key=lambda r: _loss(r, lab), default=None)
        best_other = min(others, key=lambda r: _loss(r, lab), default=None)
        name = res.model + ("" if lab else f" ({res.dataset.split()[0]} photos: disagreement %)")

        def where(r: Row | None, route: bool) -> str:
            if r is None:
                return "–"
            return f"{_loss(r, lab):+.2f} ({(r.route + ' ') if route else ''}{r.variant}, {r.file})"

        acc.append("| " + " | ".join([
            name, f"{fmt(d_t)} / {fmt(d_o)}", where(best_ptq, False), f"{fmt(q_t)} / {fmt(q_o)}",
            where(best_other, True),
            "–" if best_mq is None or best_other is None else f"{_loss(best_mq, lab) - _loss(best_other, lab):+.2f}"
            + ("" if best_mq is best_ptq else " (QAT)"),
            "–" if best_mq is None or best_other is None else _ratio(_errors(best_mq, lab), _errors(best_other, lab),
                                                                     ".3f"),
            "–" if d_t is None or best_other is None else _ratio(_errors(d_t, lab), _errors(best_other, lab), ".3f"),
        ]) + " |")
        tf = pick("tf converter", "per-channel (default)", "tflite-int8")
        ort = pick("onnxruntime", "per-channel MinMax", "onnx-int8")
        def kib(r: Row | None) -> str:
            return "–" if r is None else f"{r.size_bytes / 1024:.1f}"

        def ms(r: Row | None) -> str:
            return "–" if r is None else f"{r.latency_ms:.3f} / {r.latency_min_ms:.3f}"

        def rt(a: Row | None, b: Row | None, attr: str) -> str:
            return "–" if a is None or b is None else _ratio(getattr(a, attr), getattr(b, attr))

        tf_lat = None if tf is None or tf.note else tf  # a file run without XNNPACK: no latency ratio
        speed.append("| " + " | ".join([
            res.model, ms(d_t), ms(tf) + (" (no XNNPACK)" if tf is not None and tf.note else ""),
            rt(d_t, tf_lat, "latency_ms"), rt(d_t, tf_lat, "latency_min_ms"), kib(d_t), kib(tf),
            rt(d_t, tf, "size_bytes"), f"{rt(d_o, ort, 'latency_ms')}, {rt(d_o, ort, 'size_bytes')}",
        ]) + " |")
    return ("#### Accuracy: drop against the float model in pp (lower is better)\n\n"
            "\"best\" picks the variant with the smallest drop on the evaluation images themselves (an oracle "
            "choice, made for both sides); the error ratio divides top-1 error rates (photo crops: disagreement "
            "rates), below 1 = mobilequant makes fewer errors.\n\n" + "\n".join(acc)
            + "\n\n#### Latency and size: mobilequant's default tflite-int8 file / the TF converter's per-channel "
              "int8 file (below 1 = mobilequant faster / smaller)\n\n" + "\n".join(speed))


def model_section(res: ModelResult) -> str:
    what = (f"top-1 on {res.num_eval} {res.dataset} images, float {res.float_top1:.2f} %"
            if res.float_top1 is not None else f"{res.num_eval} evaluation crops, no labels "
            f"({res.dataset}; {res.num_confident} with float top-1 probability ≥ 0.5)")
    notes = "".join(f"\n- {n}" for n in res.notes)
    return (f"### {res.model}\n\n{res.params:,} parameters; calibration {res.num_calibration} images; "
            f"{what}.\n\n{model_table(res)}\n" + (f"\nNotes:\n{notes}\n" if notes else "")
            + "\nTargets:\n\n" + "\n".join(target_checks(res)))


def render(results: list[ModelResult], info: dict, commands: list[str], seconds: float) -> str:
    parts = [header(info, commands, seconds), "### Summary: mobilequant against the best other tool",
             ratio_summary(results), *map(model_section, results)]
    return "\n\n".join(parts) + "\n"


def load_results(path: Path) -> tuple[dict, list[str], float, list[ModelResult]]:
    d = json.loads(Path(path).read_text())
    commands = d.get("commands") or [d["command"]]
    return d["machine"], commands, d["seconds"], [ModelResult.from_dict(m) for m in d["models"]]


def write_results(out: Path, text: str, info: dict, commands: list[str], seconds: float,
                  results: list[ModelResult]) -> None:
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(
        {"commands": commands, "machine": info, "seconds": seconds,
         "models": [asdict(r) for r in results]}, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    from mobilequant.cli import quiet_library_logs
    from mobilequant.weights import DEFAULT_WEIGHTS, _manifest, list_default_weights

    quiet_library_logs()  # as the CLI does: no FutureWarning / torchao chatter per export

    shipped = list_default_weights()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None,
                    help=f"shipped Fashion-MNIST checkpoints and/or '{IMAGENET}' (default: all of "
                         f"{', '.join(shipped)} and {IMAGENET})")
    ap.add_argument("--quick", action="store_true", help="1,000 evaluation images, core rows, 30 latency runs")
    ap.add_argument("--eval-images", type=int, default=None, help="evaluate on N images spread over the set")
    ap.add_argument("--latency-runs", type=int, default=None, help="timed single-image runs (default 100)")
    ap.add_argument("--threads", type=int, default=1, help="torch, LiteRT and ORT threads")
    ap.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime quantize_static rows")
    ap.add_argument("--no-tf", action="store_true", help="skip the TensorFlow Lite converter rows")
    ap.add_argument("--keep", default=None, help="write the artifacts into this folder (default: a temp folder)")
    ap.add_argument("--out", default=None, help="also write the tables here (Markdown) and the figures "
                                               "next to it (.json)")
    ap.add_argument("--no-qat", action="store_true", help="skip the mobilequant QAT rows")
    ap.add_argument("--variants", nargs="+", default=None, metavar="TEXT",
                    help="only the mobilequant int8 variants whose label contains one of these, or is one of "
                         "them where a text is a whole label (e.g. "
                         "AdaRound); the default recipe always runs")
    ap.add_argument("--photos", choices=tuple(PHOTO_DATASETS), default="offline",
                    help=f"{IMAGENET}'s photo collection: 'offline' (62 photos of scikit-image, scikit-learn, "
                         "matplotlib and opencv-doc; pip install -e \".[photos]\", apt-get install opencv-doc) "
                         "or 'skimage' (12 photos; default: offline)")
    ap.add_argument("--qat-images", type=int, default=None,
                    help="QAT: one pass over a stratified subset of this many training images "
                         "(default 8192; --quick 2048)")
    ap.add_argument("--qat-lr", type=float, default=5e-4, help="QAT peak learning rate (SGD, cosine)")
    ap.add_argument("--qat-batch", type=int, default=64, help="QAT batch size")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="render the .json results of earlier runs as one document (with --out) and exit")
    args = ap.parse_args(argv)
    if args.variants:
        empty = [v for v, labs in _selected(args.variants, [m[0] for m in MQ_INT8]).items() if not labs]
        if empty:
            ap.error(f"--variants {', '.join(map(repr, empty))} selects no variant; the labels are: "
                     + "; ".join(m[0] for m in MQ_INT8))
    if args.merge:
        loaded = [load_results(Path(p)) for p in args.merge]
        info, seconds = loaded[0][0], max(x[2] for x in loaded)  # runs side by side: the longest
        commands = [c for x in loaded for c in x[1]]
        results = [r for x in loaded for r in x[3]]
        text = render(results, info, commands, seconds)
        if args.out:
            write_results(Path(args.out), text, info, commands, seconds, results)
        print(text)
        return 0
    if args.qat_images is None:
        args.qat_images = 2048 if args.quick else 8192
    if args.quick:
        args.eval_images = 1000 if args.eval_images is None else args.eval_images
        args.latency_runs = 30 if args.latency_runs is None else args.latency_runs
    args.latency_runs = args.latency_runs or 100
    models = args.models or [DEFAULT_WEIGHTS, IMAGENET, *[m for m in shipped if m != DEFAULT_WEIGHTS]]
    unknown = [m for m in models if m != IMAGENET and m not in shipped]
    if unknown:
        ap.error(f"no shipped weights for {', '.join(unknown)}; choose from {', '.join(shipped)} or {IMAGENET}")

    import torch

    torch.set_num_threads(args.threads)
    info = machine_info()
    # as it can be run again from the repository's root (quoted: variant labels have spaces)
    command = "python " + shlex.join([os.path.relpath(__file__, Path(__file__).resolve().parents[1])]
                                     + (sys.argv[1:] if argv is None else argv))
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="mq-compare-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        pending = list(models)
        while pending:
            res = run_model(pending.pop(0), args, work)
            results.append(res)
            print(model_section(res) + "\n", flush=True)
            if args.out:  # after every model: a run cut short keeps what it measured
                write_results(Path(args.out), render(results, info, [command], time.perf_counter() - t0),
                              info, [command], time.perf_counter() - t0, results)
            if not pending and args.models is None:  # checkpoints trained while this ran join the run
                _manifest.cache_clear()
                pending = [m for m in list_default_weights() if m not in models]
                models += pending
    text = render(results, info, [command], time.perf_counter() - t0)
    if args.out:
        write_results(Path(args.out), text, info, [command], time.perf_counter() - t0, results)
    # the header and the summary (the model sections were printed as each model finished)
    print("\n\n".join([header(info, [command], time.perf_counter() - t0),
                       "### Summary: mobilequant against the best other tool", ratio_summary(results)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
