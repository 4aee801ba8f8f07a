"""Accuracy audit: metrics, layer grouping, weight health, the real-artifact pipeline, the gate, bad input.

Everything runs the real thing: the shipped trained MobileNetV2 0.5, real PT2E quantization, real
TFLite / ONNX exports run in LiteRT / ONNX Runtime. Expensive objects (quantization, exports) are built
once per module.
"""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
from conftest import validate_audit_report
import torch

from mobilequant.audit import (AuditReport, EndToEnd, ErrorStats, Gate, LayerResult, compute_metrics,
                               dead_activation_findings, end_to_end, evaluate_gate, float_weight_findings,
                               fused_layers, run_audit)
from mobilequant.audit.artifact import open_artifact
from mobilequant.export.layout import LayoutMismatch, to_file_layout, to_nchw
from mobilequant.capture import capture
from mobilequant.data import ImageData, builtin_dataset, calibration_set
from mobilequant.errors import InputError

N_IMAGES = 300  # evaluation images per audit in these tests (the benchmark uses 1,000)
# The exporter's own verification (file vs torch simulation) is export's test; the audit audits whatever
# file it is given, so the exports here skip it (and its time).
NO_VERIFY = ("verification.enabled=false",)


# ------------------------------------------------------------------------------------------ metrics
def test_error_stats_match_direct_formulas():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(10, 4, 5, 5)).astype(np.float32)
    test = ref + rng.normal(scale=0.05, size=ref.shape).astype(np.float32)
    s = ErrorStats().update(ref[:3], test[:3]).update(ref[3:], test[3:])  # two batches = one
    m = compute_metrics(s)
    expect_sqnr = 10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ref - test).astype(np.float64) ** 2).sum())
    a, b = ref.reshape(10, -1).astype(np.float64), test.reshape(10, -1).astype(np.float64)
    expect_cos = np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    assert m["sqnr_db"] == pytest.approx(expect_sqnr, abs=1e-3)
    assert m["cosine"] == pytest.approx(expect_cos, abs=1e-6)
    assert m["max_abs_error"] == pytest.approx(float(np.abs(ref - test).max()))
    assert 20 < m["sqnr_db"] < 30  # noise at 5 % of a unit signal: ~26 dB


def test_error_stats_edge_cases():
    z = np.zeros((2, 3), np.float32)
    same = compute_metrics(ErrorStats().update(np.ones((2, 3), np.float32), np.ones((2, 3), np.float32)))
    assert same["sqnr_db"] == 150.0 and same["cosine"] == 1.0  # capped, JSON-safe
    silent = compute_metrics(ErrorStats().update(z, z))
    assert silent["cosine"] == 1.0
    noise_only = compute_metrics(ErrorStats().update(z, np.ones((2, 3), np.float32)))
    assert noise_only["sqnr_db"] == -150.0 and noise_only["cosine"] == 0.0
    with pytest.raises(ValueError):
        ErrorStats().update(z, np.zeros((3, 2), np.float32))


def test_median_channel_sqnr_sees_small_channels_crushed_by_a_shared_scale():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(8, 4, 6, 6)).astype(np.float32)
    ref[:, 0] *= 100.0  # one large channel sets the per-tensor scale
    step = np.abs(ref).max() / 127
    test = (np.round(ref / step) * step).astype(np.float32)  # int8, one scale for the tensor
    m = compute_metrics(ErrorStats().update(ref, test))
    assert m["sqnr_db"] > 35  # the tensor looks fine...
    assert m["median_channel_sqnr_db"] < 5  # ...but the small channels are mostly rounding noise
    fine = compute_metrics(ErrorStats().update(ref, ref + 1e-4 * ref))
    assert fine["median_channel_sqnr_db"] == pytest.approx(80.0, abs=0.5)


def test_layout_nhwc_and_squeezed_shapes():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # NCHW
    nhwc = to_file_layout(x, (1, 4, 5, 3), prefer_nhwc=True)
    assert nhwc.shape == (2, 4, 5, 3) and np.array_equal(to_nchw(nhwc, x.shape, prefer_nhwc=True), x)
    # C = H = W: only the preference can decide, and it is honoured both ways
    cube = np.arange(2 * 27, dtype=np.float32).reshape(2, 3, 3, 3)
    assert np.array_equal(to_nchw(cube, cube.shape, prefer_nhwc=True), cube.transpose(0, 3, 1, 2))
    assert np.array_equal(to_nchw(cube, cube.shape, prefer_nhwc=False), cube)
    pooled = np.ones((2, 7), np.float32)  # TFLite global pool (N, C) vs torch (N, C, 1, 1)
    assert to_nchw(pooled, (2, 7, 1, 1), prefer_nhwc=True).shape == (2, 7, 1, 1)
    with pytest.raises(LayoutMismatch):
        to_nchw(np.ones((2, 8, 8, 4), np.float32), (2, 3, 8, 8), prefer_nhwc=True)


