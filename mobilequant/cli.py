"""The ``mobilequant`` command: a thin shell over :mod:`mobilequant.api`.

Every sub-command parses its options, calls one API function and prints its result (a short human
summary, or JSON with ``--json``). User errors (:class:`mobilequant.errors.MobileQuantError`) print one
line on stderr and exit 2 (usage / bad input) or 1 (a failed check or gate); nothing else is caught, so a
bug keeps its traceback. Ctrl-C exits 130 and SIGTERM 143, each after the cleanup a failed job runs.
``main(argv)`` takes an argv list so tests need no subprocess.

The streams: output that stdout's encoding cannot show is written as ``\\u2192`` escapes (an ASCII or
Latin-1 locale, ``PYTHONIOENCODING=ascii``), never an error. A reader that closes stdout early
(``mobilequant zoo list | head -1``) ends the command quietly with exit 141, what a shell reports for any
tool stopped by SIGPIPE (``set -o pipefail`` sees it; a job that was writing files still cleans up);
any other failure to write stdout (``> /dev/full``) is one error line and exit 2. With stderr closed
(``2>&-``) the error and warning lines are dropped, not written to stdout. mobilequant's own warnings are
always printed as warnings (one line each), even under ``-W error`` / ``PYTHONWARNINGS=error``, which
still applies to the libraries' warnings.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import json
import math
import os
import re
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence

from .errors import MobileQuantError, Terminated, UsageError, did_you_mean, note_stop, raise_if_stopped

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT / SIGTERM, what a shell reports for a killed job
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: stdout's reader went away (`| head -1`), as for any tool killed by it

# the top-level help's description: plain text (the module docstring is reStructuredText for Sphinx)
DESCRIPTION = ("mobilequant: quantize MobileNet-style networks and write int8 / float16 TFLite and ONNX files,\n"
               "each one checked in its real runtime.")

_EXAMPLES = {
    "export": """examples:
  mobilequant export --target tflite-int8                 # built-in MobileNetV2 0.5 on Fashion-MNIST
  mobilequant export --target onnx-int8 --model shufflenetv2_x0_5 -o out/
  mobilequant export --recipe export_recipes/per-tensor-dsp-cle.yaml   # the recipe names its target
  mobilequant export --recipe tflite-int8-accurate --model shufflenetv1_g3   # a built-in recipe, by name
  mobilequant export --target tflite-int8 --model my_pkg.nets:build --weights ckpt.pt --data calib_dir/
""",
    "qat": """examples:
  mobilequant qat --epochs 1                               # default model, Fashion-MNIST
  mobilequant qat --model shufflenetv2_x0_5 --epochs 1 --export tflite-int8 onnx-int8
  mobilequant qat --resume --out-dir out/qat               # continue after a crash
  mobilequant qat --start ptq --freeze-observer-step 0     # from PTQ, its ranges kept (docs/qat.md)
  mobilequant qat --model nets.py:build --weights ckpt.pt --data train_dir/ --val-data val_dir/
  torchrun --nproc_per_node=2 -m mobilequant qat --epochs 1
""",
    "audit": """examples:
  mobilequant audit out/mobilenetv2_050-tflite-int8.tflite --max-drop 0.5
  mobilequant audit out/model.onnx --min-sqnr 20 --fail-on-dead-kernels --html report.html
""",
    "zoo": """examples:
  mobilequant zoo list 'mobilenet*'
  mobilequant zoo info mobilenetv2_100 --resolution 224
