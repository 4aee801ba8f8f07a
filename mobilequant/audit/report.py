"""The audit's result: typed records, the JSON report (schema in docs/audit.md) and the terminal summary."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, UsageError
from .health import DEAD_CHECKS, Finding

__all__ = ["SCHEMA", "LayerResult", "EndToEnd", "GateFailure", "Gate", "AuditReport", "write_json", "format_terminal"]

SCHEMA = "mobilequant.audit/1"


def _num(v):
    """JSON-safe float: nan / inf → None."""
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) or math.isinf(v) else round(v, 6)


@dataclass(frozen=True)
class LayerResult:
    """Per-layer comparison with the float torch reference on the evaluation batch."""

    index: int  # position along the network (graph order)
    name: str  # stable layer name
    kind: str  # depthwise | pointwise | conv | linear | add | ...
    tensor: str  # tensor name in the artifact
    accumulated: dict[str, float]  # metrics of the artifact's tensor (all layers before it quantized too)
    isolated: dict[str, float] | None  # metrics of this layer alone fed the float reference (None: not run)
    segment_ops: tuple[str, ...] = ()  # artifact ops run for the isolated measurement

    @property
    def iso_sqnr(self) -> float:
        return self.isolated["sqnr_db"] if self.isolated else math.nan

    @property
    def acc_sqnr(self) -> float:
        return self.accumulated["sqnr_db"]

    def to_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "kind": self.kind, "tensor": self.tensor,
                "accumulated": {k: _num(v) for k, v in self.accumulated.items()},
                "isolated": None if self.isolated is None else {k: _num(v) for k, v in self.isolated.items()},
                "segment_ops": list(self.segment_ops)}


@dataclass(frozen=True)
class EndToEnd:
    """Whole-model comparison on the evaluation set."""

    images: int
    labels_used: bool
    float_top1: float | None  # accuracy in [0, 1] (None without labels)
    quant_top1: float | None
    top1_agreement: float  # fraction of images where both predict the same class
    top5_containment: float  # fraction where the float top-1 class is in the artifact's top 5
    output_sqnr_db: float  # SQNR of the artifact's logits against the float logits
    note: str = ""
    # With labels: images only the float model gets right / only the artifact gets right. The drop is
    # their net difference over ``images``; their sum sets its noise (the other images cannot move it).
    float_only_right: int | None = None
    quant_only_right: int | None = None

    @property
    def drop_pp(self) -> float | None:
        """From image counts where the audit has them: (0.955 − 0.95)·100 is 0.5000000000000004 in floats,
        and a drop of exactly one image in 200 failed a 0.5 pp gate."""
        if self.float_top1 is None or self.quant_top1 is None:
            return None
        if self.images and self.float_only_right is not None and self.quant_only_right is not None:
            return 100.0 * (self.float_only_right - self.quant_only_right) / self.images
        return (self.float_top1 - self.quant_top1) * 100.0

    @property
    def disagreement_pp(self) -> float:
        if self.images and not math.isnan(self.top1_agreement):  # a count of images, like the drop
            return 100.0 * round(self.images * (1.0 - self.top1_agreement)) / self.images
        return (1.0 - self.top1_agreement) * 100.0

    @property
    def ci95_pp(self) -> float | None:
        """Half-width (pp) of the 95 % interval of the gated figure: the drop with labels (paired:
        ``1.96·√((b + c)/n − ((b − c)/n)²)/√n`` with b, c the images only one of the two models gets
        right), else the disagreement (binomial). It says how far the figure moves with the sample of
        images alone — a gate closer to the figure than this decides on noise."""
        n = self.images
        if not n:
            return None
        if self.labels_used:
            if self.float_only_right is None or self.quant_only_right is None:
                return None
            b, c = self.float_only_right / n, self.quant_only_right / n
            var = max(b + c - (b - c) ** 2, 0.0) / n
        else:
            p = 1.0 - self.top1_agreement
            var = p * (1.0 - p) / n
        return 196.0 * math.sqrt(var)

    @property
    def gated_pp(self) -> float:
        """The figure ``max_drop`` gates: the drop with labels, the disagreement without."""
        return self.drop_pp if self.labels_used and self.drop_pp is not None else self.disagreement_pp

    def noise_note(self, max_drop: float | None) -> str:
        """'' or a sentence saying that the gate ``max_drop`` lies inside the gated figure's 95 % interval."""
        ci = self.ci95_pp
        if max_drop is None or ci is None or math.isnan(ci) or abs(self.gated_pp - max_drop) >= ci:
            return ""
        return (f"the {max_drop:g} pp gate is within the ±{ci:.2f} pp noise of {self.images} images (95 %): "
                "the verdict is the sample's; more images decide it")

    def to_dict(self) -> dict:
        return {"images": self.images, "labels_used": self.labels_used, "float_top1": _num(self.float_top1),
                "quant_top1": _num(self.quant_top1), "drop_pp": _num(self.drop_pp),
                "top1_agreement": _num(self.top1_agreement), "top5_containment": _num(self.top5_containment),
                "disagreement_pp": _num(self.disagreement_pp), "output_sqnr_db": _num(self.output_sqnr_db),
                "float_only_right": self.float_only_right, "quant_only_right": self.quant_only_right,
                "ci95_pp": _num(self.ci95_pp), "note": self.note}


