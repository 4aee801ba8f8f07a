"""What an exported file says about where it came from, and what the audit does with it.

* the float weights' sha256 (``weights_sha256``): the audit refuses a model with other weights, naming the
  checkpoint to pass with ``--weights``; a checkpoint's export is named after it;
* the bytes do not depend on the verification settings or on how the recipe was named;
* the ``.verify.json`` report beside the file: the audit fails a file changed after export, or export's
  ``.failed`` file;
* ``--set`` overrides are recorded and name the file;
* class names, preprocessing, converter versions, a user model's spec without its directory.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import validate_audit_report
import torch
import torch.nn as nn

from mobilequant.audit import run_audit
from mobilequant.data import ImageData
from mobilequant.errors import InputError
from mobilequant.export import export, load_artifact, load_recipe
from mobilequant.export.artifact import sidecar_path, weights_sha256
from mobilequant.models import FASHION_MNIST
from mobilequant.quant import QuantConfig, quantize


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 1, 8, 8, generator=g)
    return torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 10)).eval()
    model.preprocess = FASHION_MNIST
    model.class_names = tuple(f"c{i}" for i in range(10))
    model.model_name = "tinynet"
    return model


@pytest.fixture(scope="module")
def small():
    model = _net()
    qr = quantize(model, [_images(64, 0)], QuantConfig(num_calibration=64))
    x = _images(32, 5)
    return {"model": model, "qr": qr, "x": x, "data": ImageData(x, None, "smooth noise")}


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ------------------------------------------------------------------------------------------ bytes
def test_same_quantization_same_bytes_however_verified_or_named(small, tmp_path):
    """The embedded recipe had carried verification.num_images (bytes changed with --num-eval) and the
    description (``--recipe tflite-int8`` differed from no recipe)."""
    for target, suffix in (("tflite-int8", ".tflite"), ("onnx-int8", ".onnx")):
        a = export(small["qr"], target, tmp_path / f"a{suffix}", verify_data=small["x"],
                   overrides=["verification.num_images=16"])
        b = export(small["qr"], None, tmp_path / f"b{suffix}", recipe=target, verify_data=small["x"],
                   overrides=["verification.num_images=32"])
        assert load_recipe(target).description, "the built-in recipe has a description"
        assert _sha(a.path) == _sha(b.path), target
        assert "verification" not in a.metadata["recipe"] and "description" not in a.metadata["recipe"]
        assert a.metadata["recipe"]["name"] == target and a.metadata["recipe_overrides"] == []
        # the checks' settings are in the report beside the file, which names the file, not the path given
        ra, rb = (json.loads(sidecar_path(p).read_text()) for p in (a.path, b.path))
        assert ra["verification_settings"]["num_images"] == 16 and rb["verification_settings"]["num_images"] == 32
        assert ra["artifact"] == a.path.name and ra["artifact_sha256"] == _sha(a.path)


def test_provenance_metadata(small, tmp_path):
    art = export(small["qr"], "tflite-int8", tmp_path / "p.tflite", verify_data=small["x"],
                 overrides=["verification.num_images=16"], model_spec=str(tmp_path / "nets" / "mynet.py") + ":build",
                 weights_file=str(tmp_path / "ckpt" / "mine.pt"))
    meta = load_artifact(art.path).metadata
    assert meta["weights_sha256"] == weights_sha256(small["model"])
    assert meta["class_names"] == [f"c{i}" for i in range(10)]
    pre = meta["preprocess"]
    assert {k: pre[k] for k in ("input_size", "mean", "std", "resize", "layout", "frame", "pixel_scale")} == {
        "input_size": [1, 32, 32], "mean": [0.286], "std": [0.353], "resize": None, "layout": "NCHW",
        "frame": [28, 28], "pixel_scale": 1 / 255}
    assert "BILINEAR" in pre["resample"] and pre["crop"].startswith("centre")  # what another resampler changes
    assert meta["versions"]["torch"] == torch.__version__ and meta["versions"]["litert-torch"]
    assert meta["model_spec"] == "mynet.py:build" and meta["weights_file"] == "mine.pt"
    assert str(tmp_path).encode() not in art.path.read_bytes(), "no absolute path in an artifact"
    onnx = export(small["qr"], "onnx-fp32", tmp_path / "p.onnx", overrides=["verification.enabled=false"])
    assert set(load_artifact(onnx.path).metadata["versions"]) == {"torch", "onnx", "onnxscript"}


def test_a_quant_result_records_its_own_settings(small, tmp_path):
    """A per-tensor QuantResult exported with the default recipe recorded the recipe's quantization
    (per_channel true, mse, 512 images) beside a quant_config saying per_channel false."""
    cfg = QuantConfig(per_channel=False, calibration="minmax", num_calibration=64)
    qr = quantize(small["model"], [_images(64, 0)], cfg)
    meta = load_artifact(export(qr, "tflite-int8", tmp_path / "pt.tflite",
                                overrides=["verification.enabled=false"]).path).metadata
    recorded = meta["recipe"]["quantization"]
    assert recorded["per_channel"] is False and recorded["calibration"] == "minmax"
    assert recorded["num_calibration"] == 64 and meta["quant_config"]["per_channel"] is False
    # a model quantized by the recipe records the recipe as it is
    plain = export(small["model"], "tflite-int8", tmp_path / "r.tflite", calibration_data=[_images(64, 0)],
                   overrides=["verification.enabled=false"])
    assert load_artifact(plain.path).metadata["recipe"]["quantization"] == \
        load_recipe("tflite-int8").file_settings()["quantization"]


def test_metadata_input_is_the_files_input(small, tmp_path):
    """An io.layout=NHWC file said input_shape [1, 1, 32, 32] and preprocess layout NCHW: an app sizing its
    buffer from the metadata got the wrong shape. Both now describe the file's own input tensor."""
    from mobilequant.runtime import open_runner

    for layout in ("NCHW", "NHWC"):
        art = export(small["qr"], "tflite-int8", tmp_path / f"{layout}.tflite",
                     overrides=["verification.enabled=false", f"io.layout={layout}"])
        meta = load_artifact(art.path).metadata
        runner = open_runner(art.path)
        assert meta["input_shape"] == [int(d) for d in runner.input.shape], layout
        assert meta["input_layout"] == meta["preprocess"]["layout"] == layout
        assert meta["preprocess"]["input_size"] == [1, 32, 32]  # the model's (C, H, W), whatever the layout


