"""Capture (stable layer names, one-line errors, unsupported-op listing) and conv-BN folding."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mobilequant.capture import capture, find_unsupported_ops
from mobilequant.errors import InputError
from mobilequant.fusion import BN_OPS, fold_conv_bn


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics so folding is actually exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.proj = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))  # linear bottleneck

    def forward(self, x):
        y = self.proj(self.conv(x))
        a, b = y.chunk(2, dim=1)
        return x + torch.cat([b, a], 1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block()
        self.relu = nn.ReLU()  # reused: second call is "relu@1"
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.relu(self.block(self.stem(x)))
        x = self.relu(x - 0.5)
        return self.fc(torch.flatten(x.mean((2, 3), keepdim=True), 1))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return _randomize_bn(Net())


def _names(gm):
    return [n.meta["mq_name"] for n in gm.graph.nodes if n.op == "call_function"]


def test_layer_names_are_module_paths_and_stable(net):
    x = torch.randn(2, 3, 8, 8)
    gm = capture(net, x)
    names = _names(gm)
    assert len(names) == len(set(names)), "layer names must be unique"
    for expected in ("stem.0", "stem.1", "stem.2", "block.conv.0", "block.conv.2", "block.proj.1",
                     "block.chunk_0", "block.chunk_0[0]", "block.chunk_0[1]", "block.cat_0", "block.add_0",
                     "relu", "relu@1", "sub_0", "mean_0", "flatten_0", "fc"):
        assert expected in names, expected
    assert _names(capture(net, x)) == names  # deterministic
    with torch.no_grad():
        torch.testing.assert_close(gm(torch.ones(5, 3, 8, 8)), net(torch.ones(5, 3, 8, 8)))  # dynamic batch


def test_capture_error_names_the_module():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Identity(), DataDependent())

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(InputError) as e:
        capture(Outer(), torch.randn(2, 3))
    msg = str(e.value)
    assert "\n" not in msg and "inner.1" in msg


def test_find_unsupported_ops_lists_every_op(net):
    gm = capture(net, torch.randn(2, 3, 8, 8))
    supported = {n.target for n in gm.graph.nodes if n.op == "call_function"} - set(BN_OPS)
    bad = find_unsupported_ops(gm, supported)
    assert sorted(name for name, _ in bad) == ["block.conv.1", "block.proj.1", "stem.1"]
    assert all("batch_norm" in op for _, op in bad)


def test_fold_conv_bn_matches_unfused_and_records_activation(net):
    x = torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    gm = capture(net, x)
    report = fold_conv_bn(gm)
    kinds = {f.conv: f.activation for f in report.folded}
    assert kinds == {"stem.0": "relu", "block.conv.0": "relu6", "block.proj.0": "none"}
    assert not any(n.target in BN_OPS for n in gm.graph.nodes)
    with torch.no_grad():
        assert _rel_err(net(x), gm(x)) < 1e-5
    for k, v in net.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k]), k


def test_conv_with_other_users_is_not_folded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    m = _randomize_bn(Shared())
    x = torch.randn(2, 3, 4, 4)
    gm = capture(m, x)
    report = fold_conv_bn(gm)
    assert not report.folded and report.skipped == (("bn", "convolution output has other users"),)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x))


# Every zoo architecture is folded and checked against its float model (within 1e-5 relative) in
# tests/test_ptq.py::test_zoo_architecture_fuses_and_quantizes, which reuses that capture for quantization.


class PooledConcat(nn.Module):
    """A ShuffleNetV1 stride-2 unit: ``relu(cat(avgpool(x), conv-BN(x)))`` with ``x`` a ReLU output,
    plus a ReLU6 over a concat of a ReLU6 output and a plain conv (clamped on one input only)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4))
        self.six = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU6())
        self.plain = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(torch.cat((self.pool(x), self.branch(x)), 1))
        return nn.functional.relu6(torch.cat((self.six(y), self.plain(y)), 1))


