"""Calibration observers: ranges on known distributions, ReLU6 modes, degenerate data, batch invariance."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torchao.quantization.pt2e.observer import HistogramObserver

from mobilequant.errors import UsageError
from mobilequant.quant.observers import (
    ACTIVATION_METHODS,
    EntropyObserver,
    MSEObserver,
    ReLU6FixedObserver,
    _kl_threshold_bins,
    make_activation_observer,
    make_weight_observer,
)

HIST_METHODS = ("percentile", "entropy", "mse")
RELU6_SCALE = torch.tensor(6 / 255, dtype=torch.float32).item()


def _observe(method: str, data: torch.Tensor, batch: int = 50_000, **kw):
    obs = make_activation_observer(method, **kw)()
    for chunk in data.split(batch):
        obs(chunk)
    return obs


def _range(obs) -> tuple[float, float]:
    scale, zp = obs.calculate_qparams()
    s, z = float(scale), int(zp)
    return (-128 - z) * s, (127 - z) * s


def _quant_mse(x: torch.Tensor, scale, zp) -> float:
    q = torch.clamp(torch.round(x / scale) + zp, -128, 127)
    return float(((q - zp) * scale - x).pow(2).mean())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one thread is faster than two contending ones on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gauss_outlier() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(300_000, generator=g), torch.tensor([25.0])])


@pytest.fixture(scope="module")
def relu_laplace() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.distributions.Laplace(0.0, 1.0).sample((200_000,)).clamp(min=0)


# -- options ------------------------------------------------------------------------------------------


def test_unknown_method_suggests_close_match():
    with pytest.raises(UsageError, match="did you mean 'entropy'"):
        make_activation_observer("entropi")
    with pytest.raises(UsageError, match="did you mean 'percentile'"):
        make_activation_observer("percentile", percentil=99.9)
    with pytest.raises(UsageError, match=r"\(50, 100\]"):
        make_activation_observer("percentile", percentile=20)
    with pytest.raises(UsageError, match="'clamped'"):
        make_activation_observer("minmax", relu6="clamp")
    with pytest.raises(UsageError, match="takes none"):
        make_activation_observer("minmax", bins=10)


def test_observers_are_int8_per_tensor_affine():
    for method in ACTIVATION_METHODS:
        obs = make_activation_observer(method)()
        assert (obs.dtype, obs.qscheme, obs.quant_min, obs.quant_max) == (
            torch.int8, torch.per_tensor_affine, -128, 127)


# -- known distributions --------------------------------------------------------------------------------


def test_clipping_methods_cut_the_outlier_minmax_keeps_it(gauss_outlier):
    x = gauss_outlier
    lo, hi = _range(_observe("minmax", x))
    assert hi >= 24.9
    for method, limit in (("percentile", 5.0), ("entropy", 6.0), ("mse", 20.0)):
        _, hi = _range(_observe(method, x))
        assert hi < limit, (method, hi)
    # the 99.99th percentile of a standard normal is 3.72
    lo, hi = _range(_observe("percentile", x, percentile=99.99))
    assert hi == pytest.approx(3.72, abs=0.1) and lo == pytest.approx(-3.72, abs=0.1)


def test_mse_range_beats_minmax_and_torchao_histogram(gauss_outlier, relu_laplace):
    for x in (gauss_outlier, relu_laplace):
        errors = {}
        for name in ("minmax", "mse"):
            errors[name] = _quant_mse(x, *_observe(name, x).calculate_qparams())
        hist = HistogramObserver(dtype=torch.int8, quant_min=-128, quant_max=127)
        for chunk in x.split(50_000):
            hist(chunk)
        errors["torchao_histogram"] = _quant_mse(x, *hist.calculate_qparams())
        assert errors["mse"] < errors["minmax"], errors
        assert errors["mse"] < errors["torchao_histogram"], errors


def test_mse_search_is_near_the_brute_force_optimum():
    g = torch.Generator().manual_seed(3)
    one_sided = torch.distributions.Laplace(0.0, 1.0).sample((20_000,)).clamp(min=0)
    two_sided = torch.cat([torch.randn(15_000, generator=g), 4 * torch.rand(5_000, generator=g)])
    for x in (one_sided, two_sided):
        chosen = _quant_mse(x, *_observe("mse", x).calculate_qparams())
        lo_cands = [0.0] if float(x.min()) >= 0 else [float(x.min()) * k / 30 for k in range(10, 31)]
        his = torch.linspace(float(x.max()) / 4, float(x.max()), 200)[:, None]
        best = math.inf
        for lo in lo_cands:
            scale = (his - lo) / 255
            zp = -128 - torch.round(lo / scale)
            q = torch.clamp(torch.round(x[None, :] / scale) + zp, -128, 127)
            best = min(best, float(((q - zp) * scale - x[None, :]).pow(2).mean(1).min()))
        assert chosen <= 1.02 * best, (chosen, best)


def test_entropy_keeps_a_light_tail_and_clips_a_heavy_one():
    torch.manual_seed(2)
    half_normal = torch.randn(200_000).abs()
    _, hi = _range(_observe("entropy", half_normal))
    assert hi > 3.5  # nothing worth clipping in a half-normal of 200k samples (max ~4.5)
    heavy = torch.cat([half_normal, 40 * torch.rand(20)])
    _, hi = _range(_observe("entropy", heavy))
    assert hi < 15  # the tail up to 40 is cut (thresholds start at levels bins: 1/8 of the range)


def _kl_reference(hist: torch.Tensor, levels: int, eps: float = 1e-4) -> int:
    """TensorRT / MXNet's loop, bin by bin, with the same Q smoothing rule as the library."""
    h = hist.double()
    n = int(torch.nonzero(h).flatten()[-1]) + 1
    best_i, best = n, math.inf
    for i in range(levels, n + 1):
        p = h[:i].clone()
        p[-1] += h[i:].sum()
        m = i // levels
        q = torch.zeros(i, dtype=torch.float64)
        for j in range(levels):
            start, stop = j * m, (i if j == levels - 1 else (j + 1) * m)
            nz = (p[start:stop] > 0).sum()
            if nz:
                q[start:stop] = torch.where(p[start:stop] > 0, h[start:stop].sum() / nz, 0.0)
        q = torch.where((p > 0) & (q == 0), eps, q)
        pn, qn = p / p.sum(), q / q.sum()
        kl = float(torch.where(pn > 0, pn * torch.log(pn / torch.where(qn > 0, qn, 1.0)), 0.0).sum())
        if kl < best:
            best_i, best = i, kl
    return best_i


