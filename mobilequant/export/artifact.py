"""The exported file and what is known about it: :class:`Artifact`, atomic writes, metadata read-back.

Every artifact carries one metadata entry ``"mobilequant"`` (TFLite: a ``Model.metadata`` buffer; ONNX:
a ``metadata_props`` key) whose value is canonical JSON (sorted keys, no timestamps, so the same export
gives the same bytes): model name, target, recipe (its quantization and I/O settings; not the verification
settings, which the ``.verify.json`` report beside the file keeps), the ``--set`` overrides that changed
them, mobilequant version and the converter's, quant table sha256, the float weights' sha256
(:func:`weights_sha256`), class names and preprocessing, input layout and I/O type, the rewrites made, and
the name map (stable layer name → tensor name in the file). No absolute path goes into a file.

Files are written atomically (:func:`atomic_write`, :func:`atomic_write_all` for a file and its report):
bytes go to a temporary file in the destination directory, are flushed and fsync'ed, then
``os.replace``-d onto the destination. A failure at any point leaves no file at the destination (and an
earlier file there untouched) and is an :class:`InputError` (``cannot write PATH: REASON``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..errors import InputError, raise_if_stopped
from .tflite_file import TFLITE_METADATA_KEY, read_tflite

__all__ = ["Artifact", "atomic_write", "atomic_write_all", "load_artifact", "metadata_json", "file_sha256", "weights_sha256",
           "sidecar_path", "read_model_bytes", "check_model_file", "METADATA_KEY", "FORMAT_VERSION", "MAX_MODEL_BYTES"]

METADATA_KEY = TFLITE_METADATA_KEY
FORMAT_VERSION = 1
# the largest model file read: a TFLite flatbuffer (32-bit offsets) and an ONNX protobuf without external
# data (protobuf's message limit) cannot be larger than 2 GiB
MAX_MODEL_BYTES = 2 << 30


@dataclass
class Artifact:
    """An exported model file.

    ``metadata`` is what the file carries under ``"mobilequant"``; ``name_map`` maps stable layer names
    (``node.meta["mq_name"]``) to the names of the tensors holding their outputs in the file.
    ``census``, ``verification``, ``findings`` (the quantization's :class:`~mobilequant.quant.ptq.Finding`
    list: dead channels, repaired ranges, float fallbacks) and ``cle_summary`` (one line on cross-layer
    equalization, None when it did not run) are filled in by :func:`mobilequant.export.export`; an
    artifact read back with :func:`load_artifact` has neither of the last two.
    """

    path: Path
    target: str
    metadata: dict
    name_map: dict[str, str]
    census: object | None = None
    verification: object | None = None
    rewrites: list = field(default_factory=list)
    findings: list = field(default_factory=list)
    cle_summary: str | None = None

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


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read a MiB at a time (what the ``.verify.json`` report records)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(model) -> str:
    """sha256 of a model's float weights: of the sorted sha256s of its floating-point ``state_dict`` tensors
    (each over dtype, shape and bytes). The same weights give the same hash in any process (no pickling, no
    paths) and under any naming — the module, its captured graph, a DDP ``module.`` or ``torch.compile``
    wrapper, whose state_dict keys differ; any changed value or shape gives another. Integer buffers (BN's
    ``num_batches_tracked``, which a captured graph drops) are not weights. Export records it as
    ``weights_sha256``; the audit compares it with the model it is given."""
    import torch

    digests = []
    for t in model.state_dict().values():
        if not isinstance(t, torch.Tensor) or not torch.is_floating_point(t):
            continue
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        digests.append(h.hexdigest())
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


def sidecar_path(path: str | Path) -> Path:
    """The verification report export writes beside an artifact: ``<file name>.verify.json``."""
    path = Path(path)
    return path.with_name(path.name + ".verify.json")


def atomic_write(path: str | Path, data: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically.

    * The bytes go to a short-named temporary file (``.mq-XXXXXXXX.tmp``, so any name the file system
      allows can be written) in the destination's directory, are fsync'ed, then ``os.replace``-d onto it.
    * A symbolic link at ``path`` is written through: the file it points to is replaced and the link stays
      (a ``current.onnx -> releases/v3.onnx`` layout keeps its link).
    * A file replaced keeps its permission bits; a new one gets ``0o666`` less the umask, as ``open`` gives.
    * Any failure (no space, file size limit, read-only file system, an immutable file) is an
      :class:`InputError` ``cannot write PATH: REASON``; the temporary file is removed and an earlier file
      at ``path`` is untouched.
    """
    return atomic_write_all([(path, data)])[0]


