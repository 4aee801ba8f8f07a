"""Data and arguments a notebook user passes to the Python API: every form that makes sense is accepted,
anything else is refused with one line naming it, before any work; short reprs; the root logger left alone.

A small 1-channel 8×8 model keeps every export to a second or two.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import mobilequant.api as api
import mobilequant.export as mq_export
from mobilequant.data import ImageData
from mobilequant.errors import InputError, UsageError
from mobilequant.export import export
from mobilequant.quant import QuantConfig, quantize

SIZE = 8
FAST = QuantConfig(calibration="minmax", bias_correction=False)  # the data path, not the calibration method


class Tiny(nn.Module):
    """conv-BN-ReLU6 → global pool → 10 classes: takes any image size in float."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.act(self.bn(self.conv(x))).mean((2, 3)))


def _images(n: int, c: int = 1, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Tiny().eval()
    x = _images(32)
    y = torch.arange(32) % 10
    return {"model": model, "x": x, "y": y, "table": quantize(model, [x], FAST).table}


def _no_work(monkeypatch):
    """Fail the test if export gets as far as capturing the model (the refusal must come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("export captured the model before refusing its data")

    monkeypatch.setattr(mq_export, "_checked_float_graph", refuse)


# ------------------------------------------------------------------------------------------ A: shapes
@pytest.mark.parametrize("bad", [(8, 1, 6, 6), (8, 3, SIZE, SIZE)], ids=["28px-for-32px", "3ch-for-1ch"])
def test_verify_data_of_another_shape_is_refused_before_any_work(tiny, bad, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    path = tmp_path / "m.tflite"
    with pytest.raises(InputError, match=rf"verify_data has shape \({', '.join(map(str, bad))}\); "
                                         rf"expected \(N, 1, {SIZE}, {SIZE}\) \(the shape of the calibration data\)"):
        export(tiny["model"], "tflite-int8", path, calibration_data=[tiny["x"]], verify_data=torch.randn(*bad))
    assert not path.exists()


def test_data_of_another_size_than_the_models_own_is_refused(tiny, tmp_path, monkeypatch):
    """A model that says its input size (``preprocess.input_size``, as every zoo and shipped model does)
    refuses calibration and verification images of another size before any work — a 6×6 set for this
    8×8 model had been calibrated and exported as a 6×6 file, and 8×8 verify_data then refused as wrong."""
    from types import SimpleNamespace

    model = Tiny().eval()
    model.preprocess = SimpleNamespace(input_size=(1, SIZE, SIZE))
    small = _images(8, size=6)
    want = rf"expected \(N, 1, {SIZE}, {SIZE}\) \(the model's input size, model.preprocess.input_size; for another size give example_input\)"
    with pytest.raises(InputError, match=rf"calibration data has shape \(8, 1, 6, 6\); {want}"):
        quantize(model, small, FAST)
    _no_work(monkeypatch)
    path = tmp_path / "m.tflite"
    with pytest.raises(InputError, match=rf"calibration data has shape \(8, 1, 6, 6\); {want}"):
        export(model, "tflite-int8", path, calibration_data=small, verify_data=_images(8))
    with pytest.raises(InputError, match=rf"verify_data has shape \(8, 1, 6, 6\); {want}"):
        export(model, "tflite-fp32", path, verify_data=small)
    assert not path.exists()
    # example_input says otherwise: the caller's size wins (a fully convolutional net run at another size)
    assert quantize(model, small, FAST, example_input=small[:1]).table


# ------------------------------------------------------------------------------------------ B: forms
def test_quantize_reads_every_form_of_one_image_set_like_a_list_of_batches(tiny):
    m, x, y, table = tiny["model"], tiny["x"], tiny["y"], tiny["table"]
    forms = {
        "tensor": x,
        "(images, labels)": (x, y),
        "ImageData": ImageData(x, y, "mem"),
        "float array": x.numpy(),
        "list of float arrays": [x.numpy()],
        # the forms that already worked stay working
        "generator": (b for b in x.split(8)),
        "DataLoader (x, y)": DataLoader(TensorDataset(x, y), batch_size=8),
        "DataLoader (x,)": DataLoader(TensorDataset(x), batch_size=8),
        "tuple of batches": (x[:16], x[16:]),
        "batches with masks, not labels": [(x, torch.zeros(32, SIZE, SIZE))],
    }
    for form, data in forms.items():
        r = quantize(m, data, FAST)
        assert r.num_calibration_samples == 32 and r.table == table, form


def test_a_set_larger_than_a_batch_is_read_in_batches(tiny):
    x = _images(150, seed=3)
    r = quantize(tiny["model"], x, dataclasses.replace(FAST, num_calibration=100))
    assert r.num_calibration_samples == 100
    assert r.table == quantize(tiny["model"], [x[:64], x[64:100]], FAST).table


@pytest.mark.parametrize("form, data, message", [
    ("uint8 array", lambda x: (x.abs() * 40).to(torch.uint8).numpy(),
     r"calibration data is a uint8 array; expected float"),
    ("uint8 NHWC array", lambda x: (x.abs() * 40).to(torch.uint8).permute(0, 2, 3, 1).numpy(), r"a uint8 array"),
    ("NHWC float array", lambda x: _images(32, size=12).permute(0, 2, 3, 1).numpy(),
     r"calibration images of shape \(12, 12, 1\): it looks channels-last \(H×W×C\); the model takes C×H×W"),
    ("single images", lambda x: list(x), r"calibration batch 0 has shape \(1, 8, 8\); expected \(N, C, H, W\)"),
    ("a path", lambda x: "images.npy", r"calibration data is a str .*mobilequant\.data\.load_data"),
    ("labels of another length", lambda x: (x, torch.zeros(3, dtype=torch.long)),
     r"calibration data has 32 images but labels of shape \(3,\)"),
])
def test_other_forms_are_refused_naming_the_form_and_the_expected_one(tiny, form, data, message):
    with pytest.raises(InputError, match=message):
        quantize(tiny["model"], data(tiny["x"]), FAST)


def test_export_takes_a_tensor_a_pair_and_image_data_as_calibration_data(tiny, tmp_path):
    m, x, y = tiny["model"], tiny["x"], tiny["y"]
    want = quantize(m, [x], QuantConfig()).table.sha256()  # export quantizes with the recipe's settings
    art = export(m, "tflite-int8", tmp_path / "t.tflite", calibration_data=x)
    assert art.metadata["quant_table_sha256"] == want
    art = export(m, "tflite-int8", tmp_path / "d.tflite", calibration_data=ImageData(x, y, "mem"))
    assert art.metadata["quant_table_sha256"] == want
    # the pair's labels are read as labels (verified: an accuracy check), not as a batch of images
    art = export(m, "tflite-int8", tmp_path / "p.tflite", calibration_data=(x, y))
    assert art.metadata["quant_table_sha256"] == want
    assert "int8_accuracy" in {c.name for c in art.verification.checks}


# ------------------------------------------------------------------------------- C: NaN and labels
@pytest.mark.parametrize("target", ["onnx-fp32", "tflite-int8"])
def test_verify_data_with_nan_is_refused_naming_the_image(tiny, target, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    x = tiny["x"].clone()
    x[3, 0, 2, 2] = float("nan")
    x[5, 0, 0, 0] = float("inf")
    path = tmp_path / ("m.onnx" if target.startswith("onnx") else "m.tflite")
    with pytest.raises(InputError, match=r"verify_data contains NaN or Inf values \(image 3, 5; 2 of 32 images\)"):
        export(tiny["model"], target, path, calibration_data=[tiny["x"]], verify_data=x)
    with pytest.raises(InputError, match=r"verify_data batch 1 contains NaN or Inf values \(its image 1;"):
        export(tiny["model"], target, path, calibration_data=[tiny["x"]], verify_data=[x[:2], x[2:4]])
    assert not path.exists() and not list(tmp_path.iterdir())


def test_verify_labels_outside_the_models_classes_are_refused(tiny, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    y = tiny["y"].clone()
    y[7] = 12
    path = tmp_path / "m.onnx"
    with pytest.raises(InputError, match=r"labels of verify_data run from 0 to 12 but the model has 10 classes"):
        export(tiny["model"], "onnx-fp32", path, verify_data=(tiny["x"], y))
    with pytest.raises(InputError, match=r"labels of verify_data run from 0 to 12"):
        export(tiny["model"], "onnx-fp32", path, verify_data=ImageData(tiny["x"], y, "mem"))
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------- D: the right message
def test_empty_batches_integer_batches_and_an_empty_calibration_set_get_their_own_message(tiny, tmp_path):
    m, x = tiny["model"], tiny["x"]
    with pytest.raises(InputError, match=r"calibration batch 1 has shape \(4, 1, 6, 6\); expected \(N, 1, 8, 8\) "
                                         r"\(the shape of batch 0\)"):
        quantize(m, [x, torch.randn(4, 1, 6, 6)], FAST)
    with pytest.raises(InputError, match=r"calibration batch 0 holds no images \(shape \(0, 1, 8, 8\)\)"):
        quantize(m, [torch.empty(0, 1, SIZE, SIZE)], FAST)
    with pytest.raises(InputError, match=r"calibration batch 1 is a uint8 tensor; expected float images"):
        quantize(m, [x, (x.abs() * 40).to(torch.uint8)], FAST)
    with pytest.raises(InputError, match=r"calibration batch 0 is an int64 tensor"):
        quantize(m, [x.long()], FAST)
    with pytest.raises(InputError, match=r"^calibration set is empty"):
        export(m, "tflite-int8", tmp_path / "e.tflite", calibration_data=[])
    # float64 is converted to float32: the same table
    assert quantize(m, [x.double()], FAST).table == tiny["table"]


# ------------------------------------------------------------------------------------------ E: reprs
def test_quant_and_qat_results_have_short_reprs(tiny):
    from mobilequant.qat import QATResult
    from mobilequant.quant import QuantResult

    qr = quantize(tiny["model"], [tiny["x"]], FAST)
    text = repr(qr)
    assert len(text) < 200 and text.startswith("QuantResult('Tiny', ") and "quantized tensors" in text
    qat = QATResult(**{f.name: getattr(qr, f.name) for f in dataclasses.fields(QuantResult)}, steps=7,
                    int8_accuracy=0.9125)
    text = repr(qat)
    assert len(text) < 200 and text.startswith("QATResult('Tiny', ") and "7 steps" in text and "91.25 %" in text


# ------------------------------------------------------------------------------------ F: root logger
def test_a_tflite_export_leaves_the_root_loggers_handlers_alone(tiny, tmp_path, monkeypatch):
    """litert-torch logs on the root logger; with no handler there, that ran logging.basicConfig() and the
    user's own basicConfig afterwards did nothing. Its messages are cached per op, so one is sent here."""
    from litert_torch._convert import core

    convert = core._run_convert_passes

    def logging_convert(*args, **kwargs):
        logging.info("a library message on the root logger")
        return convert(*args, **kwargs)

    monkeypatch.setattr(core, "_run_convert_passes", logging_convert)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # a fresh interpreter's root logger (pytest adds its own)
    export(tiny["model"], "tflite-fp32", tmp_path / "f.tflite", verify_data=tiny["x"])
    assert root.handlers == []


# -------------------------------------------------------------------------------------- G, H: api.*
def test_api_export_model_refuses_a_module_and_names_export(tiny):
    with pytest.raises(UsageError, match=r"model= takes a name or path .* not a Tiny module: .*"
                                         r"mobilequant\.export\.export\(model, target, path"):
        api.export_model("tflite-int8", model=tiny["model"], progress=False)


def test_api_bench_takes_one_path(tiny, tmp_path):
    path = tmp_path / "b.tflite"
    export(tiny["model"], "tflite-fp32", path, verify_data=tiny["x"])
    for given in (str(path), path):
        (result,) = api.bench(given, runs=2, warmup=0).results
        assert str(result.path) == str(path)


def test_api_errors_name_the_argument_and_the_flag(tmp_path):
    with pytest.raises(UsageError, match=r"^num_eval \(--num-eval\) must be at least 1, got 0$"):
        api.export_model("tflite-int8", num_eval=0, progress=False)
    with pytest.raises(UsageError, match=r"^resolution \(--resolution\) must be at least 16, got 8$"):
        api.zoo_info("mobilenetv2_050", resolution=8)
    with pytest.raises(UsageError, match=r"^recipe \(--recipe\) tflite-fp16: its target"):
        api.calibrate(recipe="tflite-fp16", out=str(tmp_path / "t.json"), progress=False)
    with pytest.raises(UsageError, match=r"^overrides \(--set\) io\.layout=NHWC: calibrate uses only"):
        api.calibrate(overrides=["io.layout=NHWC"], out=str(tmp_path / "t.json"), progress=False)


# ------------------------------------------------------------------------------ I: one flip allowed
def test_int8_agreement_always_allows_one_disagreement():
    """99.5 % of 64 images allows no disagreement at all: one near-tie flip failed a faithful file."""
    from mobilequant.export.recipes import VerificationSettings
    from mobilequant.export.verify import numeric_checks

    ref = np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32)
    out = ref.copy()
    out[0] = out[0, ::-1]  # one image with another top-1
    (check,) = numeric_checks("int8", out, ref, None, VerificationSettings())
    assert check.passed and check.measured.startswith("98.44 %")
    assert "≤ 1 disagreement" in check.threshold and "one is always allowed" in check.threshold
    out[1] = out[1, ::-1]
    assert not numeric_checks("int8", out, ref, None, VerificationSettings())[0].passed
    # where the threshold allows one or more itself, it is as it was
    big = np.random.default_rng(1).standard_normal((400, 10)).astype(np.float32)
    (check,) = numeric_checks("int8", big, big, None, VerificationSettings())
    assert check.passed and check.threshold == "≥ 99.50 %"


