"""PTQ pipeline: round trips, ReLU6 ranges, degenerate ranges, data errors, zoo families, fp16."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn as nn

from mobilequant.capture import capture
from mobilequant.errors import InputError
from mobilequant.fusion import BN_OPS, fold_conv_bn
from mobilequant.models import create_model, list_models
from mobilequant.quant import QuantConfig, quantize, to_float16

qd = torch.ops.quantized_decomposed


def _batches(n=2, shape=(4, 3, 8, 8), seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * scale for _ in range(n)]


class ReLU6Net(nn.Module):
    """Two ReLU6 layers: one saturates (range hits 6), one stays small; a linear bottleneck; a residual."""

    def __init__(self):
        super().__init__()
        self.big = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.small = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(8, 3, 1, bias=False), nn.BatchNorm2d(3))
        self.fc = nn.Linear(3, 5)
        with torch.no_grad():
            self.big[0].weight.mul_(20.0)  # pre-activations far beyond 6
            self.small[0].weight.mul_(0.01)  # stays well below 6

    def forward(self, x):
        y = x + self.project(self.small(self.big(x)))
        return self.fc(y.mean((2, 3)))


@pytest.fixture(scope="module")
def relu6_results():
    torch.manual_seed(0)
    model = ReLU6Net().eval()
    batches = _batches()
    return model, {mode: quantize(model, batches, QuantConfig(relu6=mode)) for mode in ("clamped", "fixed")}


def test_quantize_dequantize_round_trip(relu6_results):
    model, results = relu6_results
    r = results["clamped"]
    for e in r.table:
        if e.per_channel or e.dtype != "int8":
            continue
        lo = (e.qmin - e.zero_point[0]) * e.scale[0]
        hi = (e.qmax - e.zero_point[0]) * e.scale[0]
        x = torch.linspace(lo, hi, 1001)
        q = qd.quantize_per_tensor.default(x, e.scale[0], e.zero_point[0], e.qmin, e.qmax, torch.int8)
        back = qd.dequantize_per_tensor.default(q, e.scale[0], e.zero_point[0], e.qmin, e.qmax, torch.int8)
        # half a step, plus float32 rounding of x itself (a few ulp of the range's end)
        tol = e.scale[0] / 2 + 4 * torch.finfo(torch.float32).eps * max(abs(lo), abs(hi))
        assert float((back - x).abs().max()) <= tol, e.key
        if lo <= 0 <= hi:
            zero = qd.quantize_per_tensor.default(torch.zeros(1), e.scale[0], e.zero_point[0], e.qmin, e.qmax,
                                                  torch.int8)
            assert float(qd.dequantize_per_tensor.default(zero, e.scale[0], e.zero_point[0], e.qmin, e.qmax,
                                                          torch.int8)) == 0.0
    # the simulated graph computes the model within 8-bit error: relative L2 error over 64 images of the
    # calibration distribution (measured 0.058-0.080 over 8 draws on this deliberately saturating net; a
    # wrong scale or zero point gives ~1). Was the max error of 3 images from the global RNG < 0.05, which
    # 15 of 30 draws fail: it passed by the draw quantize's own RNG use happened to leave.
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        err = (r.graph(x) - ref).norm() / ref.norm()
    assert float(err) < 0.15


def test_relu6_outputs_have_zero_point_minus_128(relu6_results):
    _, results = relu6_results
    for mode, r in results.items():
        relu6_convs = [f.conv for f in r.fusion.folded if f.activation == "relu6"]
        assert relu6_convs == ["big.0", "small.0"]
        for conv in relu6_convs:
            e = r.table.get(conv, "output")
            assert e.zero_point == (-128,), (mode, conv)
            if mode == "fixed":
                assert e.scale[0] == pytest.approx(6 / 255, rel=1e-7)
            else:
                assert e.scale[0] <= 6 / 255 * (1 + 1e-7)
    clamped = results["clamped"].table
    assert clamped.get("big.0", "output").scale[0] == pytest.approx(6 / 255, rel=1e-6)  # saturated: max = 6
    assert clamped.get("small.0", "output").scale[0] < 0.5 * 6 / 255  # min(6, calibrated max)
    bottleneck = clamped.get("project.0", "output")
    assert bottleneck.zero_point[0] > -128  # linear bottleneck: calibrated asymmetric range around 0


def test_export_graph_has_int8_ops_and_bias_on_the_int32_grid(relu6_results):
    model, results = relu6_results
    r = results["clamped"]
    def targets(gm):
        return [n.args[-1] for n in gm.graph.nodes
                if n.op == "call_function" and str(n.target).startswith("quantized_decomposed.quantize_per")]

    assert torch.int32 in targets(r.qdq_graph)
    assert torch.int32 not in targets(r.export_graph) and torch.int8 in targets(r.export_graph)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(r.export_graph(x), r.graph(x), rtol=0, atol=1e-6)


def test_export_graph_weights_lie_on_their_int8_grid(relu6_results):
    """Every weight an int8 quantize op reads in export_graph is already dequantize(quantize(w)): the TFLite
    converter quantizes it again with its own arithmetic, and a weight within ~1e-8 of a rounding tie had
    taken the other code than torch's float32 rounding (SqueezeNext-23: 2 of 572,736 weights, each moving
    a whole output channel of the file off its simulation). On the grid, any arithmetic gives the code."""
    from mobilequant.quant.ptq import _DEQUANTIZE_OPS, _QUANTIZE_OPS, _evaluate, _qdtype

    _, results = relu6_results
    gm = results["clamped"].export_graph
    checked = 0
    for q in gm.graph.nodes:
        if q.op != "call_function" or q.target not in _QUANTIZE_OPS or _qdtype(q) != torch.int8:
            continue
        if q.args[0].op != "get_attr":
            continue
        w = gm
        for part in str(q.args[0].target).split("."):
            w = getattr(w, part)
        dq = next(u for u in q.users if u.target in _DEQUANTIZE_OPS)
        torch.testing.assert_close(w, _evaluate(gm, dq), rtol=0, atol=0)
        checked += 1
    assert checked >= 3


def test_cle_clamp_is_quantized_like_a_fused_relu6():
    """CLE's exact ReLU6 is a per-channel clamp.Tensor: its conv output shares one range with the clamp,
    observed after the clamp ([0, max_i hi_i], zero point −128), never the pre-activation range."""
    torch.manual_seed(0)
    model = ReLU6Net().eval()
    batches = _batches(4)
    r = quantize(model, batches, QuantConfig(cle=True))
    clamps = [n for n in r.qdq_graph.graph.nodes if n.target == torch.ops.aten.clamp.Tensor]
    assert len(clamps) == 2 and r.cle is not None and r.cle.pairs
    for conv in ("big.0", "small.0"):
        e = r.table.get(conv, "output")
        assert e.zero_point == (-128,), conv  # one entry: conv output and clamp output agree
    x = batches[0]
    with torch.no_grad():
        ref = model(x)
        sqnr = 10 * torch.log10(ref.pow(2).mean() / (r(x) - ref).pow(2).mean())
    assert float(sqnr) > 25


class DeadNet(nn.Module):
    """A depthwise conv with dead channels (all-zero weights, non-zero bias), a layer whose output is all
    zero, and one whose output is constant."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.zero = nn.Conv2d(8, 8, 1)
        self.const = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)
        with torch.no_grad():
            self.dw[0].weight[[2, 5]] = 0.0
            self.dw[1].bias.fill_(0.3)
            self.zero.weight.zero_(), self.zero.bias.zero_()
            self.const.weight.zero_(), self.const.bias.fill_(1.5)

    def forward(self, x):
        y = self.dw(self.stem(x))
        z = torch.relu(self.zero(y))  # all zero (fused conv+ReLU: the "zero" layer's output)
        return self.head((y + z) * self.const(y))