@pytest.mark.parametrize("seed", [0, 1])
def test_kl_search_matches_the_reference_loop(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(20_000, generator=g).abs() * 10
    hist = torch.histc(values, bins=300, min=0, max=float(values.max()) * 1.0001)
    hist[torch.randint(0, 300, (20,), generator=g)] = 0  # empty bins exercise the non-zero counting
    hist[299] = 3
    assert _kl_threshold_bins(hist.double(), 32) == _kl_reference(hist, 32)


# -- ReLU6 ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def relu6_output() -> torch.Tensor:
    torch.manual_seed(4)
    return torch.clamp(torch.randn(100_000) * 3, 0, 6)  # zeros and sixes included


@pytest.mark.parametrize("method", ACTIVATION_METHODS)
def test_relu6_clamped_starts_exactly_at_zero(method, relu6_output):
    for data, expect_full in ((relu6_output, False), (relu6_output * 1.5, True)):  # 1.5: wrongly > 6
        obs = _observe(method, data, relu6="clamped")
        scale, zp = obs.calculate_qparams()
        assert int(zp) == -128
        assert 0 < float(scale) <= RELU6_SCALE
        if expect_full and method in ("minmax", "moving_average"):
            assert float(scale) == RELU6_SCALE


@pytest.mark.parametrize("method", ACTIVATION_METHODS)
def test_relu6_fixed_needs_no_calibration(method, relu6_output):
    obs = make_activation_observer(method, relu6="fixed")()
    assert isinstance(obs, ReLU6FixedObserver) and not obs.degenerate
    scale, zp = obs.calculate_qparams()
    assert float(scale) == RELU6_SCALE and int(zp) == -128
    obs(relu6_output)  # observing changes nothing
    assert float(obs.calculate_qparams()[0]) == RELU6_SCALE


# -- degenerate and bad data ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ACTIVATION_METHODS)
@pytest.mark.parametrize("relu6", [None, "clamped"])
def test_degenerate_ranges_give_finite_positive_scales(method, relu6):
    for data in (torch.zeros(2, 8, 4, 4), torch.full((2, 8, 4, 4), 3.0), None):
        obs = make_activation_observer(method, relu6=relu6)()
        if data is not None:
            obs(data)
            obs(data)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no torchao "run the observer first" fallback
            scale, zp = obs.calculate_qparams()
        assert math.isfinite(float(scale)) and float(scale) > 0
        assert obs.degenerate
        if data is not None and float(data.flatten()[0]) == 3.0:  # a constant is represented exactly
            q = torch.clamp(torch.round(torch.tensor(3.0) / scale) + zp, -128, 127)
            assert float((q - zp) * scale) == pytest.approx(3.0, rel=1e-6)
    obs = make_activation_observer(method, relu6=relu6)()
    obs(torch.rand(100))
    assert not obs.degenerate


@pytest.mark.parametrize("method", ACTIVATION_METHODS)
@pytest.mark.parametrize("relu6", [None, "fixed"])
def test_nan_or_inf_input_raises(method, relu6):
    for bad in (float("nan"), float("inf"), float("-inf")):
        obs = make_activation_observer(method, relu6=relu6)()
        x = torch.rand(3, 4)
        x[1, 2] = bad
        with pytest.raises(ValueError, match="NaN"):
            obs(x)


# -- histogram accumulation ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", HIST_METHODS)
def test_histogram_over_batches_equals_one_batch(method):
    g = torch.Generator().manual_seed(5)
    # the range grows batch after batch on both sides, so bins are merged several times
    parts = [torch.randn(n, generator=g) * s + o for n, s, o in
             ((3000, 0.01, 0.0), (5000, 0.5, 0.3), (7000, 3.0, -1.0), (4000, 20.0, 5.0), (6000, 1.0, 0.0))]
    data = torch.cat([torch.zeros(500), *parts, torch.full((10,), -7.25)])
    one = make_activation_observer(method)()
    one(data)
    many = make_activation_observer(method)()
    for part in torch.cat([torch.zeros(500), *parts, torch.full((10,), -7.25)]).split([500, 3000, 5000, 7000,
                                                                                        4000, 6000, 10]):
        many(part)
    for buf in ("pos_hist", "neg_hist", "pos_exp", "neg_exp", "zero_count", "min_val", "max_val"):
        assert torch.equal(getattr(one, buf), getattr(many, buf)), buf
    s1, z1 = one.calculate_qparams()
    s2, z2 = many.calculate_qparams()
    assert torch.equal(s1, s2) and torch.equal(z1, z2)


def test_histogram_memory_is_bounded():
    obs = MSEObserver(bins=512)
    for k in range(6):
        obs(torch.randn(1000) * 10 ** k)
    assert obs.pos_hist.numel() == 512 and obs.neg_hist.numel() == 512
    assert int(obs.pos_hist.sum() + obs.neg_hist.sum() + obs.zero_count) == 6000


def test_entropy_levels_option():
    x = torch.randn(50_000).abs()
    obs = EntropyObserver(levels=64)
    obs(x)
    assert float(obs.calculate_qparams()[0]) > 0


# -- weights -------------------------------------------------------------------------------------------


def test_weight_observers_are_symmetric_int8():
    w = torch.randn(8, 3, 3, 3)
    w[2] *= 10
    per_channel = make_weight_observer(True)()
    per_channel(w)
    scale, zp = per_channel.calculate_qparams()
    assert torch.all(zp == 0) and per_channel.quant_min == -127 and per_channel.quant_max == 127
    assert torch.allclose(scale, w.abs().amax((1, 2, 3)) / 127)
    per_tensor = make_weight_observer(False)()
    per_tensor(w)
    scale, zp = per_tensor.calculate_qparams()
    assert int(zp) == 0 and float(scale) == pytest.approx(float(w.abs().max()) / 127)
    four_bit = make_weight_observer(False, bits=4)()
    assert (four_bit.quant_min, four_bit.quant_max) == (-7, 7)


# -- inside torchao PT2E --------------------------------------------------------------------------------


def test_observers_work_inside_prepare_and_convert_pt2e():
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer

    def act_spec(method, relu6=None):
        return QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine,
                                observer_or_fake_quant_ctr=make_activation_observer(method, relu6=relu6))

    weight_spec = QuantizationSpec(dtype=torch.int8, quant_min=-127, quant_max=127,
                                   qscheme=torch.per_channel_symmetric, ch_axis=0,
                                   observer_or_fake_quant_ctr=make_weight_observer(True))

    class OneConv(Quantizer):
        def annotate(self, model):
            for node in model.graph.nodes:
                if node.target == torch.ops.aten.conv2d.default:
                    node.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={node.args[0]: act_spec("mse"), node.args[1]: weight_spec},
                        _annotated=True)
                if node.target == torch.ops.aten.hardtanh.default:
                    node.meta["quantization_annotation"] = QuantizationAnnotation(
                        output_qspec=act_spec("percentile", "clamped"), _annotated=True)
            return model

        def validate(self, model):
            pass

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU6()).eval()
    x = torch.randn(4, 3, 8, 8)
    gm = torch.export.export(model, (x,)).module()
    prepared = prepare_pt2e(gm, OneConv())
    prepared(x)
    converted = convert_pt2e(prepared)
    quant = [n for n in converted.graph.nodes
             if n.target == torch.ops.quantized_decomposed.quantize_per_tensor.default]
    assert len(quant) == 2
    out_zp = [n.args[2] for n in quant if n.args[0].target == torch.ops.aten.hardtanh.default]
    assert out_zp == [-128]
    assert torch.allclose(converted(x), model(x), atol=0.1)
