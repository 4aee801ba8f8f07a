"""QAT checkpoints: atomic writes, the last two kept, loaded with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and primitive containers only (so ``weights_only=True`` loads it):

==================  ===========================================================================
``format``          ``"mobilequant-qat-checkpoint"``, ``version`` 1
``model``           zoo model name; ``recipe_hash`` / ``recipe`` (the training options); ``init_hash``
                    (sha256 of the starting weights, and of the PTQ table when started from PTQ)
``config``          the whole :class:`~mobilequant.qat.config.QATJobConfig` as a dict
``graph``           ``state_dict()`` of the prepared QAT graph: weights, BN statistics, fake-quant
                    scales / zero points, observer statistics and on/off flags
``optimizer``       ``optimizer.state_dict()``; ``scheduler``: the LR scheduler's state dict
``oscillation``     state of the depthwise oscillation tracker (may be empty)
``rng``             torch (per process, ``world_size × n`` uint8), CUDA, numpy and python RNG states as tensors
``step`` …          global ``step``, ``epoch`` (0-based, the one in progress), ``position`` (batches of that
                    epoch done = data-order position), ``epoch_stats`` (running sums of the epoch in
                    progress), ``history`` (finished epochs' rows), ``world_size``, ``complete``
==================  ===========================================================================

Files: ``qat-last.pt`` and ``qat-prev.pt`` in the job's folder. A write goes to a temp file in the same
folder (fsync), then ``qat-last.pt`` becomes ``qat-prev.pt`` and the temp file becomes ``qat-last.pt``
(``os.replace`` both). A crash at any point leaves at least one complete checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import InputError

__all__ = [
    "FORMAT",
    "VERSION",
    "LAST",
    "PREV",
    "save_checkpoint",
    "load_checkpoint",
    "find_checkpoint",
    "rng_state",
    "set_rng_state",
    "state_fingerprint",
]

FORMAT = "mobilequant-qat-checkpoint"
VERSION = 1
LAST = "qat-last.pt"
PREV = "qat-prev.pt"
_REQUIRED = ("format", "version", "model", "recipe_hash", "init_hash", "config", "graph", "optimizer",
             "scheduler", "rng", "step", "epoch", "position", "history", "epoch_stats", "world_size")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(folder: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically as ``qat-last.pt``; the previous last becomes ``qat-prev.pt``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    last, prev = folder / LAST, folder / PREV
    tmp = folder / f".{LAST}.{os.getpid()}.tmp"
    payload = {"format": FORMAT, "version": VERSION, **payload}
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        if last.exists():
            os.replace(last, prev)
        os.replace(tmp, last)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(folder)
    return last


def find_checkpoint(folder: str | os.PathLike) -> Path | None:
    """``qat-last.pt`` if present, else ``qat-prev.pt`` (a crash between the two renames), else None."""
    folder = Path(folder)
    for name in (LAST, PREV):
        if (folder / name).is_file():
            return folder / name
    return None


class _CarriesCode(Exception):
    """A file that pickles code, which weights-only loading refuses: not corrupt, and never to be run."""


def _read(path: Path) -> dict[str, Any]:
    """Load and check the structure; raises ``ValueError`` with the reason when it is not usable, and
    :class:`_CarriesCode` (the global it pickles) for a file that carries code."""
    import pickle

    from ..models.loading import pickled_code, unpickling_reason

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's text advises weights_only=False: never pass that on
        code = pickled_code(e)
        if code:
            raise _CarriesCode(code) from None
        raise ValueError(f"weights-only unpickling stopped: {unpickling_reason(e)}") from None
    except Exception as e:  # torch.load raises many types (pickle, zip, EOF, runtime) for a bad file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]  # its first sentence
        raise ValueError(f"{type(e).__name__}: {first if len(first) <= 200 else first[:199] + '…'}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError("not a mobilequant QAT checkpoint")
    if ckpt.get("version") != VERSION:
        raise ValueError(f"checkpoint version {ckpt.get('version')!r}, this mobilequant reads {VERSION}")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    return ckpt


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint; a corrupt one raises :class:`InputError` naming the intact previous one, if any."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no checkpoint at {path}")
    try:
        return _read(path)
    except _CarriesCode as code:
        raise InputError(f"checkpoint {path} was refused because it carries code (it pickles {code}), which "
                         "weights-only loading never runs; resume from a qat-last.pt / qat-prev.pt that "
                         "`mobilequant qat` wrote") from None
    except ValueError as why:
        hint = ""
        other = path.with_name(PREV if path.name == LAST else LAST)
        if other != path and other.is_file():
            try:
                ok = _read(other)
                hint = (f"; the other checkpoint {other} (step {ok['step']}) is intact: "
                        f"resume from it with --resume-from {other} (resume_from={str(other)!r})")
            except (ValueError, _CarriesCode):
                hint = f"; {other} is unusable too"
        raise InputError(f"checkpoint {path} is corrupt ({why}); refusing to resume from it{hint}") from None


# ---------------------------------------------------------------------------------------------------
# RNG states as tensors


def rng_state() -> dict[str, torch.Tensor]:
    """torch / CUDA / numpy / python RNG states of this process, as tensors."""
    np_state = np.random.get_state()
    py_version, py_keys, py_gauss = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_meta": torch.tensor([float(np_state[2]), float(np_state[3]), float(np_state[4])],
                                   dtype=torch.float64),
        "python_keys": torch.tensor(py_keys, dtype=torch.int64),
        "python_meta": torch.tensor([float(py_version), float("nan") if py_gauss is None else py_gauss],
                                    dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    pos, has_gauss, cached = state["numpy_meta"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss),
                         float(cached)))
    version, gauss = state["python_meta"].tolist()
    random.setstate((int(version), tuple(int(k) for k in state["python_keys"].tolist()),
                     None if gauss != gauss else gauss))


def state_fingerprint(module: nn.Module, extra: str = "") -> str:
    """sha256 (16 hex digits) of a module's state dict (names, dtypes, shapes, bytes) and ``extra``."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(extra.encode())
    return h.hexdigest()[:16]
