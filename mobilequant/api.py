"""The public Python API; the CLI is a thin shell over these functions.

Each function takes plain values (names, paths, numbers), runs one job through the pipeline
(zoo → capture/fusion → quantization → export → runtime → audit) and returns a small result object with
``summary()`` (for people) and ``to_dict()`` (for ``--json``).
"""

from __future__ import annotations

import contextlib
import os
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
    # the family's width multiplier the counts are for, and the variant's own (they differ with --width-mult)
    width_mult: float | None = None
    variant_width_mult: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        def paper(v):
            return "n/a" if v is None else f"{v:g} M" + (f" {self.paper_config}" if self.paper_config else "")

        lines = [
            f"{self.name}  ({self.family}; {self.paper})",
            f"  parameters  {self.params / 1e6:8.3f} M   (paper {paper(self.paper_params_m)})",
            f"  mult-adds   {self.madds / 1e6:8.1f} M   at {self.resolution}x{self.resolution}, "
            f"{self.num_classes} classes   (paper {paper(self.paper_madds_m)})",
        ]
        if self.width_mult is not None and self.width_mult != self.variant_width_mult:
            # a variant is its family at one width: the option replaced it, it did not scale it again
            lines.append(f"  width       {self.width_mult:g} × the family's channels "
                         f"(in place of {self.name}'s own {self.variant_width_mult:g})")
        lines.append(f"  targets     {', '.join(self.targets)}")
        return "\n".join(lines)


TARGETS = ("tflite-int8", "tflite-fp16", "tflite-fp32", "onnx-int8", "onnx-fp16", "onnx-fp32")


def zoo_info(name: str, resolution: int | None = None, num_classes: int | None = None,
             width_mult: float | None = None) -> ZooInfo:
    """Parameters and mult-adds of one zoo model (built on the meta device: no memory).

    ``resolution`` and ``num_classes`` default to the configuration the paper's figures are for (224 px
    and 1000 classes for most; 32 px and 10 classes for EffNet, 299 px for Xception), as in docs/zoo.md.
    The model is built for ``resolution`` (EffNet's classifier is sized by it). ``width_mult`` is the
    family's width multiplier and replaces the variant's own (``mobilenetv2_050`` is 0.5; 0.35 on it
    gives MobileNetV2 0.35, not 0.5 × 0.35).
    """
    import torch

    from .models import count_madds, count_params, create_model, model_info
    from .models.complexity import torch_reason

    info = model_info(name)
    resolution = info.paper_resolution if resolution is None else resolution
    num_classes = info.paper_num_classes if num_classes is None else num_classes
    if resolution < 16:
        raise UsageError(f"resolution (--resolution) must be at least 16, got {resolution}")
    kwargs = {"num_classes": num_classes, "resolution": resolution}
    if width_mult is not None:
        kwargs["width_mult"] = width_mult

    def counts(res: int) -> tuple[int, int]:
        with torch.device("meta"):
            model = create_model(name, **{**kwargs, "resolution": res})
        return count_params(model), count_madds(model)  # at the model's own input size: the one built for

    try:
        params, madds = counts(resolution)
    except UsageError as e:  # count_madds: a feature map shrank to nothing (pooling / a strided conv on 1×1)
        if not isinstance(e.__cause__, RuntimeError):
            raise
        raise UsageError(f"model {name!r} cannot take {resolution}×{resolution} inputs "
                         f"({torch_reason(e.__cause__)}){_next_resolution(counts, resolution)}") from None
    differs = [f"{info.paper_resolution} px"] if resolution != info.paper_resolution else []
    differs += [f"{info.paper_num_classes} classes"] if num_classes != info.paper_num_classes else []
    own_width = info.width_mult
    if width_mult is not None and width_mult != own_width:
        differs += [f"width {own_width:g}"]
    return ZooInfo(name, info.family, info.paper, resolution, num_classes, params, madds,
                   info.paper_params_m, info.paper_madds_m, list(TARGETS),
                   f"at {', '.join(differs)}" if differs else "",
                   own_width if width_mult is None else float(width_mult), own_width)


def _next_resolution(counts, resolution: int, limit: int = 256) -> str:
    """``; the next resolution that works is N`` (a failure costs milliseconds on the meta device)."""
    for res in range(resolution + 1, max(limit, resolution + 1)):
        try:
            counts(res)
        except UsageError:
            continue
        return f"; the next --resolution that works is {res} (resolution={res})"
    return ""


