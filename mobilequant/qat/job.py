"""The QAT job: ``run_qat(QATJobConfig) -> QATResult``.

Reads as the pipeline::

    float model (+ optional PTQ result) → capture [→ fold BN → CLE, with quant.cle]
      → prepare_qat_pt2e (MobileQuantizer, fake-quant) → zero the weights of BN channels with zero variance
      → observe ranges on calib_batches → [ranges from the PTQ table] → train (DDP when under torchrun)
         checkpoints every ckpt_every steps and every epoch · BN frozen at freeze_bn_step ·
         observers frozen at freeze_observer_step · optional LSQ scales · depthwise oscillation control
      → convert_pt2e (+ int32 bias) → QuantTable → QATResult (a QuantResult: the exporter takes it)

Reproducibility: the data order is a function of (seed, epoch), augmentation of (seed, global step), the
model's own randomness (dropout) comes from the torch RNG whose state is checkpointed; on CPU the job asks
for deterministic kernels and a fixed thread count, so a run killed at any point and resumed from its last
checkpoint ends bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import io
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule
from torchao.quantization.pt2e import FakeQuantizeBase, move_exported_model_to_eval

from ..capture import keeps_caller_state
from ..data import ImageData, fit_labels, load_data, stratified_indices
from ..errors import InputError, UsageError
from ..quant.ptq import Finding, QuantResult, is_captured
from ..quant.table import QuantTable
from .checkpoint import (
    LAST,
    find_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_fingerprint,
)
from .config import QATJobConfig
from .distributed import DistContext, all_sum, epoch_indices, setup, shard_plan, teardown
from .convert import convert_trained
from .graph import (
    build_qat_graph,
    enable_scale_learning,
    equalized_graph,
    freeze_observers,
    observers_paused,
    set_mode,
    shift_biases,
    silence_dead_channels,
    tensor_key,
)
from .oscillation import OscillationControl
from .quantizer import qat_quantizer

__all__ = ["QATResult", "QATWarning", "run_qat", "ranges_from_table", "out_dir_lock", "CSV_NAME", "CSV_COLUMNS",
           "LOCK_NAME"]


class QATWarning(UserWarning):
    """A QAT job goes on, but not quite as asked (nothing to resume, dropout re-seeded)."""


CSV_NAME = "qat-log.csv"
LOCK_NAME = ".lock"  # in the job's folder (out_dir_lock): held while a job runs, kept beside its files
CSV_COLUMNS = ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "images_per_s", "seconds",
               "lr", "bn_frozen", "observers_frozen", "osc_freq", "osc_frozen")
_CROP_PADDING = 2
_CONVERT_CALIBRATION = 64  # images observed for tensors without a trained range (normally none)


@dataclass(repr=False)  # QuantResult's one-line repr, not the dataclass repr of every graph
class QATResult(QuantResult):
    """A :class:`~mobilequant.quant.QuantResult` (``graph``, ``export_graph``, ``table``, … — the exporter
    takes it as is) plus what the training job produced."""

    initial_model: nn.Module | None = None  # the float model training started from (float_model: trained)
    prepared: GraphModule | None = None  # the trained fake-quant graph (eval mode)
    checkpoint: Path | None = None  # the last checkpoint (the complete job)
    csv_log: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch (CSV_COLUMNS)
    steps: int = 0
    val_accuracy: float | None = None  # fake-quant graph, last epoch
    int8_accuracy: float | None = None  # converted graph (simulated int8) on the validation data
    osc_frozen_weights: int = 0  # depthwise weights frozen by oscillation control and baked
    rank: int = 0  # this process's rank in a torchrun job (0 writes checkpoints, the CSV, exports)

    def _repr_figures(self) -> list[str]:
        acc = "n/a" if self.int8_accuracy is None else f"{100 * self.int8_accuracy:.2f} %"
        return [*super()._repr_figures()[:2], f"{self.steps} steps", f"int8 accuracy {acc}"]


# ---------------------------------------------------------------------------------------------------
# Helpers


@contextlib.contextmanager
def _reproducible(threads: int | None, device: torch.device) -> Iterator[None]:
    """Fixed thread count and deterministic kernels (CPU), restored afterwards."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


