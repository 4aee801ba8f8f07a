"""MobileQuantizer annotations follow the TFLite int8 rules; QuantConfig validates its options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
from torchao.quantization.pt2e.quantizer import (
    DerivedQuantizationSpec,
    FixedQParamsQuantizationSpec,
    SharedQuantizationSpec,
)

from mobilequant.capture import capture
from mobilequant.errors import InputError, UsageError
from mobilequant.fusion import fold_conv_bn
from mobilequant.quant import MobileQuantizer, QuantConfig
from mobilequant.quant.quantizer import FUSED_INTO, OP_RULES, Q_KEY, Rule, op_table


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.relu, self.fc2, self.gate = nn.Conv2d(c, 4, 1), nn.ReLU(), nn.Conv2d(4, c, 1), nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.relu(self.fc1(self.avgpool(x)))))


class Shuffle(nn.Module):
    def forward(self, x):
        n, c, h, w = x.shape
        return x.reshape(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class Net(nn.Module):
    """Every rule once: conv+ReLU6, depthwise+ReLU6, linear bottleneck, residual add+ReLU, hardswish,
    squeeze-excite (mean, hardsigmoid, mul), channel shuffle, concat, max pool, mean, linear."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.act = nn.ReLU()
        self.hs = nn.Hardswish()
        self.se = SE(8)
        self.shuffle = Shuffle()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        y = self.act(x + self.project(self.dw(self.expand(x))))
        y = self.shuffle(self.se(self.hs(y)))
        y = self.pool(torch.cat([y, x], 1))
        return self.fc(y.mean((2, 3)))


def _graph(model=None, x=None):
    torch.manual_seed(0)
    model = (model or Net()).eval()
    gm = capture(model, torch.randn(2, 8, 8, 8) if x is None else x)
    fold_conv_bn(gm)
    return gm


def _by_name(gm):
    return {n.meta["mq_name"]: n for n in gm.graph.nodes if n.op == "call_function"}


@pytest.fixture(scope="module")
def annotated():
    gm = _graph()
    q = MobileQuantizer(QuantConfig())
    q.annotate(gm)
    return gm, q, _by_name(gm)


def _ann(node):
    return node.meta[Q_KEY]


def test_conv_relu6_output_is_on_the_activation(annotated):
    gm, q, nodes = annotated
    for conv, act in (("expand.0", "expand.2"), ("dw.0", "dw.2")):
        ca, aa = _ann(nodes[conv]), _ann(nodes[act])
        assert ca.output_qspec is None, "the pair lowers to one fused int8 conv"
        assert aa.output_qspec is q.relu6_spec and not aa.input_qspec_map
        assert nodes[act].meta[FUSED_INTO] == conv
        x, w, b = nodes[conv].args[:3]
        assert ca.input_qspec_map[w] is q.weight_spec
        bias = ca.input_qspec_map[b]
        assert isinstance(bias, DerivedQuantizationSpec) and bias.dtype == torch.int32
        assert bias.derived_from == [(x, nodes[conv]), (w, nodes[conv])]
    spec = q.weight_spec
    assert (spec.quant_min, spec.quant_max, spec.qscheme, spec.ch_axis) == (-127, 127, torch.per_channel_symmetric, 0)


def test_linear_bottleneck_and_add_relu(annotated):
    gm, q, nodes = annotated
    assert _ann(nodes["project.0"]).output_qspec is q.act_spec  # calibrated asymmetric range
    add = nodes["add_0"]
    assert _ann(add).output_qspec is None and _ann(nodes["act"]).output_qspec is q.act_spec  # ADD+ReLU fused
    assert set(_ann(add).input_qspec_map) == {a for a in add.args if isinstance(a, torch.fx.Node)}


def test_shared_fixed_and_own_parameters(annotated):
    gm, q, nodes = annotated
    fixed = _ann(nodes["se.gate"]).output_qspec
    assert isinstance(fixed, FixedQParamsQuantizationSpec)
    assert (fixed.scale, fixed.zero_point, fixed.quant_min, fixed.quant_max) == (1 / 256, -128, -128, 127)
    for name in ("shuffle.reshape_0", "shuffle.transpose_0", "shuffle.reshape_1", "pool", "cat_0"):
        assert isinstance(_ann(nodes[name]).output_qspec, SharedQuantizationSpec), name
    cat = nodes["cat_0"]
    first, second = cat.args[0]
    assert _ann(cat).input_qspec_map[second] == SharedQuantizationSpec((first, cat))
    for name in ("hs", "se.avgpool", "mean_0", "fc", "se"):
        assert _ann(nodes[name]).output_qspec is q.act_spec, name


def test_prepared_graph_shares_observers_where_tflite_requires(annotated):
    gm = _graph()
    prepared = prepare_pt2e(gm, MobileQuantizer(QuantConfig()))
    obs_after = {}
    for n in prepared.graph.nodes:
        if n.op == "call_module" and isinstance(n.args[0], torch.fx.Node):
            obs_after[n.args[0].meta.get("mq_name")] = prepared.get_submodule(n.target)
    chain = ["se", "shuffle.reshape_0", "shuffle.transpose_0", "shuffle.reshape_1", "cat_0", "pool"]
    assert len({id(obs_after[c]) for c in chain}) == 1, "channel shuffle / concat / pool keep one range"
    assert obs_after["hs"] is not obs_after["se"]


