"""Accuracy audit: metrics, layer grouping, weight health, the real-artifact pipeline, the gate, bad input.

Everything runs the real thing: the shipped trained MobileNetV2 0.5, real PT2E quantization, real
TFLite / ONNX exports run in LiteRT / ONNX Runtime. Expensive objects (quantization, exports) are built
once per module.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from mobilequant.audit import (AuditReport, EndToEnd, ErrorStats, Gate, LayerResult, compute_metrics,
                               dead_activation_findings, end_to_end, evaluate_gate, float_weight_findings,
                               fused_layers, run_audit)
from mobilequant.audit.layout import LayoutMismatch, to_file_layout, to_nchw
from mobilequant.audit.schema import REPORT_SCHEMA
from mobilequant.capture import capture
from mobilequant.data import ImageData, builtin_dataset, calibration_set
from mobilequant.errors import InputError

N_IMAGES = 300  # evaluation images per audit in these tests (the benchmark uses 1,000)


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
    assert f.channels == (0, 2) and f.severity == "error" and "1000" in f.why
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


def test_gate_without_labels_gates_disagreement():
    e2e = EndToEnd(500, False, None, None, 0.99, 1.0, 25.0, note="no labels")
    (f,) = evaluate_gate(Gate(max_drop=0.5), e2e, [], [])
    assert f.check == "disagreement" and f.value == pytest.approx(1.0) and "no labels" in f.message
    assert evaluate_gate(Gate(max_drop=1.5), e2e, [], []) == []


def test_end_to_end_metrics():
    f = np.array([[3, 2, 1, 0, 0, 0], [0, 5, 1, 0, 0, 0], [1, 0, 0, 0, 0, 9]], np.float32)
    q = np.array([[2, 3, 1, 0, 0, 0], [0, 5, 1, 0, 0, 0], [1, 0, 0, 0, 0, 9]], np.float32)
    e = end_to_end(f, q, np.array([0, 1, 2]))
    assert e.float_top1 == pytest.approx(2 / 3) and e.quant_top1 == pytest.approx(1 / 3)
    assert e.drop_pp == pytest.approx(100 / 3) and e.top1_agreement == pytest.approx(2 / 3)
    assert e.top5_containment == 1.0
    nolab = end_to_end(f, q, None)
    assert not nolab.labels_used and nolab.float_top1 is None and "no labels" in nolab.note