def test_weights_hash_is_of_the_values():
    """Of the values, not the names: a captured graph of the model (whose state_dict keys differ and which
    drops BN's num_batches_tracked) and a wrapper hash alike, so a QuantResult of a captured graph audits
    against the module."""
    from mobilequant.capture import capture

    a, b = _net(), _net()
    assert weights_sha256(a) == weights_sha256(b)
    assert weights_sha256(capture(a, _images(1, 0))) == weights_sha256(nn.Sequential(a)) == weights_sha256(a)
    with torch.no_grad():
        b[7].bias[0] += 1e-3
    assert weights_sha256(a) != weights_sha256(b)


# ----------------------------------------------------------------------------------- recipes, --set
def test_overrides_that_change_the_file_are_recorded(small, tmp_path):
    rec = load_recipe("tflite-int8", ["quantization.per_channel=false", "quantization.calibration=minmax",
                                      "verification.num_images=16", "io.dtype=int8"])  # int8 I/O: the default
    assert rec.overrides == ("quantization.calibration=minmax", "quantization.per_channel=false")
    art = export(small["model"], None, tmp_path / "o.tflite", recipe=rec, calibration_data=[_images(64, 0)],
                 verify_data=small["x"])
    assert art.metadata["recipe_overrides"] == ["quantization.calibration=minmax", "quantization.per_channel=false"]
    assert load_recipe("tflite-int8") == load_recipe("tflite-int8", ["io.layout=NCHW"])  # settings compare


def test_default_file_names_say_overrides_and_checkpoint():
    from mobilequant import api
    from mobilequant.export import resolve_recipe

    plain = resolve_recipe(None, "tflite-int8")
    custom = resolve_recipe(None, "tflite-int8", ["quantization.calibration=minmax", "quantization.per_channel=false"])
    again = resolve_recipe(None, "tflite-int8", ["quantization.per_channel=false", "quantization.calibration=minmax"])
    assert api._file_recipe_label(None, plain) == "tflite-int8"
    label = api._file_recipe_label(None, custom)
    assert label.startswith("tflite-int8-custom-") and len(label) == len("tflite-int8-custom-") + 8
    assert api._file_recipe_label(None, again) == label  # order of --set does not matter
    assert api._file_model_label("mobilenetv2_050", "/x/edited.pt") == "mobilenetv2_050-edited"


