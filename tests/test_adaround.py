"""AdaRound inside the PTQ pipeline: the learned weights stay on the observers' grid, within one step of
the float weight, and lower the output error of the simulated int8 model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mobilequant.capture import layer_name
from mobilequant.errors import UsageError
from mobilequant.quant import QuantConfig, quantize
from mobilequant.quant.adaround import AdaRoundOptions

aten = torch.ops.aten


class Net(nn.Module):
    """conv-BN-ReLU6 → depthwise-BN-ReLU6 → linear-bottleneck projection → pool → linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        return self.fc(self.pw(self.dw(self.stem(x))).mean((2, 3)))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Net().eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    calib = torch.randn(64, 3, 12, 12, generator=g)
    held_out = torch.randn(64, 3, 12, 12, generator=g)
    # 4-bit weights: where rounding choices matter most (the paper's main case)
    base = dict(weight_bits=4, bias_correction=False, calibration="minmax")
    nearest = quantize(model, calib.split(16), QuantConfig(**base))
    learned = quantize(model, calib.split(16), QuantConfig(**base, adaround=True, adaround_iterations=300))
    return model, calib, held_out, nearest, learned


def _weights(result) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """layer → (float weight stored in the QDQ graph, its scale from the quantization table)."""
    gm = result.qdq_graph
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (aten.conv2d.default, aten.linear.default):
            const = node.args[1].args[0].args[0]  # conv ← dequantize ← quantize ← get_attr
            w = gm.get_parameter(str(const.target)).detach()
            name = layer_name(node)
            scale = torch.tensor(result.table.get(name, "weight").scale)
            out[name] = (w, scale.reshape(-1, *[1] * (w.dim() - 1)))
    return out


def test_learned_weights_are_on_the_grid_within_one_step(setup):
    model, _, _, nearest, learned = setup
    report = learned.adaround
    assert len(report.layers) == 4 and report.samples == 64
    assert sum(r.flipped for r in report.layers) > 0  # it did change rounding decisions
    # the scales are the calibrated observers', untouched
    assert [e for e in nearest.table if e.role == "weight"] == [e for e in learned.table if e.role == "weight"]
    before, after = _weights(nearest), _weights(learned)
    assert before.keys() == after.keys() and len(after) == 4
    for layer, (w_round, scale) in after.items():
        w_float, _ = before[layer]  # bias_correction=False: nearest stores the float weight
        s = scale
        codes = w_round / s
        assert torch.allclose(codes, codes.round(), atol=1e-3), layer
        assert float(codes.round().abs().max()) <= 7, layer
        assert float(((w_round - w_float) / s).abs().max()) < 1 + 1e-4, layer  # floor or ceil of w / s


def test_learned_rounding_lowers_the_output_error(setup):
    model, _, held_out, nearest, learned = setup
    layers = learned.adaround.layers  # on the calibration images, layer by layer
    assert all(r.mse_adaround <= 1.01 * r.mse_nearest for r in layers), layers
    assert float(torch.tensor([r.mse_adaround / r.mse_nearest for r in layers]).prod()) < 0.8, layers
    with torch.no_grad():
        ref = model(held_out)
        err = lambda res: float((res(held_out) - ref).pow(2).mean())  # noqa: E731
        assert err(learned) < 0.9 * err(nearest), (err(nearest), err(learned))  # images it did not see


def test_adaround_with_bias_correction_reports_both():
    torch.manual_seed(2)
    model = Net().eval()
    x = torch.randn(16, 3, 8, 8)
    r = quantize(model, [x], QuantConfig(adaround=True, adaround_iterations=20))
    assert r.bias_correction is not None and len(r.bias_correction.layers) == 4
    assert "adaround: 4 layers from 16 samples" in r.adaround.summary()


def test_bad_options_are_refused_by_name():
    with pytest.raises(UsageError, match="adaround_iterations"):
        QuantConfig(adaround=True, adaround_iterations=0)
    with pytest.raises(UsageError, match="adaround"):
        QuantConfig(adaround="yes")
    with pytest.raises(UsageError, match="warm_start"):
        AdaRoundOptions(warm_start=1.0)


def test_dead_channels_stay_zero_and_get_repaired_scales():
    """All-zero depthwise channels, an all-zero layer and a constant layer (test_ptq's DeadNet): AdaRound
    leaves the dead weights at zero and the degenerate-range repairs still apply."""
    from test_ptq import DeadNet, _batches

    torch.manual_seed(0)
    r = quantize(DeadNet().eval(), _batches(), QuantConfig(adaround=True, adaround_iterations=20))
    for e in r.table:
        assert all(s > 0 and s == s and s != float("inf") for s in e.scale), e.key
    kinds = {(f.kind, f.layer) for f in r.findings}
    assert {("dead_weight_channels", "dw.0"), ("dead_weight_channels", "zero")} <= kinds
    dw = next(n for n in r.qdq_graph.graph.nodes
              if n.target == aten.conv2d.default and layer_name(n) == "dw.0")
    w = r.qdq_graph.get_parameter(str(dw.args[1].args[0].args[0].target))
    assert float(w[[2, 5]].abs().max()) == 0.0 and float(w.abs().max()) > 0
    assert bool(torch.isfinite(r(torch.randn(2, 3, 8, 8))).all())