def atomic_write_all(files: Sequence[tuple[str | Path, bytes | Callable[[BinaryIO], None]]]) -> list[Path]:
    """Write several files (``(path, data)`` pairs, as :func:`atomic_write`) as one step: every temporary
    file is written and fsync'ed before any is renamed into place, so a failure while writing (no space,
    a name too long) leaves every destination as it was, and so does a stop (Ctrl-C, SIGTERM) the CLI
    received before the renames, even one a library caught and dropped. Only a failing rename (rare: an
    immutable destination) can leave the earlier ones replaced; its error names them."""
    pending: list[tuple[str, Path, Path]] = []  # (temporary file, file it replaces, path given)
    done: list[Path] = []
    try:
        for path, data in files:
            path = Path(path)
            dest = _destination(path)
            try:
                fd, tmp = tempfile.mkstemp(prefix=".mq-", suffix=".tmp", dir=dest.parent)
            except OSError as e:
                raise _cannot_write(path, e) from None
            pending.append((tmp, dest, path))
            try:
                with os.fdopen(fd, "wb") as f:
                    os.chmod(tmp, _mode_for(dest))
                    if callable(data):
                        data(f)
                    else:
                        f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise _cannot_write(path, e) from None
        raise_if_stopped()  # a Ctrl-C / SIGTERM a library swallowed while the files were made: replace nothing
        while pending:
            tmp, dest, path = pending[0]
            try:
                os.replace(tmp, dest)
            except OSError as e:
                raise _cannot_write(path, e, done) from None
            pending.pop(0)
            done.append(path)
    finally:
        for tmp, _, _ in pending:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return done


def _destination(path: Path) -> Path:
    """The file that writing ``path`` replaces: the target of a symbolic link, else ``path`` itself."""
    dest = Path(os.path.realpath(path)) if path.is_symlink() else path
    directory = dest.parent if str(dest.parent) else Path(".")
    if not directory.is_dir():
        via = f" (the link points to {dest})" if dest != path else ""
        raise InputError(f"cannot write {path}: directory {directory} does not exist{via}")
    if dest.is_dir():
        raise InputError(f"cannot write {path}: it is a directory (give a file name)")
    return dest


def _mode_for(dest: Path) -> int:
    """Permission bits of the file written at ``dest``: those of the file it replaces, else what ``open``
    would give a new file (``0o666`` less the umask; mkstemp's own mode is 0o600)."""
    try:
        return stat.S_IMODE(os.stat(dest).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it: ``os.umask`` can only be read by setting it, and
    another thread creating a file between the set and the restore would get the wrong mode. Linux (4.7+)
    shows it in /proc/self/status; elsewhere the set-and-restore pair is the only way."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _cannot_write(path: Path, e: OSError, done: Sequence[Path] = ()) -> InputError:
    replaced = f" ({', '.join(map(str, done))} already replaced)" if done else ""
    return InputError(f"cannot write {path}: {e.strerror or e}{replaced}")


def check_model_file(path: str | Path, what: str = "model") -> int:
    """The size of the model file at ``path``, or :class:`InputError` (``cannot read WHAT PATH: REASON``)
    when it is missing, not a regular file (``/dev/zero``, a pipe: read without end) or larger than
    :data:`MAX_MODEL_BYTES` (a 20 GB sparse file was read into memory whole). Checked before any read."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"cannot read {what} {path}: it is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"cannot read {what} {path}: not a regular file")
    if st.st_size > MAX_MODEL_BYTES:
        raise InputError(f"cannot read {what} {path}: it is {st.st_size / (1 << 30):.1f} GiB, larger than the "
                         f"{MAX_MODEL_BYTES / (1 << 30):g} GiB a TFLite file or an ONNX file without external data "
                         "can be")
    return st.st_size


def read_model_bytes(path: str | Path, what: str = "model") -> bytes:
    """The bytes of a model file, checked first by :func:`check_model_file`; read no further than its limit
    even if the file grows meanwhile."""
    check_model_file(path, what)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MODEL_BYTES + 1)
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except MemoryError:
        raise InputError(f"cannot read {what} {path}: not enough memory to hold it") from None
    if len(data) > MAX_MODEL_BYTES:
        raise InputError(f"cannot read {what} {path}: larger than {MAX_MODEL_BYTES / (1 << 30):g} GiB")
    return data


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
    data = read_model_bytes(path, "model")
    if len(data) >= 8 and data[4:8] == b"TFL3":
        meta = _read_metadata_tflite(data, path)
        fmt = "tflite"
    else:
        meta = _read_metadata_onnx(data, path)
        fmt = "onnx"
    target = str(meta.get("target") or f"{fmt}-unknown")
    return Artifact(path=path, target=target, metadata=meta, name_map=dict(meta.get("name_map") or {}),
                    rewrites=list(meta.get("rewrites") or []))