# ----------------------------------------------------------------------------------- shared helpers
DEFAULT_OUT = "out"


def resolve_model(model: str | None = None, weights: str | None = None, resolution: int | None = None):
    """The float model a job runs on.

    * ``None``: the built-in default (MobileNetV2 0.5 with its shipped Fashion-MNIST weights);
    * a zoo name that has shipped weights, with no ``weights``: that model with its shipped weights;
    * otherwise ``load_model(model, checkpoint=weights)`` (zoo name, ``pkg.module:factory`` or
      ``file.py:factory``; the checkpoint is read with ``weights_only=True``).

    ``resolution`` (``--resolution``): the input size of a zoo model built from its name — MobileNetV1's ρ,
    a checkpoint trained at 128 px. A shipped model and a user factory have their own (refused if other).
    """
    from .models import load_model
    from .weights import DEFAULT_WEIGHTS, default_model, list_default_weights

    if model is None and weights is None:
        return _own_resolution(default_model(DEFAULT_WEIGHTS), resolution, "the shipped model")
    if model is None:
        model = DEFAULT_WEIGHTS
    _refuse_non_name(model, "model")
    _refuse_non_name(weights, "weights")
    model = os.fspath(model)
    if ":" not in model:
        _refuse_file_as_model(model)
    if weights is None and ":" not in model:
        from .models import model_info

        model_info(model)  # an unknown name fails here, with close matches
        if model in list_default_weights():
            return _own_resolution(default_model(model), resolution, f"the shipped {model}")
    if weights is not None and model in list_default_weights():
        net = _shipped_with_checkpoint(model, weights)
        if net is not None:
            return _own_resolution(net, resolution, f"{model} with a checkpoint of its shipped shapes")
    if ":" in model:
        net = _own_resolution(load_model(model, checkpoint=weights), resolution, model)
        net.model_name = model.rsplit(":", 1)[-1]  # a user factory: name artifacts after it
    else:
        net = load_model(model, checkpoint=weights, **({} if resolution is None else {"resolution": resolution}))
    return net.eval()


def _own_resolution(net, resolution: int | None, what: str):
    """``net``, whose input size is its own: a ``resolution`` other than it is refused."""
    size = tuple(net.preprocess.input_size[1:])
    if resolution is not None and size != (resolution, resolution):
        raise UsageError(f"--resolution {resolution}: {what} takes {size[0]}×{size[1]} inputs; --resolution sets "
                         "the input size of a zoo model built from its name (a factory sets model.preprocess)")
    return net


def _shipped_with_checkpoint(model: str, weights: str):
    """A zoo model that has shipped weights, with a checkpoint whose keys and shapes are exactly the shipped
    model's (fine-tuned from it, or the shipped weights edited): the shipped model — its preprocessing
    (Fashion-MNIST's 28 px framed to 32) and class names — carrying the checkpoint. The zoo entry alone is
    the paper's ImageNet configuration: its 224-px preprocessing had made `--model mobilenetv2_050
    --weights edited.pt` export a 224-px file at 9 % accuracy and fail every audit of a 32-px file.
    ``None`` when the checkpoint does not fit (then :func:`load_model` fits the zoo entry to it)."""
    from .models.loading import _load_state, read_state_dict
    from .weights import default_model

    state = read_state_dict(weights)  # outside the try: a file that cannot be read is its own error
    try:
        return _load_state(default_model(model), state, weights).eval()  # strict: keys and shapes
    except InputError:
        return None


# what a checkpoint file is usually called: one passed as --model gets a hint instead of "unknown model"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".tar")


def _refuse_non_name(value, what: str) -> None:
    """``model`` / ``weights`` are names and paths: an ``nn.Module`` (or anything else) is refused with the
    function that takes it, not read as a string (``argument of type 'Small' is not iterable``)."""
    import torch.nn as nn

    if value is None or isinstance(value, (str, os.PathLike)):
        return
    if isinstance(value, nn.Module):
        raise UsageError(f"{what}= takes a name or path (a zoo name, 'pkg.module:factory' or 'file.py:factory'), "
                         f"not a {type(value).__name__} module: for an nn.Module call mobilequant.export.export(model, "
                         "target, path, calibration_data=...) (or mobilequant.quant.quantize, "
                         "mobilequant.audit.run_audit)")
    raise UsageError(f"{what}= takes a name or path (str), got {type(value).__name__}")