def test_an_output_in_a_data_folder_is_refused_only_where_it_is_one_of_its_images(tmp_path):
    """A table written into the image folder it was calibrated on is fine (and again on a second run); an
    image of that folder, the data file itself, or the checkpoint is an input and is refused."""
    folder = tmp_path / "imgs"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "0.png").write_bytes(b"png")
    (folder / "table.json").write_text("{}")
    data = [("data (--data)", str(folder))]
    api._refuse_overwriting_inputs(folder / "table.json", "out (-o)", data=data)  # not an input: fine
    api._refuse_overwriting_inputs(folder / "new.png", "out (-o)", data=data)  # does not exist yet
    with pytest.raises(UsageError, match=r"^out \(-o\) .*0\.png is an image of the data folder given as data "
                                         r"\(--data\) .*imgs, which this command reads"):
        api._refuse_overwriting_inputs(folder / "cat" / "0.png", "out (-o)", data=data)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"w")
    link = tmp_path / "link.pt"
    link.symlink_to(weights)
    with pytest.raises(UsageError, match=r"link\.pt is the checkpoint given as weights \(--weights\) .*w\.pt"):
        api._refuse_overwriting_inputs(link, "out (-o)", weights=str(weights))  # the same file by another name
    api._refuse_overwriting_inputs(tmp_path / "other.pt", "out (-o)", weights=str(weights), recipe="tflite-int8",
                                   model="mobilenetv2_050", data=[("data (--data)", "builtin")])


