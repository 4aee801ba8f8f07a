"""Runtime: the TFLite / ONNX Runtime runners on real exported files (no mocks)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from mobilequant.errors import InputError
from mobilequant.export import export
from mobilequant.quant import QuantConfig, quantize
from mobilequant.runtime import (
    OrtRunner,
    TFLiteRunner,
    interpreter_class,
    open_runner,
    with_intermediate_outputs,
)
from mobilequant.runtime import tflite as tflite_runtime


class TinyNet(nn.Module):
    """conv-BN-ReLU6 → depthwise → residual add → pool → linear: the int8 patterns in small."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pw(self.dw(x))
        return self.fc(self.pool(x).flatten(1))


def smooth_images(n: int, c: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, c, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = TinyNet().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def files(net, tmp_path_factory):
    d = tmp_path_factory.mktemp("runtime")
    x = smooth_images(64)
    qr = quantize(net, [x[:32], x[32:]], QuantConfig())
    out = {"qr": qr, "x": smooth_images(16, seed=3)}
    for target in ("tflite-int8", "tflite-fp32", "onnx-fp32", "onnx-int8"):
        path = d / f"tiny.{target}{'.tflite' if target.startswith('tflite') else '.onnx'}"
        export(qr, target, path, verify_data=out["x"], overrides=["verification.num_images=16"])
        out[target] = path
    return out


def test_interpreter_class_prefers_ai_edge_litert():
    cls = interpreter_class()
    assert cls.__module__.startswith("ai_edge_litert")


def test_no_interpreter_is_a_clear_input_error(monkeypatch):
    monkeypatch.setattr(tflite_runtime, "_INTERPRETERS", (("no_such_tflite_pkg.interpreter", "Interpreter"),))
    with pytest.raises(InputError, match="no TFLite interpreter is installed.*ai-edge-litert"):
        interpreter_class()


def test_tflite_fp32_matches_torch(net, files):
    runner = TFLiteRunner(files["tflite-fp32"])
    x = files["x"]
    with torch.no_grad():
        ref = net(x).numpy()
    out = runner.run(x)
    assert out.shape == ref.shape and out.dtype == np.float32
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    assert runner.input.dtype == "float32"


def test_tflite_int8_io_is_quantized_and_matches_simulation(files):
    runner = TFLiteRunner(files["tflite-int8"])
    assert runner.input.dtype == "int8" and runner.input.quantized
    x = files["x"]
    with torch.no_grad():
        sim = files["qr"].graph(x).numpy()
    out = runner.run(x)
    step = runner.outputs[0].scales[0]
    assert np.abs(out - sim).max() <= 2 * step + 1e-6  # at most a couple of output steps apart
    assert (out.argmax(1) == sim.argmax(1)).mean() >= 0.9


def test_tflite_tensors_and_intermediates(files):
    runner = TFLiteRunner(files["tflite-int8"], preserve_all_tensors=True)
    runner.run(files["x"][:1])
    tensors = runner.tensors()
    weights = [t for t in tensors if t.dtype == "int8" and len(t.scales) > 1]
    assert weights, "per-channel int8 weights are reported with their scales"
    assert all(t.axis is not None and len(t.zero_points) == len(t.scales) for t in weights)
    values = runner.intermediates()
    act = next(t for t in tensors if t.dtype == "int8" and t.name in values and len(t.shape) == 4
               and len(t.scales) == 1)
    assert values[act.name].dtype == np.float32
    assert np.array_equal(runner.tensor(act.name), values[act.name])


def test_intermediates_need_preserved_tensors(files):
    runner = TFLiteRunner(files["tflite-int8"])
    name = runner.tensors()[-1].name
    with pytest.raises(InputError, match="preserve_all_tensors"):
        runner.tensor(name)


def test_onnx_runner_and_extra_outputs(net, files):
    runner = OrtRunner(files["onnx-fp32"])
    x = files["x"]
    with torch.no_grad():
        ref = net(x).numpy()
    assert np.abs(runner.run(x) - ref).max() <= 1e-4 * np.abs(ref).max()
    inner = [n.output[0] for n in runner.model.graph.node if n.op_type == "Conv"][:2]
    copy = with_intermediate_outputs(runner.model, inner)
    outs = OrtRunner(copy).outputs_by_name(x)
    assert set(inner) <= set(outs)
    assert outs[inner[0]].shape[0] == len(x)
    assert len(runner.model.graph.output) == 1, "the original model is not modified"


def test_open_runner_by_content(files):
    assert isinstance(open_runner(files["tflite-int8"]), TFLiteRunner)
    assert isinstance(open_runner(files["onnx-int8"]), OrtRunner)


@pytest.mark.parametrize("target", ["tflite-int8", "onnx-int8"])
def test_truncated_file_is_an_input_error_naming_it(files, tmp_path, target):
    data = files[target].read_bytes()
    bad = tmp_path / files[target].name
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match=bad.name):
        open_runner(bad)


