"""Cross-layer equalization and bias correction on captured, BN-folded graphs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from mobilequant.capture import capture, layer_name
from mobilequant.errors import UsageError
from mobilequant.fusion import fold_conv_bn
from mobilequant.quant.bias_correction import correct, correct_bias, fake_quantize_weight
from mobilequant.quant.cle import channel_ranges, equalize

aten = torch.ops.aten


class DwNet(nn.Module):
    """conv-BN-act → depthwise-BN-act → pointwise-BN → conv-BN-act → grouped conv-act → pool → linear."""

    def __init__(self, act=nn.ReLU, bn: bool = True):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=not bn), norm(16), act())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=not bn), norm(16), act())
        self.pw = nn.Sequential(nn.Conv2d(16, 12, 1, bias=not bn), norm(12))
        self.expand = nn.Sequential(nn.Conv2d(12, 24, 1, bias=not bn), norm(24), act())
        self.group = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, groups=2), act())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.group(self.expand(self.pw(self.dw(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.2)
            m.weight.data.copy_(torch.rand(n, generator=g) * 1.5 + 0.2)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def _folded(model: nn.Module, x: torch.Tensor):
    gm = capture(model, x)
    fold_conv_bn(gm)
    return gm


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach(), ref.detach()
    return float((out - ref).abs().max() / ref.abs().max())


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    out, ref = out.detach(), ref.detach()
    return float(10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean()))


def _weights_quantized(gm, per_channel: bool = False):
    """A copy of ``gm`` with every conv / linear weight fake-quantized (activations stay float)."""
    g = copy.deepcopy(gm)
    for node in g.graph.nodes:
        if node.op == "call_function" and node.target in (aten.conv2d.default, aten.linear.default):
            *path, leaf = str(node.args[1].target).split(".")
            owner = g.get_submodule(".".join(path)) if path else g
            w = getattr(owner, leaf)
            setattr(owner, leaf, nn.Parameter(fake_quantize_weight(w, per_channel), requires_grad=False))
    return g


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one thread is faster than two contending ones on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 3, 16, 16, generator=g), torch.randn(32, 3, 16, 16, generator=g)


# -- CLE: float equivalence ----------------------------------------------------------------------------


def test_cle_preserves_float_outputs_of_a_relu_network(data):
    x, _ = data
    torch.manual_seed(1)
    model = _randomize_bn(DwNet(nn.ReLU), 1)
    with torch.no_grad():
        ref = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm, report = equalize(_folded(model, x))
    assert _rel_err(gm(x), ref) < 1e-5
    assert report.converged
    kinds = {(p.first, p.second): p.kind for p in report.pairs}
    assert kinds == {
        ("stem.0", "dw.0"): "conv→dwconv",
        ("dw.0", "pw.0"): "dwconv→conv",
        ("pw.0", "expand.0"): "conv→conv",
        ("expand.0", "group.0"): "conv→gconv",
        ("group.0", "fc"): "gconv→linear",
    }
    assert next(p for p in report.pairs if p.first == "group.0").between == ("group.1", "pool", "flatten_0")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model is untouched


def test_cle_flatten_of_a_spatial_map_into_linear_is_exact():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act, self.fc = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4 * 2 * 2, 5)
            with torch.no_grad():
                self.conv.weight.mul_(torch.tensor([0.01, 1.0, 30.0, 3.0])[:, None, None, None])

        def forward(self, x):
            return self.fc(torch.flatten(self.act(self.conv(x)), 1))

    x = torch.randn(4, 3, 4, 4)
    model = Head().eval()
    gm, report = equalize(capture(model, x))
    (pair,) = report.pairs
    assert pair.kind == "conv→linear" and pair.precision_after > pair.precision_before
    assert _rel_err(gm(x), model(x)) < 1e-5


def test_residual_outputs_are_not_paired():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return self.c(self.b(y) + y)

    x = torch.randn(2, 4, 5, 5)
    model = Res().eval()
    gm, report = equalize(capture(model, x))
    assert {(p.first, p.second) for p in report.pairs} == set()  # a's output also feeds the add
    assert _rel_err(gm(x), model(x)) < 1e-6


def test_relu6_treatments(data):
    x, _ = data
    torch.manual_seed(2)
    model = _randomize_bn(DwNet(nn.ReLU6), 2)
    with torch.no_grad():  # make pre-activations exceed 6 so that ReLU6 actually clips
        model.stem[0].weight.mul_(8)
    ref = model(x)

    gm, report = equalize(_folded(model, x), relu6="clamp")
    assert _rel_err(gm(x), ref) < 1e-5  # exact: per-channel ceilings 6 / s_i
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.hardtanh.default not in targets and targets.count(aten.clamp.Tensor) == 4
    clamp = next(n for n in gm.graph.nodes if n.target == aten.clamp.Tensor)
    assert layer_name(clamp) == "stem.2"  # the stable layer name survives the rewrite
    pair = next(p for p in report.pairs if p.first == "stem.0")
    ceiling = getattr(gm, str(clamp.args[2].target)).flatten()
    assert torch.allclose(ceiling.double(), 6 / torch.tensor(pair.scales, dtype=torch.float64), rtol=1e-6)

    gm, report = equalize(_folded(model, x), relu6="relu")
    assert len(report.pairs) == 5
    assert _rel_err(gm(x), ref) > 1e-3  # the paper's ReLU6 -> ReLU changes the float function

    gm, report = equalize(_folded(model, x), relu6="skip")
    assert [(p.first, p.second) for p in report.pairs] == [("pw.0", "expand.0")]
    assert len(report.skipped) == 4
    assert _rel_err(gm(x), ref) < 1e-5


def test_bad_options_are_usage_errors(data):
    x, _ = data
    gm = capture(DwNet(bn=False).eval(), x)
    with pytest.raises(UsageError, match="did you mean 'relu'"):
        equalize(gm, relu6="reLu")
    with pytest.raises(UsageError, match="iterations"):
        equalize(gm, iterations=0)


# -- CLE: ranges and quantization ------------------------------------------------------------------------


def _imbalanced(seed: int) -> tuple[nn.Module, nn.Module]:
    """A balanced ReLU network and the same function with depthwise channel ranges spread over 1e-2..1e2
    (output channel i of the depthwise scaled by c_i, input channel i of the pointwise by 1 / c_i)."""
    torch.manual_seed(seed)
    balanced = DwNet(nn.ReLU, bn=False).eval()
    imbalanced = copy.deepcopy(balanced)
    c = torch.logspace(-2, 2, 16)[torch.randperm(16)]
    with torch.no_grad():
        imbalanced.dw[0].weight.mul_(c[:, None, None, None])
        imbalanced.dw[0].bias.mul_(c)
        imbalanced.pw[0].weight.div_(c[None, :, None, None])
    return balanced, imbalanced


def test_cle_balances_the_depthwise_ranges(data):
    x, _ = data
    _, model = _imbalanced(3)
    gm = capture(model, x)
    spread = lambda r: float(r.max() / r.min())  # noqa: E731
    dw_before = spread(channel_ranges(gm.get_parameter("dw.0.weight")))
    gm, report = equalize(gm)
    dw_after = spread(channel_ranges(gm.get_parameter("dw.0.weight")))
    assert dw_before > 1e3 and dw_after < 30
    for pair in report.pairs:
        if "dw.0" in (pair.first, pair.second):
            assert pair.precision_after > 3 * pair.precision_before, pair
    assert report.converged and "precision" in report.summary()


def test_cle_improves_per_tensor_weight_quantization(data):
    x, x_eval = data
    balanced, model = _imbalanced(4)
    ref = model(x_eval)
    assert _rel_err(balanced(x_eval), ref) < 1e-5
    plain = _sqnr(ref, _weights_quantized(capture(model, x))(x_eval))
    gm, _ = equalize(capture(model, x))
    equalized = _sqnr(ref, _weights_quantized(gm)(x_eval))
    per_channel = _sqnr(ref, _weights_quantized(capture(model, x), per_channel=True)(x_eval))
    assert equalized > plain + 10, (plain, equalized)
    assert equalized > per_channel - 6, (equalized, per_channel)


# -- bias correction ---------------------------------------------------------------------------------------


def test_fake_quantize_weight_is_on_the_int8_grid():
    w = torch.randn(6, 4, 3, 3) * torch.logspace(-1, 1, 6)[:, None, None, None]
    for per_channel in (False, True):
        wq = fake_quantize_weight(w, per_channel)
        top = w.abs().amax((1, 2, 3), keepdim=True) if per_channel else w.abs().max()
        scale = top / 127
        assert torch.allclose(wq / scale, torch.round(wq / scale), atol=1e-3)
        assert float(((wq - w).abs() / scale).max()) <= 0.5 + 1e-4
    assert fake_quantize_weight(w, False, bits=4).div(w.abs().max() / 7).round().abs().max() <= 7


def test_bias_correction_reduces_the_mean_output_error(data):
    x, x_eval = data
    model = _randomize_bn(DwNet(nn.ReLU), 5)
    gm = _folded(model, x)
    with torch.no_grad():
        ref = gm(x_eval)
    plain = _weights_quantized(gm)(x_eval)
    corrected_gm = copy.deepcopy(gm)
    report = correct_bias(corrected_gm, x.split(4), per_channel=False)
    assert len(report.layers) == 6 and report.samples == 16 and report.batches == 4
    assert _rel_err(corrected_gm(x_eval), ref) > 0  # the float graph now carries the corrected biases
    corrected = _weights_quantized(corrected_gm)(x_eval)
    mean_err = lambda out: float((out.detach() - ref).mean(0).abs().mean())  # noqa: E731  bias of the error
    assert mean_err(corrected) < 0.5 * mean_err(plain), (mean_err(plain), mean_err(corrected))
    assert _sqnr(ref, corrected) > _sqnr(ref, plain)


def test_bias_correction_adds_a_missing_bias():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False)).eval()
    x = torch.randn(4, 3, 6, 6)
    gm = capture(model, x)
    report = correct_bias(gm, [x])
    assert len(report.layers) == 2
    convs = [n for n in gm.graph.nodes if n.target == aten.conv2d.default]
    assert all(n.args[2] is not None for n in convs)
    gm(x)


def test_pipeline_correction_removes_the_mean_error_of_the_simulated_graph(data):
    """``correct(prepared, batches)``: on the calibration images, the simulated int8 graph's mean output
    error per channel (weights and activations quantized) shrinks to a fraction of what it was, and
    ``convert_pt2e`` carries the corrected biases."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from mobilequant.quant import QuantConfig
    from mobilequant.quant.quantizer import MobileQuantizer

    x, _ = data
    torch.manual_seed(6)  # the model's weights: the same whichever tests ran before
    model = _randomize_bn(DwNet(nn.ReLU), 6)
    gm = _folded(model, x)
    with torch.no_grad():
        ref = gm(x)
    prepared = prepare_pt2e(gm, MobileQuantizer(QuantConfig(per_channel=False, bias_correction=False)))
    with torch.no_grad():
        prepared(x)
    plain = copy.deepcopy(prepared)
    report = correct(prepared, x.split(8))
    assert not report.per_channel and len(report.layers) == 6 and report.samples == len(x) and report.batches == 2
    assert all(l.max_abs_shift > 0 for l in report.layers)
    mean_err = lambda g: float((_without_output_rounding(convert_pt2e(g))(x) - ref).mean(0).abs().mean())  # noqa: E731
    before, after = mean_err(plain), mean_err(prepared)
    assert after < 0.25 * before, (before, after)