class Clamps(nn.Module):
    """Clamps with other bounds than ReLU / ReLU6: after a conv, after an add, and alone after a pool."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.act, self.pool = nn.Hardtanh(), nn.MaxPool2d(2)  # Hardtanh: [-1, 1]

    def forward(self, x):
        x = self.act(self.a(x))
        x = self.b(x).clamp(min=-0.5)
        x = (x + self.c(x)).clamp(max=2.0)
        return self.pool(x).clamp(0.5, 1.5)


def test_clamps_with_any_bounds_fuse_or_share():
    """The converter makes a clamp after a conv / add that op's fused activation (RELU_N1_TO_1, RELU) or
    MINIMUM / MAXIMUM on its output, which keep its parameters: one output tensor, quantized after the
    clamp. A clamp alone is MINIMUM / MAXIMUM: same parameters in and out. (Both had own ranges: the
    int8 file computed something else than the simulation, ~96 % top-1 agreement.)"""
    gm = _graph(Clamps(), torch.randn(2, 3, 8, 8))
    q = MobileQuantizer(QuantConfig())
    q.annotate(gm)
    nodes = _by_name(gm)
    for producer, clamp in (("a", "act"), ("b", "clamp_0"), ("add_0", "clamp_1")):
        assert _ann(nodes[producer]).output_qspec is None, producer
        assert _ann(nodes[clamp]).output_qspec is q.act_spec and nodes[clamp].meta[FUSED_INTO] == producer
    alone = nodes["clamp_2"]
    assert _ann(alone).output_qspec == SharedQuantizationSpec((nodes["pool"], alone))


def test_leaky_relu_scale_is_one_xnnpack_represents():
    """XNNPACK's int8 LEAKY_RELU keeps 256·s_in/s_out as an integer (8 fractional bits): with any other
    ratio EffNet's TFLite file was a step off its simulation on up to 2.7 % of a layer's elements. The
    output scale is snapped to an odd such ratio (odd: no rounding ties), above the observed range."""
    from mobilequant.quant import quantize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LeakyReLU(0.1), nn.Conv2d(8, 4, 1), nn.LeakyReLU(0.01)).eval()
    qr = quantize(model, [torch.randn(8, 3, 8, 8)], QuantConfig(bias_correction=False))
    slopes = [n.args[1] for n in qr.qdq_graph.graph.nodes if "leaky_relu" in str(n.target)]
    for (out_name, in_name), float_slope, slope in zip((("1", "0"), ("3", "2")), (0.1, 0.01), slopes):
        s_out, s_in = qr.table.get(out_name).scale[0], qr.table.get(in_name).scale[0]
        k = 256 * s_in / s_out
        assert abs(k - round(k)) < 1e-4 and round(k) % 2 == 1 and round(k) >= 256, (out_name, k)
        # the negative side: the kernel's multiplier slope·k is an integer, odd (no ties) or 0, within 1/k
        m = slope * round(k)
        assert abs(m - round(m)) < 1e-6 and (round(m) % 2 == 1 or round(m) == 0), (out_name, m)
        assert abs(slope - float_slope) <= 1 / round(k) + 1e-9


def test_leaky_relu_int8_tflite_file_is_its_simulation_code_for_code(tmp_path):
    """XNNPACK's LEAKY_RELU computes the negative side with round(256·slope·s_in/s_out)/256: with the float
    slope the file was a step off the simulation on 0.13 % of a layer's elements (slope 0.1; EffNet's 12
    layers 0.15–0.8 %). The graph now computes the kernel's slope, and the file matches element for element."""
    from mobilequant.export import export
    from mobilequant.quant import quantize
    from mobilequant.runtime import open_runner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(16, 16, 1),
                          nn.LeakyReLU(0.2)).eval()
    qr = quantize(model, [torch.randn(32, 3, 16, 16)], QuantConfig(bias_correction=False))
    art = export(qr, "tflite-int8", tmp_path / "leaky.tflite")
    x = torch.randn(16, 3, 16, 16)
    sim = qr.graph(x).detach().numpy()
    out = open_runner(art.path).run(x)
    out = out.transpose(0, 3, 1, 2) if out.shape != sim.shape else out
    steps = np.abs(out - sim) / qr.table.get("3").scale[0]
    assert float((steps > 0.5).mean()) == 0.0, f"{(steps > 0.5).sum()} of {steps.size} elements a step off"


def test_relu6_fixed_mode_uses_exact_range():
    q = MobileQuantizer(QuantConfig(relu6="fixed"))
    obs = q.relu6_spec.observer_or_fake_quant_ctr(dtype=torch.int8, quant_min=-128, quant_max=127)
    obs(torch.tensor([0.0, 1.0]))  # data is ignored
    scale, zp = obs.calculate_qparams()
    assert float(scale) == pytest.approx(6 / 255, rel=1e-7) and int(zp) == -128


