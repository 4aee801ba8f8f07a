"""QAT job options: one frozen dataclass, validated on construction, with a recipe hash.

Every default on one line with its type and meaning. A wrong value raises :class:`UsageError` with one
line naming the option. :meth:`QATJobConfig.recipe_hash` hashes the options that change the trained
result (not where files go, how often checkpoints are written, progress bars or thread counts), so a
checkpoint can refuse to be resumed under a different recipe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import UsageError, did_you_mean
from ..quant.config import QuantConfig

__all__ = ["QATJobConfig", "START_MODES", "DEVICES", "NOT_IN_RECIPE"]

START_MODES = ("float", "ptq")
DEVICES = ("auto", "cpu", "cuda")

# Options that do not change what is trained: output place, checkpoint cadence, logging, threads, device,
# resume switches, and what is evaluated. ``train_data`` is how the data are named (``imgs`` and ``imgs/``,
# a relative and an absolute path): what they are is the checkpoint's data fingerprint, checked on resume.
NOT_IN_RECIPE = frozenset({
    "out_dir", "ckpt_every", "resume", "resume_from", "progress", "threads", "device",
    "val_data", "val_split", "val_limit", "train_data",
})


@dataclass(frozen=True)
class QATJobConfig:
    """A quantization-aware training job (see ``docs/qat.md``)."""

    model: str = "mobilenetv2_050"  # zoo name; its shipped Fashion-MNIST weights are the start (or pass model=)
    out_dir: str = "out/qat"  # checkpoints, CSV log (created)
    epochs: int = 1  # passes over the training data
    batch_size: int = 64  # global batch (all processes together); must divide by the process count
    lr: float = 5e-4  # SGD (Nesterov, momentum 0.9) peak learning rate, cosine-decayed to 0 per step
    weight_decay: float = 5e-5  # on conv / linear weights only
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    augment: bool = False  # random 2-pixel translation + horizontal flip (drawn per step, sharding-independent)
    dropout: float | None = None  # override the model's dropout probability (None: keep the model's)
    seed: int = 0  # data order, augmentation, dropout
    train_data: str = "fashion-mnist"  # data spec for mobilequant.data.load_data
    train_split: str = "train"  # "train" | "test" | "calibration" (built-in data only)
    train_limit: int | None = None  # use a stratified subset of this many training images
    val_data: str | None = "fashion-mnist"  # evaluated after every epoch (None: no evaluation)
    val_split: str = "test"
    val_limit: int | None = 2000  # stratified subset of the validation data (None: all)
    quant: QuantConfig = field(default_factory=QuantConfig)  # the PTQ options: scheme, bits, ReLU6 mode (no BC)
    start: str = "float"  # "float": observe ranges on calib_batches; "ptq": a PTQ result's ranges and corrected biases
    calib_batches: int = 4  # batches observed (eval mode, no training) before the first step
    # The two freeze points: a global step (an int), a fraction of the job's steps (a float in [0, 1]; 0.5 =
    # halfway), or None (never). The defaults are the measured 8-bit recipe (docs/qat.md).
    freeze_bn_step: int | float | None = 0.5  # from here on BN uses and keeps its running statistics
    freeze_observer_step: int | float | None = 0.75  # from here on scales / zero points stop following the data
    learn_scales: bool = False  # LSQ: scales (and activation zero points) are trained by backprop
    osc_dampen: float = 0.0  # depthwise weights: weight of the oscillation-dampening loss (0: off)
    osc_freeze_threshold: float | None = None  # depthwise weights: freeze integers oscillating more often
    osc_momentum: float = 0.01  # EMA momentum of the oscillation frequency
    distill: float = 0.0  # weight of distillation from the float model (KL to its predictions; 1: labels unused)
    distill_temperature: float = 1.0  # softmax temperature of the distillation loss
    ckpt_every: int = 50  # also write a checkpoint every this many steps (always at each epoch end)
    resume: bool = False  # continue from the last checkpoint in out_dir
    resume_from: str | None = None  # continue from this checkpoint file
    threads: int | None = None  # torch CPU threads (None: leave as is)
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda"
    progress: bool = True  # tqdm bars

    def __post_init__(self) -> None:
        if isinstance(self.quant, dict):  # from JSON / a checkpoint
            object.__setattr__(self, "quant", QuantConfig.from_dict(self.quant))
        if isinstance(self.quant, QuantConfig) and self.quant.bias_correction:
            # Bias correction is a PTQ step (QuantConfig's default); QAT trains the biases itself.
            object.__setattr__(self, "quant", dataclasses.replace(self.quant, bias_correction=False))
        for f in fields(self):
            _check_type(f.name, f.type, getattr(self, f.name))
        positive = ("epochs", "batch_size", "ckpt_every", "calib_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise UsageError(f"QATJobConfig.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("train_limit", "val_limit", "threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UsageError(f"QATJobConfig.{name} must be at least 1 (or None), got {v}")
        for name in ("freeze_bn_step", "freeze_observer_step"):
            v = getattr(self, name)
            if isinstance(v, float) and not 0 <= v <= 1:
                raise UsageError(f"QATJobConfig.{name} must be a step ≥ 0, a fraction of the job's steps in "
                                 f"[0, 1], or None, got {v}")
            if isinstance(v, int) and v < 0:
                raise UsageError(f"QATJobConfig.{name} must be a step ≥ 0 (or a fraction in [0, 1], or None), "
                                 f"got {v}")
        if not self.lr > 0:
            raise UsageError(f"QATJobConfig.lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.osc_dampen < 0:
            raise UsageError("QATJobConfig.weight_decay and osc_dampen must be ≥ 0")
        if not 0 <= self.label_smoothing < 1:
            raise UsageError(f"QATJobConfig.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise UsageError(f"QATJobConfig.dropout must be in [0, 1) or None, got {self.dropout}")
        if self.osc_freeze_threshold is not None and not 0 < self.osc_freeze_threshold < 1:
            raise UsageError(f"QATJobConfig.osc_freeze_threshold must be in (0, 1) or None, "
                             f"got {self.osc_freeze_threshold}")
        if not 0 < self.osc_momentum <= 1:
            raise UsageError(f"QATJobConfig.osc_momentum must be in (0, 1], got {self.osc_momentum}")
        if not 0 <= self.distill <= 1:
            raise UsageError(f"QATJobConfig.distill must be in [0, 1], got {self.distill}")
        if not self.distill_temperature > 0:
            raise UsageError(f"QATJobConfig.distill_temperature must be positive, got {self.distill_temperature}")
        if self.start not in START_MODES:
            raise UsageError(f"QATJobConfig.start: unknown mode {self.start!r}"
                             f"{did_you_mean(self.start, START_MODES)}; choose from {', '.join(START_MODES)}")
        if self.device not in DEVICES:
            raise UsageError(f"QATJobConfig.device: unknown device {self.device!r}"
                             f"{did_you_mean(self.device, DEVICES)}; choose from {', '.join(DEVICES)}")

    # ------------------------------------------------------------------------------------ conversions

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the quantization options nested as a dict)."""
        d = dataclasses.asdict(self)
        d["quant"] = self.quant.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QATJobConfig:
        names = [f.name for f in fields(cls)]
        for key in d:
            if key not in names:
                raise UsageError(f"unknown QAT option {key!r}{did_you_mean(key, names)}")
        return cls(**d)

    def replace(self, **changes) -> QATJobConfig:
        names = [f.name for f in fields(self)]
        for key in changes:
            if key not in names:
                raise UsageError(f"unknown QAT option {key!r}{did_you_mean(key, names)}")
        return dataclasses.replace(self, **changes)

    def freeze_steps(self, total_steps: int) -> tuple[int | None, int | None]:
        """The global steps at which BN and the ranges freeze in a job of ``total_steps`` (None: never)."""
        def at(v: int | float | None) -> int | None:
            return v if v is None or isinstance(v, int) else round(v * total_steps)

        return at(self.freeze_bn_step), at(self.freeze_observer_step)

    def recipe(self) -> dict[str, Any]:
        """The options that determine the trained result."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_IN_RECIPE}

    def recipe_hash(self) -> str:
        """sha256 (first 16 hex digits) of the canonical JSON of :meth:`recipe`."""
        text = json.dumps(self.recipe(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _check_type(name: str, annotation: str, value: Any) -> None:
    """Check ``value`` against a simple annotation string such as ``"int | None"``."""
    if annotation == "QuantConfig":
        if not isinstance(value, QuantConfig):
            raise UsageError(f"QATJobConfig.{name} must be a QuantConfig, got {type(value).__name__}")
        return
    parts = [p.strip() for p in annotation.split("|")]
    if value is None:
        if "None" in parts:
            return
        raise UsageError(f"QATJobConfig.{name} must not be None")
    for p in parts:
        allowed = _TYPES.get(p)
        if allowed is None:
            continue
        if p != "bool" and isinstance(value, bool):
            continue
        if isinstance(value, allowed):
            return
    want = " or ".join(p for p in parts)
    raise UsageError(f"QATJobConfig.{name} must be {want}, got {value!r}")
