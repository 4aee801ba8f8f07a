"""Export recipes: one typed, frozen object per export, read from YAML.

A recipe names a target (see :data:`TARGETS`) and holds three sections, each a frozen dataclass whose
fields are the only keys accepted (unknown keys are rejected with a close-match suggestion)::

    target: tflite-int8
    quantization: {calibration: mse, per_channel: true, relu6: clamped, cle: false, ...}
    io: {dtype: int8, layout: NCHW}
    verification: {num_images: 512, int8_top1_agreement: 0.995, ...}

``load_recipe("tflite-int8")`` reads ``export_recipes/tflite-int8.yaml`` (a built-in name) or any path;
``overrides=["io.layout=NHWC", "quantization.per_channel=false"]`` changes fields after loading (values
parsed with ``yaml.safe_load``, then type-checked like file values). Options a target does not support
(NHWC for ONNX, int8 I/O for a float model, quantization settings for a float target) are rejected.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import InputError, UsageError, did_you_mean

__all__ = [
    "Target",
    "TARGETS",
    "QuantizationSettings",
    "IOSettings",
    "VerificationSettings",
    "Recipe",
    "RECIPES_DIR",
    "list_recipes",
    "load_recipe",
    "default_recipe",
    "get_target",
]

RECIPES_DIR = Path(__file__).resolve().parents[2] / "export_recipes"


@dataclass(frozen=True)
class Target:
    """An export target: file format, precision, suffix."""

    name: str
    format: str  # "tflite" | "onnx"
    precision: str  # "int8" | "fp16" | "fp32"
    suffix: str
    description: str

    @property
    def quantized(self) -> bool:
        return self.precision == "int8"


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("tflite-int8", "tflite", "int8", ".tflite", "int8 weights and activations (TFLite int8 spec), litert-torch"),
        Target("tflite-fp16", "tflite", "fp16", ".tflite", "float16 weights, float32 compute and I/O"),
        Target("tflite-fp32", "tflite", "fp32", ".tflite", "float32"),
        Target("onnx-int8", "onnx", "int8", ".onnx",
               "QDQ ONNX (int8 weights, int32 bias; activations stored uint8: zero point + 128)"),
        Target("onnx-fp16", "onnx", "fp16", ".onnx", "float16 initializers cast to float32, float32 I/O"),
        Target("onnx-fp32", "onnx", "fp32", ".onnx", "float32"),
    )
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[str(name).strip().lower()]  # TFLITE-INT8 is tflite-int8
    except KeyError:
        raise UsageError(f"unknown export target {name!r}{did_you_mean(str(name), TARGETS)}; "
                         f"targets: {', '.join(TARGETS)}") from None


@dataclass(frozen=True)
class QuantizationSettings:
    """How an int8 target is quantized (mapped onto :class:`mobilequant.quant.QuantConfig`). A `--set` that changes one of these or an `io` setting is recorded in the file (`recipe_overrides`, sorted) and gives the default file name a variant: `MODEL-TARGET-custom-<8 hex of the overrides>.tflite`, so it neither replaces nor passes for the recipe's own export."""

    calibration: str = "mse"  # mse | minmax | moving_average | percentile | entropy
    per_channel: bool = True  # one weight scale per output channel (false: per tensor, e.g. for DSPs)
    relu6: str = "clamped"  # ReLU6 outputs: clamped = [0, min(6, calibrated)], fixed = exactly [0, 6]
    cle: bool = False  # cross-layer equalization before calibration
    bias_correction: bool = True  # move each conv / linear output's mean quantization error into its bias
    adaround: bool = False  # learn each weight's rounding (up / down) from the calibration images (AdaRound)
    range_search: bool = False  # narrow activation ranges where the int8 model's output error drops
    adaround_iterations: int = 1000  # AdaRound optimisation steps per layer
    num_calibration: int = 512  # calibration images used at most
    percentile: float = 99.99  # for calibration: percentile
    float_fallback: bool = False  # ops with no int8 rule run in float inside the int8 file (else refused)

    @classmethod
    def from_quant_config(cls, config) -> QuantizationSettings:
        """The settings a :class:`~mobilequant.quant.QuantConfig` was quantized with (what a file made from
        a ``QuantResult`` records: not the recipe's, which did not quantize it)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    def to_quant_config(self):
        from ..quant import QuantConfig

        return QuantConfig(
            per_channel=self.per_channel, calibration=self.calibration, relu6=self.relu6, cle=self.cle,
            bias_correction=self.bias_correction, adaround=self.adaround, range_search=self.range_search,
            adaround_iterations=self.adaround_iterations, num_calibration=self.num_calibration,
            percentile=self.percentile, float_fallback=self.float_fallback,
        )


@dataclass(frozen=True)
class IOSettings:
    """The file's input / output."""

    dtype: str = "float"  # int8 | float: tensor type at the model's input and output (int8: tflite-int8 only)
    layout: str = "NCHW"  # NCHW | NHWC input (NHWC only for TFLite)