def _data(spec: str, split: str, limit: int | None, seed: int, model: nn.Module, what: str) -> ImageData:
    data = fit_labels(load_data(spec, model.preprocess, split), model)
    if data.labels is None:
        raise InputError(f"{what} data {data.source} have no labels; QAT needs labelled images")
    if limit is not None and limit < len(data):
        data = data.subset(stratified_indices(data.labels.numpy(), limit, seed))
    return data


def _data_fingerprint(data: ImageData) -> str:
    h = hashlib.sha256()
    h.update(data.images.contiguous().numpy().tobytes())
    h.update(data.labels.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _augment(x: torch.Tensor, seed: int, step: int, positions: slice) -> torch.Tensor:
    """Random translation (replicate padding) + horizontal flip, drawn for the whole global batch.

    The generator depends only on (seed, global step); ``positions`` picks this process's samples out of
    the global batch, so sharding does not change what any image gets. (Not ``mobilequant.train``'s
    augmentation: that one draws from one generator per run, which a resumed or sharded run cannot replay.)
    """
    n, c, h, w = x.shape
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    global_n = positions.stop
    oy = torch.randint(0, 2 * _CROP_PADDING + 1, (global_n,), generator=gen)[positions]
    ox = torch.randint(0, 2 * _CROP_PADDING + 1, (global_n,), generator=gen)[positions]
    flip = (torch.rand(global_n, generator=gen) < 0.5)[positions]
    padded = F.pad(x, (_CROP_PADDING,) * 4, mode="replicate")
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def _param_groups(gm: GraphModule, scale_params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on conv / linear weights; none on biases, BN parameters and learned scales."""
    scales = {id(p) for p in scale_params}
    params = [p for p in gm.parameters() if p.requires_grad and id(p) not in scales]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if scale_params:
        groups.append({"params": list(scale_params), "weight_decay": 0.0})
    return groups


def _calibrate(gm: GraphModule, data: ImageData, batches: int, batch_size: int, seed: int,
               device: torch.device) -> None:
    """Observe ranges on ``batches`` global batches (eval mode, no gradient), the same on every process."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    set_mode(gm, train=False)
    with torch.no_grad():
        for i in range(batches):
            idx = order[i * batch_size:(i + 1) * batch_size]
            if len(idx) == 0:
                break
            x = data.images[idx]
            bad = (~torch.isfinite(x.reshape(len(x), -1)).all(1)).nonzero().reshape(-1)
            if len(bad):
                raise InputError(f"training images {idx[bad][:5].tolist()} of {data.source} contain NaN or Inf "
                                 "values (seen while observing the starting ranges)")
            gm(x.to(device))


def _shard(n: int, ctx: DistContext) -> slice:
    return slice(ctx.rank, n, ctx.world_size)


@torch.no_grad()
def _evaluate(gm: GraphModule, data: ImageData, ctx: DistContext, batch_size: int = 500,
              device: torch.device | None = None) -> tuple[float, float]:
    """(accuracy, mean loss) on ``data``, sharded over processes, observers paused; run on ``device``
    (default: the job's)."""
    device = device or ctx.device
    images, labels = data.images[_shard(len(data), ctx)], data.labels[_shard(len(data), ctx)]
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    with observers_paused(gm):
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device)
            y = labels[start:start + batch_size].to(device)
            logits = gm(x)
            totals[0] += float((logits.argmax(1) == y).sum())
            totals[1] += float(F.cross_entropy(logits, y, reduction="sum"))
            totals[2] += len(y)
    all_sum(totals, ctx)
    n = max(float(totals[2]), 1.0)
    return float(totals[0]) / n, float(totals[1]) / n


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def _gather_torch_rng(ctx: DistContext) -> torch.Tensor:
    """Every process's torch RNG state, ``world_size × n`` uint8 (dropout differs per process)."""
    mine = torch.get_rng_state()
    if not ctx.distributed:
        return mine[None]
    t = mine.to(ctx.device)
    parts = [torch.empty_like(t) for _ in range(ctx.world_size)]
    dist.all_gather(parts, t)
    return torch.stack([p.cpu() for p in parts])


def _recipe_diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return ", ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")


