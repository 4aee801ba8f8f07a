"""Users' own models and checkpoints.

``load_model(spec, checkpoint=None, **kw)`` accepts

* a registered name (``"mobilenetv2_100"``): :func:`create_model`;
* ``"pkg.module:factory"``: imports the module and calls ``factory(**kw)``;
* ``"path/to/file.py:factory"``: loads the file as a module and calls ``factory(**kw)``.

``load_checkpoint(model, path)`` reads weights with ``torch.load(..., weights_only=True)`` only: a file
that pickles code (a whole ``nn.Module``, a custom class, an ``os.system`` call) is refused, never run.
Every failure is a :class:`~mobilequant.errors.MobileQuantError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import pickle
import re
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import InputError, UsageError, did_you_mean
from ._layers import make_preprocess
from ._registry import _model_entrypoints, create_model, model_info

__all__ = ["load_model", "load_checkpoint", "read_state_dict"]

_SHOW = 3  # how many key names an error message lists


def load_model(spec: str, checkpoint: str | Path | None = None, **kwargs) -> nn.Module:
    """Build a model from a registered name or a ``module:factory`` / ``file.py:factory`` spec.

    ``kwargs`` go to the factory. A zoo model given a checkpoint takes the class count and input channels
    the checkpoint was trained with (unless ``num_classes`` / ``in_chans`` are given). A model without a
    ``preprocess`` attribute gets ImageNet's
    preprocessing at 224×224 with as many channels as its first convolution takes (set ``model.preprocess``
    in the factory to choose). ``checkpoint`` is then loaded with :func:`load_checkpoint` (strict).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"model spec must be a model name or 'module:factory', got {spec!r}")
    spec = spec.strip()
    state = None if checkpoint is None else read_state_dict(checkpoint)  # read once: fitted, then loaded
    if spec in _model_entrypoints or ":" not in spec:
        model_info(spec)  # unknown names: UsageError with close matches
        model = create_model(spec, **kwargs)
        if state is not None and not {"num_classes", "in_chans"} & set(kwargs):
            model = _fit_to_checkpoint(spec, model, state, kwargs)
    else:
        model = _call_factory(spec, kwargs)
        if not hasattr(model, "preprocess"):
            model.preprocess = make_preprocess(_first_conv_channels(model))
        model.model_name = spec
    if state is not None:
        _load_state(model, state, checkpoint)
    return model


def _fit_to_checkpoint(spec: str, model: nn.Module, state: dict, kwargs: dict) -> nn.Module:
    """The zoo model rebuilt with the class count and input channels a checkpoint was trained with (a
    MobileNetV2 fine-tuned on 10 grey classes), read from the shapes of its first and last weights."""
    own = model.state_dict()
    state = _without_wrapper_prefix(state, own)
    weights = [k for k, v in own.items() if v.dim() >= 2]
    if not weights or not all(k in state for k in (weights[0], weights[-1])):
        return model  # keys that do not fit: load_checkpoint says which
    first, last = state[weights[0]], state[weights[-1]]
    in_chans, classes = int(first.shape[1]), int(last.shape[0])
    if first.dim() != 4 or (in_chans, classes) == (own[weights[0]].shape[1], own[weights[-1]].shape[0]):
        return model
    try:
        return create_model(spec, num_classes=classes, in_chans=in_chans, **kwargs)
    except Exception:  # noqa: BLE001 - a shape this family cannot take: load_checkpoint names the mismatch
        return model