def _without_output_rounding(gm):
    """The converted graph with its output's quantize → dequantize removed: the int8 model's output
    before its last rounding, whose own mean error no bias can remove."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    dq = out.args[0][0]
    assert "dequantize" in str(dq.target) and "quantize" in str(dq.args[0].target)
    dq.replace_all_uses_with(dq.args[0].args[0])
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def test_images_beyond_the_budget_are_dropped_evenly_over_the_set(data):
    """When only some calibration images fit the memory budget, the walk takes them evenly spaced over
    the set, not its head: sets are often ordered by source (a photo's crops, a class, a folder)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from mobilequant.quant import QuantConfig
    from mobilequant.quant.bias_correction import _SideBySide, spread_subset, walk_side_by_side
    from mobilequant.quant.quantizer import MobileQuantizer

    assert torch.equal(spread_subset(torch.arange(12), 3), torch.tensor([0, 4, 8]))
    assert torch.equal(spread_subset(torch.arange(5), 9), torch.arange(5))
    x, _ = data
    prepared = prepare_pt2e(_folded(DwNet(nn.ReLU), x), MobileQuantizer(QuantConfig(bias_correction=False)))
    with torch.no_grad():
        prepared(x)
    ordered = torch.arange(1.0, len(x) + 1)[:, None, None, None] * torch.ones_like(x[:1])  # image i is all i + 1
    seen = []

    class Recording(_SideBySide):
        def run(self, images):
            seen.append(images[:, 0, 0, 0].tolist())
            return super().run(images)

    per_image = _SideBySide(prepared, dry_run=True).run(ordered[:2]).peak_bytes // 2
    walk, _, used = walk_side_by_side(prepared, ordered.split(8), Recording, budget_bytes=per_image * len(x) // 3)
    assert 1 < used < len(x) and seen[-1] == spread_subset(ordered, used)[:, 0, 0, 0].tolist()
    assert max(seen[-1]) > 0.75 * len(x)  # the end of the set is represented
