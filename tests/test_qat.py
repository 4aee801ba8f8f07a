"""Quantization-aware training: a job runs and converts, resumes bitwise after SIGKILL, refuses bad input.

Small and fast: MobileNetV2 0.5 at 32×32 grey, 128 training images of the shipped calibration set, batches
of 32, one thread. The float model is trained for a few seconds first (then its BN statistics are
re-estimated) so QAT starts from a model whose eval-mode activations are meaningful.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.fx import Interpreter

from mobilequant.data import calibration_set
from mobilequant.errors import InputError, UsageError
from mobilequant.models import FASHION_MNIST, create_model
from mobilequant.qat import QATJobConfig, QATResult, run_qat, shard_plan
from mobilequant.qat.checkpoint import LAST, PREV, load_checkpoint
from mobilequant.qat.distributed import epoch_indices
from mobilequant.qat.graph import fake_quant_modules, trained_qparams
from mobilequant.quant import QuantConfig, QuantResult, quantize

REPO = Path(__file__).resolve().parents[1]
MODEL = "mobilenetv2_050"


def _train_float(path: Path) -> None:
    """A few seconds of float training on 384 images, then BN statistics re-estimated (cached per session)."""
    from mobilequant.train import train_classifier

    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=10, in_chans=1)
    data = calibration_set().subset(slice(0, 384))
    train_classifier(model, data, epochs=3, batch_size=32, lr=0.05, threads=1, progress=False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the passes below
    model.train()
    with torch.no_grad():
        for i in range(0, len(data), 64):
            model(data.images[i:i + 64])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)


@pytest.fixture(scope="session")
def float_state(tmp_path_factory) -> Path:
    path = tmp_path_factory.getbasetemp() / "qat_float_mobilenetv2_050.pt"
    if not path.exists():
        _train_float(path)
    return path


def make_model(state: Path, name: str = MODEL) -> nn.Module:
    model = create_model(name, num_classes=10, in_chans=1)
    if name == MODEL:
        model.load_state_dict(torch.load(state, weights_only=True))
    model.preprocess = FASHION_MNIST
    return model


def make_data():
    data = calibration_set()
    return data.subset(slice(0, 128)), data.subset(slice(128, 192))


def make_config(out: Path, **kw) -> QATJobConfig:
    base = dict(model=MODEL, out_dir=str(out), epochs=2, batch_size=32, ckpt_every=2, threads=1, augment=True,
                freeze_bn_step=5, freeze_observer_step=6, progress=False, calib_batches=1)
    base.update(kw)
    return QATJobConfig(**base)


@pytest.fixture(scope="module")
def reference(float_state, tmp_path_factory):
    """One uninterrupted job: 2 epochs × 4 steps, checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("qat_reference")
    train, val = make_data()
    result = run_qat(make_config(out), model=make_model(float_state), train_data=train, val_data=val)
    return out, result