_NETS = '''
import torch.nn as nn
from mobilequant.models import PreprocessConfig


def _net(chans, classes, size):
    m = nn.Sequential(nn.Conv2d(chans, 4, 3, padding=1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(4, classes)).eval()
    m.preprocess = PreprocessConfig(input_size=(chans, size, size), mean=(0.5,) * chans, std=(0.25,) * chans,
                                    resize=None)
    return m


def rgb():
    return _net(3, 10, 32)


def five():
    return _net(1, 5, 32)
'''


def test_builtin_data_are_refused_for_a_model_not_made_for_them(tmp_path, monkeypatch):
    """The ImageNet MobileNetV2 exported without --data was calibrated and "verified" on Fashion-MNIST's grey
    clothing images scaled to 224 px, exit 0 (and the 10k test split was preprocessed whole at 3×224×224,
    16 GB, for --num-eval 32). A colour model or one of another number of classes is refused in one line."""
    (tmp_path / "nets.py").write_text(_NETS)
    for fn, what in (("rgb", r"3×32×32 inputs\)"), ("five", r"1×32×32 inputs, 5 classes\)")):
        spec = f"{tmp_path / 'nets.py'}:{fn}"
        with pytest.raises(UsageError, match=rf"^data \(--data\): the built-in data are Fashion-MNIST .*{what}"):
            api.export_model("tflite-int8", model=spec, out=str(tmp_path / "o.tflite"), progress=False)
        with pytest.raises(UsageError, match=r"^eval_data \(--eval-data\): the built-in data"):
            api.export_model("tflite-fp32", model=spec, out=str(tmp_path / "o.tflite"), progress=False)
        with pytest.raises(UsageError, match="the built-in data are Fashion-MNIST"):
            api.calibrate(model=spec, out=str(tmp_path / "t.json"), progress=False)
    assert not list(tmp_path.glob("o*")) and not (tmp_path / "t.json").exists()
    with pytest.raises(UsageError, match=r"^data \(--data\): the built-in data are Fashion-MNIST"):
        api.qat(model=f"{tmp_path / 'nets.py'}:rgb", epochs=1, out_dir=str(tmp_path / "job"), progress=False)
    assert not (tmp_path / "job").exists()


def test_num_eval_images_are_picked_before_preprocessing(monkeypatch):
    """load_data(builtin, limit=n) preprocesses n images, the ones ImageData.spread(n) would pick."""
    import mobilequant.data.builtin as builtin
    from mobilequant.data import load_data
    from mobilequant.models import FASHION_MNIST

    seen = []
    real = builtin.preprocess_images
    monkeypatch.setattr(builtin, "preprocess_images", lambda images, cfg: seen.append(len(images)) or real(images, cfg))
    few = load_data("builtin", FASHION_MNIST, "test", limit=37)
    assert seen == [37] and len(few) == 37
    whole = load_data("builtin", FASHION_MNIST, "test").spread(37)
    assert torch.equal(few.images, whole.images) and torch.equal(few.labels, whole.labels)