@dataclass(frozen=True)
class VerificationSettings:
    """Checks run after every export (see :mod:`mobilequant.export.verify`). They are not recorded in the file (its `.verify.json` report keeps them), so the same quantization gives the same bytes however many images were checked."""

    enabled: bool = True  # run the checks before writing (a file that fails is written as <name>.failed<suffix>)
    num_images: int = 512  # images compared in the runtime against the torch reference
    fp32_max_abs_diff: float = 1e-4  # fp32: max |file − torch| ≤ this × max |torch|
    fp16_top1_agreement: float = 0.999  # fp16: top-1 agreement with the float model
    int8_top1_agreement: float = 0.995  # int8: top-1 agreement with the int8 simulation (or its own under float noise)
    int8_accuracy_drop_pp: float = 0.1  # int8: |accuracy(file) − accuracy(simulated)| in pp, beyond near-tie noise
    scale_rtol: float = 1e-6  # int8: relative tolerance of scales read back from the file


_SECTIONS = {"quantization": QuantizationSettings, "io": IOSettings, "verification": VerificationSettings}
_CHOICES = {
    ("quantization", "calibration"): ("minmax", "moving_average", "percentile", "entropy", "mse"),
    ("quantization", "relu6"): ("clamped", "fixed"),
    ("io", "dtype"): ("int8", "float"),
    ("io", "layout"): ("NCHW", "NHWC"),
}