def _refuse_file_as_model(model: str) -> None:
    """A file named as ``--model`` without ``:factory``: say what to write instead (before any loading)."""

    from .models import list_models

    path = Path(model)
    if model in list_models():  # a zoo name wins over a file of that name in the working directory
        return
    if path.suffix == ".py":
        raise UsageError(f"model (--model) {model}: name the function in it that builds the model, e.g. "
                         f"'{model}:build' (the checkpoint, if any, goes in weights / --weights)")
    if path.suffix.lower() in _CHECKPOINT_SUFFIXES or path.is_file():
        raise UsageError(f"model (--model) {model} is a file, not an architecture: give the architecture as "
                         "model / --model (a zoo name, 'pkg.module:factory' or 'file.py:factory') and the "
                         f"checkpoint as weights / --weights {model}")


def _model_name(net) -> str:
    return getattr(net, "model_name", None) or type(net).__name__


def _output_path(out: str | None, name: str, suffix: str, target: str, variant: str | None = None):
    """Where an export writes: ``out`` is a file (its suffix is the target's) or a directory (created if
    its parent exists), and every refusal comes before any work.

    A path with a suffix names a file: another suffix than the target's (``model.tfl``, ``x.TFLITE``) is
    refused rather than taken for a directory to create (``-o "ü ñ.TFLITE"`` had made a folder of that name),
    unless it ends with a slash or is an existing directory; an existing directory named like the file
    (``d.tflite``) is refused. In a directory the file is named
    ``{name}-{variant or target}{suffix}``: ``variant`` is a recipe that is not the target's default, or
    one changed by overrides (``…-custom-<8 hex>``), and ``name`` carries the checkpoint's stem when one was
    given (``{model}-{weights stem}``), so such a file does not overwrite the default export's. Returns the file's path and the directory created for it
    (``None`` if none was).
    """
    text = str(out or DEFAULT_OUT)
    out = Path(text)
    as_dir = text.endswith(("/", os.sep)) or (out.is_dir() and out.suffix.lower() != suffix)
    created = None
    if out.suffix and not as_dir:
        if out.is_dir():  # `-o d.tflite` where d.tflite is a folder: atomic_write refused it after the work
            raise UsageError(f"-o {text} is a directory (a name ending in {suffix} is the file to write; "
                             f"to write into the directory, give {text}/)")
        if out.suffix.lower() != suffix:
            raise UsageError(f"-o {text}: {target} writes {suffix} files, not {out.suffix} (give a file name "
                             f"ending in {suffix}, or a directory; a new directory's name ends with /)")
        if out.suffix != suffix:  # same letters, other case: the export and the tools reading it match exactly
            raise UsageError(f"-o {text}: {target} writes {suffix} files; give the suffix in lower case "
                             f"({out.with_suffix(suffix).name})")
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
        path = out / f"{name.replace(':', '_').replace('/', '_')}-{variant or target}{suffix}"
    if path.is_dir():  # atomic_write would refuse it only after the whole conversion
        raise UsageError(f"cannot write {path}: it is a directory (give a file name)")
    if not path.parent.is_dir():
        raise UsageError(f"output directory {path.parent} does not exist")
    written = Path(os.path.realpath(path)) if path.is_symlink() else path  # atomic_write writes through a link
    try:
        if not written.parent.is_dir():
            raise UsageError(f"cannot write {path}: it is a link to {written}, whose directory does not exist")
        # Beside the file: NAME.verify.json, and when a check fails NAME.failed.SUFFIX with its report, the
        # longest name of all (temporary files have short names of their own). Refused now, not after the work.
        try:
            limit = os.pathconf(path.parent, "PC_NAME_MAX")
        except (OSError, ValueError):
            limit = -1
        limit = limit if limit > 0 else 255
        longest = len(os.fsencode(f"{path.stem}.failed{path.suffix}.verify.json"))
        if longest > limit:
            raise UsageError(f"cannot write {path}: the name is too long: the report a failed check writes "
                             f"beside it, <name>.failed{path.suffix}.verify.json, would have {longest} bytes, "
                             f"over the limit of {limit} for a file name in {path.parent} (shorten the name by "
                             f"{longest - limit} bytes)")
        _probe_writable(path.parent)
        if written.parent != path.parent:
            _probe_writable(written.parent)
    except UsageError:
        if created is not None:
            created.rmdir()
        raise
    return path, created