def _call_factory(spec: str, kwargs: dict) -> nn.Module:
    source, _, attr = spec.rpartition(":")  # rpartition: a Windows drive letter keeps its colon
    if not source or not attr:
        raise UsageError(f"model spec {spec!r}: expected 'package.module:factory' or 'path/to/file.py:factory'")
    module = _import_source(source)
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
            raise UsageError(f"model spec {spec!r}: {source} has no {attr!r}{did_you_mean(part, names)}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise UsageError(f"model spec {spec!r}: {attr!r} is not callable")
    try:
        model = factory(**kwargs)
    except TypeError as e:
        raise UsageError(f"model spec {spec!r}: calling {attr}({_fmt_kwargs(kwargs)}) failed: {e}") from e
    except Exception as e:  # the user's factory raised: one line naming it (the cause keeps the traceback)
        raise InputError(f"model spec {spec!r}: the factory {attr}({_fmt_kwargs(kwargs)}) raised "
                         f"{type(e).__name__}: {_first_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise InputError(f"model spec {spec!r}: {attr}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_here(source: str):
    """``importlib.import_module(source)``, looking in the current folder too, as ``python -m`` does: a
    console script's sys.path holds its own folder instead, so ``--model my_pkg.nets:build`` run beside
    ``my_pkg/`` failed with "No module named 'my_pkg'" unless PYTHONPATH=. was set."""
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as e:
        here = os.getcwd()
        top = source.split(".", 1)[0]
        if e.name != top or here in sys.path or "" in sys.path or "." in sys.path:
            raise
        sys.path.insert(0, here)  # kept on success: the module may import its siblings later
        try:
            return importlib.import_module(source)
        except ModuleNotFoundError as again:
            if again.name == top:
                sys.path.remove(here)
                raise e from None
            raise


def _import_source(source: str):
    looks_like_file = source.endswith(".py") or "/" in source or "\\" in source
    if not looks_like_file:
        try:
            return _import_here(source)
        except ModuleNotFoundError as e:
            if e.name is not None and source.startswith(e.name):
                raise InputError(f"cannot import module {source!r}: {e} (looked on sys.path and in the current "
                                 f"folder {os.getcwd()}; put the package's parent folder on PYTHONPATH)") from e
            raise InputError(f"importing module {source!r} failed: {type(e).__name__}: {e}") from e
        except Exception as e:  # the user's module raised while importing
            raise InputError(f"importing module {source!r} failed: {type(e).__name__}: {e}") from e
    path = Path(source).expanduser()
    if not path.is_file():
        raise InputError(f"model file {path}{_not_a_file(path)}")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    name = f"mobilequant_user_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"model file {path}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # so dataclasses / pickling inside the file can find their module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise InputError(f"model file {path} failed to import: {type(e).__name__}: {e}") from e
    return module


def _not_a_file(path: Path) -> str:
    """What ``path`` is, for one that is not a regular file, to follow its name: ": no such file",
    " is a directory, not a Python file", " is a character device, not a Python file" (``/dev/null``)."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return ": no such file"
    except OSError as e:
        return f": cannot be read ({e.strerror or e})"
    if stat.S_ISDIR(mode):
        return " is a directory, not a Python file"
    kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
             (stat.S_ISSOCK, "a socket"))
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f" is {kind}, not a Python file"


def _fmt_kwargs(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _first_conv_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict in a checkpoint file: a raw state_dict, or a dict holding one under
    ``"state_dict"`` or ``"model"``. Read with ``weights_only=True``; code-carrying pickles are refused."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"checkpoint {path}: no such file")
    if not path.is_file():
        raise InputError(f"checkpoint {path}: not a file")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = pickled_code(e)
        if code:
            raise InputError(
                f"checkpoint {path} was refused because it carries code (it pickles {code}), which "
                "weights-only loading never runs; save and share model.state_dict() instead"
            ) from None
        raise InputError(f"checkpoint {path} is not a PyTorch weights file that loads safely "
                         f"(weights-only unpickling stopped: {unpickling_reason(e)})") from None
    except EOFError:
        raise InputError(f"checkpoint {path} is empty or truncated") from None
    except Exception as e:  # a malformed file can break the unpickler in many ways
        raise InputError(f"checkpoint {path} is not a PyTorch checkpoint (torch.save file) that can be read: "
                         f"{type(e).__name__}: {_first_line(e)}") from None
    if isinstance(obj, dict) and obj.get("format") == "mobilequant-qat-checkpoint":  # mobilequant.qat.checkpoint
        raise InputError(f"checkpoint {path} is a QAT job checkpoint (`mobilequant qat`), not model weights: it "
                         "continues training (qat --resume); audit the job's exported files without --weights, "
                         "or in Python against the trained model: run_audit(file, data, quant_result=result)")
    state = obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
    if not isinstance(state, dict):
        raise InputError(f"checkpoint {path} holds a {type(state).__name__}, not a state_dict "
                         "(a dict of tensors, optionally under 'state_dict' or 'model')")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise InputError(f"checkpoint {path}: {len(not_tensors)} entries are not tensors "
                         f"({_names(not_tensors)}); expected a state_dict, optionally under 'state_dict' or 'model'")
    return state


def pickled_code(error: BaseException) -> str | None:
    """The global (``posix.system``, ``pkg.MyModel``) a file pickles that ``torch.load(weights_only=True)``
    refused to load, from its error; ``None`` when the error is not such a refusal."""
    found = re.search(r"\bGLOBAL (\S+)", str(error))
    return found.group(1) if found else None


def unpickling_reason(error: BaseException) -> str:
    """Why weights-only unpickling stopped, in one line: torch's own reason, without the advice around it
    (torch suggests re-running with ``weights_only=False``, which runs whatever code the file carries)."""
    text = str(error)
    text = text.partition("WeightsUnpickler error:")[2] or text
    for line in text.splitlines():
        line = line.strip().removeprefix("Weights only load failed.").strip()
        if line and "weights_only" not in line and "trusted source" not in line \
                and not line.startswith(("Check the documentation", "Please file an issue")):
            return line
    return type(error).__name__


def load_checkpoint(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load a checkpoint into ``model`` (in place) and return the model.

    A wrapper's prefix on every key (``module.`` of ``DataParallel``, ``model.`` of a Lightning module,
    or several) is removed when the keys fit the model without it. A mismatch raises :class:`InputError`
    naming the file, the first missing / unexpected keys and any shape mismatches; with ``strict=False``
    missing / unexpected keys only warn (shapes must still fit).
    """
    return _load_state(model, read_state_dict(path), path, strict)


def _load_state(model: nn.Module, state: dict, path: str | Path, strict: bool = True) -> nn.Module:
    """:func:`load_checkpoint` of a state_dict already read from ``path`` (named in messages)."""
    own = model.state_dict()
    state = _without_wrapper_prefix(state, own)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_names(unexpected)})")
    if mismatched:
        shown = ", ".join(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                          for k in mismatched[:_SHOW])
        more = f", … {len(mismatched) - _SHOW} more" if len(mismatched) > _SHOW else ""
        problems.append(f"{len(mismatched)} shape mismatches ({shown}{more})")
    name = getattr(model, "model_name", type(model).__name__)
    if mismatched or (strict and problems):
        inside = _prefixes_holding(state, own)
        hint = (f"; the model's keys are all found under {' and under '.join(map(repr, inside))} "
                "(save that part as the state_dict)" if inside else "")
        raise InputError(f"checkpoint {path} does not fit {name}: " + "; ".join(problems) + hint)
    if problems:
        warnings.warn(f"checkpoint {path} loaded into {name} non-strictly: " + "; ".join(problems), stacklevel=3)
    model.load_state_dict(state, strict=strict)
    return model