def test_float_reference_is_not_overwritten_by_inplace_ops():
    """conv → BN → hardswish_ (in place, not fused by TFLite): the BN output must be recorded before the
    activation overwrites its storage."""
    import torch.nn as nn

    from mobilequant.audit import FloatReference

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish(inplace=True),
                          nn.Conv2d(8, 4, 1), nn.ReLU6(inplace=True)).eval()
    x = torch.randn(4, 3, 8, 8)
    gm = capture(model, x, dynamic_batch=False)
    layers = fused_layers(gm)
    seen = {}
    model[1].register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o.detach().clone()))
    model[4].register_forward_hook(lambda m, i, o: seen.__setitem__("relu6", o.detach().clone()))
    with torch.no_grad():
        want = model(x)
    assert [(l.name, l.members) for l in layers] == [("0", ("0", "1")), ("2", ("2",)), ("3", ("3", "4"))]
    out, vals = FloatReference(gm, layers, batch=4).run(x)
    assert np.allclose(vals["0"], seen["bn"].numpy(), atol=1e-6)  # not hardswish(bn)
    assert np.allclose(vals["3"], seen["relu6"].numpy(), atol=1e-6) and np.allclose(out, want.numpy(), atol=1e-6)
    _, small = FloatReference(gm, layers, batch=4).run(x[:3])  # a short last batch is padded, then trimmed
    assert small["0"].shape == (3, 8, 8, 8) and np.allclose(small["0"], seen["bn"].numpy()[:3], atol=1e-6)


# ---------------------------------------------------------------------------- the trained model
@pytest.fixture(scope="module")
def trained():
    from mobilequant.weights import default_model

    return default_model()


@pytest.fixture(scope="module")
def test_data(trained):
    return builtin_dataset("fashion-mnist", "test", trained.preprocess).subset(slice(0, N_IMAGES))


def _layers(model):
    return fused_layers(capture(model, torch.zeros(2, *model.preprocess.input_size)))


def test_fused_layers_follow_the_graph(trained):
    layers = _layers(trained)
    by_name = {l.name: l for l in layers}
    dw = [l for l in layers if l.kind == "depthwise"]
    assert len(dw) == 17  # one per inverted residual block
    first = by_name["features.1.conv.0.0"]
    assert first.kind == "depthwise" and first.bn == "features.1.conv.0.1" and first.activation == "relu6"
    assert first.members == ("features.1.conv.0.0", "features.1.conv.0.1", "features.1.conv.0.2")
    project = by_name["features.1.conv.1"]  # linear bottleneck: conv + BN, no activation
    assert project.kind == "pointwise" and project.activation is None and project.bn == "features.1.conv.2"
    assert by_name["features.3"].kind == "add" and len(by_name["features.3"].input_nodes) == 2
    assert by_name["classifier.1"].kind == "linear"


def _plant_dead(model):
    """A copy of ``model`` with known dead channels: which (check, layer, channel) must be found."""
    m = copy.deepcopy(model)
    feats = m.features
    with torch.no_grad():
        feats[4].conv[1][0].weight[[3, 17]] = 0.0  # two dead depthwise kernels
        feats[9].conv[1][1].weight[5] = 0.0  # BN γ = 0 behind a depthwise conv
        feats[12].conv[1][0].weight[40] *= 1e-4  # a weak kernel (alive, 10⁻⁴ of its norm)
    planted = {("dead_kernel", "features.4.conv.1.0", 3), ("dead_kernel", "features.4.conv.1.0", 17),
               ("bn_gamma_zero", "features.9.conv.1.0", 5)}
    weak = {("weak_kernel", "features.12.conv.1.0", 40)}
    return m, planted, weak


def _cells(findings, checks=None, stage=None):
    return {(f.check, f.layer, c) for f in findings for c in f.channels
            if (checks is None or f.check in checks) and (stage is None or f.stage == stage)}


def test_planted_dead_kernels_are_flagged_exactly(trained):
    base = _cells(float_weight_findings(_layers(trained)))
    planted_model, planted, weak = _plant_dead(trained)
    found = _cells(float_weight_findings(_layers(planted_model)))
    assert found - base == planted | weak
    dead = {c for c in found if c[0] in ("dead_kernel", "bn_gamma_zero")}
    assert dead - base == planted  # dead = exactly the planted channels, nothing else new
    assert {c for c in found - base if c[0] == "weak_kernel"} == weak


def test_dead_activation_uses_the_whole_set():
    class L:  # a fused layer as the health check sees it
        name, kind, activation = "blk.dw", "depthwise", "relu6"

    maxes = {"blk.dw": np.array([0.0, 0.3, 0.0, 2.0])}
    (f,) = dead_activation_findings([L()], maxes, "float", images=1000)
    assert f.channels == (0, 2) and f.severity == "warning" and "1000" in f.why  # reported, never gated
    assert dead_activation_findings([L()], maxes, "quantized", 1000, exclude={"blk.dw": {0, 2}}) == []


def test_float_findings_are_stable(trained):
    a = [f.to_dict() for f in float_weight_findings(_layers(trained))]
    b = [f.to_dict() for f in float_weight_findings(_layers(copy.deepcopy(trained)))]
    assert a == b


# ----------------------------------------------------------------------------------------- gate
def _layer(i, name, iso, acc):
    m = lambda v: {"sqnr_db": v, "cosine": 0.99, "max_abs_error": 0.1}  # noqa: E731
    return LayerResult(i, name, "depthwise", f"t{i}", m(acc), m(iso))


def test_gate_orders_failures_and_uses_isolated_sqnr():
    e2e = EndToEnd(1000, True, 0.90, 0.88, 0.95, 0.999, 20.0)
    layers = [_layer(0, "a", 40, 40), _layer(1, "b", 12, 12), _layer(2, "c", 38, 11), _layer(3, "d", 9, 8)]
    fails = evaluate_gate(Gate(max_drop=0.5, min_sqnr=15), e2e, layers, [])
    assert [f.check for f in fails] == ["accuracy_drop", "layer_sqnr", "layer_sqnr"]
    assert [f.subject for f in fails[1:]] == ["d", "b"]  # worst first; "c" only inherits error: not failed
    assert fails[0].value == pytest.approx(2.0)
    assert evaluate_gate(Gate(max_drop=3.0, min_sqnr=None), e2e, layers, []) == []