def test_per_tensor_weights():
    spec = MobileQuantizer(QuantConfig(per_channel=False, weight_bits=4)).weight_spec
    assert (spec.qscheme, spec.ch_axis, spec.quant_min, spec.quant_max) == (torch.per_tensor_symmetric, None, -7, 7)


def test_validate_lists_unsupported_ops_and_float_fallback():
    class WithGelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 4, 1), nn.GELU()

        def forward(self, x):
            return self.act(self.conv(x))

    gm = _graph(WithGelu(), torch.randn(2, 3, 4, 4))
    # the message says what a command-line user can do: a float target, or the recipe key as --set takes it
    with pytest.raises(InputError, match=r"act \(aten\.gelu\.default\).*tflite-fp32.*"
                                         r"--set quantization\.float_fallback=true"):
        MobileQuantizer(QuantConfig()).validate(gm)
    MobileQuantizer(QuantConfig(float_fallback=True)).validate(gm)  # no error


def test_litert_reads_a_static_global_config():
    assert MobileQuantizer().global_config.is_dynamic is False


def test_op_table_has_one_rule_per_op():
    rows = op_table()
    assert len(rows) == len(OP_RULES) and ("aten.hardtanh.default", "clamp") in rows
    assert OP_RULES[torch.ops.aten.cat.default] is Rule.SHARED


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"calibration": "minmx"}, "calibration"),
        ({"relu6": "clamp"}, "relu6"),
        ({"weight_bits": 9}, "weight_bits"),
        ({"percentile": 20.0}, "percentile"),
        ({"num_calibration": 0}, "num_calibration"),
        ({"per_channel": "yes"}, "per_channel"),
    ],
)
def test_config_rejects_bad_values_naming_the_option(kwargs, option):
    with pytest.raises(UsageError) as e:
        QuantConfig(**kwargs)
    assert f"QuantConfig.{option}" in str(e.value) and "\n" not in str(e.value)


def test_config_suggests_close_names():
    with pytest.raises(UsageError, match="did you mean 'minmax'"):
        QuantConfig(calibration="minmx")
    with pytest.raises(UsageError, match="did you mean 'per_channel'"):
        QuantConfig().replace(per_chanel=False)
    assert QuantConfig.from_dict(QuantConfig(cle=True).to_dict()) == QuantConfig(cle=True)


class ConvBNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        y = self.a(x)
        return y + self.b(y)


def test_qat_annotations_look_through_batch_norm():
    """In QAT the BN stays in the graph (torchao folds it while training): the conv gets input, weight
    and bias specs, the output spec goes on the activation after the BN (or on the BN for a linear
    bottleneck), and the BN step counter ``add_`` is not an ADD. (``prepare_qat_pt2e`` itself is
    exercised by mobilequant.qat's tests; its conv-BN pattern export is slow.)"""
    from torchao.quantization.pt2e import FakeQuantize

    from mobilequant.capture import name_layers
    from mobilequant.fusion import BN_OPS

    x = torch.randn(4, 3, 8, 8)
    gm = torch.export.export(ConvBNNet().train(), (x,)).module()
    name_layers(gm)
    q = MobileQuantizer(QuantConfig(), is_qat=True)
    assert q.act_spec.observer_or_fake_quant_ctr.p.func is FakeQuantize and q.global_config.is_qat
    q.annotate(gm)
    q.validate(gm)  # batch norms are supported in QAT
    nodes = _by_name(gm)
    assert _ann(nodes["a.0"]).output_qspec is None and _ann(nodes["a.1"]).output_qspec is None
    assert _ann(nodes["a.2"]).output_qspec is q.relu6_spec and nodes["a.2"].meta[FUSED_INTO] == "a.0"
    assert _ann(nodes["b.1"]).output_qspec is q.act_spec and nodes["b.1"].meta[FUSED_INTO] == "b.0"
    counters = [n for n in gm.graph.nodes if n.target == torch.ops.aten.add_.Tensor]
    assert counters and all(not _ann(n).input_qspec_map and _ann(n).output_qspec is None for n in counters)
    assert any(n.target in BN_OPS for n in gm.graph.nodes)


def test_learned_scales_except_fixed_parameters():
    from torchao.quantization.pt2e import FakeQuantize, LearnableFakeQuantize

    def fq_class(spec):
        return spec.observer_or_fake_quant_ctr.p.func

    learned = MobileQuantizer(QuantConfig(relu6="fixed"), is_qat=True, learn_scales=True)
    assert fq_class(learned.act_spec) is LearnableFakeQuantize
    assert fq_class(learned.weight_spec) is LearnableFakeQuantize
    assert fq_class(learned.relu6_spec) is FakeQuantize  # [0, 6] stays fixed


def test_learn_scales_needs_qat():
    with pytest.raises(UsageError, match="is_qat"):
        MobileQuantizer(QuantConfig(), learn_scales=True)