def _check_resumable(ckpt: dict, path: Path, config: QATJobConfig, init_hash: str, data_hash: str) -> None:
    """Refuse a checkpoint of another model, recipe, starting point or data set (one line: why)."""
    if ckpt["model"] != config.model:
        raise InputError(f"checkpoint {path} is for model {ckpt['model']!r}, this job trains {config.model!r}; "
                         "refusing to resume: use another out_dir")
    if ckpt["recipe_hash"] != config.recipe_hash():
        why = _recipe_diff(ckpt.get("recipe", {}), config.recipe()) or "options differ"
        raise InputError(f"checkpoint {path} was written by a different recipe ({why}); refusing to resume: "
                         "use the same options or another out_dir")
    if ckpt["init_hash"] != init_hash:
        raise InputError(f"checkpoint {path} started from different weights (fingerprint {ckpt['init_hash']} "
                         f"≠ {init_hash}); refusing to resume")
    if ckpt.get("data_hash") not in (None, data_hash):
        raise InputError(f"checkpoint {path} was trained on different data (fingerprint {ckpt['data_hash']} "
                         f"≠ {data_hash}); refusing to resume")


# ---------------------------------------------------------------------------------------------------
# Ranges from a PTQ result


def ranges_from_table(gm: GraphModule, table: QuantTable) -> tuple[int, list[Finding]]:
    """Start every fake-quant from a PTQ table's scale / zero point (and observer range), by layer name.

    Returns how many fake-quant modules were set, and a finding for each activation the table lacks.
    """
    done: set[int] = set()
    findings: list[Finding] = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(str(node.target))
        if not isinstance(mod, FakeQuantizeBase) or id(mod) in done:
            continue
        key = tensor_key(node)
        if key is None:
            continue
        entry = table.get(*key)
        if entry is None or len(entry.scale) != mod.scale.numel():
            if key[1] != "weight":
                findings.append(Finding("ptq_range_missing", key[0], f"no PTQ {key[1]} range; observed instead"))
            continue
        done.add(id(mod))
        scale = torch.tensor(entry.scale, dtype=torch.float32).reshape(mod.scale.shape)
        zp = torch.tensor(entry.zero_point).reshape(mod.zero_point.shape)
        with torch.no_grad():
            mod.scale.copy_(scale)
            mod.zero_point.copy_(zp.to(mod.zero_point.dtype))
            obs = mod.activation_post_process
            lo = (entry.qmin - zp.to(torch.float32)) * scale
            hi = (entry.qmax - zp.to(torch.float32)) * scale
            for buf, value in ((getattr(obs, "min_val", None), lo), (getattr(obs, "max_val", None), hi)):
                if not isinstance(buf, torch.Tensor):
                    continue
                if buf.dim() == 0:  # per-tensor observers keep scalars
                    buf.copy_(value.reshape(()))
                else:
                    buf.resize_(value.shape).copy_(value)
    return len(done), findings