@dataclass(frozen=True)
class GateFailure:
    check: str  # "accuracy_drop" | "disagreement" | "layer_sqnr" | "dead_kernels"
    subject: str  # what failed: "model" or a layer name
    message: str
    value: float | None = None
    limit: float | None = None

    def to_dict(self) -> dict:
        return {"check": self.check, "subject": self.subject, "message": self.message,
                "value": _num(self.value), "limit": _num(self.limit)}


@dataclass(frozen=True)
class Gate:
    """The release gate's settings; ``None`` switches a check off."""

    max_drop: float | None = 0.5  # pp of top-1 accuracy (without labels: pp of top-1 disagreement)
    min_sqnr: float | None = None  # dB, every layer's isolated SQNR
    fail_on_dead_kernels: bool = False  # error-severity health findings (dead depthwise kernels) fail the gate

    def to_dict(self) -> dict:
        return {"max_drop_pp": self.max_drop, "min_sqnr_db": self.min_sqnr,
                "fail_on_dead_kernels": self.fail_on_dead_kernels}


@dataclass(repr=False)
class AuditReport:
    """Everything the audit found; ``passed`` is the gate's verdict (the CLI exits 0 / 1 on it)."""

    artifact: dict  # path, target, sha256, model_name, quant_table_sha256
    data: dict  # source, images, labels
    gate: Gate
    end_to_end: EndToEnd
    layers: list[LayerResult]
    findings: list[Finding]
    failures: list[GateFailure]
    unmapped_layers: list[str] = field(default_factory=list)  # float layers with no tensor in the artifact
    kernel_norms: dict[str, list[float]] = field(default_factory=dict)  # depthwise: per-channel norm / median
    warnings: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"

    def worst_layers(self, n: int | None = None, by: str = "isolated") -> list[LayerResult]:
        """Layers sorted worst first by SQNR (``isolated``: the layer's own error; ``accumulated``)."""
        def key(l: LayerResult):
            v = l.iso_sqnr if by == "isolated" else l.acc_sqnr
            return (math.inf if math.isnan(v) else v, l.index)
        out = sorted(self.layers, key=key)
        return out if n is None else out[:n]

    def dead_findings(self) -> list[Finding]:
        return [f for f in self.findings if f.check in DEAD_CHECKS]

    def end_to_end_notes(self) -> list[str]:
        """The end-to-end notes every form of the report shows: the measurement's own, and that the gate
        lies within the sampling noise (unless a failing gate says so in its failure already)."""
        e = self.end_to_end
        noise = e.noise_note(self.gate.max_drop)
        if any(f.check in ("accuracy_drop", "disagreement") for f in self.failures):
            noise = ""
        return [n for n in (e.note, noise) if n]

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "verdict": self.verdict,
            "failures": [f.to_dict() for f in self.failures],
            "artifact": self.artifact,
            "data": self.data,
            "gate": self.gate.to_dict(),
            "end_to_end": {**self.end_to_end.to_dict(), "note": " ".join(self.end_to_end_notes())},
            "layers": [l.to_dict() for l in self.layers],
            "worst_layers": [l.name for l in self.worst_layers(10)],
            "unmapped_layers": list(self.unmapped_layers),
            "findings": [f.to_dict() for f in sorted(self.findings, key=lambda f: f.sort_key)],
            "kernel_norms": {k: [_num(x) for x in v] for k, v in self.kernel_norms.items()},
            "warnings": list(self.warnings),
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
        }

    def __repr__(self) -> str:
        """One line of key figures (the dataclass repr printed every layer: ~110k characters in a notebook)."""
        e = self.end_to_end
        drop = "" if e.drop_pp is None else f", drop {e.drop_pp:+.2f} pp"
        return (f"AuditReport({str(self.artifact.get('path', ''))!r}, {self.verdict}, {e.images} images, "
                f"agreement {100 * e.top1_agreement:.2f} %{drop}, {len(self.layers)} layers, "
                f"{len(self.failures)} failure(s), {len(self.findings)} finding(s))")

    def write_json(self, path: str | os.PathLike) -> Path:
        return write_json(self, path)

    def write_html(self, path: str | os.PathLike) -> Path:
        from .html import write_html

        return write_html(self, path)

    def summary(self, top: int = 10) -> str:
        return format_terminal(self, top)