def _refuse_overwriting_inputs(out, option: str, model=None, weights=None, recipe=None, data=()) -> None:
    """Refuse an output path that is a file the command reads (``calibrate --weights w.pt -o w.pt`` had
    replaced the checkpoint by the table, exit 0): the checkpoint (``weights``), a recipe file, a
    ``file.py:factory`` model file, a data file (``data``: ``(option, spec)`` pairs), or an image inside a
    data folder (any other file in one is not an input). Compared as files (``os.path.samefile``: links and
    other spellings of the same path), so only an output that exists can be one."""
    from .data.readers import IMAGE_SUFFIXES

    out = os.fspath(out)
    if not os.path.exists(out):
        return
    inputs = [("the checkpoint given as weights (--weights)", weights),
              ("the recipe file given as recipe (--recipe)", recipe)]
    if model is not None and ":" in os.fspath(model):
        inputs.append(("the model file given as model (--model)", os.fspath(model).rpartition(":")[0]))
    inputs += [(f"the data file given as {what}", spec) for what, spec in data]
    for what, value in inputs:
        if value is None or not isinstance(value, (str, os.PathLike)):
            continue
        value = os.fspath(value)
        try:
            same = os.path.samefile(out, value)
        except (OSError, ValueError):  # no such input (a name: a zoo model, a built-in data set)
            continue
        folder = os.path.realpath(value)
        inside = (not same and os.path.isdir(folder) and what.startswith("the data")
                  and os.path.realpath(out).startswith(folder.rstrip(os.sep) + os.sep)
                  and Path(out).suffix.lower() in IMAGE_SUFFIXES and not Path(out).name.startswith("."))
        if same or inside:
            what = what.replace("the data file", "an image of the data folder") if inside else what
            raise UsageError(f"{option} {out} is {what} {value}, which this command reads: writing there "
                             "would replace it (give another output path)")


def _probe_writable(directory: Path) -> None:
    import tempfile

    try:  # a real probe: permission bits say nothing for root or on a read-only file system
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise UsageError(f"output directory {directory} is not writable ({e.strerror or e})") from None


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


def _percent(hits) -> float:
    """Percent of true entries, from the integer count: a float32 mean carries noise into the JSON
    (94 % read 93.99999976158142)."""
    return 100.0 * int(hits.sum()) / max(int(hits.numel()), 1)


def _accuracy(logits, labels) -> float | None:
    return None if labels is None else _percent(logits.argmax(1) == labels)


def _recipe_label(recipe: str | None, target: str) -> str | None:
    """What a default file name says about a recipe that is not the target's own: its name, or a YAML
    file's stem (``per-tensor-dsp-cle``); ``None`` for the target's own recipe."""
    if recipe is None:
        return None
    path = Path(recipe)
    label = path.stem if path.suffix.lower() in (".yaml", ".yml") or path.is_file() else recipe
    return None if label.lower() == target else label


def _load(data: str, net, split: str, limit: int | None = None, option: str = "data (--data)"):
    """``data`` for ``net``: the built-in images only for a model they were made for (:func:`_builtin_fits`);
    ``limit`` images chosen before preprocessing where the reader can."""
    from .data import load_data

    _builtin_fits(data, net, option)
    return load_data(data, net.preprocess, split=split, limit=limit)