def _teacher(model: nn.Module, device: torch.device) -> nn.Module:
    """The float model, frozen, for distillation (a copy: the job never changes the caller's model)."""
    teacher = copy.deepcopy(model)
    if is_captured(teacher):  # an exported graph has no .eval()
        move_exported_model_to_eval(teacher)
    else:
        teacher.eval()
    teacher = teacher.to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _distilled(ce: torch.Tensor, logits: torch.Tensor, teacher: nn.Module, x: torch.Tensor, weight: float,
               temperature: float) -> torch.Tensor:
    """``(1 − w)·CE + w·T²·KL(p_float,T ‖ p_qat,T)`` (Hinton et al. 2015; the float model as teacher).

    The QAT model then learns to give the float model's predictions rather than the training labels, so
    it moves towards the float function and its accuracy — what QAT of a well-trained model is for — and
    not towards another optimum of the labels (one epoch of label training moves top-1 by ±0.1 pp either
    way on the Fashion-MNIST nets, ``docs/qat.md``).
    """
    with torch.no_grad():
        target = F.log_softmax(teacher(x).float() / temperature, dim=1)
    kl = F.kl_div(F.log_softmax(logits.float() / temperature, dim=1), target, reduction="batchmean",
                  log_target=True)
    return (1.0 - weight) * ce + weight * temperature ** 2 * kl