def test_an_audit_report_repr_is_one_line(tflite_report):
    """Evaluating a report in a notebook cell printed the dataclass repr: every layer, ~110k characters."""
    text = repr(tflite_report)
    assert text.startswith("AuditReport(") and "\n" not in text and len(text) < 300, text


def test_a_failure_never_prints_its_figure_as_the_limit():
    """`--min-sqnr 31.6` failed a layer at 31.598 dB and said "isolated SQNR 31.6 dB < 31.6 dB"."""
    e2e = EndToEnd(1000, True, 0.90, 0.88, 0.95, 0.999, 20.0)
    (f,) = evaluate_gate(Gate(max_drop=None, min_sqnr=31.6), e2e, [_layer(0, "a", 31.598, 30)], [])
    assert "isolated SQNR 31.598 dB < 31.6 dB" in f.message
    (f,) = evaluate_gate(Gate(max_drop=None, min_sqnr=15), e2e, [_layer(0, "a", 12, 12)], [])
    assert "isolated SQNR 12.0 dB < 15 dB" in f.message


def test_gate_without_labels_gates_disagreement():
    e2e = EndToEnd(500, False, None, None, 0.99, 1.0, 25.0, note="no labels")
    (f,) = evaluate_gate(Gate(max_drop=0.5), e2e, [], [])
    assert f.check == "disagreement" and f.value == pytest.approx(1.0) and "no labels" in f.message
    assert evaluate_gate(Gate(max_drop=1.5), e2e, [], []) == []


def test_a_gate_at_exactly_the_measured_drop_passes():
    """One image of 200 is a drop of exactly 0.5 pp, but (0.955 − 0.95)·100 is 0.5000000000000004 in floats:
    `--max-drop 0.5` failed with "drop 0.50 pp > 0.5 pp". Drop and disagreement come from image counts."""
    e2e = end_to_end(*_paired_logits(n=200, float_only=1, quant_only=0))
    assert (e2e.float_top1 - e2e.quant_top1) * 100 > 0.5  # the float arithmetic that failed the gate
    assert e2e.drop_pp == 0.5 and e2e.disagreement_pp == 0.5
    assert evaluate_gate(Gate(max_drop=0.5), e2e, [], []) == []
    assert evaluate_gate(Gate(max_drop=0.49), e2e, [], [])[0].check == "accuracy_drop"
    unlabelled = EndToEnd(200, False, None, None, 0.995, 1.0, 25.0)
    assert unlabelled.disagreement_pp == 0.5 and evaluate_gate(Gate(max_drop=0.5), unlabelled, [], []) == []


def test_gate_reports_when_it_decides_on_sampling_noise():
    # ShuffleNetV1's onnx-int8 file on 1,000 images: 0.80 pp = 8 images net, of ~24 decided differently.
    e2e = end_to_end(*_paired_logits(n=1000, float_only=16, quant_only=8))
    assert (e2e.float_only_right, e2e.quant_only_right, e2e.drop_pp) == (16, 8, pytest.approx(0.8))
    b, c = 0.016, 0.008
    assert e2e.ci95_pp == pytest.approx(196 * np.sqrt((b + c - (b - c) ** 2) / 1000))  # ≈ 0.96 pp
    (f,) = evaluate_gate(Gate(max_drop=0.5), e2e, [], [])
    assert f.check == "accuracy_drop" and "within the ±0.96 pp noise of 1000 images" in f.message
    # The same 8-image net loss on 10,000 images (0.08 ± 0.10 pp) against a 0.05 pp gate: inside the noise
    # too; 80 images net of 240 (0.80 ± 0.30 pp) against a 0.3 pp gate: outside it, a plain failure.
    assert "noise" in evaluate_gate(Gate(max_drop=0.05), end_to_end(*_paired_logits(10000, 16, 8)), [], [])[0].message
    far = end_to_end(*_paired_logits(10000, 160, 80))
    assert "noise" not in evaluate_gate(Gate(max_drop=0.3), far, [], [])[0].message and far.ci95_pp < 0.31
    # Without labels the disagreement's binomial interval is the one.
    nol = end_to_end(*_paired_logits(500, 4, 1)[:2], None)
    assert nol.ci95_pp == pytest.approx(196 * np.sqrt(0.01 * 0.99 / 500))
    assert "noise" in evaluate_gate(Gate(max_drop=0.5), nol, [], [])[0].message


def _paired_logits(n, float_only, quant_only):
    """Logits of n images over 3 classes: the float model right on all but ``quant_only`` images, the
    artifact wrong on ``float_only`` of those and right on the ``quant_only`` others."""
    labels = np.zeros(n, np.int64)
    f, q = np.eye(3, dtype=np.float32)[labels], np.eye(3, dtype=np.float32)[labels]
    f[:quant_only] = np.eye(3, dtype=np.float32)[1]
    q[quant_only:quant_only + float_only] = np.eye(3, dtype=np.float32)[2]
    return f, q, labels