# ------------------------------------------------------------------------------------ the audit
def test_audit_refuses_a_model_with_other_weights(small, tmp_path):
    art = export(small["qr"], "tflite-int8", tmp_path / "w.tflite", verify_data=small["x"],
                 overrides=["verification.num_images=16"], weights_file="edited.pt")
    other = _net(seed=3)
    with pytest.raises(InputError) as e:
        run_audit(art.path, small["data"], model=other, images=8, progress=False)
    text = str(e.value)
    assert "\n" not in text and str(art.path) in text and "--weights" in text and "edited.pt" in text
    # the right weights: audited
    r = run_audit(art.path, small["data"], model=small["model"], images=8, max_drop=None, progress=False)
    assert r.artifact["recipe"] == "tflite-int8" and r.artifact["mobilequant_version"]
    # a fine-tuned (QAT) file keeps today's behaviour
    import dataclasses

    qat_like = dataclasses.replace(art, metadata={**art.metadata, "fine_tuned": "qat"})
    run_audit(qat_like, small["data"], model=other, images=8, max_drop=None, layer_checks=False, progress=False)


def test_audit_reads_the_verification_report_beside_the_file(small, tmp_path):
    art = export(small["qr"], "tflite-int8", tmp_path / "v.tflite", verify_data=small["x"],
                 overrides=["verification.num_images=16"])
    kw = dict(model=small["model"], images=8, max_drop=None, layer_checks=False, progress=False)
    r = run_audit(art.path, small["data"], **kw)
    assert r.passed and r.artifact["verification"] == {"sidecar": "v.tflite.verify.json", "passed": True,
                                                      "sha256_matches": True}
    report_path = sidecar_path(art.path)
    report = json.loads(report_path.read_text())
    recorded = report["artifact_sha256"]
    report["artifact_sha256"] = "0" * 64  # the file is not the one export verified
    report_path.write_text(json.dumps(report))
    r = run_audit(art.path, small["data"], **kw)
    validate_audit_report(r.to_dict())
    assert [f.check for f in r.failures] == ["artifact_changed"]
    assert f"changed after export's verification: sha256 {recorded}, its v.tflite.verify.json says {'0' * 64}" \
        in r.failures[0].message
    assert r.artifact["verification"]["sha256_matches"] is False
    report["artifact_sha256"], report["passed"] = recorded, False  # export's .failed file
    report["checks"][0]["passed"] = False
    report_path.write_text(json.dumps(report))
    r = run_audit(art.path, small["data"], **kw)
    assert [f.check for f in r.failures] == ["export_verification"]
    assert report["checks"][0]["name"] in r.failures[0].message
    report_path.unlink()  # no report: nothing noted
    r = run_audit(art.path, small["data"], **kw)
    assert r.passed and r.artifact["verification"] is None
    validate_audit_report(r.to_dict())




def test_calibrate_summary_says_which_sha256():
    from mobilequant.api import CalibrateSummary

    text = CalibrateSummary("m", "t.json", 3, "ab" * 32, []).summary()
    assert "table sha256 " + "ab" * 32 in text and "quant_table_sha256" in text


def test_checkpoint_export_is_named_after_it_and_the_default_audit_refuses_it(tmp_path, capsys):
    """`export --model mobilenetv2_050 --weights edited.pt` then `audit FILE`: the audit compared the file with
    the shipped weights and failed at "drop 24.50 pp" with no hint; the export's default name was the
    shipped weights' export's, which it replaced."""
    from mobilequant import api, cli
    from mobilequant.weights import default_model

    net = default_model("mobilenetv2_050")
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["classifier.1.bias"] += 0.5
    torch.save(state, tmp_path / "edited.pt")
    out = tmp_path / "out"
    s = api.export_model("onnx-fp32", model="mobilenetv2_050", weights=str(tmp_path / "edited.pt"),
                         out=f"{out}/", num_eval=16, verify=False, progress=False)
    path = out / "mobilenetv2_050-edited-onnx-fp32.onnx"
    assert s.path == str(path) and s.to_dict()["sha256"] == _sha(path)
    meta = load_artifact(path).metadata
    assert meta["weights_file"] == "edited.pt" and meta["weights_sha256"] != weights_sha256(net)
    assert meta["class_names"] and meta["preprocess"]["input_size"] == [1, 32, 32]
    capsys.readouterr()
    assert cli.main(["audit", str(path), "--num-images", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "--weights" in err and "edited.pt" in err
    assert cli.main(["audit", str(path), "--num-images", "16", "--weights", str(tmp_path / "edited.pt"),
                     "--max-drop", "off"]) == 0