def _builtin_fits(data, net, option: str) -> None:
    """Refuse the built-in Fashion-MNIST images (grey, 10 classes) for a model of colour images or of
    another number of classes: the ImageNet MobileNetV2 exported without ``--data`` was calibrated on 512
    grey clothing images scaled to 224 px and "verified" on them, exit 0, with one warning about labels."""
    from .data.builtin import is_builtin
    from .data.labels import _output_shape

    if not is_builtin(data):
        return
    size = tuple(net.preprocess.input_size)
    shape = _output_shape(net, size) if size[0] == 1 else None
    classes = shape[1] if shape is not None and len(shape) == 2 else None
    if size[0] != 1 or (classes is not None and classes != 10):
        what = f"{'×'.join(map(str, size))} inputs" + (f", {classes} classes" if classes is not None else "")
        raise UsageError(f"{option}: the built-in data are Fashion-MNIST (grey images of 10 classes), which "
                         f"model {_model_name(net)} ({what}) was not made for; give {option.split(' (')[0]} "
                         "a folder of images or an .npy / .npz array (docs/data.md)")


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
    # True / False: the read-back checks ran and passed / failed; None: they did not run (--no-verify)
    verified: bool | None = None
    checks: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # verification figures measured, not gated
    findings: list[str] = field(default_factory=list)  # what quantization found (dead channels, repaired ranges)
    cle: str | None = None  # what cross-layer equalization did, when it ran
    census: str = ""
    failed: bool = False
    audit: dict | None = None
    sha256: str = ""  # of the file written (the one .verify.json records and the audit checks)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def failure(self) -> str:
        """One line: why ``failed`` (the failing checks, else the audit's first failure); '' if it passed."""
        bad = [f"{c['name']} {c['measured']} (needs {c['threshold']})" for c in self.checks if not c["passed"]]
        if bad:
            return f"verification failed: {'; '.join(bad)}; written as {self.path}"
        if self.audit is not None and self.audit.get("verdict") != "pass":
            first = (self.audit.get("failures") or [{}])[0].get("message", "")
            return f"audit failed: {first or self.audit.get('verdict')} (file kept: {self.path})"
        return ""

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
        elif self.verified is None:
            lines.append("checks     not run (verification off)")
        lines += [f"note       {n}" for n in self.notes]
        if self.cle:
            lines.append(f"cle        {self.cle.removeprefix('CLE: ')}")
        lines += [f"finding    {f}" for f in self.findings]
        if self.census:
            lines.append("census     " + self.census.replace("\n", "\n           "))
        audit_failed = self.audit is not None and self.audit.get("verdict") != "pass"
        if self.audit is not None:
            first = (self.audit.get("failures") or [{}])[0].get("message", "")
            lines.append(f"audit      {'FAIL' if audit_failed else 'PASS'}" + (f": {first}" if audit_failed and first else ""))
        checks_failed = any(not c["passed"] for c in self.checks)
        lines.append(f"time       {self.seconds:.1f} s" + (
            "   — VERIFICATION FAILED (written as the .failed file above; the output path is left as it was)"
            if checks_failed else
            "   — AUDIT FAILED (file kept)" if audit_failed else ""))
        return "\n".join(lines)


def export_model(target: str | None = None, model: str | None = None, weights: str | None = None,
                 data: str = "builtin", eval_data: str = "builtin", recipe: str | None = None,
                 out: str | None = None, overrides=(), num_eval: int | None = None, verify: bool = True,
                 audit: bool = False, progress: bool = True, resolution: int | None = None) -> ExportSummary:
    """Quantize / convert a model, write the artifact atomically, verify it in its runtime, summarise.

    With no ``model`` this is the main job: the built-in MobileNetV2 0.5 (Fashion-MNIST), calibrated on
    the shipped 512-image subset and evaluated on the 10k test split. ``target`` defaults to the recipe's
    (every recipe names one), and to ``tflite-int8`` without a recipe; a target that differs from the
    recipe's is refused before any work.
    """
    import time

    from .audit.report import check_name_lengths
    from .data import fit_labels
    from .errors import CheckFailed
    from .export import export, resolve_recipe
    from .export.artifact import file_sha256
    from .export.recipes import VerificationSettings
    from .runtime import open_runner

    t0 = time.perf_counter()
    if out is not None:  # before any work: a name the file system cannot take
        check_name_lengths(out, "out (-o)")
    if num_eval is not None and num_eval < 1:
        raise UsageError(f"num_eval (--num-eval) must be at least 1, got {num_eval}")
    extra = [*overrides, *([] if verify else ["verification.enabled=false"])]
    # before the model and data load: a recipe / target mismatch or a bad override fails at once
    rec = resolve_recipe(recipe, "tflite-int8" if target is None and recipe is None else target, extra)
    spec = rec.spec
    net = resolve_model(model, weights, resolution)
    name = _model_name(net)
    path, created = _output_path(out, _file_model_label(name, weights, resolution), spec.suffix, spec.name,
                                 _file_recipe_label(recipe, rec))
    with _removed_if_left_empty(created):
        _refuse_overwriting_inputs(path, "out (-o)", model, weights, recipe,
                                   [("data (--data)", data), ("eval_data (--eval-data)", eval_data)])
        if num_eval is None and rec.verification.num_images != VerificationSettings.num_images:
            # a recipe or --set that asks for N verification images: the summary and the checks take N
            num_eval = rec.verification.num_images
        calib = _load(data, net, "calibration", rec.quantization.num_calibration) if spec.quantized else None
        if not spec.quantized and data != "builtin":
            from .data.readers import DataWarning

            warnings.warn(f"data (--data) {data} is not read: {spec.name} needs no calibration", DataWarning,
                          stacklevel=2)
        # default: the whole evaluation set (10k test images)
        evald = _load(eval_data, net, "test", num_eval, "eval_data (--eval-data)")
        evald = fit_labels(evald, net)  # before any work: labels the model cannot have fail here
        if len(evald) != rec.verification.num_images:  # verification runs on the same images as the summary
            rec = rec.replace([f"verification.num_images={len(evald)}"])
        if progress:  # a float target is converted, not calibrated
            work = "converting" if calib is None else f"calibrating on {len(calib)} images"
            checked = f"verifying on {len(evald)}" if rec.verification.enabled else f"evaluating on {len(evald)}"
            print(f"mobilequant: {name} → {spec.name}: {work}, {checked}", flush=True)
        failed = False
        try:
            artifact = export(net, spec.name, path, recipe=rec,
                              calibration_data=None if calib is None else calib.batches(64),
                              verify_data=evald, model_name=name,
                              model_spec=os.fspath(model) if model is not None and ":" in os.fspath(model) else None,
                              weights_file=None if weights is None else os.fspath(weights))
        except CheckFailed as e:
            artifact = getattr(e, "artifact", None)
            if artifact is None:
                raise
            failed = True
        float_logits = _logits(net, evald.images)
        path = Path(artifact.path)  # a file that failed its checks is <name>.failed<suffix>, beside the output path
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
        agreement=_percent(file_logits.argmax(1) == float_logits.argmax(1)),
        seconds=round(time.perf_counter() - t0, 3), verified=artifact.verified,
        checks=[] if ver is None else [asdict(c) for c in ver.checks],
        notes=[] if ver is None else list(ver.notes),
        findings=[str(f) for f in artifact.findings], cle=artifact.cle_summary,
        census=str(artifact.census) if artifact.census is not None else "", failed=failed, audit=report,
        sha256=file_sha256(path))