def _layer_outputs(gm, x: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}

    class Recorder(Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n.meta.get("mq_name") in names and isinstance(value, torch.Tensor):
                out[n.meta["mq_name"]] = value.detach().clone()
            return value

    with torch.no_grad():
        Recorder(gm).run(x)
    return out


# ---------------------------------------------------------------------------------------------------
# A job runs and converts


def test_qat_runs_converts_and_carries_trained_ranges(reference):
    out, result = reference
    assert isinstance(result, QATResult) and isinstance(result, QuantResult)  # the exporter's input type
    assert result.steps == 8 and len(result.history) == 2
    assert [r["bn_frozen"] for r in result.history] == [False, True]
    assert [r["observers_frozen"] for r in result.history] == [False, True]
    assert all(int(m.observer_enabled[0]) == 0 for _, m in fake_quant_modules(result.prepared))

    # Every trained scale / zero point is in the converted graph's table, exactly.
    trained = trained_qparams(result.prepared)
    assert len(trained) > 100
    for (name, role), (scale, zp) in trained.items():
        entry = result.table.get(name, role)
        assert entry is not None, (name, role)
        assert entry.scale == tuple(scale.tolist()), (name, role)
        assert entry.zero_point == tuple(int(z) for z in zp.tolist()), (name, role)
    assert any(e.role == "bias" and e.dtype == "int32" for e in result.table)
    assert result.findings == []

    # The first fused layer of the int8 graph computes what the fake-quant graph trained: the same int8
    # values, but for the few that sit within float rounding of a grid midpoint (the two graphs fold BN
    # with different float arithmetic: ~1e-5 apart before quantization).
    x = make_data()[1].images[:16]
    a = _layer_outputs(result.prepared, x, {"features.0.2"})["features.0.2"]
    b = _layer_outputs(result.graph, x, {"features.0.2"})["features.0.2"]
    entry = result.table.get("features.0.0", "output")
    qa, qb = (torch.clamp(torch.round(t / entry.scale[0]) + entry.zero_point[0], -128, 127) for t in (a, b))
    assert float((a - b).abs().max()) < 1e-3
    assert float((qa != qb).float().mean()) < 1e-3
    with torch.no_grad():
        agree = (result.prepared(x).argmax(1) == result.graph(x).argmax(1)).float().mean()
    assert agree >= 0.75
    assert result.int8_accuracy is not None and abs(result.int8_accuracy - result.val_accuracy) <= 0.15


def test_checkpoints_csv_and_progress_files(reference):
    out, result = reference
    assert sorted(p.name for p in out.iterdir()) == sorted([LAST, PREV, "qat-log.csv", ".lock"])  # the lock, released
    ckpt = torch.load(out / LAST, map_location="cpu", weights_only=True)  # tensors and primitives only
    assert ckpt["step"] == 8 and ckpt["epoch"] == 2 and ckpt["position"] == 0 and ckpt["complete"]
    assert ckpt["model"] == MODEL and ckpt["recipe_hash"] == make_config(out).recipe_hash()
    assert {"torch", "numpy_keys", "python_keys", "torch_per_process"} <= set(ckpt["rng"])
    prev = load_checkpoint(out / PREV)
    assert prev["step"] == 6 and prev["position"] == 2  # the last mid-epoch checkpoint
    lines = (out / "qat-log.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,step,train_loss,train_acc,val_loss,val_acc,images_per_s")
    assert len(lines) == 3 and lines[2].startswith("2,8,")


# ---------------------------------------------------------------------------------------------------
# Killed mid-epoch, resumed: the same result, bitwise

CHILD = textwrap.dedent("""
    import sys, time
    import torch
    sys.path.insert(0, {tests!r})
    from test_qat import make_config, make_data, make_model
    from mobilequant.qat import run_qat
    from pathlib import Path

    def hang(step):
        if step == {hang}:
            print("HANG", step, flush=True)
            time.sleep(600)

    train, val = make_data()
    run_qat(make_config(Path({out!r})), model=make_model(Path({state!r})), train_data=train, val_data=val,
            on_step=hang)
""")


def _child_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    return env


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(reference, float_state, tmp_path):
    ref_out, ref = reference
    out = tmp_path / "job"
    script = tmp_path / "child.py"
    # Checkpoints at steps 2, 6 (mid-epoch) and 4, 8 (epoch ends); the child stops after step 3.
    script.write_text(CHILD.format(tests=str(REPO / "tests"), hang=3, out=str(out), state=str(float_state)))
    proc = subprocess.Popen([sys.executable, str(script)], env=_child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("HANG") or time.monotonic() > deadline:
                break
        assert any(line.startswith("HANG") for line in seen), "".join(seen[-20:])
        assert (out / LAST).exists()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    ckpt = load_checkpoint(out / LAST)
    assert (ckpt["step"], ckpt["epoch"], ckpt["position"]) == (2, 0, 2)  # mid-epoch, one step lost

    train, val = make_data()
    resumed = run_qat(make_config(out, resume=True), model=make_model(float_state), train_data=train,
                      val_data=val)
    a = load_checkpoint(ref_out / LAST)
    b = load_checkpoint(out / LAST)
    assert a["graph"].keys() == b["graph"].keys()
    different = [k for k in a["graph"] if not torch.equal(a["graph"][k], b["graph"][k])]
    assert different == []
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in ref.history]
    assert [r["val_acc"] for r in resumed.history] == [r["val_acc"] for r in ref.history]
    assert resumed.table == ref.table


# ---------------------------------------------------------------------------------------------------
# Bad input: one-line user errors


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_resume_refuses_another_model_or_recipe(reference, float_state, tmp_path):
    ref_out, _ = reference
    train, val = make_data()
    other = make_model(float_state, "mobilenetv2_035")
    with pytest.raises(InputError) as e:
        run_qat(make_config(tmp_path, model="mobilenetv2_035", resume_from=str(ref_out / LAST)),
                model=other, train_data=train, val_data=val)
    assert "for model 'mobilenetv2_050'" in _one_line(e)
    with pytest.raises(InputError) as e:
        run_qat(make_config(tmp_path, lr=0.01, resume_from=str(ref_out / LAST)), model=make_model(float_state),
                train_data=train, val_data=val)
    assert "different recipe" in _one_line(e) and "lr: 0.0005 → 0.01" in str(e.value)
    with pytest.raises(InputError) as e:  # same recipe, other starting weights
        run_qat(make_config(tmp_path, resume_from=str(ref_out / LAST)), model=_perturbed(make_model(float_state)),
                train_data=train, val_data=val)
    assert "different weights" in _one_line(e)


def _perturbed(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model.classifier[1].bias.add_(1.0)
    return model


def test_corrupt_checkpoint_is_refused_and_the_previous_kept(reference, float_state, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "job"
    out.mkdir()
    for name in (LAST, PREV):
        (out / name).write_bytes((ref_out / name).read_bytes())
    (out / LAST).write_bytes((ref_out / LAST).read_bytes()[:5000])  # a truncated write
    train, val = make_data()
    with pytest.raises(InputError) as e:
        run_qat(make_config(out, resume=True), model=make_model(float_state), train_data=train, val_data=val)
    msg = _one_line(e)
    assert "is corrupt" in msg and str(out / PREV) in msg and "(step 6)" in msg
    assert load_checkpoint(out / PREV)["step"] == 6  # untouched
    with pytest.raises(UsageError, match="already holds a QAT checkpoint"):
        run_qat(make_config(out), model=make_model(float_state), train_data=train, val_data=val)


def test_nan_data_stops_with_the_step_and_keeps_the_last_good_checkpoint(float_state, tmp_path):
    train, val = make_data()
    order = epoch_indices(len(train), shard_plan(len(train), 32, 1), rank=0, epoch=0, seed=0)
    images = train.images.clone()
    images[order[70]] = float("nan")  # position 70 of epoch 0: the third batch, i.e. step 3
    bad = type(train)(images, train.labels, "nan-data", train.classes)
    with pytest.raises(InputError) as e:
        run_qat(make_config(tmp_path, ckpt_every=1), model=make_model(float_state), train_data=bad, val_data=val)
    msg = _one_line(e)
    assert "NaN" in msg and "at step 3 " in msg and "qat-last.pt" in msg
    assert load_checkpoint(tmp_path / LAST)["step"] == 2


def test_process_count_the_data_cannot_feed():
    assert shard_plan(128, 32, 2).local_batch == 16
    with pytest.raises(UsageError, match="at most 32 processes"):
        shard_plan(128, 32, 64)
    with pytest.raises(UsageError, match="does not divide"):
        shard_plan(128, 30, 4)
    with pytest.raises(UsageError, match="only 3 training images"):
        shard_plan(3, 4, 4)
    with pytest.raises(InputError, match="cannot fill one batch"):
        shard_plan(10, 32, 1)


def test_distillation_from_the_float_model(reference, float_state, tmp_path):
    """distill=w: (1 − w)·CE + w·T²·KL to the float model. A job with w = 1 trains towards the float
    model's predictions: its loss starts near the fake-quant error, far below the label loss."""
    from mobilequant.qat.job import _distilled

    model = make_model(float_state).eval()
    x, y = make_data()[0].images[:16], make_data()[0].labels[:16]
    with torch.no_grad():
        logits = model(x)
        ce = nn.functional.cross_entropy(logits, y)
        assert torch.allclose(_distilled(ce, logits, model, x, 0.25, 2.0), 0.75 * ce)  # the teacher itself: KL 0
        assert _distilled(ce, logits.flip(0), model, x, 1.0, 1.0) > 0.1
    train, val = make_data()
    result = run_qat(make_config(tmp_path, epochs=1, distill=1.0), model=make_model(float_state),
                     train_data=train, val_data=val)
    label_loss = reference[1].history[0]["train_loss"]  # the same job without distillation
    assert result.history[0]["train_loss"] < 0.5 * label_loss


def test_config_validation():
    with pytest.raises(UsageError, match="batch_size must be at least 1"):
        QATJobConfig(batch_size=0)
    with pytest.raises(UsageError, match="did you mean 'learn_scales'"):
        QATJobConfig.from_dict({"learn_scale": True})
    with pytest.raises(UsageError, match="osc_freeze_threshold"):
        QATJobConfig(osc_freeze_threshold=2.0)
    with pytest.raises(UsageError, match="distill must be in"):
        QATJobConfig(distill=1.5)
    with pytest.raises(UsageError, match="distill_temperature must be positive"):
        QATJobConfig(distill=0.5, distill_temperature=0)
    for bad in (1.5, -1, float("nan")):
        with pytest.raises(UsageError, match="freeze_bn_step must be a step ≥ 0"):
            QATJobConfig(freeze_bn_step=bad)
    # freeze points: a step as given, a fraction of the job's steps, or never; the defaults are fractions
    assert QATJobConfig().freeze_steps(937) == (468, 703)
    assert QATJobConfig(freeze_bn_step=10, freeze_observer_step=None).freeze_steps(937) == (10, None)
    assert QATJobConfig(freeze_bn_step=1.0, freeze_observer_step=0.0).freeze_steps(8) == (8, 0)
    a, b = QATJobConfig(), QATJobConfig(out_dir="elsewhere", progress=False, ckpt_every=7)
    assert a.recipe_hash() == b.recipe_hash() != QATJobConfig(lr=0.01).recipe_hash()
    assert QATJobConfig.from_dict(a.to_dict()) == a
    # bias correction (on by default in PTQ) is not a QAT step: QAT trains the biases
    assert QATJobConfig().quant.bias_correction is False
    assert QATJobConfig(quant=QuantConfig(per_channel=False)).quant == QuantConfig(per_channel=False,
                                                                                  bias_correction=False)


# ---------------------------------------------------------------------------------------------------
# Options: PTQ start, learned scales, oscillation freezing


@pytest.mark.slow
def test_start_from_ptq_keeps_its_activation_ranges_when_observers_are_frozen(float_state, tmp_path):
    train, val = make_data()
    model = make_model(float_state)
    ptq = quantize(model, [train.images[:64]], QuantConfig())
    result = run_qat(make_config(tmp_path, epochs=1, start="ptq", freeze_observer_step=0, freeze_bn_step=None),
                     model=model, train_data=train, val_data=val, ptq_result=ptq)
    activations = [e for e in ptq.table if e.role in ("output", "input")]
    assert len(activations) > 50
    for e in activations:
        got = result.table.get(e.name, e.role)
        assert got is not None and got.scale == pytest.approx(e.scale, rel=1e-6) and got.zero_point == e.zero_point
    trained, start = result.float_model.state_dict(), model.state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start if k.endswith("weight"))  # weights trained


@pytest.mark.parametrize("cle", [False, True], ids=["conv-bn", "equalized"])
def test_start_from_ptq_carries_its_bias_correction(float_state, cle):
    """Before any step, a QAT graph started from a bias-corrected PTQ result converts to that PTQ model:
    its ranges (ranges_from_table) and its corrected biases (shift_biases: the BN's β in the QAT conv-BN
    pattern, the conv bias in the equalized graph)."""
    import dataclasses

    from mobilequant.qat.convert import convert_trained
    from mobilequant.qat.graph import build_qat_graph, equalized_graph, shift_biases
    from mobilequant.qat.job import ranges_from_table
    from mobilequant.qat.quantizer import qat_quantizer

    train, val = make_data()
    model = make_model(float_state)
    x, y = train.images[:64], val.images
    qc = QuantConfig(per_channel=not cle, cle=cle)  # bias correction: on, the PTQ default
    start = equalized_graph(model, x[:2]) if cle else model
    ptq = quantize(start, [x], dataclasses.replace(qc, cle=False))
    shifts = ptq.bias_correction.shifts()
    assert len(shifts) > 50 and all(bool(torch.isfinite(s).all()) for s in shifts.values())
    qat_qc = dataclasses.replace(qc, bias_correction=False)  # what a QAT job's config holds

    def converted(carry: bool) -> torch.Tensor:
        prepared = build_qat_graph(start, x[:2], qat_quantizer(qat_qc))
        if carry:
            assert shift_biases(prepared, shifts) == []  # every corrected layer has a bias or a BN β here
        with torch.no_grad():
            prepared(x)  # observed once (as a job does), then the PTQ ranges replace what was observed
        ranges_from_table(prepared, ptq.table)
        with torch.no_grad():
            return convert_trained(prepared, start, qat_qc, x[:1], x).graph(y)

    with torch.no_grad():
        want = ptq.graph(y)
    step = want.unique().diff().min()  # the int8 logits' quantum
    carried, plain = (converted(True) - want).abs(), (converted(False) - want).abs()
    # equal but for a few rounding ties (biases folded in float32 here, corrected in float64 in PTQ)
    assert carried.max() <= step * 1.01 and (carried > step / 2).float().mean() < 0.02
    assert (plain > step / 2).float().mean() > 0.05  # without the shifts it is another model


@pytest.mark.slow
def test_learned_scales_and_frozen_oscillations_reach_the_int8_graph(float_state, tmp_path):
    train, val = make_data()
    cfg = make_config(tmp_path, epochs=1, learn_scales=True, quant=QuantConfig(weight_bits=4),
                      osc_freeze_threshold=0.05, osc_momentum=0.5, freeze_bn_step=0, freeze_observer_step=None)
    result = run_qat(cfg, model=make_model(float_state), train_data=train, val_data=val)
    learned = [m for _, m in fake_quant_modules(result.prepared) if isinstance(m.scale, nn.Parameter)]
    assert len(learned) > 100
    assert any(bool(m.learning_enabled[0]) for m in learned)
    # 4-bit depthwise weights oscillate; the frozen integers are baked into the converted weights.
    assert result.osc_frozen_weights > 0
    ckpt = load_checkpoint(tmp_path / LAST)
    frozen = {k.rsplit(".", 1)[0]: v for k, v in ckpt["oscillation"].items() if k.endswith(".frozen")}
    assert sum(int(v.sum()) for v in frozen.values()) == result.osc_frozen_weights
    assert all(e.qmin == -7 and e.qmax == 7 for e in result.table if e.role == "weight")


@pytest.mark.slow
def test_per_tensor_qat_with_cle_trains_the_equalized_graph_and_exports(float_state, tmp_path):
    """cle=True: QAT starts from the BN-folded, equalized float graph (ReLU6 as per-channel clamps)."""
    from mobilequant.export import export
    from mobilequant.qat.graph import equalized_graph

    train, val = make_data()
    model = make_model(float_state)
    qc = QuantConfig(per_channel=False, cle=True)
    x = val.images[:16]
    with torch.no_grad():  # the starting graph computes what the model computes
        start = equalized_graph(model, x)
        assert torch.allclose(start(x), model.eval()(x), rtol=1e-4, atol=1e-4)
    assert any(n.target == torch.ops.aten.clamp.Tensor for n in start.graph.nodes)

    ptq = quantize(model, [train.images[:64]], qc)
    result = run_qat(make_config(tmp_path, epochs=1, quant=qc, start="ptq"), model=model, train_data=train,
                     val_data=val, ptq_result=ptq)
    assert result.findings == []  # every PTQ range found its fake-quant (same layer names)
    weights = [e for e in result.table if e.role == "weight"]
    assert len(weights) > 50 and all(len(e.scale) == 1 for e in weights)
    trained, equalized = result.float_model.state_dict(), start.state_dict()
    assert any(not torch.equal(trained[k], equalized[k]) for k in equalized if k.endswith("weight"))
    with torch.no_grad():
        agree = (result.prepared(x).argmax(1) == result.graph(x).argmax(1)).float().mean()
    assert agree >= 0.75

    # The trained per-tensor scales reach the file, and the per-channel clamps run as int8 MINIMUM ops.
    # (A 48 % test model has many near-tied logits: a 1-LSB difference flips ~1 % of top-1 classes.)
    art = export(result, "tflite-int8", tmp_path / "qat-cle.tflite",
                 overrides=["verification.int8_top1_agreement=0.97"])
    assert art.verification.passed
    assert art.census.ops.get("MINIMUM:int8", 0) > 30 and not art.census.float_compute_ops
    assert art.metadata["fine_tuned"] == "qat"  # the audit then says its shipped reference predates the training

    # The ONNX file's name map leads each layer to a QuantizeLinear with the trained scale of its output
    # (after CLE's clamp where there is one).
    import onnx

    from mobilequant.export.onnx import constants

    art = export(result, "onnx-int8", tmp_path / "qat-cle.onnx", overrides=["verification.enabled=false"])
    graph = onnx.load(str(art.path)).graph
    values, producer = constants(graph), {o: n for n in graph.node for o in n.output}
    pairs = [(layer, float(np.asarray(values[q.input[1]]).reshape(-1)[0]), e.scale[0])
             for layer, tensor in art.name_map.items()
             if (e := result.table.get(layer)) is not None and (q := producer.get(tensor)) is not None
             and q.op_type == "QuantizeLinear"]
    assert len(pairs) >= 20 and all(abs(a - b) <= 1e-6 * b for _, a, b in pairs), pairs


def test_channels_with_zero_bn_variance_are_kept_silent(float_state, tmp_path):
    """A BN channel with zero running variance (constant on the data) keeps zero weights through QAT."""
    train, val = make_data()
    model = make_model(float_state)
    conv, bn = model.features[1].conv[0][0], model.features[1].conv[0][1]  # first depthwise conv, its BN
    with torch.no_grad():
        bn.running_var[:2] = 0.0
    assert float(conv.weight[:2].abs().sum()) > 0  # the weights themselves are not zero
    result = run_qat(make_config(tmp_path, epochs=1), model=model, train_data=train, val_data=val)
    silenced = [f for f in result.findings if f.kind == "dead_channels_silenced"]
    assert [(f.layer, f.message.split()[0]) for f in silenced] == [("features.1.conv.0.0", "2")]
    trained = result.float_model.features[1].conv[0][0].weight
    assert float(trained[:2].abs().max()) == 0.0 and float(trained[2:].abs().max()) > 0
    assert float(model.features[1].conv[0][0].weight[:2].abs().sum()) > 0  # the caller's model is untouched


class _CallsSystem:
    def __reduce__(self):
        return (os.system, ("true",))


def test_resume_from_a_file_that_carries_code_says_so(tmp_path):
    """It was called "corrupt", with torch's advice to load it with weights_only=False."""
    path = tmp_path / "evil.pt"
    torch.save({"format": "mobilequant-qat-checkpoint", "graph": _CallsSystem()}, path)
    with pytest.raises(InputError) as e:
        load_checkpoint(path)
    msg = _one_line(e)
    assert "refused because it carries code (it pickles posix.system)" in msg, msg
    assert "corrupt" not in msg and "weights_only" not in msg, msg


_HOLDER = ("import fcntl, os, sys, time\n"
           "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
           "fcntl.flock(fd, fcntl.LOCK_EX)\n"
           "os.write(fd, str(os.getpid()).encode())\n"
           "print('held', flush=True)\n"
           "time.sleep(120)\n")


def test_a_second_job_in_the_same_out_dir_is_refused_and_a_killed_ones_files_cleared(tmp_path):
    """Two jobs started a second apart in one folder had both run and mixed their checkpoints; a job killed
    while saving left ``.qat-last.pt.PID.tmp`` for ever."""
    import mobilequant.api as api
    from mobilequant.qat.job import LOCK_NAME, out_dir_lock

    out = tmp_path / "job"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out / LOCK_NAME)], stdout=subprocess.PIPE,
                              text=True)  # another job, as far as the lock goes
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / f".{LAST}.{holder.pid}.tmp").write_bytes(b"half a checkpoint")
        with pytest.raises(UsageError) as e:  # refused before the model or the data load
            run_qat(make_config(out))
        assert f"is in use by another QAT job (process {holder.pid})" in _one_line(e)
        with pytest.raises(UsageError, match="is in use by another QAT job"):
            api.qat(out_dir=str(out), progress=False)
        assert (out / f".{LAST}.{holder.pid}.tmp").exists()  # its process runs: not ours to remove
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel releases the lock of a killed process
        holder.wait()
    alive = out / f".{LAST}.{os.getppid()}.tmp"
    alive.write_bytes(b"")
    with out_dir_lock(out):
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
        assert not (out / f".{LAST}.{holder.pid}.tmp").exists()  # the killed job's temporary file
        assert alive.exists()  # a running process's is kept
        with out_dir_lock(out):  # re-entrant in one process (api.qat holds it around run_qat)
            pass
        assert (out / LOCK_NAME).exists()
    # released: another process takes it at once (filelock keeps the file, unlocked)
    taker = subprocess.run([sys.executable, "-c", _HOLDER.replace("fcntl.LOCK_EX", "fcntl.LOCK_EX | fcntl.LOCK_NB")
                            .replace("time.sleep(120)", "pass"), str(out / LOCK_NAME)],
                           capture_output=True, text=True, timeout=60)
    assert taker.returncode == 0 and taker.stdout.strip() == "held", taker.stderr


def test_a_job_that_fails_before_writing_leaves_no_folder(tmp_path):
    """A failed job's folder held only the released lock file (filelock keeps it), so the folder the job
    had created stayed behind."""
    import mobilequant.api as api
    from mobilequant.errors import MobileQuantError

    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((4, 28, 28), np.nan, np.float32))
    with pytest.raises(MobileQuantError):
        api.qat(data=str(bad), epochs=1, out_dir=str(tmp_path / "job"), progress=False)
    assert not (tmp_path / "job").exists()
    with pytest.raises(MobileQuantError):
        run_qat(make_config(tmp_path / "job2", train_data=str(bad)))
    assert not (tmp_path / "job2").exists()