def test_end_to_end_metrics():
    f = np.array([[3, 2, 1, 0, 0, 0], [0, 5, 1, 0, 0, 0], [1, 0, 0, 0, 0, 9]], np.float32)
    q = np.array([[2, 3, 1, 0, 0, 0], [0, 5, 1, 0, 0, 0], [1, 0, 0, 0, 0, 9]], np.float32)
    e = end_to_end(f, q, np.array([0, 1, 2]))
    assert e.float_top1 == pytest.approx(2 / 3) and e.quant_top1 == pytest.approx(1 / 3)
    assert e.drop_pp == pytest.approx(100 / 3) and e.top1_agreement == pytest.approx(2 / 3)
    assert e.top5_containment == 1.0
    nolab = end_to_end(f, q, None)
    assert not nolab.labels_used and nolab.float_top1 is None and "no labels" in nolab.note


# ------------------------------------------------------------------ real artifacts (module-scoped)
def _quantize(model):
    from mobilequant.quant import QuantConfig, quantize

    cal = calibration_set(cfg=model.preprocess)
    return quantize(model, (cal.images[i:i + 64] for i in range(0, 256, 64)), QuantConfig(num_calibration=256))


@pytest.fixture(scope="module")
def quantized(trained):
    return _quantize(trained)


@pytest.fixture(scope="module")
def tflite_artifact(quantized, tmp_path_factory):
    from mobilequant.export import export

    return export(quantized, "tflite-int8", tmp_path_factory.mktemp("audit") / "mnv2.tflite", overrides=NO_VERIFY)


@pytest.fixture(scope="module")
def tflite_report(tflite_artifact, trained, quantized, test_data):
    return run_audit(tflite_artifact, test_data, model=trained, quant_result=quantized, min_sqnr=15,
                     max_drop=1.0, progress=False)




@pytest.mark.slow
def test_tflite_audit_maps_every_layer_and_passes(tflite_report, tflite_artifact, test_data, tmp_path):
    r = tflite_report
    assert r.artifact["format"] == "tflite" and r.artifact["model_name"] == "mobilenetv2_050"
    # every fused layer that computes something has its tensor; only ops the exporter removes are unmapped
    assert set(r.unmapped_layers) <= {"flatten_0", "classifier.0"}
    kinds = [l.kind for l in r.layers]
    assert kinds.count("depthwise") == 17 and "add" in kinds and kinds[-1] == "linear"
    for l in r.layers:
        assert l.isolated is not None and l.segment_ops, l.name
        # int8 alone costs 20-60 dB per layer; in the chain a layer never does much better than alone
        assert 15 < l.iso_sqnr < 80 and 0 < l.acc_sqnr < l.iso_sqnr + 3, (l.name, l.iso_sqnr, l.acc_sqnr)
        assert 0.8 < l.accumulated["cosine"] <= 1.0 and 0.99 < l.isolated["cosine"] <= 1.0
        assert l.accumulated["weight_sqnr_db"] > 25 or l.kind not in ("depthwise", "pointwise", "conv", "linear")
    e = r.end_to_end
    assert e.labels_used and e.images == N_IMAGES and e.float_top1 > 0.85
    assert e.drop_pp < 1.0 and e.top1_agreement > 0.97 and e.top5_containment > 0.99  # a gain is no failure
    assert r.passed, r.summary()
    text = r.summary()
    assert text.startswith("mobilequant audit: PASS") and "Worst layers by isolated SQNR" in text
    d = json.loads(r.write_json(tmp_path / "r.json").read_text())
    validate_audit_report(d)
    assert d["verdict"] == "pass" and len(d["layers"]) == len(r.layers) and d["worst_layers"][0] == r.worst_layers(1)[0].name


def test_end_to_end_is_the_file_run_whole(tflite_report, tflite_artifact, test_data):
    # the gate judges the file as an app runs it (LiteRT + XNNPACK, whole graph), as export's summary does
    from mobilequant.runtime import open_runner

    logits = open_runner(tflite_artifact.path).run(test_data.images.numpy())
    top1 = float((logits.argmax(1) == test_data.labels.numpy()).mean())
    assert tflite_report.end_to_end.quant_top1 == pytest.approx(top1, abs=1e-9)
    notes = [w for w in tflite_report.warnings if w.startswith("end to end:")]
    assert len(notes) <= 1 and all("images differently" in w for w in notes), notes
    assert tflite_report.timings_s["end_to_end"] > 0


def _break_weight_scale(src, dst, tensor_name: str, factor: float) -> None:
    """Multiply the weight and bias scales of the op producing ``tensor_name`` (the artifact, edited with
    LiteRT's own flatbuffer tools): that op now computes ``factor`` × its real output."""
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.read_model(str(src))
    sg = model.subgraphs[0]
    names = [t.name.decode() if isinstance(t.name, bytes) else t.name for t in sg.tensors]
    out = names.index(tensor_name)
    (op,) = [o for o in sg.operators if out in list(o.outputs)]
    for i in list(op.inputs)[1:3]:
        q = sg.tensors[i].quantization
        q.scale = (np.asarray(q.scale) * factor).astype(np.float32)
    fbu.write_model(model, str(dst))