def check_name_lengths(path: str | os.PathLike, what: str) -> None:
    """Refuse, as a :class:`UsageError` naming ``what`` (``-o``, ``--report``), a path with a file or folder
    name longer than the file system takes (``NAME_MAX``, 255 bytes on most) or longer than ``PATH_MAX`` in
    all: ``Path.exists`` / ``is_dir`` / ``stat`` raise ``OSError`` (Errno 36) on it, which had come out as a
    traceback. Shared by every command that writes to a path it is given."""
    text = os.fspath(path)
    raw = os.fsencode(text)
    shown = text if len(text) <= 80 else f"{text[:40]}…{text[-20:]} ({len(text)} characters)"
    base = Path(text).parent
    while not os.path.isdir(base) and base != base.parent:  # os.path.isdir returns False on any OSError
        base = base.parent
    try:
        name_max, path_max = (os.pathconf(base, "PC_NAME_MAX"), os.pathconf(base, "PC_PATH_MAX"))
    except (OSError, ValueError):
        name_max, path_max = -1, -1
    name_max, path_max = (name_max if name_max > 0 else 255), (path_max if path_max > 0 else 4096)
    if len(raw) >= path_max:
        raise UsageError(f"{what} {shown}: the path is {len(raw)} bytes long, over the file system's limit of "
                         f"{path_max - 1} (shorten it)")
    longest = max((os.fsencode(part) for part in Path(text).parts), key=len, default=b"")
    if len(longest) > name_max:
        raise UsageError(f"{what} {shown}: a file or folder name in it is {len(longest)} bytes long, over the "
                         f"file system's limit of {name_max} bytes for a name (shorten it)")


