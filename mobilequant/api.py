"""The public Python API; the CLI is a thin shell over these functions.

Each function takes plain values (names, paths, numbers), runs one job through the pipeline
(zoo → capture/fusion → quantization → export → runtime → audit) and returns a small result object with
``summary()`` (for people) and ``to_dict()`` (for ``--json``).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import InputError, UsageError

__all__ = ["audit", "bench", "calibrate", "export_model", "qat", "resolve_model", "zoo_info", "zoo_list"]


# --------------------------------------------------------------------------------------------- zoo
@dataclass
class ZooList:
    models: list[dict]

    def to_dict(self) -> dict:
        return {"models": self.models}

    def summary(self) -> str:
        if not self.models:
            return "no model matches"
        w = max(len(m["name"]) for m in self.models)
        lines = [f"{'name':<{w}}  {'family':<14} paper"]
        lines += [f"{m['name']:<{w}}  {m['family']:<14} {m['paper']}" for m in self.models]
        return "\n".join(lines)


def zoo_list(pattern: str = "*") -> ZooList:
    """Registered models whose name matches the shell-style ``pattern``."""
    from .models import list_models, model_info

    names = list_models(pattern)
    return ZooList([{"name": n, "family": model_info(n).family, "paper": model_info(n).paper} for n in names])


@dataclass
class ZooInfo:
    name: str
    family: str
    paper: str
    resolution: int
    num_classes: int
    params: int
    madds: int
    paper_params_m: float | None
    paper_madds_m: float | None
    targets: list[str] = field(default_factory=list)
    # the configuration the paper's figures are for, when it is not the one measured here ("" if it is)
    paper_config: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        def paper(v):
            return "n/a" if v is None else f"{v:g} M" + (f" {self.paper_config}" if self.paper_config else "")

        return "\n".join([
            f"{self.name}  ({self.family}; {self.paper})",
            f"  parameters  {self.params / 1e6:8.3f} M   (paper {paper(self.paper_params_m)})",
            f"  mult-adds   {self.madds / 1e6:8.1f} M   at {self.resolution}x{self.resolution}, "
            f"{self.num_classes} classes   (paper {paper(self.paper_madds_m)})",
            f"  targets     {', '.join(self.targets)}",
        ])


TARGETS = ("tflite-int8", "tflite-fp16", "tflite-fp32", "onnx-int8", "onnx-fp16", "onnx-fp32")


def zoo_info(name: str, resolution: int = 224, num_classes: int = 1000, width_mult: float | None = None) -> ZooInfo:
    """Parameters and mult-adds of one zoo model at ``resolution`` (built on the meta device: no memory)."""
    import torch

    from .models import count_madds, count_params, create_model, model_info

    if resolution < 16:
        raise UsageError(f"--resolution must be at least 16, got {resolution}")
    info = model_info(name)
    kwargs = {"num_classes": num_classes}
    if width_mult is not None:
        kwargs["width_mult"] = width_mult
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    differs = [f"{info.paper_resolution} px"] if resolution != info.paper_resolution else []
    differs += [f"{info.paper_num_classes} classes"] if num_classes != info.paper_num_classes else []
    differs += ["the variant's own width"] if width_mult is not None else []
    return ZooInfo(name, info.family, info.paper, resolution, num_classes, count_params(model),
                   count_madds(model, (model.preprocess.input_size[0], resolution, resolution)),
                   info.paper_params_m, info.paper_madds_m, list(TARGETS),
                   f"at {', '.join(differs)}" if differs else "")


# ----------------------------------------------------------------------------------- shared helpers
DEFAULT_OUT = "out"


def resolve_model(model: str | None = None, weights: str | None = None):
    """The float model a job runs on.

    * ``None``: the built-in default (MobileNetV2 0.5 with its shipped Fashion-MNIST weights);
    * a zoo name that has shipped weights, with no ``weights``: that model with its shipped weights;
    * otherwise ``load_model(model, checkpoint=weights)`` (zoo name, ``pkg.module:factory`` or
      ``file.py:factory``; the checkpoint is read with ``weights_only=True``).
    """
    from .models import load_model
    from .weights import DEFAULT_WEIGHTS, default_model, list_default_weights

    if model is None and weights is None:
        return default_model(DEFAULT_WEIGHTS)
    if model is None:
        model = DEFAULT_WEIGHTS
    if ":" not in model:
        _refuse_file_as_model(model)
    if weights is None and ":" not in model:
        from .models import model_info

        model_info(model)  # an unknown name fails here, with close matches
        if model in list_default_weights():
            return default_model(model)
    net = load_model(model, checkpoint=weights)
    if ":" in model:  # a user factory: name artifacts after it
        net.model_name = model.rsplit(":", 1)[-1]
    return net.eval()


# what a checkpoint file is usually called: one passed as --model gets a hint instead of "unknown model"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".tar")


def _refuse_file_as_model(model: str) -> None:
    """A file named as ``--model`` without ``:factory``: say what to write instead (before any loading)."""

    from .models import list_models

    path = Path(model)
    if model in list_models():  # a zoo name wins over a file of that name in the working directory
        return
    if path.suffix == ".py":
        raise UsageError(f"--model {model}: name the function in it that builds the model, e.g. "
                         f"'{model}:build' (the checkpoint, if any, goes in --weights)")
    if path.suffix.lower() in _CHECKPOINT_SUFFIXES or path.is_file():
        raise UsageError(f"--model {model} is a file, not an architecture: give the architecture with --model "
                         "(a zoo name, 'pkg.module:factory' or 'file.py:factory') and the checkpoint with "
                         f"--weights {model}")


def _model_name(net) -> str:
    return getattr(net, "model_name", None) or type(net).__name__


def _output_path(out: str | None, name: str, suffix: str, target: str):
    """``out`` is a file (ends with the target's suffix) or a directory (created if its parent exists).

    Returns the file's path and the directory created for it (``None`` if none was).
    """

    out = Path(out or DEFAULT_OUT)
    created = None
    if out.suffix in (".tflite", ".onnx", ".json"):
        path = out
    else:
        if not out.exists():
            if not out.parent.exists():
                raise UsageError(f"output directory {out.parent} does not exist")
            try:
                out.mkdir()
                created = out
            except OSError as e:
                raise UsageError(f"cannot create output directory {out}: {e.strerror or e}") from None
        elif not out.is_dir():
            raise UsageError(f"output path {out} exists and is not a directory")
        path = out / f"{name.replace(':', '_').replace('/', '_')}-{target}{suffix}"
    if not path.parent.is_dir():
        raise UsageError(f"output directory {path.parent} does not exist")
    import tempfile

    try:  # a real probe: permission bits say nothing for root or on a read-only file system
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise UsageError(f"output directory {path.parent} is not writable ({e.strerror or e})") from None
    return path, created


@contextlib.contextmanager
def _removed_if_left_empty(directory: Path | None):
    """A job that fails leaves no trace: the output directory it created is removed if still empty."""
    try:
        yield
    except BaseException:
        if directory is not None and directory.is_dir() and not any(directory.iterdir()):
            with contextlib.suppress(OSError):  # another process of a torchrun job may have removed it
                directory.rmdir()
        raise


def _logits(net, images, batch_size: int = 500):
    import torch

    with torch.no_grad():
        return torch.cat([net(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def _accuracy(logits, labels) -> float | None:
    if labels is None:
        return None
    return float((logits.argmax(1) == labels).float().mean()) * 100.0


def _load(data: str, cfg, split: str, limit: int | None = None):
    from .data import load_data

    d = load_data(data, cfg, split=split)
    return d if limit is None else d.spread(limit)


# ------------------------------------------------------------------------------------------- export
@dataclass
class ExportSummary:
    model: str
    target: str
    path: str
    size_bytes: int
    num_eval: int
    float_accuracy: float | None
    artifact_accuracy: float | None
    agreement: float
    seconds: float
    checks: list[dict] = field(default_factory=list)
    census: str = ""
    failed: bool = False
    audit: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        def pct(v):
            return "n/a (no labels)" if v is None else f"{v:.2f} %"

        drop = ("" if self.float_accuracy is None or self.artifact_accuracy is None
                else f"   (drop {self.float_accuracy - self.artifact_accuracy:+.2f} pp)")
        lines = [
            f"model      {self.model}",
            f"target     {self.target}",
            f"artifact   {self.path}  ({self.size_bytes / 1024:.1f} KiB)",
            f"accuracy   float {pct(self.float_accuracy)} → {self.target} {pct(self.artifact_accuracy)}{drop}"
            f" on {self.num_eval} images",
            f"agreement  {self.agreement:.2f} % top-1 with the float model",
        ]
        if self.checks:
            lines.append("checks     " + "\n           ".join(
                f"{'ok    ' if c['passed'] else 'FAILED'} {c['name']}: {c['measured']} (needs {c['threshold']})"
                for c in self.checks))
        if self.census:
            lines.append("census     " + self.census.replace("\n", "\n           "))
        audit_failed = self.audit is not None and self.audit.get("verdict") != "pass"
        if self.audit is not None:
            first = (self.audit.get("failures") or [{}])[0].get("message", "")
            lines.append(f"audit      {'FAIL' if audit_failed else 'PASS'}" + (f": {first}" if audit_failed and first else ""))
        checks_failed = any(not c["passed"] for c in self.checks)
        lines.append(f"time       {self.seconds:.1f} s" + (
            "   — VERIFICATION FAILED (file kept, flagged)" if checks_failed else
            "   — AUDIT FAILED (file kept)" if audit_failed else ""))
        return "\n".join(lines)


def export_model(target: str | None = None, model: str | None = None, weights: str | None = None,
                 data: str = "builtin", eval_data: str = "builtin", recipe: str | None = None,
                 out: str | None = None, overrides=(), num_eval: int | None = None, verify: bool = True,
                 audit: bool = False, progress: bool = True) -> ExportSummary:
    """Quantize / convert a model, write the artifact atomically, verify it in its runtime, summarise.

    With no ``model`` this is the main job: the built-in MobileNetV2 0.5 (Fashion-MNIST), calibrated on
    the shipped 512-image subset and evaluated on the 10k test split. ``target`` defaults to the recipe's
    (every recipe names one), and to ``tflite-int8`` without a recipe; a target that differs from the
    recipe's is refused before any work.
    """
    import time

    from .data import fit_labels
    from .errors import CheckFailed
    from .export import export, resolve_recipe
    from .export.recipes import VerificationSettings
    from .runtime import open_runner

    t0 = time.perf_counter()
    if num_eval is not None and num_eval < 1:
        raise UsageError(f"--num-eval must be at least 1, got {num_eval}")
    extra = [*overrides, *([] if verify else ["verification.enabled=false"])]
    # before the model and data load: a recipe / target mismatch or a bad override fails at once
    rec = resolve_recipe(recipe, "tflite-int8" if target is None and recipe is None else target, extra)
    spec = rec.spec
    net = resolve_model(model, weights)
    name = _model_name(net)
    path, created = _output_path(out, name, spec.suffix, spec.name)
    with _removed_if_left_empty(created):
        cfg = net.preprocess
        if num_eval is None and rec.verification.num_images != VerificationSettings.num_images:
            # a recipe or --set that asks for N verification images: the summary and the checks take N
            num_eval = rec.verification.num_images
        calib = _load(data, cfg, "calibration", rec.quantization.num_calibration) if spec.quantized else None
        if not spec.quantized and data != "builtin":
            from .data.readers import DataWarning

            warnings.warn(f"--data {data} is not read: {spec.name} needs no calibration", DataWarning, stacklevel=2)
        evald = _load(eval_data, cfg, "test", num_eval)  # default: the whole evaluation set (10k test images)
        evald = fit_labels(evald, net)  # before any work: labels the model cannot have fail here
        if len(evald) != rec.verification.num_images:  # verification runs on the same images as the summary
            rec = rec.replace([f"verification.num_images={len(evald)}"])
        if progress:
            print(f"mobilequant: {name} → {spec.name}: calibrating on {0 if calib is None else len(calib)} images, "
                  f"verifying on {len(evald)}", flush=True)
        failed = False
        try:
            artifact = export(net, spec.name, path, recipe=rec,
                              calibration_data=None if calib is None else calib.batches(64),
                              verify_data=evald, model_name=name)
        except CheckFailed as e:
            artifact = getattr(e, "artifact", None)
            if artifact is None:
                raise
            failed = True
        float_logits = _logits(net, evald.images)
        file_logits = open_runner(path).run(evald.images.numpy())
        import torch

        file_logits = torch.as_tensor(file_logits)
        report = None
        if audit:
            from .audit import run_audit

            # the images the accuracy line above is measured on (the audit's own default is 1,000 of them:
            # ShuffleNetV1 read +0.18 pp on the 10k split above it and failed the gate at +0.80 on 1,000)
            rep = run_audit(artifact, evald, model=net, images=None, progress=progress)
            report = rep.to_dict()
            failed = failed or not rep.passed
    ver = getattr(artifact, "verification", None)
    return ExportSummary(
        model=name, target=spec.name, path=str(path), size_bytes=path.stat().st_size, num_eval=len(evald),
        float_accuracy=_accuracy(float_logits, evald.labels),
        artifact_accuracy=_accuracy(file_logits, evald.labels),
        agreement=float((file_logits.argmax(1) == float_logits.argmax(1)).float().mean()) * 100.0,
        seconds=time.perf_counter() - t0,
        checks=[] if ver is None else [asdict(c) for c in ver.checks],
        census=str(artifact.census) if artifact.census is not None else "", failed=failed, audit=report)


# ---------------------------------------------------------------------------------------- calibrate
@dataclass
class CalibrateSummary:
    model: str
    path: str
    tensors: int
    table_sha256: str
    findings: list[str]

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"quantization table of {self.model}: {self.tensors} tensors → {self.path}",
                 f"sha256 {self.table_sha256}"]
        lines += [f"finding: {f}" for f in self.findings]
        return "\n".join(lines)


def calibrate(model: str | None = None, weights: str | None = None, data: str = "builtin",
              recipe: str | None = None, overrides=(), out: str = "quant_table.json",
              progress: bool = True) -> CalibrateSummary:
    """Calibrate with the recipe's settings (default: tflite-int8) and write the quantization table."""

    from .export import default_recipe, load_recipe
    from .export.artifact import atomic_write
    from .quant import quantize

    rec = load_recipe(recipe) if recipe is not None else default_recipe("tflite-int8")
    if overrides:
        rec = rec.replace(list(overrides))
    out_path = Path(out)
    if not out_path.parent.is_dir():
        raise UsageError(f"output directory {out_path.parent} does not exist")
    net = resolve_model(model, weights)
    calib = _load(data, net.preprocess, "calibration", rec.quantization.num_calibration)
    result = quantize(net, calib.batches(64), rec.quantization.to_quant_config())
    atomic_write(out_path, result.table.to_json().encode())
    return CalibrateSummary(_model_name(net), str(out_path), len(result.table), result.table.sha256(),
                            [str(f) for f in result.findings])


# -------------------------------------------------------------------------------------------- audit
@dataclass
class AuditSummary:
    report: object
    json_path: str | None = None
    html_path: str | None = None

    @property
    def failed(self) -> bool:
        return not self.report.passed

    def to_dict(self) -> dict:
        return self.report.to_dict()

    def summary(self) -> str:
        extra = [f"JSON report: {self.json_path}"] if self.json_path else []
        extra += [f"HTML report: {self.html_path}"] if self.html_path else []
        return "\n".join([self.report.summary(), *extra])


def audit(artifact: str, model: str | None = None, weights: str | None = None, data: str = "builtin",
          num_images: int | None = 1000, max_drop: float | None = 0.5, min_sqnr: float | None = None,
          fail_on_dead_kernels: bool = False, report: str | None = None, html: str | None = None,
          progress: bool = True) -> AuditSummary:
    """Audit an exported artifact against its float model; ``failed`` when the gate fails (exit 1)."""
    from .audit import run_audit

    for out in (report, html):  # before the audit runs: a path that cannot take the report fails now
        if out and Path(out).is_dir():
            raise InputError(f"cannot write {out}: it is a directory (give a file name)")
    net = resolve_model(model, weights) if (model is not None or weights is not None) else None
    rep = run_audit(artifact, data, model=net, max_drop=max_drop, min_sqnr=min_sqnr,
                    fail_on_dead_kernels=fail_on_dead_kernels, images=num_images, progress=progress)
    json_path = str(rep.write_json(report)) if report else None
    html_path = str(rep.write_html(html)) if html else None
    return AuditSummary(rep, json_path, html_path)


# ---------------------------------------------------------------------------------------------- qat
@dataclass
class QATSummary:
    model: str
    checkpoint: str | None
    csv_log: str | None
    steps: int
    val_accuracy: float | None  # fraction in [0, 1], as QATResult has it
    int8_accuracy: float | None
    exports: list[dict] = field(default_factory=list)
    main_process: bool = True  # False in the other processes of a torchrun job (they print nothing)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def failed(self) -> bool:
        return any(not e.get("passed", True) for e in self.exports)

    def summary(self) -> str:
        def pct(v):
            return "n/a (no validation data)" if v is None else f"{100 * v:.2f} %"

        lines = [f"QAT of {self.model}: {self.steps} steps; fake-quant accuracy {pct(self.val_accuracy)}, "
                 f"int8 (simulated) {pct(self.int8_accuracy)}",
                 f"checkpoint {self.checkpoint}", f"log        {self.csv_log}"]
        lines += [f"exported   {e['path']} ({e['target']})" + ("" if e.get("passed", True) else
                                                               f" — VERIFICATION FAILED: {e['failure']}")
                  for e in self.exports]
        return "\n".join(lines)


def qat(model: str | None = None, weights: str | None = None, data: str = "builtin", epochs: int | None = None,
        batch_size: int | None = None, lr: float | None = None, recipe: str | None = None,
        out_dir: str | None = None, resume: bool = False, resume_from: str | None = None, seed: int = 0,
        export: list[str] | tuple[str, ...] = (), start: str = "float",
        freeze_bn_step: int | float | str | None = None, freeze_observer_step: int | float | str | None = None,
        val_data: str | None = None, progress: bool = True) -> QATSummary:
    """Quantization-aware fine-tuning (see ``docs/qat.md``); optionally export the result.

    ``epochs``, ``batch_size``, ``lr``, ``out_dir`` and the two freeze points default to
    :class:`~mobilequant.qat.QATJobConfig`'s (None); a freeze point is a step, a fraction of the job's steps,
    or ``"never"``.
    ``val_data`` defaults to the Fashion-MNIST test split for built-in training data, else none. Every
    ``export`` target is written and verified; one that fails its checks is reported, the others still run
    (``failed``). In a torchrun job only the main process exports.
    """
    from .errors import CheckFailed
    from .export import default_recipe, get_target, load_recipe
    from .export import export as export_artifact
    from .qat import QATJobConfig, run_qat
    from .weights import DEFAULT_WEIGHTS

    targets = [get_target(t) for t in export]  # unknown targets fail before training
    rec = load_recipe(recipe) if recipe is not None else default_recipe("tflite-int8")
    train_data = "fashion-mnist" if data == "builtin" else data
    net = resolve_model(model, weights) if (weights is not None or (model and ":" in model)) else None
    given = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "out_dir": out_dir,
             "freeze_bn_step": freeze_bn_step, "freeze_observer_step": freeze_observer_step}
    given = {k: None if v == "never" else v for k, v in given.items() if v is not None}
    if val_data == "builtin" or (val_data is None and train_data == "fashion-mnist"):
        val_data = "fashion-mnist"
    config = QATJobConfig(model=_model_name(net) if net is not None else (model or DEFAULT_WEIGHTS),
                          train_data=train_data, val_data=val_data, seed=seed,
                          quant=rec.quantization.to_quant_config(), resume=resume, resume_from=resume_from,
                          progress=progress, start=start, **given)
    folder = Path(config.out_dir)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out-dir {folder} is a file, not a folder")
    created = None if folder.exists() else folder
    try:  # before the graph is built: a folder that cannot be made fails now
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out-dir {folder}: {e.strerror or e}") from None
    with _removed_if_left_empty(created):
        result = run_qat(config, model=net)
    main = result.rank == 0
    exports = []
    for spec in targets if main else ():  # one process writes the files
        path = Path(config.out_dir) / f"{config.model.replace(':', '_')}-qat-{spec.name}{spec.suffix}"
        try:
            art = export_artifact(result, spec.name, path, model_name=config.model)
            exports.append({"target": spec.name, "path": str(art.path), "passed": True})
        except CheckFailed as e:  # the file is kept, flagged; the other targets still run
            exports.append({"target": spec.name, "path": str(path), "passed": False, "failure": str(e)})
    return QATSummary(config.model, None if result.checkpoint is None else str(result.checkpoint),
                      None if result.csv_log is None else str(result.csv_log), result.steps,
                      result.val_accuracy, result.int8_accuracy, exports, main)


# -------------------------------------------------------------------------------------------- bench
@dataclass
class BenchSummary:
    results: list

    def to_dict(self) -> dict:
        return {"results": [r.to_dict() for r in self.results]}

    def summary(self) -> str:
        lines = ["| artifact | runtime | threads | size KiB | median ms | min–max ms |", "|---|---|---|---|---|---|"]
        lines += [f"| {r.path} | {r.runtime} | {r.threads} | {r.size_bytes / 1024:.1f} | {r.median_ms:.3f} | "
                  f"{r.min_ms:.3f}–{r.max_ms:.3f} |" for r in self.results]
        return "\n".join(lines)


def bench(artifacts, threads: int = 1, runs: int = 100, warmup: int = 10) -> BenchSummary:
    """Single-image latency and size of each artifact in its runtime."""
    from .runtime.bench import measure_latency

    return BenchSummary([measure_latency(a, threads=threads, runs=runs, warmup=warmup) for a in artifacts])