def test_non_model_file_is_an_input_error(tmp_path):
    bad = tmp_path / "notes.tflite"
    bad.write_text("not a model at all")
    with pytest.raises(InputError, match="notes.tflite"):
        TFLiteRunner(bad)
    bad_onnx = tmp_path / "notes.onnx"
    bad_onnx.write_text("not a model at all")
    with pytest.raises(InputError, match="notes.onnx"):
        OrtRunner(bad_onnx)
    with pytest.raises(InputError, match="missing.tflite"):
        TFLiteRunner(tmp_path / "missing.tflite")


@pytest.mark.parametrize("elem, dtype", [("INT64", np.int64), ("UINT8", np.uint8), ("DOUBLE", np.float64)])
def test_bench_feeds_onnx_inputs_of_their_own_type(tmp_path, elem, dtype):
    """`bench` had fed float32 to every ONNX input: an int64 input ended in ONNX Runtime's traceback."""
    import onnx
    from onnx import TensorProto, helper

    from mobilequant.runtime.bench import measure_latency

    t = getattr(TensorProto, elem)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id",
                              [helper.make_tensor_value_info("x", t, [1, 4])],
                              [helper.make_tensor_value_info("y", t, [1, 4])])
    path = tmp_path / "id.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert measure_latency(path, runs=3, warmup=1).median_ms > 0


def test_an_onnx_file_named_tflite_is_called_what_it_is(tmp_path):
    """An ONNX file saved as .tflite was "not a TFLite model (no 'TFL3' flatbuffer identifier)"."""
    import onnx
    from onnx import TensorProto, helper

    from mobilequant.errors import InputError
    from mobilequant.runtime.tflite import check_tflite_file

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "model.tflite"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    with pytest.raises(InputError, match="it is an ONNX model"):
        check_tflite_file(path)
    # bench (open_runner) picks the runtime by content, as audit does: it had refused the file
    from mobilequant.runtime import OrtRunner, open_runner
    from mobilequant.runtime.bench import measure_latency

    assert isinstance(open_runner(path), OrtRunner)
    assert measure_latency(path, runs=2, warmup=0).runtime == "onnxruntime"
    path.write_text("hello")
    with pytest.raises(InputError, match="no 'TFL3'"):
        check_tflite_file(path)
    with pytest.raises(InputError, match="no 'TFL3'"):
        open_runner(path)


def test_huge_or_endless_model_files_are_refused_before_reading(tmp_path, monkeypatch):
    """A 20 GB sparse .tflite / .onnx was read into memory whole (audit, bench); /dev/zero until the OOM
    killer came. A file over 2 GiB (the most a flatbuffer or a protobuf without external data can be) or one
    that is not a regular file is one line, from its size and type alone."""
    import pathlib

    from mobilequant.export.artifact import MAX_MODEL_BYTES, check_model_file, load_artifact
    from mobilequant.runtime import load_onnx_model
    from mobilequant.runtime.tflite import check_tflite_file

    def no_whole_read(self):
        raise AssertionError(f"{self} was read whole")

    monkeypatch.setattr(pathlib.Path, "read_bytes", no_whole_read)
    for name in ("big.tflite", "big.onnx"):
        big = tmp_path / name
        with open(big, "wb"):
            pass
        os.truncate(big, MAX_MODEL_BYTES + 1)  # sparse: no disk space used
        for read in (open_runner, check_tflite_file, load_onnx_model, load_artifact, TFLiteRunner, OrtRunner):
            with pytest.raises(InputError, match=rf"^cannot read (\w+ )*model {big}: it is 2\.0 GiB, larger than "
                                                 r"the 2 GiB"):
                read(big)
    if os.path.exists("/dev/zero"):
        for read in (open_runner, check_tflite_file, load_onnx_model, load_artifact):
            with pytest.raises(InputError, match="^cannot read (\\w+ )*model /dev/zero: not a regular file$"):
                read("/dev/zero")
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)  # opening it would wait for a writer
    with pytest.raises(InputError, match="not a regular file"):
        check_model_file(fifo)
    from mobilequant.audit.artifact import open_artifact  # audit opened the file first: a pipe blocked it

    for path in (fifo, tmp_path / "big.onnx"):
        with pytest.raises(InputError, match=f"^cannot read artifact {path}: (not a regular file|it is 2.0 GiB)"):
            open_artifact(path)
    with pytest.raises(InputError, match="not a regular file"):
        open_runner(fifo)
    with pytest.raises(InputError, match="it is a directory"):
        open_runner(tmp_path)