def _without_wrapper_prefix(state: dict, own: dict) -> dict:
    """``state`` without the dotted prefix its every key shares (``module.``, ``model.``, ``model.net.``),
    when that prefix is not the model's own and its removal makes the keys fit the model better."""
    def fit(keys) -> int:
        return len(own.keys() & set(keys))

    best, best_fit = state, fit(state)
    first = next(iter(state), "").split(".")
    for depth in range(1, len(first)):
        prefix = ".".join(first[:depth]) + "."
        if not all(k.startswith(prefix) for k in state) or any(k.startswith(prefix) for k in own):
            break
        stripped = {k[len(prefix):]: v for k, v in state.items()}
        if fit(stripped) > best_fit:
            best, best_fit = stripped, fit(stripped)
    return best


def _prefixes_holding(state: dict, own: dict) -> list[str]:
    """The dotted prefixes under which ``state`` holds every one of the model's keys (others beside them)."""
    prefixes = {k[:len(k) - len(o)] for k in state for o in own if k.endswith("." + o)}
    return sorted(p for p in prefixes if all(p + o in state for o in own))


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f", … {len(keys) - _SHOW} more" if len(keys) > _SHOW else "")


def _first_line(e: BaseException | str) -> str:
    text = str(e).strip()
    if not text:
        return type(e).__name__
    return text.splitlines()[0]
