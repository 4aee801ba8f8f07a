"""The model zoo: every registered variant builds, runs, honours its options, and matches its paper's counts."""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import pytest

from mobilequant.errors import UsageError
from mobilequant.models import (
    FASHION_MNIST,
    count_madds,
    count_params,
    create_model,
    list_models,
    model_info,
)
from mobilequant.models._layers import ChannelShuffle, ConvNormAct, make_divisible

ALL_MODELS = list_models()

FAMILIES = {
    "mobilenetv1", "mobilenetv2", "mobilenetv3", "shufflenetv1", "shufflenetv2", "squeezenet", "squeezenext",
    "effnet", "fdmobilenet", "igcv3", "xception",
}

# Activations the export / fusion stages know; every non-linearity in the zoo must be one of these modules.
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.Sigmoid)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _on_meta(name: str, **kw) -> nn.Module:
    """Build without allocating or initialising real weights (counting needs shapes only)."""
    with torch.device("meta"):
        return create_model(name, **kw)


def test_every_family_registered():
    assert {model_info(n).family for n in ALL_MODELS} == FAMILIES
    assert len(ALL_MODELS) >= 30


@pytest.mark.parametrize("name", ALL_MODELS)
def test_variant_signature(name):
    params = inspect.signature(model_info(name).fn).parameters
    assert list(params)[:3] == ["num_classes", "in_chans", "width_mult"]
    assert params["num_classes"].default == 1000 and params["in_chans"].default == 3
    assert isinstance(params["width_mult"].default, float)
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_builds_and_runs(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, resolution=64).eval()
    assert model.model_name == name
    assert model.preprocess.input_size == (3, 64, 64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        split = model.forward_head(model.forward_features(x))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, split)

    grey = create_model(name, num_classes=10, in_chans=1, preprocess=FASHION_MNIST).eval()
    assert grey.preprocess == FASHION_MNIST
    with torch.no_grad():
        assert grey(torch.randn(1, *FASHION_MNIST.input_size)).shape == (1, 10)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_width_mult_scales_the_network(name):
    width = inspect.signature(model_info(name).fn).parameters["width_mult"].default
    narrow = count_params(_on_meta(name, width_mult=width / 2))
    normal = count_params(_on_meta(name))
    wide = count_params(_on_meta(name, width_mult=width * 1.5))
    assert narrow < normal < wide


@pytest.mark.parametrize("name", ALL_MODELS)
def test_width_mult_replaces_the_variants_own(name):
    """A variant is its family at one width (`model_info(name).width_mult`); `width_mult=` builds the family at
    that width instead of scaling the variant's again (`zoo info --width-mult` reports both)."""
    own = model_info(name).width_mult
    assert own == inspect.signature(model_info(name).fn).parameters["width_mult"].default
    assert count_params(_on_meta(name, width_mult=own)) == count_params(_on_meta(name))


def test_width_mult_of_a_variant_is_the_family_width():
    assert count_params(_on_meta("mobilenetv2_050", width_mult=1.0)) == count_params(_on_meta("mobilenetv2_100"))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_conv_bn_act_are_separate_modules(name):
    model = _on_meta(name)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert type(m) is nn.Conv2d, f"{type(m).__name__} subclasses Conv2d"
        if isinstance(m, nn.BatchNorm2d):
            assert type(m) is nn.BatchNorm2d, f"{type(m).__name__} subclasses BatchNorm2d"
        if isinstance(m, ConvNormAct):
            kinds = [type(c) for c in m]
            assert kinds[0] is nn.Conv2d
            assert all(k is nn.BatchNorm2d or issubclass(k, ACTIVATIONS) for k in kinds[1:]), kinds
    assert not any(isinstance(m, (nn.GELU, nn.SiLU, nn.Mish)) for m in model.modules())


def test_options():
    model = create_model("mobilenetv2_100", resolution=160)
    assert model.preprocess.input_size == (3, 160, 160)
    assert model.preprocess.resize == round(160 * 256 / 224)
    with pytest.raises(UsageError, match="resolution"):
        create_model("mobilenetv2_100", resolution=0)
    with pytest.raises(UsageError, match="mobilenetv2_100"):
        create_model("mobilenetv2_100", no_such_option=1)
    with pytest.raises(UsageError, match="channels"):
        create_model("mobilenetv2_100", in_chans=3, preprocess=FASHION_MNIST)
    with pytest.raises(UsageError, match="did you mean .*'shufflenetv2_x1_0'"):
        create_model("shufflenetv2_x1")


