"""Writing files and streams as the CLI meets them: a write that fails (no space, a file size limit, an
immutable file), a file and its report as a pair, long names, a symlinked output, permission bits, a closed
or full stdout, a non-UTF-8 locale, no temporary directory, ``-W error`` and a closed stderr. Each failure
is one line and exit 2 (141 for a closed pipe), and a good file at the output path survives it."""

from __future__ import annotations

import errno
import io
import os
import resource
import signal
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from mobilequant import cli
from mobilequant.cli import main
from mobilequant.errors import InputError, Terminated, UsageError, note_stop, stop_signal
from mobilequant.export.artifact import atomic_write

TINY = textwrap.dedent("""
    import torch
    import torch.nn as nn
    from mobilequant.models import FASHION_MNIST

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, 10)
            self.preprocess = FASHION_MNIST

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))

    def build():
        torch.manual_seed(0)
        return Tiny().eval()
""")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("writing")
    (d / "tiny.py").write_text(TINY)
    np.save(d / "x.npy", np.random.default_rng(0).standard_normal((8, 1, 32, 32)).astype(np.float32))
    return d


def _export(d: Path, out: Path, *extra: str) -> list[str]:
    return ["export", "--target", "onnx-fp32", "--model", f"{d / 'tiny.py'}:build", "--eval-data",
            str(d / "x.npy"), "-o", str(out), *extra]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("mobilequant: error:")]
    assert len(errors) == 1, err
    return errors[0]


def _failing(exc: OSError, after: int = 0):
    """A stand-in for an os function that works ``after`` times, then raises ``exc``."""
    calls = {"n": 0}

    def wrap(real):
        def fn(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > after:
                raise exc
            return real(*args, **kwargs)
        return fn
    return wrap


# ------------------------------------------------------------------------------- 1: a failed write
@pytest.mark.parametrize("func, err", [
    ("fsync", errno.ENOSPC),  # the disk fills
    ("replace", errno.EPERM),  # chattr +i on the file replaced
    ("replace", errno.EROFS),
], ids=["ENOSPC", "EPERM-immutable", "EROFS"])
def test_failed_write_is_an_input_error_and_keeps_the_old_file(tmp_path, monkeypatch, func, err):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"GOOD")
    monkeypatch.setattr(os, func, _failing(OSError(err, os.strerror(err)))(getattr(os, func)))
    with pytest.raises(InputError, match=f"cannot write {path}: {os.strerror(err)}$"):
        atomic_write(path, b"new bytes")
    assert path.read_bytes() == b"GOOD"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"], "the temporary file is removed"


