"""Output-aware activation ranges (``QuantConfig.range_search``): what the search reports is what the
converted graph does, only activation scales change (by the reported factor, zero points kept), shared
ranges move together and fixed ranges stay fixed."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mobilequant.errors import UsageError
from mobilequant.quant import QuantConfig, quantize
from mobilequant.quant import range_search
from mobilequant.quant.range_search import RangeSearchOptions, _split


class Branches(nn.Module):
    """Two conv-BN-ReLU branches concatenated (one shared range), a 1×1 conv, pooling, a classifier."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.pw(torch.cat([self.a(x), self.b(x)], 1))
        return self.fc(y.mean((2, 3)))


def _kl(result, model, x) -> float:
    """KL divergence of the converted graph's softmax from the float model's, per image."""
    with torch.no_grad():
        ref = torch.log_softmax(model(x).double(), 1)
        out = torch.log_softmax(result(x).double(), 1)
    return float(F.kl_div(out, ref, log_target=True, reduction="batchmean"))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Branches().eval()
    with torch.no_grad():
        model.fc.weight.mul_(100.0)  # confident logits, as a trained classifier's
    g = torch.Generator().manual_seed(1)
    calib = torch.randn(96, 3, 10, 10, generator=g)
    calib[:3, :, 4:6, 4:6] = 60.0  # a bright spot on three images stretches every min-max range
    held_out = torch.randn(64, 3, 10, 10, generator=g)
    base = dict(calibration="minmax", bias_correction=False)
    plain = quantize(model, calib.split(32), QuantConfig(**base))
    searched = quantize(model, calib.split(32), QuantConfig(**base, range_search=True))
    return model, calib, held_out, plain, searched


def test_only_activation_scales_change_by_the_reported_factor(setup):
    _, _, _, plain, searched = setup
    report = searched.range_search
    assert report.samples == 96 and report.metric == "kl"
    options = RangeSearchOptions()
    assert report.held_out == 12  # every eighth image judges the walk over the others
    assert report.trials == 1 + report.searched * options.passes * len(options.factors)  # each factor, each pass
    assert report.changes, report.summary()
    factors: dict[str, float] = {}  # a range may narrow in both passes: the factors multiply
    for c in report.changes:
        factors[c.layer] = factors.get(c.layer, 1.0) * c.factor
    before = {e.key: e for e in plain.table}
    after = {e.key: e for e in searched.table}
    assert before.keys() == after.keys()
    moved = set()
    for key, e in after.items():
        b = before[key]
        assert e.zero_point == b.zero_point and e.dtype == b.dtype, key
        if e.scale == b.scale:
            continue
        if e.role == "bias":  # int32: scale = input scale × weight scale, follows the input's range
            continue
        assert e.role in ("output", "input") and e.dtype == "int8", key  # never a weight scale
        ratio = e.scale[0] / b.scale[0]
        assert any(ratio == pytest.approx(f, rel=1e-5) for f in factors.values()), (key, ratio, factors)
        moved.add(e.name)
    assert set(factors) <= moved | {"input"}


def test_the_reported_error_is_the_converted_graphs(setup):
    """The search's simulation is the int8 graph ``convert_pt2e`` builds (biases aside): its reported
    errors match the converted graphs' own, before and after, on the images the ranges were chosen on
    and on the held-out ones."""
    model, calib, _, plain, searched = setup
    report = searched.range_search
    fit, held = _split(calib, RangeSearchOptions().holdout)
    assert report.error_after < 0.9 * report.error_before
    assert report.held_out_after < report.held_out_before
    assert _kl(plain, model, fit) == pytest.approx(report.error_before, rel=0.05)
    assert _kl(searched, model, fit) == pytest.approx(report.error_after, rel=0.05)
    assert _kl(plain, model, held) == pytest.approx(report.held_out_before, rel=0.05)
    assert _kl(searched, model, held) == pytest.approx(report.held_out_after, rel=0.05)


def test_narrower_ranges_help_on_images_it_did_not_see(setup):
    model, _, held_out, plain, searched = setup
    assert _kl(searched, model, held_out) < 0.9 * _kl(plain, model, held_out)