def _file_model_label(name: str, weights, resolution: int | None = None) -> str:
    """What a default file name says about the model: its name, and for a checkpoint given (``--weights``)
    the checkpoint's file stem too, so that ``mobilenetv2_050-edited-tflite-int8.tflite`` does not replace
    the shipped weights' export in the same folder; ``-128px`` for a ``--resolution``."""
    label = name if weights is None else f"{name}-{Path(os.fspath(weights)).stem}"
    return label if resolution is None else f"{label}-{resolution}px"


def _file_recipe_label(recipe: str | None, rec) -> str:
    """What a default file name says about the recipe: the target, or a recipe that is not the target's
    own (:func:`_recipe_label`), then ``-custom-<8 hex>`` when ``--set`` overrides changed its quantization
    or I/O settings (the hex: sha256 of the overrides the file records, sorted), so that such a file
    neither replaces the recipe's own export nor passes for it."""
    import hashlib

    label = _recipe_label(recipe, rec.spec.name) or rec.spec.name
    if rec.overrides:
        label += "-custom-" + hashlib.sha256("\n".join(rec.overrides).encode()).hexdigest()[:8]
    return label


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
                 f"table sha256 {self.table_sha256} (of its canonical JSON, as exported files record it in "
                 "quant_table_sha256; not the file's sha256)"]
        lines += [f"finding: {f}" for f in self.findings]
        return "\n".join(lines)