""",
    "bench": """examples:
  mobilequant bench out/*.tflite out/*.onnx --threads 1 --runs 200
""",
    "calibrate": """examples:
  mobilequant calibrate --model mobilenetv2_050 -o table.json
""",
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and close-match suggestions for mistyped sub-commands/options."""

    def error(self, message: str):  # noqa: D401 - argparse API
        m = re.match(r"unrecognized arguments: (\S+)", message)
        if m:
            opt = m.group(1).split("=")[0]
            message += did_you_mean(opt, _long_options(self))
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _long_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every ``--option`` of a parser and of its sub-commands (for suggestions)."""
    opts = {o for o in parser._option_string_actions if o.startswith("--")}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                opts |= _long_options(child)
    return opts


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub-)command given, e.g. ``zoo info``'s (the top-level one if none was)."""
    for dest in ("command", "zoo_command"):
        name = getattr(args, dest, None)
        sub = next((a.choices[name] for a in parser._actions
                    if isinstance(a, argparse._SubParsersAction) and name in a.choices), None)
        if sub is None:
            break
        parser = sub
    return parser


def _unrecognized(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> str:
    """Unknown arguments of the command given, with close matches among its own options only (the top-level
    parser would offer every sub-command's), and the sub-commands that do have an option given."""
    command = args.command
    sub = _command_parser(parser, args)
    opt = extra[0].split("=")[0]
    msg = f"unrecognized arguments: {' '.join(extra)}"
    if opt in ("-q", "--quiet") and sub is not parser:
        msg += f"; `{sub.prog}` prints only its result, which -q would hide"
    elif opt.startswith("--"):
        msg += did_you_mean(opt, _long_options(sub))
        owners = [name for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                  for name, child in a.choices.items() if name != command and opt in child._option_string_actions]
        if owners:
            msg += f"; {opt} is an option of `mobilequant {owners[0]}`"
    return f"{msg} (see `{sub.prog} --help`)"


def _count(minimum: int):
    """An integer option of at least ``minimum``, checked as the options are parsed: a negative
    --num-images had been refused only after the model and data had loaded (~5 s)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "count"  # argparse names the type in its message
    return parse


def _number(text: str) -> float:
    """A finite float: ``float()`` also takes 'nan' and 'inf', and a NaN gate would pass every file."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _freeze_point(text: str) -> int | float | str:
    """A QAT freeze point: a step (an integer), a fraction of the job's steps (0.5), or 'never'."""
    if text.strip().lower() == "never":
        return "never"
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
    if not (value >= 0 if isinstance(value, int) else 0 <= value <= 1):  # NaN fails here too
        raise argparse.ArgumentTypeError(f"expected a step ≥ 0, a fraction in [0, 1] or 'never', got {text!r}")
    return value


def _gate(text: str) -> float | None:
    """A gate threshold: a finite number, or 'off'."""
    return None if text.strip().lower() == "off" else _number(text)


def _max_drop(text: str) -> float | None:
    """The accuracy-drop gate: a number ≥ 0, or 'off' (a negative limit would fail every file)."""
    value = _gate(text)
    if value is not None and value < 0:
        raise argparse.ArgumentTypeError(f"expected a drop ≥ 0 pp or 'off', got {text!r}")
    return value


def _common(p: argparse.ArgumentParser, quiet: bool = True) -> None:
    """``--json`` and, for commands whose output is a summary of work done, ``-q``. Commands whose output
    is the result itself (zoo list / info, bench) take no ``-q``: it would leave them printing nothing."""
    p.add_argument("--json", action="store_true", help="print the result as JSON (for machines)")
    if quiet:
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, summaries or runtime log lines (CI); a failure still "
                       "prints its reason")


def _model_args(p: argparse.ArgumentParser, data_help: str,
                model_default: str = "the built-in MobileNetV2 0.5 trained on Fashion-MNIST") -> None:
    p.add_argument("--model", default=None,
                   help=f"zoo name, 'pkg.module:factory' or 'path/file.py:factory' (default: {model_default})")
    p.add_argument("--weights", default=None,
                   help="checkpoint (state_dict) to load, read with weights_only=True; a zoo --model with shipped "
                        "weights keeps their preprocessing when the checkpoint has their shapes, else takes the "
                        "class count and input channels the checkpoint was trained with")
    p.add_argument("--resolution", type=_count(1), default=None,
                   help="input size (pixels, square) of a zoo --model built from its name, e.g. MobileNetV1 at "
                        "128 for a checkpoint trained at 128 (default: the model's own; shipped models and "
                        "factories have theirs)")
    p.add_argument("--data", default="builtin", help=data_help + " (rules: docs/data.md)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="mobilequant", description=DESCRIPTION, epilog="`mobilequant help COMMAND` (or "
                     "`mobilequant COMMAND --help`) describes a command; docs/cli.md has them all.",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mobilequant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, epilog=_EXAMPLES.get(name),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = add("export", "quantize (or convert) a model and write a verified TFLite / ONNX artifact")
    p.add_argument("--target", help="tflite-int8 | tflite-fp16 | tflite-fp32 | onnx-int8 | onnx-fp16 | onnx-fp32 "
                                    "(may be left out with --recipe: every recipe names its target)")
    _model_args(p, "calibration data: 'builtin' (shipped Fashion-MNIST subset), an image folder, .npy or .npz")
    p.add_argument("--eval-data", default="builtin", help="evaluation data for verification ('builtin': "
                                                          "Fashion-MNIST test set)")
    p.add_argument("--recipe", default=None, help="a recipe YAML file, or the name of one in export_recipes/ (default: the target's own)")
    p.add_argument("-o", "--out", default="out",
                   help="output file (with the target's suffix) or directory (default: out/); in a directory the "
                        "file is MODEL-TARGET.tflite/.onnx; MODEL-RECIPE for a recipe other than the target's own, "
                        "TARGET-custom-HASH when --set changes a quantization or io value, MODEL-CHECKPOINT-TARGET "
                        "with --weights, so none overwrites the default export")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set quantization.per_channel=false (repeatable; see docs/recipes.md)")
    p.add_argument("--num-eval", type=_count(1), default=None, help="evaluation images for the summary and the checks, spread evenly over the set (default: all, or verification.num_images where a recipe or --set changes it)")
    p.add_argument("--no-verify", action="store_true", help="skip the read-back verification")
    p.add_argument("--audit", action="store_true", help="run the per-layer accuracy audit after export, on the evaluation images (gate: 0.5 pp drop)")
    _common(p)

    p = add("qat", "quantization-aware fine-tuning job (single process or under torchrun)")
    _model_args(p, "training data: 'builtin' (Fashion-MNIST), a folder with class sub-folders, or an .npz "
                   "with labels")
    p.add_argument("--val-data", default=None,
                   help="evaluated after each epoch (default: the Fashion-MNIST test split for builtin training "
                        "data, else none)")
    # defaults of these four: QATJobConfig's (one source; docs/qat.md lists them)
    p.add_argument("--epochs", type=_count(1), default=None, help="epochs (default: QATJobConfig's)")
    p.add_argument("--batch-size", type=_count(1), default=None, help="global batch size (default: QATJobConfig's)")
    p.add_argument("--lr", type=_number, default=None, help="peak learning rate (default: QATJobConfig's)")
    p.add_argument("--recipe", default=None, help="recipe YAML for the quantization settings")
    p.add_argument("--out-dir", default=None, help="checkpoints and logs (default: QATJobConfig's, out/qat)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in --out-dir (a new job starts if there is none)")
    p.add_argument("--resume-from", default=None, metavar="CHECKPOINT",
                   help="continue from this checkpoint (e.g. qat-prev.pt when qat-last.pt is damaged)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the job (default 0)")
    p.add_argument("--start", choices=("float", "ptq"), default="float",
                   help="start from the float model (ranges observed) or from its PTQ result: ranges and "
                        "bias-corrected biases (default float)")
    p.add_argument("--freeze-bn-step", type=_freeze_point, default=None, metavar="STEP",
                   help="from this step on BN uses and keeps its running statistics: a step, a fraction of the "
                        "job's steps (0.5: halfway) or 'never' (default: QATJobConfig's, 0.5)")
    p.add_argument("--freeze-observer-step", type=_freeze_point, default=None, metavar="STEP",
                   help="from this step on ranges stop following the data (0 with --start ptq: keep the "
                        "PTQ ranges); a step, a fraction or 'never' (default: QATJobConfig's, 0.75)")
    p.add_argument("--export", nargs="*", default=[], metavar="TARGET", help="export targets after training, written into --out-dir as MODEL-qat-TARGET "
                        "(+ -RECIPE for a recipe other than a target's own)")
    _common(p)

    p = add("audit", "per-layer accuracy audit of an exported artifact, with a release gate")
    p.add_argument("artifact", help=".tflite or .onnx file written by `mobilequant export`")
    _model_args(p, "evaluation data: 'builtin' (Fashion-MNIST test set), an image folder, .npy or .npz",
                model_default="the zoo model named in the artifact, with its shipped weights")
    p.add_argument("--num-images", type=_count(1), default=1000, help="evaluation images (default 1000)")
    p.add_argument("--max-drop", type=_max_drop, default=0.5,
                   help="gate: largest accepted top-1 drop in pp, or of disagreement with the float model on "
                        "unlabelled data (default 0.5, as `export --audit`; 'off': no drop gate)")
    p.add_argument("--min-sqnr", type=_number, default=None, help="gate: smallest accepted per-layer SQNR (dB)")
    p.add_argument("--fail-on-dead-kernels", action="store_true", help="gate: fail when dead kernels are found")
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--html", default=None, help="write the HTML report here")
    _common(p)

    p = add("zoo", "list the model zoo or describe one model")
    zs = p.add_subparsers(dest="zoo_command", metavar="list|info", parser_class=_Parser)
    zl = zs.add_parser("list", help="registered models matching a pattern",
                       description="registered models matching a pattern")
    zl.add_argument("pattern", nargs="?", default="*", help="shell-style name pattern, e.g. 'mobilenet*' "
                                                            "(default: every model)")
    _common(zl, quiet=False)
    zi = zs.add_parser("info", help="parameters, mult-adds and paper figures of one model",
                       description="parameters, mult-adds and paper figures of one model")
    zi.add_argument("name", help="zoo name (see `mobilequant zoo list`)")
    zi.add_argument("--resolution", type=int, default=None,
                    help="input size in pixels; the model is built for it (default: the one the paper's figures "
                         "are for, as in docs/zoo.md: 224, 299 for xception_100, 32 for effnet)")
    zi.add_argument("--num-classes", type=int, default=None,
                    help="classifier size (default: the paper's: 1000, 10 for effnet)")
    zi.add_argument("--width-mult", type=_number, default=None,
                    help="the family's width multiplier, in place of the variant's own: mobilenetv2_050 is "
                         "MobileNetV2 at 0.5, and --width-mult 0.35 on it counts MobileNetV2 0.35 "
                         "(default: the variant's)")
    _common(zi, quiet=False)

    p = add("bench", "latency and size of artifacts in their real runtimes (the direct metric, not FLOPs)")
    p.add_argument("artifacts", nargs="+", help=".tflite or .onnx files (the runtime is chosen by content)")
    p.add_argument("--threads", type=_count(1), default=1, help="runtime threads (default 1)")
    p.add_argument("--runs", type=_count(1), default=100, help="timed single-image runs per file (default 100)")
    p.add_argument("--warmup", type=_count(0), default=10, help="untimed runs before them (default 10)")
    _common(p, quiet=False)

    p = add("calibrate", "calibrate a model and write its quantization table (JSON) only")
    _model_args(p, "calibration data: 'builtin', an image folder, .npy or .npz")
    p.add_argument("--recipe", default=None,
                   help="an int8 recipe (YAML file or name in export_recipes/) whose quantization settings are "
                        "used (default: tflite-int8's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a quantization setting, e.g. --set quantization.calibration=minmax "
                        "(repeatable; see docs/recipes.md)")
    p.add_argument("-o", "--out", default="quant_table.json",
                   help="the JSON file to write (default: quant_table.json)")
    _common(p)
    return parser


def _print(result, as_json: bool, quiet: bool = False) -> None:
    if as_json:
        print(json.dumps(result.to_dict() if hasattr(result, "to_dict") else result, indent=2, default=str))
    elif not quiet:
        print(result.summary() if hasattr(result, "summary") else result)
    elif getattr(result, "failed", False):  # -q hides the summary, not the reason for exit code 1
        _say(f"mobilequant: failed: {result.failure}")


def _say(line: str) -> None:
    """One line on stderr. Nothing with no stderr (``2>&-``: ``print`` would fall back to stdout, mixing
    an error into the output) or a failing one (the exit code still tells)."""
    if sys.stderr is not None:
        with contextlib.suppress(OSError):
            print(line, file=sys.stderr, flush=True)


def quiet_library_logs() -> None:
    """Silence import-time chatter of the libraries underneath (optional CUDA kernels that torchao cannot
    load on a CPU machine, deprecation notices meant for library authors). Our own errors still print."""
    import logging
    import warnings

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("torchao", "torch.utils._pytree", "torch._export", "torch.export", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # our warnings speak to the user of an application, who gets them printed even under -W error
    warnings.filterwarnings("default", category=_OwnWarning)
    warnings.showwarning = _show_warning


class _OwnWarning(Warning, metaclass=abc.ABCMeta):
    """Stands for every warning category defined in mobilequant (``DataWarning``, ``QATWarning``, ...) in a
    warnings filter: a category is one by its module, so one in a module not imported yet is one too."""

    @classmethod
    def __subclasshook__(cls, category):
        return True if category.__module__.startswith("mobilequant.") else NotImplemented


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """mobilequant's own warnings (about the user's data and files) as one line each, like its errors;
    a library's warning keeps Python's format, which says where it comes from."""
    import warnings

    file = sys.stderr if file is None else file
    if file is None:  # stderr closed
        return
    with contextlib.suppress(OSError):
        if issubclass(category, _OwnWarning):
            print(f"mobilequant: warning: {message}", file=file, flush=True)
        else:
            file.write(warnings.formatwarning(message, category, filename, lineno, line))


def _run(args: argparse.Namespace) -> int:
    quiet_library_logs()
    try:  # torch needs one as it imports (its compile cache): without it every command ends in a traceback
        tempfile.gettempdir()
    except FileNotFoundError:
        tried = f"TMPDIR={os.environ['TMPDIR']}, " if os.environ.get("TMPDIR") else "TMPDIR is not set; "
        raise UsageError(f"no usable temporary directory ({tried}/tmp, /var/tmp, /usr/tmp and the current "
                         "directory are not writable): set TMPDIR to a writable directory") from None
    from . import api  # imported here: heavy dependencies load only for commands that need them

    if args.command == "zoo":
        if args.zoo_command == "list":
            _print(api.zoo_list(args.pattern), args.json)
        elif args.zoo_command == "info":
            _print(api.zoo_info(args.name, resolution=args.resolution, num_classes=args.num_classes,
                                width_mult=args.width_mult), args.json)
        else:
            raise UsageError("zoo: choose 'list' or 'info' (see `mobilequant zoo --help`)")
        return EXIT_OK
    if args.command == "export":
        if args.target is None and args.recipe is None:
            raise UsageError("export needs --target (or a --recipe, which names its target)")
        result = api.export_model(target=args.target, model=args.model, weights=args.weights,
                                  resolution=args.resolution, data=args.data, eval_data=args.eval_data,
                                  recipe=args.recipe, out=args.out, overrides=args.overrides,
                                  num_eval=args.num_eval, verify=not args.no_verify, audit=args.audit,
                                  progress=not (args.quiet or args.json))
    elif args.command == "calibrate":
        result = api.calibrate(model=args.model, weights=args.weights, resolution=args.resolution, data=args.data,
                               recipe=args.recipe, overrides=args.overrides, out=args.out,
                               progress=not (args.quiet or args.json))
    elif args.command == "audit":
        result = api.audit(args.artifact, model=args.model, weights=args.weights, resolution=args.resolution,
                           data=args.data, num_images=args.num_images, max_drop=args.max_drop,
                           min_sqnr=args.min_sqnr, fail_on_dead_kernels=args.fail_on_dead_kernels,
                           report=args.report, html=args.html, progress=not (args.quiet or args.json))
    elif args.command == "qat":
        result = api.qat(model=args.model, weights=args.weights, resolution=args.resolution, data=args.data,
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, recipe=args.recipe, out_dir=args.out_dir,
                         resume=args.resume, resume_from=args.resume_from, val_data=args.val_data,
                         seed=args.seed, export=args.export, start=args.start,
                         freeze_bn_step=args.freeze_bn_step, freeze_observer_step=args.freeze_observer_step,
                         progress=not (args.quiet or args.json))
    elif args.command == "bench":
        result = api.bench(args.artifacts, threads=args.threads, runs=args.runs, warmup=args.warmup)
    else:
        raise UsageError("choose a command (export, qat, audit, zoo, bench, calibrate); see `mobilequant --help`")
    if getattr(result, "main_process", True):  # in a torchrun job one process prints: the one that wrote the files
        _print(result, args.json, getattr(args, "quiet", False))
    return EXIT_CHECK_FAILED if getattr(result, "failed", False) else EXIT_OK


@contextlib.contextmanager
def _native_stderr_held(enabled: bool):
    """With ``-q``, what the native libraries write straight to file descriptor 2 (absl's "log messages
    before absl::InitializeLog()", TensorFlow's oneDNN notice, LiteRT's "Created TensorFlow Lite XNNPACK
    delegate") is held back; Python's own stderr (our warnings, errors, tracebacks) still goes to the
    terminal. ``TF_CPP_MIN_LOG_LEVEL`` silences none of these three (absl logs through its own sink), so
    descriptor 2 itself is pointed at a temporary file while the command runs; the file is replayed when
    the command ends in a bug (an exception that is not a user error or a stop), where those lines may be
    the diagnosis, and dropped otherwise. With no writable temporary directory nothing is held."""
    try:
        stream = sys.stderr
        usable = enabled and stream is not None and stream.fileno() == 2
    except (AttributeError, OSError, ValueError):  # pytest's capsys, a closed or replaced stream
        usable = False
    held = None
    if usable:
        with contextlib.suppress(OSError):  # FileNotFoundError: no usable temporary directory
            held = tempfile.TemporaryFile()
    if held is None:
        yield
        return
    stream.flush()
    saved = os.dup(2)
    python_stderr = open(saved, "w", encoding=stream.encoding, errors=stream.errors,  # noqa: SIM115
                         buffering=1, closefd=False)
    os.dup2(held.fileno(), 2)
    sys.stderr = python_stderr
    try:
        yield
    except BaseException as e:
        if not isinstance(e, (MobileQuantError, KeyboardInterrupt)) and not _on_stdout(e):
            held.seek(0)
            python_stderr.flush()
            os.write(saved, held.read())
        raise
    finally:
        python_stderr.flush()
        sys.stderr = stream
        os.dup2(saved, 2)
        os.close(saved)
        python_stderr.close()
        held.close()


def _raise_stop(signum, frame):
    """The handler of SIGINT and SIGTERM while a command runs: record the signal, then raise. A library
    that catches the exception and carries on (jax's garbage-collection callback does) still cannot make
    the command write its files or exit 0 (:func:`mobilequant.errors.raise_if_stopped`)."""
    note_stop(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def _stop_signals_raise():
    """SIGTERM (``kill``, a scheduler's timeout, torchrun stopping its workers) raises :class:`Terminated`
    and Ctrl-C ``KeyboardInterrupt`` while the command runs, each recorded as well; the previous handlers
    are restored after (``main`` runs in-process in tests). A SIGINT that is ignored (a job started with
    ``nohup`` or in the background of a non-interactive shell) or handled by the caller is left so."""
    note_stop(None)
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_stop)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _raise_stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        note_stop(None)


class _MarkedStdout:
    """``sys.stdout`` while a command runs: an ``OSError`` raised by writing to it is marked (and re-raised
    as it is), so :func:`main` tells a closed pipe or a full disk behind ``>`` from the command's own
    errors. Everything else is the real stream's."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as e:
            e.mobilequant_stdout = True
            raise

    def flush(self):
        try:
            return self._stream.flush()
        except OSError as e:
            e.mobilequant_stdout = True
            raise

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _on_stdout(e: BaseException) -> bool:
    return getattr(e, "mobilequant_stdout", False)


def _never_fail_on_encoding() -> None:
    """What stdout / stderr cannot encode (→, ≥, · under an ASCII or Latin-1 locale) is written escaped.
    Python's own choice fails on it: ``strict``, or ``surrogateescape`` in the C locale."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) in ("strict", "surrogateescape") and hasattr(stream, "reconfigure"):
            with contextlib.suppress(OSError, ValueError):
                stream.reconfigure(errors="backslashreplace")


def _stdout_to_devnull(stream) -> None:
    """After stdout failed: what is left in its buffer goes nowhere, so the interpreter's flush at exit does
    not fail again with a traceback (the pattern of Python's documentation on SIGPIPE)."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    _never_fail_on_encoding()
    stdout = sys.stdout
    if stdout is not None:
        sys.stdout = _MarkedStdout(stdout)
    try:
        try:
            return _main(argv)
        finally:
            if sys.stdout is not None:  # here, not at exit: a failure is still ours to report
                sys.stdout.flush()
    except OSError as e:
        if not _on_stdout(e):
            raise
        _stdout_to_devnull(stdout)
        if isinstance(e, BrokenPipeError):  # the reader has what it wanted (`| head -1`): no message
            return EXIT_BROKEN_PIPE
        _say(f"mobilequant: error: cannot write to standard output: {e.strerror or e}")
        return EXIT_USAGE
    finally:
        if isinstance(sys.stdout, _MarkedStdout):
            sys.stdout = stdout


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with _stop_signals_raise():
        try:
            try:
                code = _command(argv)
            except MobileQuantError as e:
                raise_if_stopped()  # an error that followed a swallowed stop is the stop's doing
                _say(f"mobilequant: error: {e}")
                return e.exit_code
            raise_if_stopped()  # a stop a library swallowed: the command went on, but it was stopped
            return code
        except Terminated:
            # what reached the output path depends on where the job was stopped: say nothing about it
            # (temporary files and an output folder the job created and left empty are removed)
            _say("mobilequant: terminated (SIGTERM)" + _qat_note(argv))
            return EXIT_TERMINATED
        except KeyboardInterrupt:
            _say("mobilequant: interrupted" + _qat_note(argv))
            return EXIT_INTERRUPTED


def _command(argv: list[str]) -> int:
    """Parse ``argv`` and run its command; its exit code."""
    parser = build_parser()
    if argv and argv[0] == "help":  # `help [COMMAND [SUBCOMMAND]]` is `[COMMAND [SUBCOMMAND]] --help`
        if len(argv) > 1 and argv[1] not in _EXAMPLES:
            raise UsageError(f"help: unknown command {argv[1]!r}{did_you_mean(argv[1], _EXAMPLES)}")
        try:
            parser.parse_args([*argv[1:], "--help"])
        except SystemExit as e:  # argparse has printed the help
            return e.code if isinstance(e.code, int) else EXIT_OK
    if argv and not argv[0].startswith("-") and argv[0] not in _EXAMPLES:
        raise UsageError(f"unknown command {argv[0]!r}{did_you_mean(argv[0], [*_EXAMPLES, 'help'])}")
    args, extra = parser.parse_known_args(argv)
    if extra:
        raise UsageError(_unrecognized(parser, args, extra))
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    with _native_stderr_held(getattr(args, "quiet", False)):
        return _run(args)


def _qat_note(argv: list[str]) -> str:
    return ("; `mobilequant qat --resume` continues from the last checkpoint, if one was written"
            if argv and argv[0] == "qat" else "")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