def test_file_size_limit_is_an_input_error(tmp_path):
    """``ulimit -f``: Python ignores SIGXFSZ, so the write fails with EFBIG."""
    path = tmp_path / "m.onnx"
    path.write_bytes(b"GOOD")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(InputError, match="File too large"):
            atomic_write(path, b"x" * 100_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert path.read_bytes() == b"GOOD"
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_cli_write_failure_is_one_line_exit_2(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"GOOD")
    monkeypatch.setattr(os, "replace", _failing(OSError(errno.EPERM, "Operation not permitted"))(os.replace))
    assert main(_export(tiny, out, "--no-verify")) == 2
    assert _one_error_line(capsys.readouterr().err) == f"mobilequant: error: cannot write {out}: Operation not permitted"
    assert out.read_bytes() == b"GOOD"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


# ------------------------------------------------------------------------ 2: file and report as a pair
def test_file_and_report_written_as_a_pair(tiny, tmp_path, monkeypatch, capsys):
    """The disk fills while the report is written: the file had been renamed into place already, so the
    failed run replaced the good file and left the old report describing another one."""
    out = tmp_path / "m.onnx"
    out.write_bytes(b"GOOD")
    (tmp_path / "m.onnx.verify.json").write_text("OLD")
    monkeypatch.setattr(os, "fsync", _failing(OSError(errno.ENOSPC, "No space left on device"), after=1)(os.fsync))
    assert main(_export(tiny, out)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"mobilequant: error: cannot write {out}.verify.json: No space left on device"
    assert out.read_bytes() == b"GOOD" and (tmp_path / "m.onnx.verify.json").read_text() == "OLD"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.verify.json"]


def test_write_all_renames_nothing_until_every_file_is_written(tmp_path):
    from mobilequant.export.artifact import atomic_write_all

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"old a")

    def fails(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(InputError, match=f"cannot write {b}: No space"):
        atomic_write_all([(a, b"new a"), (b, fails)])
    assert a.read_bytes() == b"old a" and os.listdir(tmp_path) == ["a"]
    assert atomic_write_all([(a, b"new a"), (b, b"new b")]) == [a, b]
    assert a.read_bytes() == b"new a" and b.read_bytes() == b"new b"


# ------------------------------------------------------------------------------------ 6: long names
def test_longest_legal_name_is_written(tmp_path):
    """The temporary file's name had been the file's name plus ~14 bytes: a 250-byte name failed."""
    path = tmp_path / ("n" * 250 + ".onnx")
    atomic_write(path, b"data")
    assert path.read_bytes() == b"data" and os.listdir(tmp_path) == [path.name]


def test_name_too_long_for_its_companions_is_refused_before_any_work(tiny, tmp_path, monkeypatch, capsys):
    import mobilequant.api as api

    def no_work(*args, **kwargs):
        raise AssertionError("the export started its work")

    monkeypatch.setattr(api, "_load", no_work)
    out = tmp_path / ("m" * 240 + ".onnx")  # legal (245 bytes); its .failed.onnx.verify.json is 264
    assert main(_export(tiny, out)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "<name>.failed.onnx.verify.json, would have 264 bytes, over the limit of 255" in line, line
    assert "shorten the name by 9 bytes" in line
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------- 7: symlinks
def test_symlinked_output_is_written_through(tmp_path):
    (tmp_path / "releases").mkdir()
    target = tmp_path / "releases" / "v3.onnx"
    target.write_bytes(b"v3")
    link = tmp_path / "current.onnx"
    link.symlink_to(Path("releases") / "v3.onnx")
    assert atomic_write(link, b"v4") == link
    assert link.is_symlink() and os.readlink(link) == str(Path("releases") / "v3.onnx")
    assert target.read_bytes() == b"v4"
    assert sorted(os.listdir(tmp_path)) == ["current.onnx", "releases"]
    assert os.listdir(tmp_path / "releases") == ["v3.onnx"]


def test_link_into_a_missing_directory_is_refused_before_any_work(tmp_path):
    from mobilequant.api import _output_path

    link = tmp_path / "m.onnx"
    link.symlink_to(tmp_path / "gone" / "m.onnx")
    with pytest.raises(UsageError, match="is a link to .*gone/m.onnx, whose directory does not exist"):
        _output_path(str(link), "tiny", ".onnx", "onnx-fp32")


# -------------------------------------------------------------------------------- 8: permission bits
@pytest.mark.parametrize("umask, existing, expected", [
    (0o022, None, 0o644), (0o077, None, 0o600), (0o002, None, 0o664),
    (0o022, 0o600, 0o600), (0o022, 0o664, 0o664),
])
def test_mode_of_the_file_replaced_or_from_the_umask(tmp_path, umask, existing, expected):
    path = tmp_path / "m.onnx"
    if existing is not None:
        path.write_bytes(b"old")
        os.chmod(path, existing)
    previous = os.umask(umask)
    try:
        atomic_write(path, b"new")
    finally:
        os.umask(previous)
    assert oct(path.stat().st_mode & 0o777) == oct(expected)


# --------------------------------------------------------------------------------------- 3: stdout
def test_closed_pipe_on_stdout_exits_quietly(monkeypatch, capsys):
    r, w = os.pipe()
    os.close(r)  # the reader went away (`| head -1`, `| true`)
    stream = open(w, "w")  # noqa: SIM115
    monkeypatch.setattr(sys, "stdout", stream)
    try:
        assert main(["zoo", "list"]) == cli.EXIT_BROKEN_PIPE == 141
    finally:
        stream.close()
    assert capsys.readouterr().err == ""


def test_closed_pipe_in_a_real_process_has_no_traceback():
    """The interpreter's own flush at exit had raised again after the command."""
    proc = subprocess.Popen([sys.executable, "-m", "mobilequant", "zoo", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


def test_full_stdout_is_one_error_line(monkeypatch, capsys):
    stream = open("/dev/full", "w")  # noqa: SIM115
    monkeypatch.setattr(sys, "stdout", stream)
    try:
        assert main(["zoo", "list"]) == 2
    finally:
        stream.close()
    line = _one_error_line(capsys.readouterr().err)
    assert line == "mobilequant: error: cannot write to standard output: No space left on device"


# ------------------------------------------------------------------------------------ 4: encodings
@pytest.mark.parametrize("encoding, errors", [("ascii", "strict"), ("latin-1", "strict"),
                                              ("ascii", "surrogateescape")],  # PYTHONUTF8=0 in the C locale
                         ids=["ascii", "latin-1", "C-locale"])
def test_stdout_that_cannot_encode_the_progress_line(tiny, tmp_path, monkeypatch, capsys, encoding, errors):
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding=encoding, errors=errors))
    assert main(_export(tiny, tmp_path / "m.onnx", "--no-verify")) == 0
    sys.stdout.flush()
    assert b"build \\u2192 onnx-fp32" in raw.getvalue()


# ---------------------------------------------------------------------------- 5: no temporary dir
def _no_temp_dir(*args, **kwargs):
    raise FileNotFoundError(errno.ENOENT, "No usable temporary directory found in ['/tmp', '/var/tmp']")


def test_quiet_without_a_temporary_directory_holds_nothing(monkeypatch, capfd):
    monkeypatch.setattr(sys, "stderr", open(2, "w", closefd=False))  # noqa: SIM115 - what -q holds: fd 2
    monkeypatch.setattr(tempfile, "TemporaryFile", _no_temp_dir)
    with cli._native_stderr_held(True):
        os.write(2, b"native log line\n")
    assert "native log line" in capfd.readouterr().err


def test_no_temporary_directory_is_one_line_naming_tmpdir(monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "gettempdir", _no_temp_dir)
    monkeypatch.delenv("TMPDIR", raising=False)
    assert main(["zoo", "list"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "no usable temporary directory (TMPDIR is not set" in line and "set TMPDIR" in line


# ---------------------------------------------------------------------------- 9: warnings, stderr
def test_own_warnings_are_printed_under_warnings_error(monkeypatch, capsys):
    import mobilequant.api as api
    from mobilequant.data.readers import DataWarning

    def zoo_list(pattern):
        warnings.warn("about your data", DataWarning, stacklevel=2)
        return api.ZooList([])

    monkeypatch.setattr(api, "zoo_list", zoo_list)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PYTHONWARNINGS=error
        assert main(["zoo", "list"]) == 0
        with pytest.raises(UserWarning):  # a library's warning still follows the user's filter
            warnings.warn("library", UserWarning)
    assert capsys.readouterr().err.strip() == "mobilequant: warning: about your data"


def test_closed_stderr_keeps_error_lines_off_stdout(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stderr", None)  # 2>&-
    assert main(["exprot"]) == 2
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("signum, stop", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_a_recorded_stop_replaces_no_file(tmp_path, signum, stop):
    """A Ctrl-C raised inside jax's garbage-collection callback was swallowed ("Exception ignored in"): the
    export carried on and replaced the file. A stop the CLI recorded raises again before the rename."""
    out = tmp_path / "m.tflite"
    out.write_bytes(b"old")
    note_stop(signum)
    try:
        with pytest.raises(stop):
            atomic_write(out, b"new")
    finally:
        note_stop(None)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tflite"]  # no .mq-XXXXXXXX.tmp left
    atomic_write(out, b"new")  # nothing recorded: written
    assert out.read_bytes() == b"new"


@pytest.mark.parametrize("signum, code, line", [(signal.SIGINT, 130, "mobilequant: interrupted"),
                                                (signal.SIGTERM, 143, "mobilequant: terminated (SIGTERM)")])
def test_a_stop_a_library_swallowed_still_ends_the_command(monkeypatch, capsys, signum, code, line):
    """The command returns normally after the handler's exception was caught and dropped: the CLI exits
    130 / 143 with its one line, not 0; the next command starts with nothing recorded."""
    import mobilequant.api as api

    def swallowed(*args, **kwargs):
        try:
            cli._raise_stop(signum, None)  # what the handler does on the signal
        except KeyboardInterrupt:
            pass  # what jax's gc callback did with it
        return []

    monkeypatch.setattr(api, "zoo_list", swallowed)
    assert main(["zoo", "list"]) == code
    assert capsys.readouterr().err.strip().splitlines()[-1] == line
    assert stop_signal() is None
    monkeypatch.undo()
    assert main(["zoo", "list", "mobilenetv2_050"]) == 0