@pytest.mark.slow
def test_broken_layer_is_the_worst_in_isolation(tflite_artifact, tflite_report, trained, test_data, tmp_path):
    victim = "features.6.conv.1.0"
    broken = tmp_path / "broken.tflite"
    _break_weight_scale(tflite_artifact.path, broken, tflite_artifact.name_map[victim], 6.0)
    r = run_audit(broken, test_data, model=trained, min_sqnr=15, max_drop=None, fail_on_dead_kernels=False,
                  progress=False)
    by = {l.name: l for l in r.layers}
    good = {l.name: l for l in tflite_report.layers}
    assert r.worst_layers(1)[0].name == victim
    assert by[victim].iso_sqnr < 10 < good[victim].iso_sqnr
    # the layers after it inherit the error (accumulated drops) but are fine on their own (isolated)
    for after in ("features.6.conv.2", "features.7.conv.0.0"):
        assert by[after].acc_sqnr < good[after].acc_sqnr - 3 and by[after].acc_sqnr < by[after].iso_sqnr - 10
        assert abs(by[after].iso_sqnr - good[after].iso_sqnr) < 1.0
    assert r.failures[0].check == "layer_sqnr" and r.failures[0].subject == victim
    assert [f.subject for f in r.failures] == [victim]  # inherited error does not fail the gate
    assert any(f.check == "kernel_mismatch" and f.layer == victim for f in r.findings)
    assert f"✗ layer {victim}" in r.summary()


@pytest.fixture(scope="module")
def planted(trained, tmp_path_factory):
    """The trained model with planted dead channels, quantized and exported to TFLite.

    Written to the session's temp root, where tests/test_audit_html.py (same planting, same
    quantization) picks it up instead of exporting it a second time."""
    from mobilequant.export import export

    model, cells, weak = _plant_dead(trained)
    qr = _quantize(model)
    shared = tmp_path_factory.getbasetemp() / "audit-shared"
    shared.mkdir(exist_ok=True)
    art = export(qr, "tflite-int8", shared / "planted.tflite", overrides=NO_VERIFY)
    return model, cells, weak, qr, art


@pytest.mark.slow
def test_planted_dead_kernels_in_the_artifact(planted, tflite_report, test_data, tmp_path):
    model, cells, _weak, qr, art = planted
    r = run_audit(art, test_data, model=model, quant_result=qr, max_drop=1.0, fail_on_dead_kernels=True,
                  progress=False)
    base = _cells(tflite_report.findings, ("dead_kernel", "bn_gamma_zero"))
    # before quantization: exactly the planted channels
    assert _cells(r.findings, ("dead_kernel", "bn_gamma_zero"), "float") - base == cells
    # after quantization: the zero kernels, and the kernel that γ = 0 zeroes when BN is folded, are all
    # zero codes in the artifact, reported as dead before quantization (not as killed by it)
    after = [f for f in r.findings if f.check == "dead_kernel" and f.stage == "quantized"]
    assert _cells(after) - base == {("dead_kernel", "features.4.conv.1.0", 3), ("dead_kernel", "features.4.conv.1.0", 17),
                                    ("dead_kernel", "features.9.conv.1.0", 5)}
    assert all("quantization killed" not in f.why for f in after)
    assert not r.passed
    failing = {(f.check, f.subject) for f in r.failures}
    assert ("dead_kernels", "features.4.conv.1.0") in failing and ("dead_kernels", "features.9.conv.1.0") in failing
    text = r.summary()
    assert "Dead kernels (!! fails the gate" in text and "features.4.conv.1.0" in text and "Remedies:" in text
    for f in r.findings:
        if (f.check, f.layer) in {("dead_kernel", "features.4.conv.1.0"), ("bn_gamma_zero", "features.9.conv.1.0")}:
            assert f.why and "remove the dead channels" in f.remedy
    norms = r.kernel_norms["features.4.conv.1.0"]
    assert norms[3] == 0.0 and norms[17] == 0.0 and min(n for i, n in enumerate(norms) if i not in (3, 17)) > 0
    validate_audit_report(r.to_dict())


@pytest.mark.slow
def test_real_model_findings_are_stable_across_runs(tflite_report, tflite_artifact, trained, quantized, test_data):
    again = run_audit(tflite_artifact, test_data, model=trained, quant_result=quantized, min_sqnr=15, max_drop=1.0,
                      progress=False)
    assert [f.to_dict() for f in again.findings] == [f.to_dict() for f in tflite_report.findings]
    assert [l.to_dict() for l in again.layers] == [l.to_dict() for l in tflite_report.layers]
    assert again.end_to_end == tflite_report.end_to_end


@pytest.mark.slow
def test_onnx_audit(quantized, trained, test_data, tmp_path):
    from mobilequant.export import export

    art = export(quantized, "onnx-int8", tmp_path / "mnv2.onnx", overrides=NO_VERIFY)
    r = run_audit(art.path, test_data.subset(slice(0, 150)), model=trained, quant_result=quantized, min_sqnr=15,
                  max_drop=2.0, progress=False)
    assert r.artifact["format"] == "onnx"
    assert set(r.unmapped_layers) <= {"flatten_0", "classifier.0"}
    assert len(r.layers) >= 60 and all(l.isolated is not None for l in r.layers)
    assert all(15 < l.iso_sqnr < 80 for l in r.layers), [(l.name, l.iso_sqnr) for l in r.worst_layers(3)]
    assert r.end_to_end.top1_agreement > 0.95
    validate_audit_report(r.to_dict())
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(art.path.read_bytes()[:50_000])
    with pytest.raises(InputError, match="not an ONNX model|neither a TFLite nor an ONNX model"):
        run_audit(cut, test_data, model=trained)