def test_held_out_images_are_spread_and_disjoint():
    x = torch.arange(512)
    fit, held = _split(x, 0.25)
    assert len(held) == 128 and held.tolist() == list(range(3, 512, 4))
    assert sorted(fit.tolist() + held.tolist()) == list(range(512))
    assert len(_split(x[:31], 0.25)[1]) == 0  # 7 held-out images: too few to check anything
    assert len(_split(x, 0.0)[1]) == 0


def _no_holdout(monkeypatch):
    """``quantize`` runs the search with ``RangeSearchOptions(holdout=0)``: every image takes part,
    nothing is undone."""
    search = range_search.search_ranges
    monkeypatch.setattr(range_search, "search_ranges",
                        lambda prepared, batches: search(prepared, batches, RangeSearchOptions(holdout=0.0)))


def test_narrowings_the_held_out_images_refute_are_undone(monkeypatch):
    """Every held-out image (every eighth) has a bright spot that needs the wide min-max ranges; the
    others would gain from narrower ones. Without held-out images the search narrows them; with them it
    stops the walk before the first narrowing and the held-out error is unchanged."""
    torch.manual_seed(0)
    model = Branches().eval()
    with torch.no_grad():
        model.fc.weight.mul_(100.0)
    x = torch.randn(128, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    x[7::8, :, 4:6, 4:6] = 60.0
    config = QuantConfig(calibration="minmax", bias_correction=False, range_search=True)
    checked = quantize(model, x.split(32), config).range_search
    _no_holdout(monkeypatch)
    unchecked = quantize(model, x.split(32), config).range_search
    assert unchecked.changes and unchecked.held_out == 0 and unchecked.undone == 0, unchecked.summary()
    assert checked.undone and not checked.changes, checked.summary()
    assert checked.held_out_after == checked.held_out_before and checked.held_out == 16
    assert checked.error_after == checked.error_before


def test_shared_ranges_move_together(setup):
    """The concatenation's inputs and output share one range (TFLite's rule): still one after the search."""
    _, _, _, _, searched = setup
    t = searched.table
    assert "a.0" in {c.layer for c in searched.range_search.changes}  # the shared range did move
    shared = [t.get("a.0"), t.get("b.0"), t.get("cat_0")]
    assert all(e is not None for e in shared), [e.key for e in t]
    assert len({(e.scale[0], e.zero_point[0]) for e in shared}) == 1, shared


def test_fixed_ranges_are_left_alone(monkeypatch):
    """ReLU6 in the data-free mode keeps exactly [0, 6]; h-sigmoid keeps its fixed parameters (the walk
    is not stopped early here, so that every range it changes is kept)."""
    _no_holdout(monkeypatch)

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6())
            self.gate = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Hardsigmoid())
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            y = self.conv(x)
            return self.fc((y * self.gate(y)).mean((2, 3)))

    torch.manual_seed(3)
    x = torch.randn(32, 3, 8, 8)
    model = Fixed().eval()
    plain = quantize(model, [x], QuantConfig(relu6="fixed", bias_correction=False))
    r = quantize(model, [x], QuantConfig(relu6="fixed", bias_correction=False, range_search=True))
    relu6 = r.table.get("conv.0")  # conv + ReLU6, one tensor
    assert relu6.scale[0] == pytest.approx(6 / 255) and relu6.zero_point[0] == -128
    assert r.table.get("gate.1") == plain.table.get("gate.1")  # h-sigmoid: 1/256, −128
    changed = {c.layer for c in r.range_search.changes}
    assert changed and not changed & {"conv.0", "gate.1"}, changed


def test_bad_options_are_refused_by_name():
    with pytest.raises(UsageError, match="range_search"):
        QuantConfig(range_search="yes")
    with pytest.raises(UsageError, match="factors"):
        RangeSearchOptions(factors=(0.5, 1.5))
    with pytest.raises(UsageError, match="passes"):
        RangeSearchOptions(passes=0)
    with pytest.raises(UsageError, match="holdout"):
        RangeSearchOptions(holdout=1.0)