def calibrate(model: str | None = None, weights: str | None = None, data: str = "builtin",
              recipe: str | None = None, overrides=(), out: str = "quant_table.json",
              progress: bool = True, resolution: int | None = None) -> CalibrateSummary:
    """Calibrate with the recipe's quantization settings (default: tflite-int8's) and write the table.

    Refused before any work: a float recipe (it has no quantization table), an override of anything but a
    ``quantization.*`` setting (calibration reads nothing else: an ``io.layout`` given here would be
    silently dropped), and an output path that cannot take the file.
    """

    from .audit.report import check_name_lengths
    from .export import default_recipe, load_recipe
    from .export.artifact import atomic_write
    from .quant import quantize

    check_name_lengths(out, "out (-o)")  # before any work: Path.is_dir raised OSError on such a name
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith("quantization."):
            raise UsageError(f"overrides (--set) {item}: calibrate uses only the quantization.* settings ({key} is "
                             "an export setting: give it to `mobilequant export`)")
    rec = load_recipe(recipe) if recipe is not None else default_recipe("tflite-int8")
    if not rec.spec.quantized:
        raise UsageError(f"recipe (--recipe) {recipe}: its target {rec.target} is a float target, which has no "
                         "quantization table (give an int8 recipe, e.g. tflite-int8)")
    if overrides:
        rec = rec.replace(list(overrides))
    out_path = Path(out)
    if not out_path.parent.is_dir():
        raise UsageError(f"output directory {out_path.parent} does not exist")
    if out_path.is_dir():  # atomic_write would refuse it only after the calibration
        raise UsageError(f"out (-o) {out} is a directory (give the file to write, e.g. "
                         f"{out_path / 'quant_table.json'})")
    _probe_writable(out_path.parent)
    _refuse_overwriting_inputs(out_path, "out (-o)", model, weights, recipe, [("data (--data)", data)])
    net = resolve_model(model, weights, resolution)
    calib = _load(data, net, "calibration", rec.quantization.num_calibration)
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

    @property
    def failure(self) -> str:
        """One line: the gate's failures ('' if it passed)."""
        msgs = [f.message for f in self.report.failures]
        more = f" (and {len(msgs) - 3} more)" if len(msgs) > 3 else ""
        return "; ".join(msgs[:3]) + more

    def to_dict(self) -> dict:
        return self.report.to_dict()

    def summary(self) -> str:
        extra = [f"JSON report: {self.json_path}"] if self.json_path else []
        extra += [f"HTML report: {self.html_path}"] if self.html_path else []
        return "\n".join([self.report.summary(), *extra])


def _artifact_model_name(artifact: str) -> str:
    """The zoo model an artifact's metadata names (for ``--weights`` given without ``--model``)."""
    from .audit.artifact import artifact_provenance, open_artifact
    from .models import list_models

    name = artifact_provenance(open_artifact(artifact)).get("model_name")
    if name not in list_models():
        made = f"was exported from {name!r}, not a zoo model" if name else "names no model"
        raise UsageError(f"weights (--weights) without model (--model): the artifact {made}; give the model "
                         "(e.g. file.py:factory)")
    return name


def audit(artifact: str, model: str | None = None, weights: str | None = None, data: str = "builtin",
          num_images: int | None = 1000, max_drop: float | None = 0.5, min_sqnr: float | None = None,
          fail_on_dead_kernels: bool = False, report: str | None = None, html: str | None = None,
          progress: bool = True, resolution: int | None = None) -> AuditSummary:
    """Audit an exported artifact against its float model; ``failed`` when the gate fails (exit 1)."""
    from .audit import run_audit

    from .audit.report import check_report_paths

    check_report_paths(artifact, report, html)  # before the audit runs: a path that cannot take a report
    for path, option in ((report, "report (--report)"), (html, "html (--html)")):
        if path:
            _refuse_overwriting_inputs(path, option, model, weights, data=[("data (--data)", data)])
    if model is None and (weights is not None or resolution is not None):  # for the zoo model the artifact names
        model = _artifact_model_name(artifact)
    net = resolve_model(model, weights, resolution) if (model is not None or weights is not None) else None
    if net is not None:
        _builtin_fits(data, net, "data (--data)")
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

    @property
    def failure(self) -> str:
        """One line: the exports that failed their checks ('' if none)."""
        return "; ".join(f"{e['target']} failed its checks ({e['path']}): {e['failure']}"
                         for e in self.exports if not e.get("passed", True))

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


def _qat_artifact_path(out_dir, model: str, spec, recipe: str | None) -> Path:
    """``OUT_DIR/MODEL-qat-TARGET[-RECIPE].suffix``: a recipe other than a target's own is in the name, as
    export names its files, so a job with ``--recipe per-tensor-dsp-cle`` does not overwrite the files of a
    per-channel job in the same folder."""
    from .export import TARGETS

    own = recipe is None or str(recipe).strip().lower() in TARGETS
    variant = "" if own else f"-{_recipe_label(recipe, '')}"
    return Path(out_dir) / f"{model.replace(':', '_').replace('/', '_')}-qat-{spec.name}{variant}{spec.suffix}"