@pytest.mark.slow
def test_cle_artifacts_compare_each_layer_after_its_per_channel_clamp(trained, test_data, tmp_path):
    """CLE turns each ReLU6 into a clamp with per-channel bounds; the artifact's layer output is after it,
    so the reference layer must end with it too (it had ended before it: 1-3 dB on every such layer).
    The TFLite file also takes NHWC input (the DSP recipe's layout), audited without the QuantResult."""
    from mobilequant.export import export
    from mobilequant.quant import QuantConfig, quantize

    cal = calibration_set(cfg=trained.preprocess)
    qr = quantize(trained, (cal.images[i:i + 64] for i in range(0, 256, 64)),
                  QuantConfig(per_channel=False, cle=True, num_calibration=256))
    data = test_data.subset(slice(0, 150))
    files = [export(qr, "tflite-int8", tmp_path / "dsp.tflite", overrides=NO_VERIFY + ("io.layout=NHWC",)),
             export(qr, "onnx-int8", tmp_path / "dsp.onnx", overrides=NO_VERIFY)]
    for art, result in zip(files, (None, qr)):
        r = run_audit(art.path, data, model=trained, quant_result=result, max_drop=2.0, progress=False)
        relu6 = [l for l in r.layers if l.name in {"features.0.0", "features.1.conv.0.0", "features.18.0"}]
        assert len(relu6) == 3 and len(r.layers) >= 55, art.path.name
        assert all(l.iso_sqnr > 15 for l in r.layers), (art.path.name, [(l.name, l.iso_sqnr) for l in r.worst_layers(3)])
        assert r.end_to_end.top1_agreement > 0.95
        # the layer's tensor is the clamp's output, and its kernel is found behind the clamp
        assert all(math.isfinite(l.accumulated["weight_sqnr_db"]) for l in relu6), art.path.name
        ops = {"tflite": ("MINIMUM", "MAXIMUM"), "onnx": ("Min",)}[r.artifact["format"]]
        graph = open_artifact(art.path)
        assert all(graph.producer_op(l.tensor) in ops for l in relu6 if l.name != "features.18.0"), art.path.name
        # the shipped model's two dead channels (zero BN variance) are dead kernels in both files
        assert ("dead_kernel", "features.1.conv.0.0", "quantized") in {(f.check, f.layer, f.stage) for f in r.findings}


@pytest.mark.slow
def test_tflite_fp16_audit_reads_buffers_stored_after_the_flatbuffer(trained, test_data, tmp_path):
    """ai-edge-quantizer's float16 files keep their buffers (the metadata's too) after the flatbuffer, by
    offset: the audit had found no model name in them, and its cut segments had lost the weights."""
    from mobilequant.export import export

    art = export(trained, "tflite-fp16", tmp_path / "f16.tflite", overrides=NO_VERIFY)
    r = run_audit(art.path, test_data.subset(slice(0, 100)), max_drop=1.0, progress=False)  # model from the file
    assert r.artifact["model_name"] == "mobilenetv2_050" and len(r.layers) >= 55
    assert all(l.iso_sqnr > 40 for l in r.layers), [(l.name, l.iso_sqnr) for l in r.worst_layers(3)]
    assert r.end_to_end.top1_agreement > 0.99


@pytest.mark.slow
def test_fine_tuned_artifact_against_the_shipped_model_is_flagged(tflite_artifact, test_data):
    """A QAT file names the zoo model it started from; audited against that model's shipped weights
    (no model given), the report says the reference predates the fine-tuning."""
    import dataclasses

    qat_like = dataclasses.replace(tflite_artifact, metadata={**tflite_artifact.metadata, "fine_tuned": "qat"})
    r = run_audit(qat_like, test_data.subset(slice(0, 40)), max_drop=5.0, progress=False)
    assert any("fine-tuned (qat)" in w for w in r.warnings)
    r = run_audit(tflite_artifact, test_data.subset(slice(0, 40)), max_drop=5.0, progress=False)
    assert not any("fine-tuned" in w for w in r.warnings)


# -------------------------------------------------------------------------------------- bad input
@pytest.mark.slow
def test_labels_missing_fall_back_to_agreement(tflite_artifact, trained, test_data):
    unlabelled = ImageData(test_data.images[:100], None, "unlabelled")
    r = run_audit(tflite_artifact, unlabelled, model=trained, max_drop=0.5, layer_checks=False, progress=False)
    e = r.end_to_end
    assert not e.labels_used and e.float_top1 is None and e.drop_pp is None and "no labels" in e.note
    assert "agreement metrics only" in r.summary()
    assert all(f.check != "accuracy_drop" for f in r.failures)
    assert not r.layers and r.unmapped_layers  # layer_checks=False: end to end and weight health only


@pytest.mark.slow
def test_sequential_model_audits_in_tflite(test_data, tmp_path):
    """An ``nn.Sequential``'s forward argument is called ``input``, a builtin: torch.export names its node
    ``input_1`` while the exporter's name map keys the argument's name; every TFLite audit of such a model
    was refused as "artifact and model do not belong together". Its linear reads a flattened 2×2 map,
    whose kernel the TFLite file stores with its columns in (H, W, C) order: that is not a "kernel mismatch"."""
    from mobilequant.export import export

    model = _tiny_net()
    model[3], model[5] = torch.nn.AvgPool2d(8), torch.nn.Linear(8 * 2 * 2, 10)
    artifact = export(_quantize(model), "tflite-int8", tmp_path / "seq.tflite", overrides=NO_VERIFY)
    assert "input" in artifact.name_map
    r = run_audit(artifact, test_data.subset(slice(0, 32)), model=model, max_drop=None, progress=False)
    assert {l.name for l in r.layers} >= {"0", "5"}  # the conv (with its BN and ReLU6) and the linear
    assert not [f for f in r.findings if f.check == "kernel_mismatch"], r.findings