def check_report_paths(artifact: str | os.PathLike, *paths: str | os.PathLike | None) -> None:
    """Refuse, before an audit runs, report paths it could only fail on (or lose data through) after it:
    a name ending in a slash (``--report out/`` had written a *file* named ``out``), the artifact itself
    (``--report model.onnx`` replaced the model by its report), the same file for two reports, an existing
    directory, and a place no file can be created in (a read-only directory, ``/proc``, below a regular
    file) — found by creating and removing a probe file in the nearest existing directory. A missing
    directory is created when the report is written."""
    import tempfile

    given = [str(p) for p in paths if p]
    for text in given:
        check_name_lengths(text, "cannot write the report")
    resolved = [Path(p).expanduser().resolve() for p in given]
    art = Path(artifact).expanduser().resolve()
    for text, path in zip(given, resolved):
        if text.endswith(("/", os.sep)) or path.is_dir():
            raise InputError(f"cannot write the report {text}: it names a directory (give a file name)")
        if path == art:
            raise InputError(f"cannot write the report {text}: it is the artifact being audited")
        if resolved.count(path) > 1:
            raise InputError(f"cannot write both reports to {text}: give the JSON and the HTML report "
                             "different names")
        base = path.parent
        while not base.exists() and base != base.parent:
            base = base.parent
        if not base.is_dir():
            raise InputError(f"cannot write the report {text}: {base} is a file, not a directory")
        try:
            fd, probe = tempfile.mkstemp(prefix=".mq-probe-", dir=base)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise InputError(f"cannot write the report {text}: {base}: {e.strerror or e}") from None


def _atomic_write(path: str | os.PathLike, text: str) -> Path:
    """Write a report atomically, creating its directory (an existing directory as ``path`` or an
    unwritable place is an ``InputError`` naming it)."""
    from ..export.artifact import atomic_write

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    return atomic_write(path, text.encode("utf-8"))


def write_json(report: AuditReport, path: str | os.PathLike) -> Path:
    """Write the JSON report atomically (``allow_nan=False``: the file is strict JSON)."""
    return _atomic_write(path, json.dumps(report.to_dict(), indent=1, allow_nan=False) + "\n")


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def _db(v: float) -> str:
    return "  n/a" if v is None or math.isnan(v) else f"{v:5.1f}"


def _channels(ch: tuple[int, ...], limit: int = 12) -> str:
    s = ", ".join(str(c) for c in ch[:limit])
    return s + (f", … (+{len(ch) - limit})" if len(ch) > limit else "")