def _ptq_fingerprint(ptq_result: QuantResult) -> str:
    """What a QAT job takes from a PTQ result: its table and its bias-correction shifts."""
    h = hashlib.sha256(ptq_result.table.sha256().encode())
    bc = ptq_result.bias_correction
    for layer, shift in sorted((bc.shifts() if bc is not None else {}).items()):
        h.update(layer.encode())
        h.update(shift.to(torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# One job per folder

_TEMP_FILE = re.compile(rf"^\.({re.escape(LAST)}|{re.escape(CSV_NAME)})\.(\d+)\.tmp$")  # save_checkpoint, _write_csv


@contextlib.contextmanager
def out_dir_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder/.lock`` (filelock: ``flock`` on Unix, exclusive) while the block runs: a second job in
    the same folder is refused with one line naming the holder's process (two jobs started a second apart
    had both run and mixed their checkpoints). The kernel releases the lock when the process ends, however
    it ends; filelock removes the file on release. Re-entrant in one process (one lock object per path;
    ``api.qat`` holds it over the training and the exports). Taking it also removes the temporary files a
    killed job left (``.qat-last.pt.PID.tmp`` of a PID no longer running). The folder must exist."""
    import filelock

    path = Path(folder) / LOCK_NAME
    lock = filelock.FileLock(path, is_singleton=True, thread_local=False, on_acquired=_write_pid)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        holder = _read_pid(path)
        by = f" (process {holder})" if holder else ""
        raise UsageError(f"out_dir (--out-dir) {folder} is in use by another QAT job{by}; wait for it to end "
                         "or choose another output folder") from None
    except OSError as e:
        raise UsageError(f"cannot create the lock file {path} in out_dir (--out-dir) {folder}: "
                         f"{e.strerror or e}") from None
    try:
        if lock.lock_counter == 1:
            _remove_stale_temp_files(Path(folder))
        yield
    finally:
        if lock.lock_counter == 1 and {p.name for p in Path(folder).iterdir()} == {LOCK_NAME}:
            # a job that wrote nothing leaves nothing (filelock keeps its file): whoever created the
            # folder can then remove it as empty
            with contextlib.suppress(OSError):
                path.unlink()
        lock.release()


def _write_pid(fd: int) -> None:
    """filelock's ``on_acquired``: the holder's PID in the lock file, for the message a second job gets."""
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())


def _read_pid(path: Path) -> str:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def _remove_stale_temp_files(folder: Path) -> None:
    """The temporary files of checkpoints and logs that a killed job left (its PID no longer runs)."""
    for entry in os.scandir(folder):
        found = _TEMP_FILE.match(entry.name)
        if found and not _running(int(found.group(2))):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _running(pid: int) -> bool:
    if pid == os.getpid():  # this process holds the lock: a file of its PID is an earlier process's
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


@contextlib.contextmanager
def _job_lock(out_dir: Path, ctx: DistContext) -> Iterator[None]:
    """:func:`out_dir_lock` for a job, creating the folder (removed again if the job leaves it empty): taken
    by the main process, the one that writes there; under torchrun every process learns whether it was
    taken, so that all stop together when another job holds the folder."""
    refused: UsageError | None = None
    with contextlib.ExitStack() as stack:
        if ctx.is_main:
            existed = out_dir.is_dir()
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                refused = UsageError(f"cannot create out_dir (--out-dir) {out_dir}: {e.strerror or e}")
            if refused is None:
                if not existed:
                    stack.callback(_remove_if_empty, out_dir)  # runs last, after the lock file is gone
                try:
                    stack.enter_context(out_dir_lock(out_dir))
                except UsageError as e:
                    refused = e
        if ctx.distributed:
            flag = torch.tensor([0.0 if refused is None else 1.0], device=ctx.device)
            if float(all_sum(flag, ctx)[0]) and refused is None:
                refused = UsageError(f"out_dir (--out-dir) {out_dir}: the main process of this job could not "
                                     "take the folder (its error says why)")
        if refused is not None:
            raise refused
        yield


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


# ---------------------------------------------------------------------------------------------------
# The job


@keeps_caller_state
def run_qat(
    config: QATJobConfig,
    *,
    model: nn.Module | None = None,
    train_data: ImageData | None = None,
    val_data: ImageData | None = None,
    ptq_result: QuantResult | None = None,
    on_step: Callable[[int], None] | None = None,
) -> QATResult:
    """Quantization-aware training of ``config.model`` (or ``model``); see the module docstring.

    ``model`` defaults to the shipped Fashion-MNIST weights of ``config.model``; ``train_data`` /
    ``val_data`` default to ``config.train_data`` / ``config.val_data`` (a stratified subset of
    ``*_limit`` images). ``ptq_result`` (with ``config.start="ptq"``) gives the starting ranges; without
    it PTQ is run on the training data. ``on_step(step)`` is called after every training step (and its
    checkpoint, if one is due).
    """
    if not isinstance(config, QATJobConfig):
        raise UsageError(f"config must be a QATJobConfig, got {type(config).__name__}")
    ctx = setup(config.device)
    try:
        with _job_lock(Path(config.out_dir), ctx), _reproducible(config.threads, ctx.device):
            return _run(config, ctx, model, train_data, val_data, ptq_result, on_step)
    finally:
        teardown(ctx)


def _run(config: QATJobConfig, ctx: DistContext, model, train_data, val_data, ptq_result,
         on_step) -> QATResult:
    from tqdm import tqdm

    if model is None:
        from ..weights import default_model

        model = default_model(config.model)
    name = getattr(model, "model_name", config.model)
    if name != config.model:
        raise UsageError(f"the model given is {name!r} but config.model is {config.model!r}")
    if not hasattr(model, "preprocess") and (train_data is None or val_data is None and config.val_data):
        raise UsageError("the model has no .preprocess; pass train_data and val_data already preprocessed")
    if train_data is None:
        train_data = _data(config.train_data, config.train_split, config.train_limit, config.seed, model, "training")
    if train_data.labels is None:
        raise InputError(f"training data {train_data.source} have no labels; QAT needs labelled images")
    if val_data is None and config.val_data:
        val_data = _data(config.val_data, config.val_split, config.val_limit, config.seed, model, "validation")
    plan = shard_plan(len(train_data), config.batch_size, ctx.world_size)
    total_steps = config.epochs * plan.steps_per_epoch
    bn_step, obs_step = config.freeze_steps(total_steps)

    out_dir = Path(config.out_dir)
    ckpt, ckpt_path = None, None
    if config.resume_from:
        ckpt_path = Path(config.resume_from)
    elif config.resume:
        ckpt_path = find_checkpoint(out_dir)
        if ckpt_path is None and ctx.is_main:  # a restart loop may resume before any checkpoint exists
            warnings.warn(f"nothing to resume in {out_dir} (no qat-last.pt / qat-prev.pt): a new job starts",
                          QATWarning, stacklevel=2)
    elif find_checkpoint(out_dir) is not None:
        raise UsageError(f"{out_dir} already holds a QAT checkpoint; continue it with --resume (resume=True) "
                         "or choose another output folder")
    init_extra = _ptq_fingerprint(ptq_result) if (ptq_result is not None and config.start == "ptq") else ""
    init_hash = state_fingerprint(model, init_extra)
    data_hash = _data_fingerprint(train_data)
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        _check_resumable(ckpt, ckpt_path, config, init_hash, data_hash)

    # ---- graph, ranges, optimizer
    quantizer = qat_quantizer(config.quant, learn_scales=config.learn_scales)
    example = train_data.images[:2]
    # With cle (for per-tensor weights) training starts from the equalized, BN-folded float graph.
    start_model = equalized_graph(model, example) if config.quant.cle else model
    prepared = build_qat_graph(start_model, example, quantizer, dropout=config.dropout).to(ctx.device)
    silenced = silence_dead_channels(prepared)
    findings = [Finding("dead_channels_silenced", layer, f"{k} channel(s) with zero BN running variance: weights "
                        "zeroed and kept at zero (the output stays the constant BN bias)")
                for layer, k in silenced]
    from_ptq = config.start == "ptq" and ckpt is None  # a resumed job has it all in its state dict
    if from_ptq and ptq_result is None:
        from ..quant.ptq import quantize

        calib = (train_data.images[i:i + config.batch_size]
                 for i in range(0, min(len(train_data), config.quant.num_calibration), config.batch_size))
        # The PTQ default, bias correction included (the job's own quant options have it off: see config).
        ptq_result = quantize(start_model, calib, dataclasses.replace(config.quant, cle=False, bias_correction=True),
                              example_input=example)
    if from_ptq and ptq_result.bias_correction is not None:
        # Start from the PTQ model's corrected biases too, not only from its ranges.
        findings += [Finding("bias_correction_missing", layer, "no bias to carry the PTQ bias correction into; "
                             "trained from the float bias") for layer in
                     shift_biases(prepared, ptq_result.bias_correction.shifts())]
    _calibrate(prepared, train_data, config.calib_batches, config.batch_size, config.seed, ctx.device)
    if from_ptq:
        _, more = ranges_from_table(prepared, ptq_result.table)
        findings += more
    scale_params = enable_scale_learning(prepared) if config.learn_scales else []
    osc = OscillationControl(prepared, config.osc_dampen, config.osc_freeze_threshold,
                             config.osc_momentum).to(ctx.device)
    optimizer = torch.optim.SGD(_param_groups(prepared, scale_params, config.weight_decay), lr=config.lr,
                                momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    trainable = [q for group in optimizer.param_groups for q in group["params"]]

    step, epoch, position = 0, 0, 0
    history: list[dict[str, Any]] = []
    stats = {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0, "seconds": 0.0}
    if ckpt is not None:
        prepared.load_state_dict(ckpt["graph"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        osc.load_state_dict(ckpt["oscillation"], strict=True)
        step, epoch, position = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["position"])
        history = [dict(r) for r in ckpt["history"]]
        stats = {k: float(v) for k, v in ckpt["epoch_stats"].items()}
        rng = ckpt["rng"]
        torch_states = rng["torch_per_process"]
        if ckpt["world_size"] == ctx.world_size:
            # a row of the gathered tensor is a view at an offset; torch.set_rng_state needs its own storage
            set_rng_state({**rng, "torch": torch_states[ctx.rank].clone()})
        else:
            warnings.warn(f"checkpoint written by {ckpt['world_size']} process(es), resumed with "
                          f"{ctx.world_size}: dropout draws are re-seeded, the run is no longer bitwise "
                          "reproducible", QATWarning, stacklevel=3)
            set_rng_state({**rng, "torch": torch_states[0].clone()})
            torch.manual_seed(config.seed * 7919 + ctx.rank * 104729 + step)
        if ctx.is_main and config.progress:
            tqdm.write(f"resuming {ckpt_path} at step {step} (epoch {epoch + 1}, batch {position})"
                       if epoch < config.epochs else
                       f"{ckpt_path} is a finished job (step {step}, {config.epochs} epoch(s)): nothing left to train")
    else:
        torch.manual_seed(config.seed)

    ddp = None
    if ctx.distributed:
        ddp = nn.parallel.DistributedDataParallel(
            prepared, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    net = ddp if ddp is not None else prepared
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    teacher = _teacher(model, ctx.device) if config.distill > 0 else None
    bn_frozen = bn_step is not None and step >= bn_step
    obs_frozen = False  # (re)applied by the first step due: idempotent, and a fresh run needs it at step 0
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / CSV_NAME
    last_ckpt = ckpt_path

    def checkpoint() -> Path | None:
        torch_states = _gather_torch_rng(ctx)  # every process takes part in the gather
        if not ctx.is_main:
            return None
        payload = {
            "model": config.model, "recipe_hash": config.recipe_hash(), "recipe": config.recipe(),
            "init_hash": init_hash, "data_hash": data_hash, "config": config.to_dict(),
            "graph": prepared.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "oscillation": osc.state_dict(),
            "rng": {**rng_state(), "torch_per_process": torch_states},
            "step": step, "epoch": epoch, "position": position, "history": history,
            "epoch_stats": dict(stats), "world_size": ctx.world_size, "complete": step >= total_steps,
        }
        return save_checkpoint(out_dir, payload)

    def stop(what: str) -> None:
        good = find_checkpoint(out_dir)
        kept = f"the last good checkpoint {good} is kept" if good else "no checkpoint was written yet"
        raise InputError(f"{what} at step {step + 1} (epoch {epoch + 1}, batch {position + 1} of "
                         f"{plan.steps_per_epoch}); training stopped, {kept}")

    set_mode(prepared, train=True, bn_frozen=bn_frozen)
    while epoch < config.epochs:
        indices = epoch_indices(len(train_data), plan, ctx.rank, epoch, config.seed)
        bar = tqdm(total=plan.steps_per_epoch, initial=position, desc=f"QAT epoch {epoch + 1}/{config.epochs}",
                   unit="batch", leave=False,
                   disable=None if (config.progress and ctx.is_main) else True)  # None: on a terminal only
        while position < plan.steps_per_epoch:
            t0 = time.perf_counter()
            if not bn_frozen and bn_step is not None and step >= bn_step:
                bn_frozen = True
                set_mode(prepared, train=True, bn_frozen=True)
            if not obs_frozen and obs_step is not None and step >= obs_step:
                obs_frozen = True
                freeze_observers(prepared)
            idx = indices[position * plan.local_batch:(position + 1) * plan.local_batch]
            x, y = train_data.images[idx], train_data.labels[idx]
            if config.augment:
                x = _augment(x, config.seed, step, slice(ctx.rank, plan.global_batch, ctx.world_size))
            x, y = x.to(ctx.device), y.to(ctx.device)
            bad_input = torch.tensor([0.0 if bool(torch.isfinite(x).all()) else 1.0], device=ctx.device)
            if float(all_sum(bad_input, ctx)[0]):
                stop("training images contain NaN or Inf values")
            osc.training_step = True
            failed = False
            try:
                logits = net(x)
                loss = criterion(logits, y)
                if teacher is not None:
                    loss = _distilled(loss, logits, teacher, x, config.distill, config.distill_temperature)
            except ValueError:  # an observer refused a non-finite activation: training diverged
                if all(bool(torch.isfinite(p).all()) for p in prepared.parameters()):
                    raise
                failed, loss, logits = True, torch.tensor(float("nan")), None
            finally:
                osc.training_step = False
            extra = osc.dampening_loss()
            local = torch.tensor([
                float(loss.detach()) * len(y) if not failed else float("nan"),
                float((logits.argmax(1) == y).sum()) if logits is not None else 0.0,
                float(len(y)),
            ], dtype=torch.float64, device=ctx.device)
            all_sum(local, ctx)
            if not math.isfinite(float(local[0])):
                stop("the loss is NaN or infinite")
            if extra is not None:
                loss = loss + extra
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grads = [q.grad for q in trainable if q.grad is not None]
            if grads and not math.isfinite(float(torch.nn.utils.get_total_norm(grads))):
                stop("the gradients are NaN or infinite")  # (after DDP's all-reduce: the same on every process)
            optimizer.step()
            scheduler.step()
            step += 1
            position += 1
            stats["loss_sum"] += float(local[0])
            stats["correct"] += float(local[1])
            stats["seen"] += float(local[2])
            stats["seconds"] += time.perf_counter() - t0
            bar.update(1)
            if position % 5 == 0 or position == plan.steps_per_epoch:
                bar.set_postfix(loss=f"{stats['loss_sum'] / stats['seen']:.3f}",
                                acc=f"{stats['correct'] / stats['seen']:.3f}",
                                img_s=f"{stats['seen'] / max(stats['seconds'], 1e-9):.0f}")
            if step % config.ckpt_every == 0 and position < plan.steps_per_epoch:
                last_ckpt = checkpoint() or last_ckpt
            if on_step is not None:
                on_step(step)
        bar.close()
        # ---- epoch end: evaluate, log, checkpoint
        val_acc = val_loss = None
        if val_data is not None:
            set_mode(prepared, train=False)
            val_acc, val_loss = _evaluate(prepared, val_data, ctx)
            set_mode(prepared, train=True, bn_frozen=bn_frozen)
        seen = max(stats["seen"], 1.0)
        row = {
            "epoch": epoch + 1, "step": step, "train_loss": round(stats["loss_sum"] / seen, 6),
            "train_acc": round(stats["correct"] / seen, 6),
            "val_loss": None if val_loss is None else round(val_loss, 6),
            "val_acc": None if val_acc is None else round(val_acc, 6),
            "images_per_s": round(stats["seen"] / max(stats["seconds"], 1e-9), 1),
            "seconds": round(stats["seconds"], 2), "lr": optimizer.param_groups[0]["lr"],
            "bn_frozen": bn_frozen, "observers_frozen": obs_frozen,
            **{k: round(v, 6) for k, v in osc.stats().items() if k in ("osc_freq", "osc_frozen")},
        }
        history.append(row)
        epoch, position = epoch + 1, 0
        stats = {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0, "seconds": 0.0}
        last_ckpt = checkpoint() or last_ckpt
        if ctx.is_main:
            _write_csv(csv_path, history)
            if config.progress:
                shown = "" if val_acc is None else f", val acc (fake-quant) {val_acc * 100:.2f} %"
                tqdm.write(f"QAT epoch {row['epoch']}/{config.epochs}: loss {row['train_loss']:.4f}, "
                           f"train acc {row['train_acc'] * 100:.2f} %{shown}, {row['images_per_s']:.0f} img/s")

    # ---- convert
    set_mode(prepared, train=False)
    baked = 0
    if any(bool(st.frozen.any()) for st in osc.layers.values()):
        baked = osc.bake(prepared, train_data.images[: min(len(train_data), 8)].to(ctx.device))
    osc.remove()
    prepared = prepared.to("cpu")
    converted = convert_trained(prepared, start_model, config.quant, train_data.images[:1],
                                train_data.images[: min(len(train_data), _CONVERT_CALIBRATION)])
    freeze_observers(prepared)  # training is over: calling the returned graph must not move its ranges
    int8_acc = _evaluate(converted.graph, val_data, ctx, device=torch.device("cpu"))[0] if val_data else None
    parts = {f.name: getattr(converted, f.name) for f in dataclasses.fields(QuantResult)}
    parts["findings"] = findings + converted.findings
    parts["fine_tuned"] = "qat"
    return QATResult(
        **parts, initial_model=model, prepared=prepared, checkpoint=last_ckpt,
        csv_log=csv_path if ctx.is_main else None, history=history, steps=step,
        val_accuracy=history[-1]["val_acc"] if history else None, int8_accuracy=int8_acc,
        osc_frozen_weights=baked, rank=ctx.rank,
    )