@pytest.fixture(scope="module")
def dead_result():
    torch.manual_seed(0)
    return DeadNet().eval(), quantize(DeadNet().eval(), _batches(), QuantConfig())


def test_degenerate_ranges_get_positive_scales_and_findings(dead_result):
    _, r = dead_result
    for e in r.table:
        assert all(s > 0 and s == s and s != float("inf") for s in e.scale), e.key
    kinds = {(f.kind, f.layer) for f in r.findings}
    assert ("dead_weight_channels", "dw.0") in kinds
    assert ("dead_weight_channels", "zero") in kinds and ("dead_weight_channels", "const") in kinds
    assert ("degenerate_activation", "zero") in kinds  # the all-zero ReLU output
    assert ("constant_activation", "const") in kinds
    w = r.table.get("dw.0", "weight")
    healthy = sorted(s for i, s in enumerate(w.scale) if i not in (2, 5))
    assert w.scale[2] == w.scale[5] >= healthy[len(healthy) // 2 - 1]  # median of the other channels
    b, x = r.table.get("dw.0", "bias"), r.table.get("stem.0", "output")
    assert b.scale[2] == pytest.approx(x.scale[0] * w.scale[2], rel=1e-6)
    assert 0.3 / b.scale[2] < 2**31  # the dead channel's bias is representable
    assert r.table.get("zero", "output").scale == (pytest.approx(1 / 255),)
    assert r.table.get("zero", "output").zero_point == (-128,)
    out = r(torch.randn(2, 3, 8, 8))
    assert bool(torch.isfinite(out).all())


def test_per_tensor_reports_dead_weight_channels():
    """Per-tensor weights report all-zero output channels like per-channel ones (nothing reported them:
    the tensor's scale needs no repair, so the dead channels went unmentioned); the scale stays the
    tensor's."""
    torch.manual_seed(0)
    model = DeadNet().eval()
    r = quantize(model, _batches(), QuantConfig(per_channel=False))
    dw = [f for f in r.findings if f.kind == "dead_weight_channels" and f.layer == "dw.0"]
    assert len(dw) == 1 and "[2, 5]" in dw[0].message, r.findings
    w = r.table.get("dw.0", "weight")
    bn = model.dw[1]
    folded = model.dw[0].weight.detach() * (bn.weight.detach() / (bn.running_var + bn.eps).sqrt()).view(-1, 1, 1, 1)
    assert w.scale == (pytest.approx(float(folded.abs().max()) / r.config.weight_qmax, rel=1e-5),), "the tensor's scale"
    assert not [f for f in r.findings if f.kind == "dead_weight_channels" and f.layer in ("stem.0", "head")]


def test_nan_batch_is_refused_by_index():
    batches = _batches(3)
    batches[2][0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="calibration batch 2 contains NaN"):
        quantize(ReLU6Net().eval(), batches)


def test_empty_calibration_set_is_refused():
    with pytest.raises(InputError, match="empty"):
        quantize(ReLU6Net().eval(), [])


def test_wrong_shape_names_expected_and_got():
    batches = _batches(2) + [torch.randn(4, 3, 9, 8)]
    with pytest.raises(InputError, match=r"batch 2 has shape \(4, 3, 9, 8\); expected \(N, 3, 8, 8\)"):
        quantize(ReLU6Net().eval(), batches)


def test_num_calibration_caps_the_images_used():
    labelled = [(x, torch.zeros(4, dtype=torch.long)) for x in _batches(4)]
    r = quantize(ReLU6Net().eval(), labelled, QuantConfig(num_calibration=5))
    assert r.num_calibration_samples == 5


def test_float_fallback_keeps_unsupported_ops_in_float():
    class WithGelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.fc(self.act(self.conv(x)))

    torch.manual_seed(0)
    model = WithGelu().eval()
    with pytest.raises(InputError, match="act"):
        quantize(model, _batches())
    r = quantize(model, _batches(), QuantConfig(float_fallback=True))
    assert [(f.kind, f.layer) for f in r.findings] == [("float_fallback", "act")]
    assert r.table.get("conv", "output") is not None and r.table.get("fc", "weight") is not None
    x = _batches()[0]  # inside the calibrated ranges
    with torch.no_grad():
        ref = model(x)
        assert float((r(x) - ref).abs().max() / ref.abs().max()) < 0.05


def test_float16_stores_weights_in_half():
    torch.manual_seed(0)
    model = ReLU6Net().eval()
    x = torch.randn(2, 3, 8, 8)
    r = to_float16(model, x)
    assert r.graph.meta["mq_precision"] == "float16" and r.num_constants == 4  # 3 convs + linear
    params = dict(r.graph.named_parameters())
    assert {n for n, p in params.items() if p.dtype == torch.float16} == {
        "big.0.weight", "small.0.weight", "project.0.weight", "fc.weight"}
    assert all(p.dtype == torch.float32 for n, p in params.items() if n.endswith("bias"))
    with torch.no_grad():
        out, ref = r(x), model(x)
    assert out.dtype == torch.float32
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-2


def _architectures() -> list[str]:
    """One model per architecture (identical module trees: width variants, ShuffleNetV1 group counts
    give the same ATen graph up to tensor sizes), the first name of each; every zoo model is covered."""
    groups: dict[tuple, str] = {}
    for name in list_models():
        model = create_model(name, num_classes=10)
        groups.setdefault(tuple((k, type(m).__name__) for k, m in model.named_modules()), name)
    return sorted(groups.values())


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", _architectures())
def test_zoo_architecture_fuses_and_quantizes(name):
    """Per architecture, one capture: conv-BN folding matches the float model within 1e-5 relative, then
    capture → prepare → calibrate → convert runs and obeys the TFLite rules.

    Output agreement after quantization is not asserted: a random-weight network is chaotic (measured on
    mobilenetv2_035 with data BN statistics: the simulated/float SQNR falls ~3 dB per block, from 39 dB
    after the stem to ~1 dB at the head), so accuracy is checked on the trained model below."""
    model = _randomize_bn(create_model(name, num_classes=10))
    c, h, _ = model.preprocess.input_size
    side = min(32, h)
    batches = _batches(2, (4, c, side, side))
    gm = capture(model, batches[0])
    report = fold_conv_bn(gm)
    assert not any(n.target in BN_OPS for n in gm.graph.nodes), "every BN follows a conv in the zoo"
    with torch.no_grad():
        ref = model(batches[0])
        assert float((gm(batches[0]) - ref).abs().max() / ref.abs().max()) < 1e-5

    r = quantize(gm, batches, QuantConfig())
    assert r.fusion.folded == () and len(report.folded) == len([m for m in model.modules()
                                                                if isinstance(m, nn.BatchNorm2d)])
    assert not any(f.kind == "float_fallback" for f in r.findings)
    with torch.no_grad():
        out = r(batches[0])
    assert out.shape == ref.shape and bool(torch.isfinite(out).all())
    for e in r.table:
        assert all(0 < s < float("inf") for s in e.scale), e.key
        if e.role == "weight":
            assert set(e.zero_point) == {0} and (e.qmin, e.qmax) == (-127, 127) and e.axis == 0
    for f in report.folded:
        assert r.table.get(f.conv, "weight") is not None, f.conv
        if f.activation == "relu6":
            out_entry = r.table.get(f.conv, "output")
            assert out_entry.zero_point == (-128,) and out_entry.scale[0] <= 6 / 255 * (1 + 1e-6), f.conv


def _trained_default():
    if importlib.util.find_spec("mobilequant.weights") is None:
        return None
    try:
        from mobilequant.weights import default_model

        return default_model()
    except Exception:  # weights not shipped yet
        return None


@pytest.fixture(scope="module")
def trained():
    model = _trained_default()
    if model is None:
        pytest.skip("shipped Fashion-MNIST weights are not installed")
    from mobilequant.data import builtin_dataset, calibration_set

    try:
        test = builtin_dataset("fashion-mnist", "test", model.preprocess)
    except Exception as e:  # the full split comes from a system package
        pytest.skip(f"Fashion-MNIST test split not available: {e}")
    calib = calibration_set("fashion-mnist", model.preprocess)
    batches = [calib.images[i:i + 128] for i in range(0, len(calib.images), 128)]
    x, y = test.images[:1000], test.labels[:1000]
    with torch.no_grad():
        f = torch.cat([model(x[i:i + 250]).argmax(1) for i in range(0, 1000, 250)])
    return model, batches, x, y, f


@pytest.mark.slow
@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(per_channel=False, cle=True)],
                         ids=["per_channel", "per_tensor_cle"])
def test_trained_default_model_keeps_its_accuracy(trained, config):
    """Measured on the full 10k split (shipped MobileNetV2 0.5, float 91.11 %): per-channel minmax
    90.96 %, mse 91.13 %, per-tensor 63.40 % (no CLE), per-tensor + CLE 91.02 %. Here: first 1000 images."""
    model, batches, x, y, f = trained
    r = quantize(model, batches, config)
    with torch.no_grad():
        q = torch.cat([r(x[i:i + 250]).argmax(1) for i in range(0, 1000, 250)])
    float_acc, int8_acc = float((f == y).float().mean()), float((q == y).float().mean())
    assert float((f == q).float().mean()) >= 0.98
    assert int8_acc >= float_acc - 0.01