def format_terminal(report: AuditReport, top: int = 10) -> str:
    """The terminal summary: verdict, failing items first, end to end, worst layers, dead kernels."""
    r, e = report, report.end_to_end
    lines = [f"mobilequant audit: {'PASS' if r.passed else 'FAIL'} — {r.artifact.get('path', '?')} "
             f"({r.artifact.get('target', '?')}), {e.images} images of {r.data.get('source', '?')}"]
    if r.failures:
        lines.append(f"Failing ({len(r.failures)}):")
        lines += [f"  ✗ {f.message}" for f in r.failures[:top]]
        if len(r.failures) > top:
            lines.append(f"  … and {len(r.failures) - top} more (all in the JSON / HTML report)")
    ci = " pp" if e.ci95_pp is None or math.isnan(e.ci95_pp) else f" ± {e.ci95_pp:.2f} pp at 95 %"
    if e.labels_used:
        lines.append(f"End to end: top-1 float {_pct(e.float_top1)} → artifact {_pct(e.quant_top1)} "
                     f"(drop {e.drop_pp:+.2f}{ci}); agreement {_pct(e.top1_agreement)}; "
                     f"top-5 containment {_pct(e.top5_containment)}; logits SQNR {e.output_sqnr_db:.1f} dB")
    else:
        lines.append(f"End to end (no labels — agreement metrics only): top-1 agreement {_pct(e.top1_agreement)} "
                     f"(disagreement {e.disagreement_pp:.2f}{ci}); top-5 containment "
                     f"{_pct(e.top5_containment)}; logits SQNR {e.output_sqnr_db:.1f} dB")
    lines += [f"  note: {n}" for n in r.end_to_end_notes()]
    if r.layers:
        lines.append(f"Worst layers by isolated SQNR (the layer's own error; accumulated = what reaches it):")
        w = max(len(l.name) for l in r.layers)
        kw = max(10, max(len(l.kind) for l in r.layers))
        lines.append(f"  {'#':>3}  {'layer':<{w}}  {'kind':<{kw}} {'iso dB':>6} {'acc dB':>6} {'cos':>7} {'max|err|':>9}")
        limit = r.gate.min_sqnr
        for l in r.worst_layers(top):
            flag = "✗" if limit is not None and not math.isnan(l.iso_sqnr) and l.iso_sqnr < limit else " "
            lines.append(f"{flag} {l.index:>3}  {l.name:<{w}}  {l.kind:<{kw}} {_db(l.iso_sqnr):>6} {_db(l.acc_sqnr):>6} "
                         f"{l.accumulated['cosine']:7.4f} {l.accumulated['max_abs_error']:9.4f}")
    dead = sorted((f for f in r.dead_findings() if f.check != "dead_activation"), key=lambda f: f.sort_key)
    remedies: dict[str, str] = {}
    if dead:
        lines.append("Dead kernels (!! fails the gate with fail_on_dead_kernels):")
        w = max(len(f.layer) for f in dead)
        for f in dead:
            mark = "!!" if f.severity == "error" else " !"
            lines.append(f" {mark} {f.layer:<{w}}  {f.layer_kind:<9} {f.check:<13} {f.stage:<9} "
                         f"{len(f.channels)}/{f.channel_count} ch [{_channels(f.channels, 8)}]")
            remedies.setdefault(f.check, f.remedy)
    acts = sorted((f for f in r.findings if f.check == "dead_activation"), key=lambda f: f.sort_key)
    if acts:
        fl = [f for f in acts if f.stage == "float"]
        ql = [f for f in acts if f.stage == "quantized"]
        def n_layers(k: int) -> str:
            return f"{k} layer{'' if k == 1 else 's'}"

        head = (f"Dead activations (0 on every image): {sum(len(f.channels) for f in fl)} channels in "
                f"{n_layers(len(fl))} of the float model")
        if ql:
            head += f"; {sum(len(f.channels) for f in ql)} more in {n_layers(len(ql))} of the artifact only (alive in float)"
        lines.append(head)
        w = max(len(f.layer) for f in acts)
        for f in sorted(acts, key=lambda f: (-len(f.channels) / max(f.channel_count, 1), f.layer_index))[:top // 2 or 1]:
            lines.append(f"  ! {f.layer:<{w}}  {f.layer_kind:<9} {f.stage:<9} {len(f.channels)}/{f.channel_count} ch "
                         f"[{_channels(f.channels, 8)}]")
        if len(acts) > (top // 2 or 1):
            lines.append(f"    … {len(acts) - (top // 2 or 1)} more layers in the report")
        remedies.setdefault("dead_activation", acts[0].remedy)
    other = sorted((f for f in r.findings if f.check not in DEAD_CHECKS and f.severity != "info"),
                   key=lambda f: f.sort_key)
    if other:
        lines.append("Other weight-health findings:")
        for f in other[:top]:
            lines.append(f"  {'!!' if f.severity == 'error' else ' !'} {f.layer} ({f.layer_kind}, {f.stage}): {f.why}")
            remedies.setdefault(f.check, f.remedy)
        if len(other) > top:
            lines.append(f"   … {len(other) - top} more in the report")
    if remedies:
        lines.append("Remedies:")
        lines += [f"  {check}: {remedy}" for check, remedy in remedies.items()]
    info = [f for f in r.findings if f.severity == "info"]
    if info:
        lines.append(f"({len(info)} informational findings, e.g. range spreads absorbed by per-channel weights, "
                     "are in the JSON / HTML report)")
    if r.unmapped_layers:
        shown = ", ".join(r.unmapped_layers[:8]) + (f", … (+{len(r.unmapped_layers) - 8})" if len(r.unmapped_layers) > 8 else "")
        lines.append(f"Layers with no tensor in the artifact (not compared): {shown}")
    lines += [f"warning: {w}" for w in r.warnings]
    return "\n".join(lines)