def test_effnet_classifier_follows_resolution():
    # EffNet flattens its last feature map: the classifier is sized for the resolution it is built for.
    assert create_model("effnet", num_classes=10).classifier[1].in_features == 256 * 4 * 4
    assert create_model("effnet", num_classes=10, resolution=64).classifier[1].in_features == 256 * 8 * 8


# --- shared layers -------------------------------------------------------------------------------------------


def test_make_divisible():
    assert make_divisible(32 * 1.0) == 32
    assert make_divisible(32 * 0.35) == 16  # 8 would lose more than 10 %
    assert make_divisible(24 * 0.75) == 24  # 16 would lose more than 10 %
    assert make_divisible(1280 * 1.4) == 1792
    assert make_divisible(12, divisor=3) == 12


def test_channel_shuffle_interleaves_groups_and_inverts():
    x = torch.arange(6.0).reshape(1, 6, 1, 1)
    assert ChannelShuffle(2)(x).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    y = torch.randn(2, 12, 3, 3)
    torch.testing.assert_close(ChannelShuffle(12 // 2)(ChannelShuffle(2)(y)), y)


def test_channel_shuffle_exports_as_reshape_transpose_reshape():
    model = create_model("shufflenetv1_g3", num_classes=10, resolution=32).eval()
    graph = torch.export.export(model, (torch.randn(1, 3, 32, 32),)).module().graph
    ops = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    transposes = [i for i, op in enumerate(ops) if "transpose" in op]
    assert transposes
    for i in transposes:
        assert "reshape" in ops[i - 1] and "reshape" in ops[i + 1], ops[i - 1:i + 2]


# --- complexity ----------------------------------------------------------------------------------------------


def test_madds_of_grouped_and_depthwise_convs():
    grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False)
    assert count_madds(grouped, (8, 10, 10)) == 10 * 10 * 16 * (8 // 4) * 3 * 3
    depthwise = nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32, bias=False)
    assert count_madds(depthwise, (32, 20, 20)) == 10 * 10 * 32 * 1 * 3 * 3
    linear = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    assert count_madds(linear, (3, 2, 2)) == 12 * 5
    # The same figure torch reports, halved: nothing is corrected by hand.
    with FlopCounterMode(display=False) as counter:
        grouped(torch.zeros(1, 8, 10, 10))
    assert counter.get_total_flops() == 2 * count_madds(grouped, (8, 10, 10))


def test_count_madds_input_forms():
    model = _on_meta("mobilenetv1_025", num_classes=10)
    at_224 = count_madds(model)
    assert count_madds(model, 224) == at_224 == count_madds(model, (3, 224, 224))
    assert count_madds(model, (2, 3, 224, 224)) == 2 * at_224
    assert count_madds(model, 112) < at_224 / 3.5  # resolution multiplier ρ: ~ρ² fewer mult-adds
    with pytest.raises(UsageError):
        count_madds(model, (224, 224))


def _rounding(value: float) -> float:
    """Half a unit in the last digit the paper printed (0.5 M means 0.45–0.55 M)."""
    text = repr(value)
    decimals = len(text.split(".")[1]) if "." in text else 0
    return 0.5 * 10.0 ** -decimals


PAPER_MODELS = [n for n in ALL_MODELS if model_info(n).paper_params_m or model_info(n).paper_madds_m]

# The required comparisons: these must carry the paper's figures.
REQUIRED_FIGURES = [
    "mobilenetv1_100", "mobilenetv1_075", "mobilenetv1_050", "mobilenetv1_025", "mobilenetv2_100",
    "mobilenetv3_large_100", "mobilenetv3_small_100", "shufflenetv2_x0_5", "shufflenetv2_x1_0",
    "shufflenetv2_x1_5", "shufflenetv2_x2_0", "shufflenetv1_g1", "shufflenetv1_g2", "shufflenetv1_g3",
    "shufflenetv1_g4", "shufflenetv1_g8", "squeezenet1_0", "squeezenet1_1",
]


def test_required_models_carry_paper_figures():
    assert set(REQUIRED_FIGURES) <= set(PAPER_MODELS)


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_counts_match_paper(name):
    """Within 5 % of the paper (or of its printed precision, whichever is looser) at the paper's config."""
    info = model_info(name)
    model = _on_meta(name, num_classes=info.paper_num_classes, resolution=info.paper_resolution)
    if info.paper_params_m:
        ours = count_params(model) / 1e6
        tol = max(0.05 * info.paper_params_m, _rounding(info.paper_params_m))
        assert abs(ours - info.paper_params_m) <= tol, f"params {ours:.3f} M vs paper {info.paper_params_m} M"
    if info.paper_madds_m:
        ours = count_madds(model, info.paper_resolution) / 1e6
        tol = max(0.05 * info.paper_madds_m, _rounding(info.paper_madds_m))
        assert abs(ours - info.paper_madds_m) <= tol, f"mult-adds {ours:.1f} M vs paper {info.paper_madds_m} M"


# torchvision's published parameter counts: same structure, so exactly the same numbers.
TORCHVISION_PARAMS = {
    "mobilenetv2_100": 3_504_872,
    "mobilenetv3_large_100": 5_483_032,
    "mobilenetv3_small_100": 2_542_856,
    "shufflenetv2_x0_5": 1_366_792,
    "shufflenetv2_x1_0": 2_278_604,
    "shufflenetv2_x1_5": 3_503_624,
    "shufflenetv2_x2_0": 7_393_996,
    "squeezenet1_0": 1_248_424,
    "squeezenet1_1": 1_235_496,
}


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_params_equal_torchvision(name):
    assert count_params(_on_meta(name)) == TORCHVISION_PARAMS[name]


def test_mobilenetv2_madds_equal_torchvision():
    assert round(count_madds(_on_meta("mobilenetv2_100")) / 1e6, 1) == 300.8


# Zhang et al. 2018, Table 2 (0.5×, 0.25×) and Table 5 (1.5×, 2×): ShuffleNetV1 g=3 at other widths, MFLOPs
# (= mult-adds). 1.5× keeps the reference implementation's 24-channel stem; with 36 it counted 299.6 M.
SHUFFLENETV1_G3_WIDTHS = {0.25: 13, 0.5: 38, 1.5: 292, 2.0: 524}


@pytest.mark.parametrize("width", sorted(SHUFFLENETV1_G3_WIDTHS))
def test_shufflenetv1_widths_match_paper(width):
    ours = count_madds(_on_meta("shufflenetv1_g3", width_mult=width)) / 1e6
    paper = SHUFFLENETV1_G3_WIDTHS[width]
    assert abs(ours - paper) <= max(0.01 * paper, 0.5), f"{ours:.1f} M vs paper {paper} M"


def test_zoo_options_are_refused_in_one_line():
    with pytest.raises(UsageError, match="width_mult must be a positive number, got True"):
        create_model("mobilenetv1_100", width_mult=True)  # a bool is an int to Python, not a width
    with pytest.raises(UsageError, match="sets groups itself.*shufflenetv1_g8"):
        create_model("shufflenetv1_g3", groups=5)
    with pytest.raises(UsageError, match=r"squeezenet1_0 cannot take a 3×16×16 input \(Output size is too small\)"):
        count_madds(_on_meta("squeezenet1_0", resolution=16))


def test_squeezenet_1_1_needs_2_4x_fewer_madds():
    ratio = count_madds(_on_meta("squeezenet1_0")) / count_madds(_on_meta("squeezenet1_1"))
    assert abs(ratio / 2.4 - 1) <= 0.05, ratio
    assert count_params(_on_meta("squeezenet1_1")) < count_params(_on_meta("squeezenet1_0"))


def test_mobilenetv2_has_torchvision_layout():
    shapes = {k: tuple(v.shape) for k, v in _on_meta("mobilenetv2_100").state_dict().items()}
    assert shapes["features.0.0.weight"] == (32, 3, 3, 3)
    assert shapes["features.1.conv.0.0.weight"] == (32, 1, 3, 3)  # t=1: no expansion conv
    assert shapes["features.1.conv.1.weight"] == (16, 32, 1, 1)
    assert shapes["features.2.conv.0.0.weight"] == (96, 16, 1, 1)
    assert shapes["features.18.0.weight"] == (1280, 320, 1, 1)
    assert shapes["classifier.1.weight"] == (1000, 1280)
    assert len(shapes) == 314