def test_activation_after_concat_moves_onto_its_inputs():
    torch.manual_seed(0)
    m = _randomize_bn(PooledConcat())
    x = torch.randn(2, 3, 8, 8) * 3
    gm = capture(m, x)
    report = fold_conv_bn(gm)
    assert len(report.moved_activations) == 2
    # The branch's activation now follows its conv, so it folds as conv-BN-ReLU; the pooled ReLU output and
    # the ReLU6 output already lie in range and get no new node.
    assert {f.conv: f.activation for f in report.folded} == {"stem.0": "relu", "branch.0": "relu"}
    cats = [n for n in gm.graph.nodes if n.target == torch.ops.aten.cat.default]
    assert len(cats[0].users) == 2 and list(cats[1].users)[0].op == "output"  # no activation after either
    producers = [[str(a.target).split(".")[1] for a in n.args[0]] for n in cats]
    assert producers == [["avg_pool2d", "relu"], ["hardtanh", "hardtanh"]]  # F.relu6 is captured as hardtanh
    assert "moved before a concat" in report.summary()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-6)


class _Arithmetic(nn.Module):
    """h-swish / h-sigmoid as users write them, and a division by a number."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        x = self.conv(x)
        if self.form == "x*relu6(x+3)/6":
            return x * nn.functional.relu6(x + 3) / 6
        if self.form == "x*(relu6(x+3)/6)":
            return x * (nn.functional.relu6(x + 3.0) / 6.0)
        if self.form == "relu6(x+3)/6":
            return nn.functional.relu6(x + 3) / 6
        return x / 4  # a plain division


@pytest.mark.parametrize("form, op", [("x*relu6(x+3)/6", "hardswish"), ("x*(relu6(x+3)/6)", "hardswish"),
                                      ("relu6(x+3)/6", "hardsigmoid"), ("x/4", "mul")])
def test_arithmetic_activations_are_captured_as_one_op(form, op):
    model = _Arithmetic(form).eval()
    x = torch.randn(2, 3, 8, 8) * 4
    gm = capture(model, x)
    ops = {n.target.__name__.split(".")[0] for n in gm.graph.nodes if n.op == "call_function"}
    assert op in ops and not ops & {"div", "add", "hardtanh"}, ops
    torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)


def test_batchnorm1d_after_a_linear_is_folded():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc, self.bn = nn.Conv2d(3, 8, 3), nn.Linear(8, 6), nn.BatchNorm1d(6)
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.data.uniform_(0.5, 1.5)

        def forward(self, x):
            return self.bn(self.fc(self.conv(x).mean((2, 3))))

    model = Head().eval()
    x = torch.randn(4, 3, 8, 8)
    gm = capture(model, x)
    report = fold_conv_bn(gm)
    assert [f.bn for f in report.folded] == ["bn"] and not any(n.target in BN_OPS for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


class _Pools(nn.Module):
    """Adaptive average pools to 2×2 (divides 8×8), 3×3 (does not) and 1×1, and an eval-mode Dropout2d."""

    def __init__(self):
        super().__init__()
        self.conv, self.drop = nn.Conv2d(3, 4, 3, padding=1), nn.Dropout2d(0.3)
        self.even, self.uneven, self.glob = nn.AdaptiveAvgPool2d((2, 2)), nn.AdaptiveAvgPool2d(3), nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.drop(self.conv(x))
        return torch.cat([self.even(x).flatten(1), self.uneven(x).flatten(1), self.glob(x).flatten(1)], 1)


def test_even_adaptive_pools_and_eval_dropouts_have_one_spelling():
    """AdaptiveAvgPool2d((2, 2)) of 8×8 is avg_pool2d(4, 4) — what TFLite computes, whose int8 form shares
    its input's parameters (the adaptive spelling had an own range: an extra QUANTIZE in the file); the
    global and the uneven pool stay adaptive. Dropout2d in eval (feature_dropout) is the identity, spelled
    as dropout (it had been refused by every target)."""
    model = _Pools().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = capture(model, x)
    by_name = {n.meta["mq_name"]: n for n in gm.graph.nodes if n.op == "call_function"}
    aten = torch.ops.aten
    assert by_name["even"].target == aten.avg_pool2d.default and by_name["even"].args[1:] == ([4, 4], [4, 4])
    assert by_name["uneven"].target == by_name["glob"].target == aten.adaptive_avg_pool2d.default
    assert by_name["drop"].target == aten.dropout.default
    assert not find_unsupported_ops(gm, {aten.conv2d.default, aten.dropout.default, aten.avg_pool2d.default,
                                         aten.adaptive_avg_pool2d.default, aten.flatten.using_ints, aten.cat.default})
    torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)