def qat(model: str | None = None, weights: str | None = None, data: str = "builtin", epochs: int | None = None,
        batch_size: int | None = None, lr: float | None = None, recipe: str | None = None,
        out_dir: str | None = None, resume: bool = False, resume_from: str | None = None, seed: int = 0,
        export: list[str] | tuple[str, ...] = (), start: str = "float",
        freeze_bn_step: int | float | str | None = None, freeze_observer_step: int | float | str | None = None,
        val_data: str | None = None, progress: bool = True, resolution: int | None = None) -> QATSummary:
    """Quantization-aware fine-tuning (see ``docs/qat.md``); optionally export the result.

    ``epochs``, ``batch_size``, ``lr``, ``out_dir`` and the two freeze points default to
    :class:`~mobilequant.qat.QATJobConfig`'s (None); a freeze point is a step, a fraction of the job's steps,
    or ``"never"``.
    ``val_data`` defaults to the Fashion-MNIST test split for built-in training data, else none. Every
    ``export`` target is written and verified; one that fails its checks is reported, the others still run
    (``failed``). In a torchrun job only the main process exports.
    """
    from .audit.report import check_name_lengths
    from .data.builtin import is_builtin
    from .errors import CheckFailed
    from .export import default_recipe, get_target, load_recipe
    from .export import export as export_artifact
    from .qat import QATJobConfig, run_qat
    from .qat.job import out_dir_lock
    from .weights import DEFAULT_WEIGHTS

    _refuse_non_name(model, "model")
    if out_dir is not None:  # before any work: Path.exists raised OSError on a name the file system cannot take
        check_name_lengths(out_dir, "out_dir (--out-dir)")
    targets = [get_target(t) for t in export]  # unknown targets fail before training
    rec = load_recipe(recipe) if recipe is not None else default_recipe("tflite-int8")
    train_data = "fashion-mnist" if data == "builtin" else data
    by_name = weights is None and resolution is None and not (model and ":" in model)
    net = None if by_name else resolve_model(model, weights, resolution)
    given = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "out_dir": out_dir,
             "freeze_bn_step": freeze_bn_step, "freeze_observer_step": freeze_observer_step}
    given = {k: None if v == "never" else v for k, v in given.items() if v is not None}
    if val_data == "builtin" or (val_data is None and train_data == "fashion-mnist"):
        val_data = "fashion-mnist"
    builtin = [(spec, option) for spec, option in ((train_data, "data (--data)"), (val_data, "val_data (--val-data)"))
               if spec is not None and is_builtin(spec)]
    checked = net if net is not None or not builtin else resolve_model(model)  # built once, for both
    for spec, option in builtin:  # a colour or 1000-class model is not trained on them
        _builtin_fits(spec, checked, option)
    config = QATJobConfig(model=_model_name(net) if net is not None else (model or DEFAULT_WEIGHTS),
                          train_data=train_data, val_data=val_data, seed=seed,
                          quant=rec.quantization.to_quant_config(), resume=resume, resume_from=resume_from,
                          progress=progress, start=start, **given)
    folder = Path(config.out_dir)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"out_dir (--out-dir) {folder} is a file, not a folder")
    created = None if folder.exists() else folder
    try:  # before the graph is built: a folder that cannot be made fails now
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create out_dir (--out-dir) {folder}: {e.strerror or e}") from None
    # One job per folder, from training to the last export: run_qat takes the folder's lock (in the main
    # process of a torchrun job); a single process takes it here already, so that it covers the exports.
    single = int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 and not _distributed_initialized()
    with _removed_if_left_empty(created), (out_dir_lock(folder) if single else contextlib.nullcontext()):
        result = run_qat(config, model=net)
        main = result.rank == 0
        exports = []
        for spec in targets if main else ():  # one process writes the files
            path = _qat_artifact_path(config.out_dir, config.model, spec, recipe)
            try:
                art = export_artifact(result, spec.name, path, model_name=config.model)
                exports.append({"target": spec.name, "path": str(art.path), "passed": True})
            except CheckFailed as e:  # written beside as <name>.failed<suffix>; the other targets still run
                failed = getattr(e, "artifact", None)
                exports.append({"target": spec.name, "path": str(failed.path if failed is not None else path),
                                "passed": False, "failure": str(e)})
    return QATSummary(config.model, None if result.checkpoint is None else str(result.checkpoint),
                      None if result.csv_log is None else str(result.csv_log), result.steps,
                      result.val_accuracy, result.int8_accuracy, exports, main)


def _distributed_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


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
    """Single-image latency and size of each artifact in its runtime (``artifacts``: paths, or one path)."""
    from .runtime.bench import measure_latency

    if isinstance(artifacts, (str, os.PathLike)):  # one file, not a sequence of one-character paths
        artifacts = [artifacts]
    return BenchSummary([measure_latency(a, threads=threads, runs=runs, warmup=warmup) for a in artifacts])