@dataclass(frozen=True)
class Recipe:
    """A complete export recipe. Build with :func:`load_recipe` / :func:`default_recipe`."""

    target: str
    name: str = ""
    description: str = ""
    quantization: QuantizationSettings = field(default_factory=QuantizationSettings)
    io: IOSettings = field(default_factory=IOSettings)
    verification: VerificationSettings = field(default_factory=VerificationSettings)
    # the overrides (``--set``) that changed a quantization / io setting of the recipe as loaded, as sorted
    # ``section.key=value``: the file records them and its default name says so (settings compare equal
    # however they were reached)
    overrides: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        target = get_target(self.target)
        for (section, key), choices in _CHOICES.items():
            value = getattr(getattr(self, section), key)
            same = next((c for c in choices if str(value).lower() == c.lower()), None)
            if same is None:
                raise UsageError(f"recipe {section}.{key}: {value!r} is not one of {', '.join(choices)}"
                                 f"{did_you_mean(str(value), choices)}")
            if same != value:  # nhwc is NHWC
                object.__setattr__(self, section, dataclasses.replace(getattr(self, section), **{key: same}))
        if self.io.dtype == "int8" and not target.quantized:
            raise UsageError(f"recipe io.dtype: int8 I/O needs an int8 target, not {target.name}")
        if self.io.dtype == "int8" and target.format != "tflite":
            raise UsageError(f"recipe io.dtype: int8 I/O is a TFLite option; {target.name} files take and return "
                             "float (their first and last ops quantize and dequantize)")
        if self.io.layout == "NHWC" and target.format != "tflite":
            raise UsageError(f"recipe io.layout: NHWC input is only supported for TFLite targets, not {target.name}")
        if not target.quantized and self.quantization != QuantizationSettings():
            raise UsageError(f"recipe quantization: {target.name} is not quantized and takes no quantization "
                             "options (a recipe's quantization section, --set quantization.*)")
        v = self.verification
        for key in ("fp16_top1_agreement", "int8_top1_agreement"):
            if not 0.0 <= getattr(v, key) <= 1.0:
                raise UsageError(f"recipe verification.{key} must lie in [0, 1], got {getattr(v, key)!r}")
        if v.num_images < 1:
            raise UsageError(f"recipe verification.num_images must be at least 1, got {v.num_images}")
        for key in ("fp32_max_abs_diff", "int8_accuracy_drop_pp", "scale_rtol"):
            if not getattr(v, key) >= 0:
                raise UsageError(f"recipe verification.{key} must be ≥ 0, got {getattr(v, key)!r}")
        q = self.quantization
        if q.num_calibration < 1:
            raise UsageError("recipe quantization.num_calibration must be at least 1")
        if q.adaround_iterations < 1:
            raise UsageError(f"recipe quantization.adaround_iterations must be at least 1, got {q.adaround_iterations}")
        if not 50 < q.percentile <= 100:  # QuantConfig's own limit: the percentile of |activation| kept
            raise UsageError(f"recipe quantization.percentile must lie in (50, 100], got {q.percentile!r}")

    @property
    def spec(self) -> Target:
        return TARGETS[self.target]

    def to_dict(self) -> dict:
        """The recipe as a file would hold it (``target``, ``name``, ``description`` and the three sections)."""
        data = dataclasses.asdict(self)
        del data["overrides"]
        return data

    def file_settings(self) -> dict:
        """What an exported file records of its recipe: the settings that make its bytes (``target``,
        ``name``, ``quantization``, ``io``). Not the ``verification`` section — how many images were
        checked does not change the file; the ``.verify.json`` report beside it keeps those — and not the
        ``description``, prose that does not change it either."""
        data = self.to_dict()
        del data["verification"], data["description"]
        return data

    def replace(self, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
        """Apply ``section.key=value`` overrides (values parsed by ``yaml.safe_load``)."""
        import yaml

        data = self.to_dict()
        touched = set()
        for item in overrides:
            if "=" not in item:
                raise UsageError(f"override {item!r} must look like section.key=value")
            path, raw = item.split("=", 1)
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw
            parts = path.strip().split(".")
            if len(parts) == 1:
                _check_keys({parts[0]: value}, ["target", "name", "description"], "recipe")
                data[parts[0]] = value
                continue
            if len(parts) != 2:
                raise UsageError(f"override {path!r} must be section.key")
            section, key = parts
            _check_keys({section: None}, list(_SECTIONS), "recipe section")
            _check_keys({key: None}, [f.name for f in fields(_SECTIONS[section])], f"recipe {section}")
            data[section][key] = value
            touched.add((section, key))
        result = _from_dict(data, "override")
        recorded = {item.split("=", 1)[0]: item for item in self.overrides}
        for section, key in touched & set(_FILE_SECTION_KEYS):
            before, after = getattr(getattr(self, section), key), getattr(getattr(result, section), key)
            if after != before:  # an override that sets the value already there changes nothing
                recorded[f"{section}.{key}"] = f"{section}.{key}={_fmt_value(after)}"
        return dataclasses.replace(result, overrides=tuple(sorted(recorded.values())))


# the settings an override of which changes the file (verification settings only change the checks)
_FILE_SECTION_KEYS = [(section, f.name) for section in ("quantization", "io") for f in fields(_SECTIONS[section])]


def _fmt_value(value) -> str:
    """A setting as an override spells it: ``true`` / ``false``, numbers and names as written."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _check_keys(d: dict, allowed: list[str], where: str) -> None:
    for key in d:
        if key not in allowed:
            raise UsageError(f"unknown key {key!r} in {where}{did_you_mean(str(key), allowed)}; "
                             f"allowed: {', '.join(allowed)}")


def _coerce(value: Any, ftype: str, where: str):
    """Check a YAML value against a dataclass field type (one source of truth: the annotations)."""
    if ftype == "bool":
        if isinstance(value, bool):
            return value
    elif ftype == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif ftype == "float":
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string; 1.0e-6 as a number
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif ftype == "str":
        if isinstance(value, str):
            return value
    raise UsageError(f"{where} must be {ftype}, got {value!r}")


def _section(cls, d: Any, where: str):
    if d is None:
        return cls()
    if not isinstance(d, dict):
        raise UsageError(f"{where} must be a mapping, got {type(d).__name__}")
    names = {f.name: f for f in fields(cls)}
    _check_keys(d, list(names), where)
    return cls(**{k: _coerce(v, names[k].type, f"{where}.{k}") for k, v in d.items()})


def _from_dict(d: Any, source: str) -> Recipe:
    if not isinstance(d, dict):
        raise InputError(f"{source}: a recipe must be a mapping of sections, got {type(d).__name__}")
    _check_keys(d, ["target", "name", "description", *_SECTIONS], f"recipe {source}")
    if "target" not in d:
        raise UsageError(f"recipe {source} has no 'target' (one of {', '.join(TARGETS)})")
    target = get_target(str(d["target"]))
    sections = {}
    for name, cls in _SECTIONS.items():
        sections[name] = _section(cls, d.get(name), f"recipe {source} {name}")
    if "io" not in d or d["io"] is None or "dtype" not in (d.get("io") or {}):
        sections["io"] = dataclasses.replace(sections["io"], dtype=_default_io_dtype(target))
    return Recipe(
        target=target.name,
        name=str(d.get("name") or ""),
        description=str(d.get("description") or ""),
        **sections,
    )


def _default_io_dtype(target: Target) -> str:
    """int8 I/O for int8 TFLite files (what an int8 app pipeline feeds), float for every other target."""
    return "int8" if target.quantized and target.format == "tflite" else "float"


def default_recipe(target: str) -> Recipe:
    """The built-in defaults for a target (tflite-int8: int8 I/O; every other target: float I/O) — the
    settings of ``export_recipes/<target>.yaml`` (a test keeps the two equal)."""
    t = get_target(target)
    return Recipe(target=t.name, name=t.name, io=IOSettings(dtype=_default_io_dtype(t)))


def list_recipes() -> list[str]:
    """Names of the recipes in ``export_recipes/``."""
    if not RECIPES_DIR.is_dir():
        return []
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; a bigger file is not one
MAX_RECIPE_NODES = 10_000  # values in the document with each alias counted where it is used (a recipe has ~40)


def _duplicate_key(text: str):
    """The first mapping key given twice in ``text`` (``safe_load`` keeps the last silently), as
    ``(key, mark)``, or None. Reads the node tree only (``yaml.compose``): no object is constructed, and
    each node is visited once however many aliases point at it (walking every alias again took ×9 time per
    level of a nine-alias "billion laughs" document)."""
    import yaml

    stack = [yaml.compose(text, Loader=yaml.SafeLoader)]
    visited: set[int] = set()  # id() of the nodes walked; the tree keeps them alive, so ids are not reused
    while stack:
        node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key, value in node.value:
                ident = (key.tag, key.value) if isinstance(key, yaml.ScalarNode) else None
                if ident is not None and ident in seen:
                    return key.value, key.start_mark
                seen.add(ident)
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return None


def _expanded_size(text: str, limit: int) -> int:
    """How many values ``text`` stands for once its aliases are expanded, counted up to ``limit + 1`` (a
    document that refers to itself counts as over). Linear in the nodes written: each node's count is
    computed once and reused wherever an alias repeats it."""
    import yaml

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is None:
        return 0
    size: dict[int, int] = {}
    open_nodes: set[int] = set()  # nodes whose children are being counted: reaching one again is a cycle
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in size:
            continue
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            size[id(node)] = 1
            continue
        if children_done:
            open_nodes.discard(id(node))
            size[id(node)] = min(limit + 1, 1 + sum(size[id(c)] for c in children))
            continue
        if id(node) in open_nodes:
            return limit + 1
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                return limit + 1
            if id(child) not in size:
                stack.append((child, False))
    return size[id(root)]


def _read_recipe_text(path: Path) -> str:
    """The recipe file as text: one-line :class:`InputError` for an unreadable file, one over
    :data:`MAX_RECIPE_BYTES` (read no further: ``--recipe /dev/zero`` never ends) or bytes that are not
    UTF-8."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise InputError(f"cannot read recipe {path}: {e.strerror or e}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise InputError(f"recipe {path} is larger than {MAX_RECIPE_BYTES >> 20} MiB; a recipe is a short YAML "
                         "file (see export_recipes/)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"recipe {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
                         "save it as UTF-8") from None


def load_recipe(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A recipe from a built-in name (``export_recipes/NAME.yaml``) or a YAML file path."""
    import yaml

    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        builtin = RECIPES_DIR / f"{name_or_path}.yaml"
        if builtin.is_file():
            path = builtin
        elif str(name_or_path) in TARGETS:
            return default_recipe(str(name_or_path)).replace(overrides)
        else:
            known = sorted(set(list_recipes()) | set(TARGETS))
            raise UsageError(f"unknown recipe {str(name_or_path)!r}{did_you_mean(str(name_or_path), known)}; "
                             f"recipes: {', '.join(known)}")
    text = _read_recipe_text(path)
    try:
        if _expanded_size(text, MAX_RECIPE_NODES) > MAX_RECIPE_NODES:  # before anything walks the values
            raise InputError(f"recipe {path} stands for more than {MAX_RECIPE_NODES:,} values once its aliases "
                             "(*name) are expanded; a recipe has a few dozen")
        data = yaml.safe_load(text)
        twice = _duplicate_key(text)
    except RecursionError:  # PyYAML composes nested values recursively
        raise InputError(f"recipe {path} is not valid YAML: values nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"recipe {path} is not valid YAML{where}: {what}") from None
    if twice is not None:
        key, mark = twice
        raise InputError(f"recipe {path} is not valid YAML (line {mark.line + 1}, column {mark.column + 1}): "
                         f"the key {key!r} is given twice")
    recipe = _from_dict(data, str(path))
    if not recipe.name:
        recipe = dataclasses.replace(recipe, name=path.stem)
    return recipe.replace(overrides) if overrides else recipe
