"""The CLI as a user meets it: every user error the issues name gives one line on stderr, the right exit
code, no traceback, and nothing half-written at the output path. Driven through ``main(argv)``."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mobilequant.cli import main

TINY_FACTORY = textwrap.dedent("""
    import torch
    import torch.nn as nn
    from mobilequant.models import FASHION_MNIST

    class Tiny(nn.Module):
        def __init__(self, act=None):
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, stride=2, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.act = act or nn.ReLU6()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 10)
            self.preprocess = FASHION_MNIST

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.act(self.bn(self.conv(x)))), 1))

    def build():
        torch.manual_seed(0)
        return Tiny().eval()

    def build_unsupported():
        torch.manual_seed(0)
        return Tiny(act=nn.Softplus()).eval()
""")


class _Evil:
    def __reduce__(self):
        return (print, ("this checkpoint runs code",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "tiny.py").write_text(TINY_FACTORY)
    torch.save({"conv.weight": torch.zeros(8, 1, 3, 3)}, d / "partial.pt")
    (d / "corrupt.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    # the layout of a `mobilequant qat` job checkpoint (mobilequant.qat.checkpoint), not model weights
    torch.save({"format": "mobilequant-qat-checkpoint", "version": 1, "model": "tiny",
                "graph": {"w": torch.zeros(1)}}, d / "qat-last.pt")
    with open(d / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    x = np.random.default_rng(0).standard_normal((16, 1, 32, 32)).astype(np.float32)
    nan = x.copy()
    nan[3, 0, 0, 0] = np.nan
    np.save(d / "nan.npy", nan)
    np.save(d / "wrong_shape.npy", np.zeros((4, 3, 20, 20), np.float32))
    np.save(d / "good.npy", x)
    np.savez(d / "labels_past_the_classes.npz", images=x, labels=np.arange(16) + 5)  # the model has 10
    np.save(d / "one_colour_image.npy", np.zeros((40, 40, 3), np.uint8))  # one image, not 40 of 40 × 3
    (d / "empty_dir").mkdir()
    (d / "bad_recipe.yaml").write_text("target: tflite-int8\nquantisation:\n  per_channel: true\n")
    (d / "truncated.tflite").write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 20)
    (d / "not_a_model.onnx").write_text("hello")
    (d / "notes.txt").write_text("model   accuracy\n")  # neither format, and the name does not say which
    (d / "folder.onnx").mkdir()  # a directory named like the file an export writes
    ro = d / "readonly"
    ro.mkdir()
    os.chmod(ro, 0o555)
    return d


def _read_only_dir(d):
    """A directory this process cannot write to: mode 0555, or /proc when running as root (CI is root,
    and root ignores permission bits)."""
    from pathlib import Path

    return Path("/proc") if os.geteuid() == 0 else d / "readonly"


def _tiny(d, factory="build"):
    return ["--model", f"{d / 'tiny.py'}:{factory}"]


# (id, argv builder, exit code, a phrase the one-line message must contain)
CASES = [
    ("unknown-model", lambda d: ["export", "--target", "tflite-int8", "--model", "mobilenetv2_05"], 2,
     "did you mean"),
    ("unknown-target", lambda d: ["export", "--target", "tflite-int9", *_tiny(d)], 2, "tflite-int8"),
    ("checkpoint-as-model", lambda d: ["export", "--target", "tflite-int8", "--model", str(d / "corrupt.pt")], 2,
     "--weights"),
    ("python-file-without-factory", lambda d: ["export", "--target", "tflite-int8", "--model", str(d / "tiny.py")],
     2, "tiny.py:build"),
    ("unknown-command", lambda d: ["exprot"], 2, "did you mean 'export'"),
    ("unknown-option", lambda d: ["export", "--target", "tflite-int8", "--no-verfy"], 2, "--no-verify"),
    ("option-of-another-command", lambda d: ["audit", str(d / "truncated.tflite"), "--out", "x"], 2,
     "--out is an option of `mobilequant export`"),
    ("unknown-recipe-key", lambda d: ["export", "--target", "tflite-int8", *_tiny(d), "--recipe",
                                      str(d / "bad_recipe.yaml")], 2, "quantization"),
    ("missing-recipe", lambda d: ["export", "--target", "tflite-int8", *_tiny(d), "--recipe",
                                  str(d / "nope.yaml")], 2, "nope.yaml"),
    ("no-target-no-recipe", lambda d: ["export", *_tiny(d)], 2, "--target"),
    ("target-differs-from-recipe", lambda d: ["export", "--target", "onnx-int8", *_tiny(d), "--recipe",
                                              "tflite-int8-adaround"], 2, "tflite-int8-adaround"),
    ("checkpoint-mismatch", lambda d: ["export", "--target", "tflite-int8", *_tiny(d), "--weights",
                                       str(d / "partial.pt")], 2, "missing"),
    ("qat-job-checkpoint-as-weights", lambda d: ["export", "--target", "tflite-int8", *_tiny(d), "--weights",
                                                 str(d / "qat-last.pt")], 2, "QAT job checkpoint"),
    ("corrupt-checkpoint", lambda d: ["export", "--target", "tflite-int8", *_tiny(d), "--weights",
                                      str(d / "corrupt.pt")], 2, "corrupt.pt"),
    ("code-carrying-checkpoint", lambda d: ["export", "--target", "tflite-int8", *_tiny(d), "--weights",
                                            str(d / "evil.pt")], 2, "evil.pt"),
    ("nan-calibration", lambda d: ["export", "--target", "tflite-int8", *_tiny(d), "--data",
                                   str(d / "nan.npy"), "--eval-data", str(d / "good.npy")], 2, "nan"),
    ("empty-calibration", lambda d: ["export", "--target", "tflite-int8", *_tiny(d), "--data",
                                     str(d / "empty_dir"), "--eval-data", str(d / "good.npy")], 2, "empty_dir"),
    ("wrong-input-shape", lambda d: ["export", "--target", "tflite-int8", *_tiny(d), "--data",
                                     str(d / "wrong_shape.npy"), "--eval-data", str(d / "good.npy")], 2,
     "shape"),
    # labels the model cannot have: refused before anything is written, and the new -o folder is removed
    ("labels-past-the-classes", lambda d: ["export", "--target", "onnx-fp32", *_tiny(d), "--eval-data",
                                           str(d / "labels_past_the_classes.npz"), "-o", str(d / "new_dir")], 2,
     "run from 5 to 20 but the model has 10 classes"),
    ("one-colour-image-as-array", lambda d: ["export", "--target", "tflite-int8", *_tiny(d), "--data",
                                             str(d / "one_colour_image.npy")], 2, "1×H×W×C"),
    ("qat-out-dir-is-a-file", lambda d: ["qat", "--out-dir", str(d / "tiny.py")], 2, "is a file, not a folder"),
    ("unsupported-op", lambda d: ["export", "--target", "tflite-int8", *_tiny(d, "build_unsupported"),
                                  "--data", str(d / "good.npy"), "--eval-data", str(d / "good.npy")], 2,
     "act"),
    ("read-only-output", lambda d: ["export", "--target", "tflite-int8", *_tiny(d), "-o",
                                    str(_read_only_dir(d) / "m.tflite")], 2, "not writable"),
    ("missing-output-dir", lambda d: ["export", "--target", "onnx-fp32", *_tiny(d), "-o",
                                      str(d / "no" / "such" / "m.onnx")], 2, "does not exist"),
    ("truncated-artifact", lambda d: ["audit", str(d / "truncated.tflite")], 2, "truncated.tflite"),
    ("not-an-artifact", lambda d: ["bench", str(d / "not_a_model.onnx")], 2, "not_a_model.onnx"),
    ("bad-number", lambda d: ["bench", str(d / "truncated.tflite"), "--runs", "many"], 2, "--runs"),
    ("zero-width", lambda d: ["zoo", "info", "mobilenetv2_050", "--width-mult", "0"], 2, "width_mult"),
    ("zero-classes", lambda d: ["zoo", "info", "mobilenetv2_050", "--num-classes", "0"], 2, "num_classes"),
    ("nan-gate", lambda d: ["audit", str(d / "truncated.tflite"), "--max-drop", "nan"], 2, "finite number"),
    # counts are checked as options are parsed, not after the model and data have loaded
    ("negative-num-images", lambda d: ["audit", str(d / "truncated.tflite"), "--num-images", "-5"], 2,
     "argument --num-images: must be at least 1, got -5"),
    ("fractional-epochs", lambda d: ["qat", "--epochs", "0.5"], 2, "argument --epochs: expected a whole number"),
    ("report-path-is-a-directory", lambda d: ["audit", str(d / "truncated.tflite"), "--html", str(d / "empty_dir")],
     2, "names a directory"),
    # zoo info at a resolution the model cannot take: one line naming model and size (was a traceback)
    ("too-small-resolution", lambda d: ["zoo", "info", "squeezenet1_0", "--resolution", "17"], 2,
     "'squeezenet1_0' cannot take 17×17 inputs"),
    ("too-small-resolution-next", lambda d: ["zoo", "info", "squeezenet1_1", "--resolution", "16"], 2,
     "the next --resolution that works is 17"),
    ("zoo-without-subcommand", lambda d: ["zoo"], 2, "error: zoo: choose 'list' or 'info'"),
    ("quiet-zoo-list", lambda d: ["zoo", "list", "-q"], 2, "prints only its result"),
    ("help-unknown-command", lambda d: ["help", "exprot"], 2, "did you mean 'export'"),
    ("negative-max-drop", lambda d: ["audit", str(d / "truncated.tflite"), "--max-drop", "-1"], 2,
     "expected a drop ≥ 0 pp"),
    ("bench-neither-format", lambda d: ["bench", str(d / "notes.txt")], 2, "is not a TFLite or ONNX model (by its"),
    # -o: a suffix that is not the target's names a file, refused (it had become a new folder of that name);
    # the labels that cannot fit come later: each refusal must come first, before any work
    ("output-suffix-in-other-case", lambda d: ["export", "--target", "onnx-fp32", *_tiny(d), "--eval-data",
                                               str(d / "labels_past_the_classes.npz"), "-o", str(d / "ü ñ.ONNX")],
     2, "give the suffix in lower case (ü ñ.onnx)"),
    ("output-suffix-not-the-targets", lambda d: ["export", "--target", "tflite-fp32", *_tiny(d), "--eval-data",
                                                 str(d / "labels_past_the_classes.npz"), "-o", str(d / "m.tfl")],
     2, "writes .tflite files, not .tfl"),
    ("output-file-is-a-directory", lambda d: ["export", "--target", "onnx-fp32", *_tiny(d), "--eval-data",
                                              str(d / "labels_past_the_classes.npz"), "-o", str(d / "folder.onnx")],
     2, "folder.onnx is a directory"),
    # calibrate: a float recipe has no table; export settings are not silently dropped; -o checked first
    ("calibrate-float-recipe", lambda d: ["calibrate", "--recipe", "tflite-fp32", *_tiny(d), "--data",
                                          str(d / "nan.npy"), "-o", str(d / "t.json")], 2, "float target"),
    ("calibrate-export-setting", lambda d: ["calibrate", "--set", "io.layout=NHWC", *_tiny(d), "--data",
                                            str(d / "nan.npy"), "-o", str(d / "t.json")], 2,
     "calibrate uses only the quantization.* settings"),
    ("calibrate-out-is-a-directory", lambda d: ["calibrate", *_tiny(d), "--data", str(d / "nan.npy"), "-o",
                                                str(d / "empty_dir")], 2, "empty_dir is a directory"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_user_errors_are_one_line_with_exit_code(case, files, capsys):
    _, argv, code, phrase = case
    before = {p.name for p in files.rglob("*")}
    rc = main(argv(files))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code, err
    assert "Traceback" not in "\n".join(err)
    message = [line for line in err if line.startswith("mobilequant: error:")]
    assert len(message) == 1, err
    assert phrase.lower() in message[0].lower(), message[0]
    after = {p.name for p in files.rglob("*")}
    assert after == before, f"files left behind: {sorted(after - before)}"


def test_help_of_every_command_has_examples(capsys):
    for command in ("export", "qat", "audit", "zoo", "bench", "calibrate"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and f"mobilequant {command}" in out


def test_zoo_info_json(capsys):
    assert main(["zoo", "info", "mobilenetv2_100", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 3_504_872
    assert abs(info["madds"] / 1e6 - 300.8) < 0.1 and info["paper_config"] == ""
    # another configuration than the paper's: the paper's figure says which one it is for
    assert main(["zoo", "info", "mobilenetv2_050", "--num-classes", "10", "--width-mult", "0.35"]) == 0
    text = capsys.readouterr().out
    assert "(paper 97 M at 1000 classes, width 0.5)" in text
    assert "width       0.35 × the family's channels (in place of mobilenetv2_050's own 0.5)" in text


def test_zoo_info_is_measured_at_the_configuration_it_names(capsys):
    """EffNet's classifier reads the flattened map: `zoo info effnet` had built it for 32 px and counted at
    224 (a traceback). With no options a model is counted at its paper's configuration, as in docs/zoo.md;
    at another resolution the model is built for it."""
    from mobilequant.models import count_madds, count_params, create_model

    assert main(["zoo", "info", "effnet", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    with torch.device("meta"):
        ref = create_model("effnet", num_classes=10, resolution=32)
    assert (info["resolution"], info["num_classes"], info["paper_config"]) == (32, 10, "")
    assert (info["params"], info["madds"]) == (count_params(ref), count_madds(ref))
    assert main(["zoo", "info", "effnet", "--resolution", "64", "--json"]) == 0
    bigger = json.loads(capsys.readouterr().out)
    assert bigger["resolution"] == 64 and bigger["params"] > info["params"] and bigger["madds"] > info["madds"]
    assert main(["zoo", "info", "xception_100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["resolution"] == 299


def test_width_mult_is_the_familys_not_a_factor_on_the_variants(capsys):
    """`--width-mult 0.5` on xception_sep_025 (a quarter width) counts Xception at half width: more
    parameters than the variant; the output says it replaced the variant's own width, and the help says so."""
    def info(*extra):
        assert main(["zoo", "info", "xception_sep_025", *extra, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    own, half, same = info(), info("--width-mult", "0.5"), info("--width-mult", "0.25")
    assert (own["width_mult"], own["variant_width_mult"]) == (0.25, 0.25)
    assert (half["width_mult"], half["variant_width_mult"]) == (0.5, 0.25) and half["params"] > own["params"]
    assert same["params"] == own["params"] and same["paper_config"] == ""
    with pytest.raises(SystemExit):
        main(["zoo", "info", "--help"])
    assert "in place of the variant's own" in " ".join(capsys.readouterr().out.split())


def test_help_texts(capsys):
    """Plain text at the top (the module docstring's ``markup`` had been printed), every option explained,
    `mobilequant help [COMMAND]` prints the help (it had passed the unknown-command check and then failed)."""
    import argparse

    from mobilequant.cli import build_parser

    def parsers(p):
        yield p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for child in a.choices.values():
                    yield from parsers(child)

    for p in parsers(build_parser()):
        for a in p._actions:
            if not isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                assert a.help, f"{p.prog} {a.option_strings or a.dest} has no help"
    assert main(["help"]) == 0
    top = capsys.readouterr().out
    assert top.startswith("usage: mobilequant") and "``" not in top and ":mod:" not in top
    assert main(["help", "zoo", "info"]) == 0
    assert capsys.readouterr().out.startswith("usage: mobilequant zoo info")
    assert main(["help", "calibrate"]) == 0
    assert "(default: quant_table.json)" in capsys.readouterr().out


def test_export_takes_the_target_of_the_recipe(files, tmp_path, capsys):
    out = tmp_path / "tiny"
    out.mkdir()
    rc = main(["export", "--recipe", "onnx-fp32", *_tiny(files), "--data", str(files / "good.npy"),
               "--eval-data", str(files / "good.npy"), "-o", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, report
    assert report["target"] == "onnx-fp32" and report["path"].endswith(".onnx")
    assert Path(report["path"]).parent == out and Path(report["path"]).is_file()
    # the JSON says whether the read-back checks ran
    assert report["verified"] is True and Path(report["path"]).name == "build-onnx-fp32.onnx"
    # a recipe other than the target's own names the default file (it had overwritten the default export);
    # a float target is converted, not "calibrated on 0 images"; without verification: verified null
    (tmp_path / "my-fp32.yaml").write_text("target: onnx-fp32\n")
    rc = main(["export", "--recipe", str(tmp_path / "my-fp32.yaml"), *_tiny(files), "--eval-data",
               str(files / "good.npy"), "-o", str(out), "--no-verify"])
    text = capsys.readouterr().out
    assert rc == 0 and sorted(p.name for p in out.iterdir()) == [
        "build-my-fp32.onnx", "build-onnx-fp32.onnx", "build-onnx-fp32.onnx.verify.json"], text
    assert "build → onnx-fp32: converting, evaluating on 16" in text and "calibrating" not in text
    assert "checks     not run (verification off)" in text
    rc = main(["export", "--recipe", str(tmp_path / "my-fp32.yaml"), *_tiny(files), "--eval-data",
               str(files / "good.npy"), "-o", str(out), "--no-verify", "--json", "-q"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["verified"] is None


def test_accuracies_are_exact_percentages():
    """A float32 mean put 93.99999976158142 in the JSON for 47 of 50."""
    from mobilequant.api import _accuracy

    logits = torch.zeros(50, 10)
    logits[:47, 1] = 1.0
    assert _accuracy(logits, torch.ones(50, dtype=torch.long)) == 94.0


def test_sigterm_runs_the_cleanup_and_exits_143(files, tmp_path, capsys, monkeypatch):
    """`kill` during an export: the -o folder the run created (during calibration) and the temporary file
    (during the write) are removed, exit 143, one line. Without a handler in the CLI, SIGTERM reaches the
    test's own handler below (the default one would end the test session)."""
    import mobilequant.api as api

    def not_handled(signum, frame):
        raise AssertionError("SIGTERM reached the handler installed before main: the CLI installs none")

    previous = signal.signal(signal.SIGTERM, not_handled)
    try:
        real_load = api._load

        def killed_while_loading(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(2)  # the handler raises here
            return real_load(*args, **kwargs)

        monkeypatch.setattr(api, "_load", killed_while_loading)
        common = ["export", "--target", "onnx-fp32", *_tiny(files), "--eval-data", str(files / "good.npy")]
        assert main([*common, "-o", str(tmp_path / "new")]) == 143
        assert capsys.readouterr().err.strip().splitlines()[-1] == "mobilequant: terminated (SIGTERM)"
        assert not (tmp_path / "new").exists()
        monkeypatch.setattr(api, "_load", real_load)

        real_fsync = os.fsync

        def killed_while_writing(fd):
            monkeypatch.setattr(os, "fsync", real_fsync)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(2)

        monkeypatch.setattr(os, "fsync", killed_while_writing)
        (tmp_path / "kept").mkdir()
        assert main([*common, "-o", str(tmp_path / "kept")]) == 143
        assert list((tmp_path / "kept").iterdir()) == []  # no .mq-XXXXXXXX.tmp
        assert signal.getsignal(signal.SIGTERM) is not_handled  # main restores the handler it replaced
    finally:
        signal.signal(signal.SIGTERM, previous)
    capsys.readouterr()


def test_interrupt_message_claims_nothing_about_the_output(monkeypatch, capsys):
    """Ctrl-C after the file was replaced had printed 'nothing was written at the output path'."""
    import mobilequant.api as api

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "export_model", interrupted)
    assert main(["export", "--target", "tflite-int8"]) == 130
    assert capsys.readouterr().err.strip() == "mobilequant: interrupted"


def test_data_warnings_are_one_line_and_the_recipe_image_count_is_kept(files, tmp_path, capsys):
    """A folder whose class names mean nothing to the model: the export runs, the labels are dropped with one
    'mobilequant: warning:' line (not Python's two-line warning format naming our source file); a
    ``--set verification.num_images`` is the number of images checked, not replaced by the whole set."""
    from PIL import Image

    for i, name in enumerate(("cat", "dog", "emu")):
        for j in range(4):
            (tmp_path / "set" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((28, 28), 40 * i + j, np.uint8)).save(tmp_path / "set" / name / f"{j}.png")
    rc = main(["export", "--target", "onnx-fp32", *_tiny(files), "--eval-data", str(tmp_path / "set"),
               "--set", "verification.num_images=6", "-o", str(tmp_path), "--json"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert rc == 0, captured.err
    assert report["float_accuracy"] is None and report["num_eval"] == 6
    warned = [line for line in captured.err.splitlines() if "labels not used" in line]
    assert len(warned) == 1 and warned[0].startswith("mobilequant: warning: "), captured.err
    assert "LabelWarning" not in captured.err and ".py:" not in captured.err


def test_qat_of_a_user_model_from_the_command_line(files, tmp_path, capsys, monkeypatch):
    """`qat --model file.py:factory` had always been refused (the job compared the factory's name with the
    whole spec); the summary printed accuracies as fractions with a % sign (0.90 % for 90 %); one export
    failing its checks stopped the exports after it and the summary."""
    import mobilequant.export as export_module
    from mobilequant.api import QATSummary
    from mobilequant.errors import CheckFailed
    from mobilequant.qat import QATJobConfig

    real_export = export_module.export

    def tflite_fails(result, target, path, **kw):
        if target == "tflite-int8":
            raise CheckFailed(f"{path}: int8_top1_agreement: FAILED (made to fail here)")
        return real_export(result, target, path, **kw)

    monkeypatch.setattr(export_module, "export", tflite_fails)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", images=rng.integers(0, 256, (64, 28, 28), dtype=np.uint8),
             labels=np.arange(64) % 10)
    rc = main(["qat", *_tiny(files), "--data", str(tmp_path / "train.npz"), "--val-data",
               str(tmp_path / "train.npz"), "--batch-size", "32", "--out-dir", str(tmp_path / "q"),
               "--export", "tflite-int8", "onnx-fp32", "--json", "--freeze-bn-step", "never",
               "--freeze-observer-step", "0.5"])
    captured = capsys.readouterr()
    assert rc == 1, captured.err[-2000:]  # the failed check, reported
    out = json.loads(captured.out)
    assert out["model"] == "build" and out["steps"] == 2 and 0.0 <= out["val_accuracy"] <= 1.0
    job = torch.load(tmp_path / "q" / "qat-last.pt", weights_only=True)["config"]
    # 'never' is None in the job, a fraction stays a fraction, options not given are QATJobConfig's
    assert (job["freeze_bn_step"], job["freeze_observer_step"], job["lr"]) == (None, 0.5, QATJobConfig().lr)
    assert [(e["target"], e["passed"]) for e in out["exports"]] == [("tflite-int8", False), ("onnx-fp32", True)]
    assert Path(out["exports"][1]["path"]).is_file()
    assert Path(out["exports"][1]["path"]).name == "build-qat-onnx-fp32.onnx"
    assert "fake-quant accuracy 89.55 %" in QATSummary("m", None, None, 10, 0.8955, None).summary()


def test_qat_file_names_carry_a_recipe_other_than_a_targets_own(tmp_path):
    """QAT files were MODEL-qat-TARGET whatever the recipe: a per-tensor job overwrote the per-channel
    job's files in the same folder."""
    from mobilequant.api import _qat_artifact_path
    from mobilequant.export import get_target

    spec = get_target("tflite-int8")
    names = [_qat_artifact_path(tmp_path, "m", spec, r).name
             for r in (None, "tflite-int8", "ONNX-INT8", "per-tensor-dsp-cle", "recipes/my.yaml")]
    assert names == ["m-qat-tflite-int8.tflite"] * 3 + ["m-qat-tflite-int8-per-tensor-dsp-cle.tflite",
                                                        "m-qat-tflite-int8-my.tflite"]


def test_audit_weights_go_into_the_zoo_model_the_artifact_names(files, tmp_path, capsys):
    """`audit FILE --weights W` loaded W into the default model, whatever the file was exported from:
    the zoo model the artifact names takes them; a user model's file needs --model."""
    from mobilequant.api import _artifact_model_name

    out = tmp_path / "s.onnx"
    assert main(["export", "--target", "onnx-fp32", "--model", "shufflenetv2_x0_5", "-o", str(out),
                 "--num-eval", "16", "-q"]) == 0
    assert _artifact_model_name(str(out)) == "shufflenetv2_x0_5"
    user = tmp_path / "u.onnx"
    assert main(["export", "--target", "onnx-fp32", *_tiny(files), "--eval-data", str(files / "good.npy"),
                 "-o", str(user), "-q"]) == 0
    capsys.readouterr()
    assert main(["audit", str(user), "--weights", str(files / "partial.pt")]) == 2
    assert "exported from 'build', not a zoo model; give the model" in capsys.readouterr().err


def test_resolution_builds_a_zoo_model_for_its_checkpoints_input_size(tmp_path, capsys):
    """MobileNetV1 0.25 trained at ρ = 64 (here: random weights, 10 grey classes): --resolution builds the
    zoo model for 64×64 inputs — before, a checkpoint of a zoo name always went out at 224 px — names the
    file after it, and the audit takes the same option; the shipped model has its own size (exit 2)."""
    from ai_edge_litert.interpreter import Interpreter

    from mobilequant.models import create_model

    torch.manual_seed(0)
    ckpt = tmp_path / "v1.pt"
    torch.save(create_model("mobilenetv1_025", num_classes=10, in_chans=1).state_dict(), ckpt)
    args = ["--model", "mobilenetv1_025", "--weights", str(ckpt), "--resolution", "64"]
    assert main(["export", "--target", "tflite-fp32", *args, "--num-eval", "16", "-o", f"{tmp_path}/", "-q"]) == 0
    out = tmp_path / "mobilenetv1_025-v1-64px-tflite-fp32.tflite"
    assert list(Interpreter(str(out)).get_input_details()[0]["shape"]) == [1, 1, 64, 64]
    assert main(["audit", str(out), "--weights", str(ckpt), "--resolution", "64", "--num-images", "16", "-q"]) == 0
    capsys.readouterr()
    # without it the refusal names the option (it said only "data and artifact do not fit")
    assert main(["audit", str(out), "--weights", str(ckpt), "--num-images", "16", "-q"]) == 2
    assert "audit it with --resolution 64" in capsys.readouterr().err
    assert main(["export", "--target", "tflite-fp32", "--resolution", "64", "-o", str(tmp_path / "x.tflite")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("mobilequant: error: --resolution 64: the shipped model takes 32×32 inputs; --resolution sets "
                   "the input size of a zoo model built from its name (a factory sets model.preprocess)")
    assert not (tmp_path / "x.tflite").exists()


def test_a_file_the_runtime_refuses_fails_its_checks_in_one_line(tmp_path, capsys):
    """A QAT job of a random-weight MobileNetV1 0.25 at 64 px on noise images: its classifier's output scale
    falls to 2⁻²³ and XNNPACK refuses the int8 file ("failed to prepare"), which had escaped export as a
    RuntimeError traceback. Now a failed check (runs_in_runtime, naming the smallest scale): exit 1, the
    file kept as .failed beside the output, nothing at the output path."""
    from mobilequant.models import create_model

    torch.manual_seed(0)
    ckpt = tmp_path / "v1.pt"
    torch.save(create_model("mobilenetv1_025", num_classes=10, in_chans=1).state_dict(), ckpt)
    rng = np.random.default_rng(0)
    data = tmp_path / "t.npz"
    np.savez(data, images=rng.integers(0, 255, (128, 28, 28), dtype=np.uint8), labels=rng.integers(0, 10, 128))
    job = tmp_path / "job"
    rc = main(["qat", "--model", "mobilenetv1_025", "--weights", str(ckpt), "--resolution", "64", "--data", str(data),
               "--val-data", str(data), "--epochs", "1", "--batch-size", "32", "--out-dir", str(job),
               "--export", "tflite-int8", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and "runs_in_runtime: FAILED, LiteRT (XNNPACK) refused the file" in err[0], err
    assert "smallest activation scale" in err[0]
    assert (job / "mobilenetv1_025-qat-tflite-int8.failed.tflite").is_file()
    assert not (job / "mobilenetv1_025-qat-tflite-int8.tflite").exists()


def test_export_fp32_then_bench_and_audit_exit_codes(files, tmp_path, capsys):
    """A real export through the CLI, its file benchmarked, and the audit gate's exit code both ways."""
    out = tmp_path / "tiny.tflite"
    rc = main(["export", "--target", "tflite-int8", *_tiny(files), "--data", str(files / "good.npy"),
               "--eval-data", str(files / "good.npy"), "-o", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, report
    assert out.is_file() and report["size_bytes"] == out.stat().st_size
    assert main(["bench", str(out), "--runs", "5", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert bench["results"][0]["runtime"] == "litert" and bench["results"][0]["median_ms"] > 0
    common = ["audit", str(out), *_tiny(files), "--data", str(files / "good.npy"), "--num-images", "16", "-q",
              "--max-drop", "off"]
    assert main([*common, "--min-sqnr", "0"]) == 0
    assert main([*common, "--min-sqnr", "200"]) == 1


def test_export_with_audit_reports_the_gate(files, tmp_path, capsys):
    """`export --audit` prints the audit's verdict (it had printed FAIL for every audit: the summary read a
    key the report does not have) and a failed gate fails the command."""
    from mobilequant.api import ExportSummary

    good = str(files / "good.npy")
    rc = main(["export", "--target", "tflite-int8", *_tiny(files), "--data", good, "--eval-data", good,
               "-o", str(tmp_path / "a.tflite"), "--audit"])
    text = capsys.readouterr().out
    assert rc == 0 and "audit      PASS" in text and "FAILED" not in text
    # the audit judges the images the export's accuracy line is measured on, not its own first 1,000
    many = tmp_path / "many.npy"
    np.save(many, np.random.default_rng(1).standard_normal((1100, 1, 32, 32)).astype(np.float32))
    rc = main(["export", "--target", "tflite-int8", *_tiny(files), "--data", good, "--eval-data", str(many),
               "-o", str(tmp_path / "b.tflite"), "--audit", "--json", "-q"])
    out = json.loads(capsys.readouterr().out)  # (random images: the tiny model's gate may fail, rc 1)
    assert rc in (0, 1) and out["num_eval"] == 1100 and out["audit"]["end_to_end"]["images"] == 1100
    base = dict(model="m", target="tflite-int8", path="a.tflite", size_bytes=1, num_eval=1, float_accuracy=None,
                artifact_accuracy=None, agreement=100.0, seconds=1.0)
    failing = ExportSummary(**base, failed=True, audit={"verdict": "fail", "failures": [{"message": "drop 0.9 pp"}]})
    assert "audit      FAIL: drop 0.9 pp" in failing.summary() and "AUDIT FAILED" in failing.summary()
    # what quantization found and what CLE did reach the summary (export had printed neither)
    found = ExportSummary(**base, findings=["features.4.conv.1.0: all-zero weight channel(s) [5]"],
                          cle="CLE: 37 pairs, 29 passes (converged)")
    assert "finding    features.4.conv.1.0: all-zero weight channel(s) [5]" in found.summary()
    assert "cle        37 pairs, 29 passes (converged)" in found.summary()
    assert found.to_dict()["findings"] and found.to_dict()["cle"].startswith("CLE: 37 pairs")


@pytest.mark.parametrize("script, doc", [("gen_cli_docs.py", "cli.md"), ("gen_recipe_docs.py", "recipes.md")])
def test_generated_reference_docs_are_current(script, doc):
    """docs/cli.md comes from the parser, docs/recipes.md from the recipe dataclasses and export_recipes/."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / script
    spec = importlib.util.spec_from_file_location(script[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--check"]) == 0, f"docs/{doc} is stale: run python scripts/{script}"
    text = (path.parents[1] / "docs" / doc).read_text()
    assert ("## mobilequant export" in text) if doc == "cli.md" else (
        "| `per_channel` | bool | true |" in text and "`per-tensor-dsp-cle`" in text)


def test_quiet_prints_nothing_but_the_reason_for_a_failed_gate(files, tmp_path, capsys):
    """`-q` hid the summary and with it the only statement of why a gate failed: exit 1, nothing printed.
    Now one line on stderr says it; a passing run prints nothing."""
    out = tmp_path / "t.tflite"
    assert main(["export", "--target", "tflite-fp32", *_tiny(files), "--eval-data", str(files / "good.npy"),
                 "-o", str(out), "-q"]) == 0
    audit = ["audit", str(out), *_tiny(files), "--data", str(files / "good.npy"), "-q"]
    capsys.readouterr()
    assert main(audit) == 0
    assert capsys.readouterr() == ("", "")
    assert main([*audit, "--min-sqnr", "900"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mobilequant: failed: ") and "900" in lines[0], lines


def test_quiet_holds_back_the_native_libraries_log_lines(files, tmp_path):
    """With -q the runtimes' own C++ lines (absl's "log messages before absl::InitializeLog()", LiteRT's
    "Created TensorFlow Lite XNNPACK delegate"), which no log level silences, reached stderr; a CI log
    should show nothing for a passing run. Without -q they still print (they are diagnostics)."""
    out = tmp_path / "t.tflite"
    assert main(["export", "--target", "tflite-fp32", *_tiny(files), "--eval-data", str(files / "good.npy"),
                 "-o", str(out), "-q"]) == 0
    audit = [sys.executable, "-m", "mobilequant", "audit", str(out), *_tiny(files),
             "--data", str(files / "good.npy")]
    loud = subprocess.run(audit, capture_output=True, text=True, timeout=600)
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "XNNPACK" in loud.stderr  # the line this test is about: it is there without -q
    quiet = subprocess.run([*audit, "-q"], capture_output=True, text=True, timeout=600)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")


def _one_error_line(rc, capsys, code=2) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code, err
    assert "Traceback" not in "\n".join(err)
    message = [line for line in err if line.startswith("mobilequant: error:")]
    assert len(message) == 1, err
    return message[0]


LONG_NAME = "a" * 300  # over NAME_MAX (255 bytes): Path.exists / is_dir raised OSError Errno 36, a traceback


@pytest.mark.parametrize("argv, option", [
    (lambda d: ["export", "--target", "tflite-fp32", *_tiny(d), "-o", str(d / f"{LONG_NAME}.tflite")], "out (-o)"),
    (lambda d: ["calibrate", *_tiny(d), "-o", str(d / f"{LONG_NAME}.json")], "out (-o)"),
    (lambda d: ["audit", str(d / "truncated.tflite"), "--report", str(d / f"{LONG_NAME}.json")], "report"),
    (lambda d: ["qat", "--data", str(d / "good.npy"), "--out-dir", str(d / LONG_NAME)], "out_dir (--out-dir)"),
], ids=["export", "calibrate", "audit", "qat"])
def test_a_name_over_the_file_systems_limit_is_one_line_before_any_work(argv, option, files, capsys, monkeypatch):
    import mobilequant.api as api

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was refused")

    monkeypatch.setattr(api, "resolve_model", no_work)
    before = {p.name for p in files.rglob("*")}
    message = _one_error_line(main(argv(files)), capsys)
    assert option in message and "bytes long, over the file system's limit of 255" in message, message
    assert len(message) < 400, message  # the name is shortened in the message
    assert {p.name for p in files.rglob("*")} == before


@pytest.mark.parametrize("case", ["calibrate-weights", "calibrate-recipe", "calibrate-data", "calibrate-model-file",
                                  "export-weights", "audit-report-weights"])
def test_an_output_that_is_one_of_the_inputs_is_refused_and_left_as_it_was(case, files, tmp_path, capsys):
    """``calibrate --weights w.pt -o w.pt`` had replaced the checkpoint by the JSON table (exit 0)."""
    import hashlib
    import shutil

    tiny = tmp_path / "tiny.py"
    shutil.copy(files / "tiny.py", tiny)
    data = tmp_path / "good.npy"
    shutil.copy(files / "good.npy", data)
    weights = tmp_path / ("w.tflite" if case == "export-weights" else "w.pt")
    from mobilequant.models import load_model

    torch.save(load_model(f"{tiny}:build").state_dict(), weights)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("target: tflite-int8\n")
    model = ["--model", f"{tiny}:build"]
    argv, given, option = {
        "calibrate-weights": (["calibrate", *model, "--weights", str(weights), "-o", str(weights)], weights,
                              "--weights"),
        "calibrate-recipe": (["calibrate", *model, "--recipe", str(recipe), "-o", str(recipe)], recipe, "--recipe"),
        "calibrate-data": (["calibrate", *model, "--data", str(data), "-o", str(data)], data, "--data"),
        "calibrate-model-file": (["calibrate", *model, "-o", str(tiny)], tiny, "--model"),
        "export-weights": (["export", "--target", "tflite-fp32", *model, "--weights", str(weights), "-o",
                            str(weights)], weights, "--weights"),
        "audit-report-weights": (["audit", str(files / "truncated.tflite"), *model, "--weights", str(weights),
                                  "--report", str(weights)], weights, "--weights"),
    }[case]
    digest = hashlib.sha256(given.read_bytes()).hexdigest()
    message = _one_error_line(main(argv), capsys)
    assert f"{given} is the" in message and option in message and "which this command reads" in message, message
    assert hashlib.sha256(given.read_bytes()).hexdigest() == digest


def test_a_factory_that_raises_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "nets.py").write_text("def boom():\n    raise RuntimeError('boom in user code')\n")
    message = _one_error_line(main(["calibrate", "--model", f"{tmp_path / 'nets.py'}:boom", "-o",
                                    str(tmp_path / "t.json")]), capsys)
    assert "the factory boom() raised RuntimeError: boom in user code" in message, message
    assert not (tmp_path / "t.json").exists()