def _tiny_net():
    from mobilequant.models import FASHION_MNIST

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU6(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 10)).eval()
    model.preprocess = FASHION_MNIST
    return model


@pytest.mark.slow
def test_a_file_another_tool_changed_after_export(test_data, tmp_path):
    """ONNX Runtime's quantize_static copies the float file's metadata into its int8 file: the audit had
    refused it ("35 name-map entries ... do not belong together"). The content decides the target; the
    stale name map is not used, and the report says why."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from mobilequant.audit.artifact import content_target
    from mobilequant.export import export

    model = _tiny_net()
    fp32 = export(model, "onnx-fp32", tmp_path / "f.onnx", example_input=test_data.images[:1],
                  overrides=NO_VERIFY).path
    name = onnx.load(str(fp32)).graph.input[0].name
    batches = iter([{name: test_data.images[i:i + 1].numpy()} for i in range(8)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    quantize_static(str(fp32), str(tmp_path / "ort.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
    assert "mobilequant" in [p.key for p in onnx.load(str(tmp_path / "ort.onnx")).metadata_props]
    r = run_audit(tmp_path / "ort.onnx", test_data.subset(slice(0, 32)), model=model, max_drop=None,
                  progress=False)
    assert r.artifact["target"] == "onnx-int8" and not r.layers
    assert any("another tool changed it after export" in w for w in r.warnings), r.warnings
    for target in ("tflite-fp16", "onnx-fp16", "tflite-int8"):  # the content decides, metadata or not
        art = export(model, target, tmp_path / f"m-{target}{'.onnx' if 'onnx' in target else '.tflite'}",
                     calibration_data=[test_data.images[:16]], overrides=NO_VERIFY)
        assert content_target(open_artifact(art.path)) == target


def test_a_float_file_of_another_model_fails_the_gate(tmp_path, test_data, monkeypatch):
    """An int8 file's kernels are compared with the model's; a float file's were not: an fp32 / fp16 file
    of the same architecture with other weights passed every gate (−150 dB, 13 % agreement, its accuracy
    above the model's). Its logits must now be the model's within float rounding. (Our own files record
    their weights' sha256 and are refused before any work; the gate is for files without it, as other
    tools write them.)"""
    import mobilequant.export as mq_export
    from mobilequant.audit.gate import FLOAT_FIDELITY_DB
    from mobilequant.export import export

    model = _tiny_net()
    torch.manual_seed(1)
    other = _tiny_net()
    for p_other, p_model in zip(other.parameters(), model.parameters()):
        with torch.no_grad():
            p_other.copy_(p_model + 0.5 * torch.randn_like(p_model))
    data = test_data.subset(slice(0, 32))
    for target, suffix in (("onnx-fp32", ".onnx"), ("tflite-fp16", ".tflite")):
        art = export(other, target, tmp_path / f"other{suffix}", example_input=data.images[:1],
                     overrides=NO_VERIFY)
        with pytest.raises(InputError, match="was exported from other weights"):
            run_audit(art.path, data, model=model, max_drop=None, layer_checks=False, progress=False)
        with monkeypatch.context() as m:  # the same file without the recorded hash
            m.setattr(mq_export, "weights_sha256", lambda net: None)
            art = export(other, target, tmp_path / f"other{suffix}", example_input=data.images[:1],
                         overrides=NO_VERIFY)
        r = run_audit(art.path, data, model=model, max_drop=None, layer_checks=False, progress=False)
        assert [f.check for f in r.failures] == ["float_fidelity"], (target, r.failures)
        assert r.end_to_end.output_sqnr_db < FLOAT_FIDELITY_DB[target[-4:]]
        own = export(model, target, tmp_path / f"own{suffix}", example_input=data.images[:1], overrides=NO_VERIFY)
        r = run_audit(own.path, data, model=model, max_drop=None, layer_checks=False, progress=False)
        assert r.passed
        # an untrained model guesses: the report says its drop means nothing (chance_warning)
        assert r.end_to_end.float_top1 < 0.2 and any("near chance for 10 classes" in w for w in r.warnings)


def test_chance_warning_only_near_chance():
    from mobilequant.audit.endtoend import chance_warning, end_to_end

    labels = np.arange(100) % 10
    good = np.eye(10, dtype=np.float32)[labels]  # always right
    guess = np.eye(10, dtype=np.float32)[np.zeros(100, int)]  # always class 0: 10 %
    assert chance_warning(end_to_end(good, good, labels), 10) is None
    assert chance_warning(end_to_end(good, good, None), 10) is None  # no labels: nothing to say
    note = chance_warning(end_to_end(guess, guess, labels), 10)
    assert note and "10.00 %" in note and "(10.0 %)" in note


def test_not_an_artifact(tmp_path, trained, test_data):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    with pytest.raises(InputError, match="neither a TFLite nor an ONNX model"):
        run_audit(text, test_data, model=trained)
    fake = tmp_path / "fake.tflite"
    fake.write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match="not a TFLite model"):
        run_audit(fake, test_data, model=trained)
    with pytest.raises(InputError, match="cannot read"):
        run_audit(tmp_path / "missing.tflite", test_data, model=trained)


@pytest.mark.slow
def test_truncated_artifact(tflite_artifact, tmp_path, trained, test_data):
    data = tflite_artifact.path.read_bytes()
    cut = tmp_path / "cut.tflite"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated|corrupt|cannot load"):
        run_audit(cut, test_data, model=trained)


@pytest.mark.slow
def test_artifact_and_model_that_do_not_belong(tflite_artifact, trained, quantized, test_data, monkeypatch):
    from mobilequant.models import create_model
    from mobilequant.quant import QuantConfig, quantize

    other = create_model("mobilenetv2_035", num_classes=10, in_chans=1, preprocess=trained.preprocess)
    with pytest.raises(InputError, match="exported from 'mobilenetv2_050' but the model is 'mobilenetv2_035'"):
        run_audit(tflite_artifact, test_data, model=other)
    # same architecture and name, other weights: caught by the weights sha256 the file records, and in a
    # file without it (another tool's) by comparing the kernels
    retrained = create_model("mobilenetv2_050", num_classes=10, in_chans=1, preprocess=trained.preprocess).eval()
    with pytest.raises(InputError, match="was exported from other weights"):
        run_audit(tflite_artifact, test_data, model=retrained)
    with monkeypatch.context() as m:
        m.setattr("mobilequant.audit.run._check_weights_hash", lambda *args: None)
        with pytest.raises(InputError, match="kernels do not match"):
            run_audit(tflite_artifact, test_data, model=retrained)
    # the right model but another quantization: caught by the quant table's sha256
    cal = calibration_set(cfg=trained.preprocess)
    per_tensor = quantize(trained, [cal.images[:64]], QuantConfig(per_channel=False, num_calibration=64))
    with pytest.raises(InputError, match="quantization table"):
        run_audit(tflite_artifact, test_data, model=trained, quant_result=per_tensor)


def test_data_that_does_not_fit(tflite_artifact, trained, test_data):
    rgb = ImageData(torch.zeros(4, 3, 32, 32), None, "rgb")
    with pytest.raises(InputError, match="the data has 3×32×32 images but the model takes 1×32×32"):
        run_audit(tflite_artifact, rgb, model=trained)
    small = ImageData(torch.zeros(4, 1, 28, 28), None, "28px")
    with pytest.raises(InputError, match="1×28×28"):
        run_audit(tflite_artifact, small, model=trained)


@pytest.mark.slow
def test_labels_outside_the_model_classes(tflite_artifact, trained, test_data):
    bad = ImageData(test_data.images[:20], torch.full((20,), 12, dtype=torch.int64), "bad labels")
    with pytest.raises(InputError, match="labels .* run from 12 to 12 but the model has 10 classes"):
        run_audit(tflite_artifact, bad, model=trained, layer_checks=False)


def test_report_paths_that_could_only_fail_or_destroy_are_refused_before_the_audit(tmp_path):
    """`--report model.onnx` replaced the audited model with its report; `--report out/` wrote a file named
    `out`; an unwritable `--html` was found after the whole audit (the JSON report already written, exit 2)."""
    from mobilequant.audit.report import check_report_paths

    art = tmp_path / "m.onnx"
    art.write_bytes(b"model")
    (tmp_path / "afile").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    bad = {
        str(art): "is the artifact being audited",
        str(tmp_path / "out") + "/": "names a directory",
        str(tmp_path): "names a directory",
        str(tmp_path / "afile" / "r.json"): "is a file, not a directory",
    }
    if os.geteuid() != 0:  # root writes into a 0o555 directory
        bad[str(ro / "r.json")] = "Permission denied"
    for path, why in bad.items():
        with pytest.raises(InputError, match=why):
            check_report_paths(art, path)
    with pytest.raises(InputError, match="different names"):
        check_report_paths(art, tmp_path / "r.json", tmp_path / "r.json")
    check_report_paths(art, tmp_path / "new" / "deeper" / "r.json", tmp_path / "r.html", None)  # fine
    assert not (tmp_path / "new").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert art.read_bytes() == b"model"


def test_a_file_without_a_name_map_must_have_the_models_kernels(tmp_path, test_data):
    """Without metadata nothing ties the file to the model: ShuffleNetV2's int8 file audited against
    MobileNetV2 passed the gate (the two agree on 94 % of Fashion-MNIST). The kernels' total size must fit."""
    import onnx

    from mobilequant.export import export

    model = _tiny_net()
    data = test_data.subset(slice(0, 32))
    art = export(model, "onnx-int8", tmp_path / "m.onnx", calibration_data=[data.images], overrides=NO_VERIFY)
    proto = onnx.load(str(art.path))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    r = run_audit(tmp_path / "bare.onnx", data, model=model, max_drop=None, progress=False)
    assert any("no name map" in w for w in r.warnings)
    wider = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, stride=2, padding=1), torch.nn.BatchNorm2d(16),
                                torch.nn.ReLU6(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(16, 10)).eval()
    wider.preprocess = model.preprocess
    with pytest.raises(InputError, match=r"kernels hold 152 weights, the model's 304"):
        run_audit(tmp_path / "bare.onnx", data, model=wider, max_drop=None, progress=False)


def test_the_steps_docs_audit_md_lists_import_from_mobilequant_audit():
    """docs/audit.md names the audit's steps as plain functions usable alone; each imports from the package
    (kernel_mismatch_findings had lived in audit.health only)."""
    import re
    from pathlib import Path

    import mobilequant.audit as audit

    text = Path(__file__).resolve().parents[1].joinpath("docs", "audit.md").read_text()
    steps = text.split("The steps are plain functions, usable alone", 1)[1].split("\n\n", 1)[0]
    names = [n for n in re.findall(r"`(\w+)`", steps) if n != "qdq_loss_debug"]  # ONNX Runtime's, the model
    assert len(names) >= 10, names
    missing = [n for n in names if n not in audit.__all__ or not hasattr(audit, n)]
    assert not missing, missing
