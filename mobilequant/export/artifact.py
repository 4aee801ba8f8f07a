"""The exported file and what is known about it: :class:`Artifact`, atomic writes, metadata read-back.

Every artifact carries one metadata entry ``"mobilequant"`` (TFLite: a ``Model.metadata`` buffer; ONNX:
a ``metadata_props`` key) whose value is canonical JSON (sorted keys, no timestamps, so the same export
gives the same bytes): model name, target, recipe, mobilequant version, quant table sha256, input layout
and I/O type, the rewrites made, and the name map (stable layer name → tensor name in the file).

Files are written atomically: bytes go to a temporary file in the destination directory, are flushed
and fsync'ed, then ``os.replace``-d onto the destination. A failure at any point leaves no file at the
destination (and an earlier file there untouched).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..errors import InputError
from .tflite_file import TFLITE_METADATA_KEY, read_tflite

__all__ = ["Artifact", "atomic_write", "load_artifact", "metadata_json", "METADATA_KEY", "FORMAT_VERSION"]

METADATA_KEY = TFLITE_METADATA_KEY
FORMAT_VERSION = 1


@dataclass
class Artifact:
    """An exported model file.

    ``metadata`` is what the file carries under ``"mobilequant"``; ``name_map`` maps stable layer names
    (``node.meta["mq_name"]``) to the names of the tensors holding their outputs in the file.
    ``census`` and ``verification`` are filled in by :func:`mobilequant.export.export`.
    """

    path: Path
    target: str
    metadata: dict
    name_map: dict[str, str]
    census: object | None = None
    verification: object | None = None
    rewrites: list = field(default_factory=list)

    @property
    def format(self) -> str:
        return "tflite" if self.path.suffix == ".tflite" or self.metadata.get("format") == "tflite" else "onnx"

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    @property
    def verified(self) -> bool | None:
        """True / False after verification, None when it was not run."""
        return None if self.verification is None else bool(self.verification.passed)

    def __repr__(self) -> str:
        state = {None: "not verified", True: "verified", False: "FAILED verification"}[self.verified]
        return f"Artifact({str(self.path)!r}, target={self.target!r}, {state})"


def metadata_json(metadata: dict) -> str:
    """Canonical JSON of the metadata (what goes into the file)."""
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"), allow_nan=False)


def atomic_write(path: str | Path, data: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise InputError(f"cannot write {path}: directory {directory} does not exist")
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a directory (give a file name)")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with _suppress_oserror():
            os.unlink(tmp)
        raise
    return path


class _suppress_oserror:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return exc_type is not None and issubclass(exc_type, OSError)


def _read_metadata_tflite(data: bytes, path: Path) -> dict:
    info = read_tflite(data, str(path))
    raw = info.metadata.get(METADATA_KEY)
    return _parse(raw, path) if raw is not None else {}


def _read_metadata_onnx(data: bytes, path: Path) -> dict:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError):
        raise InputError(f"{path} is not a TFLite or ONNX model (truncated or corrupt)") from None
    if not model.graph.node:
        raise InputError(f"{path} is not a TFLite or ONNX model (no graph)")
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return _parse(prop.value.encode(), path)
    return {}


def _parse(raw: bytes, path: Path) -> dict:
    try:
        meta = json.loads(raw.rstrip(b"\0").decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InputError(f"{path}: the {METADATA_KEY!r} metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: the {METADATA_KEY!r} metadata is not a JSON object")
    return meta


def load_artifact(path: str | Path) -> Artifact:
    """Read an exported file back: format from content, metadata and name map from the file.

    :class:`InputError` for a missing, truncated or non-model file. A model without mobilequant metadata
    loads with empty metadata (target guessed from the format).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) >= 8 and data[4:8] == b"TFL3":
        meta = _read_metadata_tflite(data, path)
        fmt = "tflite"
    else:
        meta = _read_metadata_onnx(data, path)
        fmt = "onnx"
    target = str(meta.get("target") or f"{fmt}-unknown")
    return Artifact(path=path, target=target, metadata=meta, name_map=dict(meta.get("name_map") or {}),
                    rewrites=list(meta.get("rewrites") or []))
