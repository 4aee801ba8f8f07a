"""The release gate: accuracy drop, per-layer SQNR, dead kernels → a list of failures (empty = pass).

* ``max_drop`` (pp): with labels, ``(float top-1 − artifact top-1) × 100``. Without labels the top-1
  *disagreement* is gated instead: the accuracy drop can never exceed it (the two models can only
  differ in accuracy on images where they disagree), so it is a conservative stand-in, and the failure
  says so. The failure carries the figure's 95 % interval on these images and says when the gate lies
  inside it (a drop of 0.8 pp on 1,000 images is ±0.9 pp: the verdict is the sample's, more images
  decide it); the gate itself compares the measured figure, as the user set it.
* ``min_sqnr`` (dB): every layer's **isolated** SQNR, i.e. the error the layer itself adds. The
  accumulated SQNR falls along any network and is shown, not gated: a layer that only inherits error
  is not the one to fix.
* ``fail_on_dead_kernels``: every ``error``-severity finding of :mod:`mobilequant.audit.health`.
* always, for a float file (fp32 / fp16 weights and activations): its logits must be the model's within
  float rounding — SQNR ≥ :data:`FLOAT_FIDELITY_DB` (measured: fp32 files 124 dB, fp16 files 65 dB on the
  shipped MobileNetV2). An int8 file's kernels are compared with the model's before anything runs; a
  float file's were not, and a float file of *another* model passed every gate (−150 dB, 13 % agreement,
  its accuracy above the model's). Below the floor the file does not compute this model: other weights,
  or a broken conversion.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from .health import Finding
from .report import EndToEnd, Gate, GateFailure, LayerResult

__all__ = ["evaluate_gate", "FLOAT_FIDELITY_DB"]

FLOAT_FIDELITY_DB = {"fp32": 60.0, "fp16": 35.0}  # logits SQNR a float file of its own model stays above


def _digits(value: float, limit: float, first: int) -> str:
    """``value`` with as many decimals as it takes not to print as the limit it failed ("isolated SQNR
    31.6 dB < 31.6 dB" for 31.598)."""
    for d in range(first, 7):
        text = f"{value:.{d}f}"
        if float(text) != limit:
            return text
    return repr(value)


def _below(value: float, limit: float) -> str:
    return _digits(value, limit, 1)


def _above(value: float, limit: float) -> str:
    return _digits(value, limit, 2)


def evaluate_gate(gate: Gate, e2e: EndToEnd, layers: Iterable[LayerResult], findings: Iterable[Finding],
                  float_precision: str | None = None) -> list[GateFailure]:
    """``float_precision``: ``"fp32"`` / ``"fp16"`` for a float file (its fidelity is then gated too)."""
    out: list[GateFailure] = []
    floor = FLOAT_FIDELITY_DB.get(float_precision or "")
    if floor is not None and not (e2e.output_sqnr_db >= floor):  # NaN fails too
        out.append(GateFailure(
            "float_fidelity", "model",
            f"the {float_precision} file's logits are {e2e.output_sqnr_db:.1f} dB from the model's "
            f"(a {float_precision} file of its own model stays above {floor:g} dB; top-1 agreement "
            f"{100 * e2e.top1_agreement:.2f} %): the file does not compute this model — other weights, or a "
            "broken conversion", e2e.output_sqnr_db, floor))
    if gate.max_drop is not None:
        noise = e2e.noise_note(gate.max_drop)
        noise = f"; {noise}" if noise else ""
        if e2e.labels_used and e2e.drop_pp is not None:
            if e2e.drop_pp > gate.max_drop:
                out.append(GateFailure(
                    "accuracy_drop", "model",
                    f"top-1 accuracy drop {_above(e2e.drop_pp, gate.max_drop)} pp > {gate.max_drop:g} pp "
                    f"(float {100 * e2e.float_top1:.2f} %, artifact {100 * e2e.quant_top1:.2f} %{noise})",
                    e2e.drop_pp, gate.max_drop))
        elif e2e.disagreement_pp > gate.max_drop:
            out.append(GateFailure(
                "disagreement", "model",
                f"top-1 disagreement with the float model {_above(e2e.disagreement_pp, gate.max_drop)} pp > {gate.max_drop:g} pp "
                f"(no labels: the disagreement bounds the accuracy drop from above{noise})",
                e2e.disagreement_pp, gate.max_drop))
    if gate.min_sqnr is not None:
        bad = [l for l in layers if l.isolated is not None and not math.isnan(l.iso_sqnr) and l.iso_sqnr < gate.min_sqnr]
        for l in sorted(bad, key=lambda l: (l.iso_sqnr, l.index)):
            out.append(GateFailure(
                "layer_sqnr", l.name,
                f"layer {l.name} ({l.kind}): isolated SQNR {_below(l.iso_sqnr, gate.min_sqnr)} dB < {gate.min_sqnr:g} dB "
                f"(accumulated {l.acc_sqnr:.1f} dB)", l.iso_sqnr, gate.min_sqnr))
    if gate.fail_on_dead_kernels:
        for f in sorted((f for f in findings if f.severity == "error"), key=lambda f: f.sort_key):
            chans = ", ".join(str(c) for c in f.channels[:10]) + (" …" if len(f.channels) > 10 else "")
            out.append(GateFailure(
                "dead_kernels", f.layer,
                f"{f.check.replace('_', ' ')} in {f.layer} ({f.layer_kind}, {f.stage}): "
                f"{len(f.channels)} of {f.channel_count} channels [{chans}]",
                float(len(f.channels)), 0.0))
    return out
