"""TFLite's int8 HARD_SWISH kernel against its numpy model (``quantizer.hardswish_kernel_table``), and the
hardswish output-scale snap that makes the file's layer compute the simulation's codes for all 256 inputs."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

import mobilequant.quant.quantizer as quantizer
from mobilequant.export import export
from mobilequant.quant import QuantConfig, quantize
from mobilequant.quant.observers import pin_qparams
from mobilequant.quant.quantizer import (
    HARDSWISH_SNAP_BOUND,
    aten,
    hardswish_exact_table,
    hardswish_kernel_table,
)


def _model_and_data():
    torch.manual_seed(2)  # its calibrated hardswish scale leaves the kernel 5 codes off
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Hardswish(), nn.Conv2d(8, 4, 1)).eval()
    return model, [torch.randn(16, 3, 8, 8) * 3]


def _file_tables(path) -> list[tuple[tuple[float, int, float, int], np.ndarray]]:
    """Each HARD_SWISH op of a TFLite file fed all 256 input codes, with and without XNNPACK:
    ((s_in, zp_in, s_out, zp_out), output codes)."""
    from mobilequant.audit.artifact import artifact_provenance, open_artifact

    found = []
    for delegates in (True, False):
        g = open_artifact(str(path))
        g.delegates = delegates
        for t in artifact_provenance(g)["name_map"].values():
            if not g.has_tensor(t) or g.producer_op(t) != "HARD_SWISH":
                continue
            k = g.producer[g.by_name[t]]
            xi, yi = g.tensors[g.ops[k][1][0]], g.tensors[g.ops[k][2][0]]
            params = (float(xi.scale[0]), int(xi.zero_point[0]), float(yi.scale[0]), int(yi.zero_point[0]))
            codes = np.arange(-128, 128)
            x = ((codes - params[1]) * np.float32(params[0])).astype(np.float32)
            feed = np.broadcast_to(x.reshape((256,) + (1,) * (len(xi.shape) - 1)),
                                   (256,) + tuple(xi.shape[1:])).copy()
            out = g.segment(t, [xi.name]).run({xi.name: feed}).reshape(256, -1)[:, 0]
            found.append((params, np.round(out / params[2]).astype(np.int64) + params[3]))
    assert len(found) == 2, "one HARD_SWISH op expected"
    return found


def _off_scale(s_in: float, zp_in: int, s_out: float, zp_out: int) -> float:
    """The float32 scale nearest s_out at which the kernel is a step off the simulation on some code."""
    for i in range(2000):
        s = float(np.float32(s_out * (1 + i * 1e-5)))
        if not np.array_equal(hardswish_kernel_table(s_in, zp_in, s, zp_out),
                              hardswish_exact_table(s_in, zp_in, s, zp_out)):
            return s
    raise AssertionError("no scale where the kernel differs")


def test_kernel_model_is_the_file_and_off_the_simulation_without_the_snap(tmp_path, monkeypatch):
    """Unsnapped (pinned to a scale where the kernel is off), the file's table is the numpy model's, code
    for code, on XNNPACK and the reference kernel, and a step off the simulation on at least one code."""

    def pin_off(prepared):
        for node in prepared.graph.nodes:
            if node.target is aten.hardswish.default or node.target is aten.hardswish_.default:
                in_obs = prepared.get_submodule(str(node.args[0].target))
                out_obs = prepared.get_submodule(str(next(iter(node.users)).target))
                (s_in, zp_in), (s, zp) = in_obs.calculate_qparams(), out_obs.calculate_qparams()
                off = _off_scale(float(s_in), int(zp_in), float(s), int(zp))
                pin_qparams(out_obs, torch.full_like(s, off), zp)
        return []

    monkeypatch.setattr(quantizer, "snap_hardswish_scales", pin_off)
    model, data = _model_and_data()
    qr = quantize(model, data, QuantConfig(bias_correction=False))
    art = export(qr, "tflite-int8", tmp_path / "hsw.tflite")
    for params, table in _file_tables(art.path):
        np.testing.assert_array_equal(table, hardswish_kernel_table(*params))
        assert (table != hardswish_exact_table(*params)).any()


def test_snapped_hardswish_file_is_the_simulation_code_for_code(tmp_path, monkeypatch):
    """With the snap, the file's HARD_SWISH computes the simulation's codes for every input code, at the
    simulation's own parameters, and the scale moved by at most HARDSWISH_SNAP_BOUND."""
    model, data = _model_and_data()
    qr = quantize(model, data, QuantConfig(bias_correction=False))
    art = export(qr, "tflite-int8", tmp_path / "hsw.tflite")
    entry = qr.table.get("1")  # the hardswish's output in the simulation
    for params, table in _file_tables(art.path):
        assert params[2:] == (float(np.float32(entry.scale[0])), int(entry.zero_point[0]))
        np.testing.assert_array_equal(table, hardswish_kernel_table(*params))
        np.testing.assert_array_equal(table, hardswish_exact_table(*params))
    monkeypatch.setattr(quantizer, "snap_hardswish_scales", lambda prepared: [])
    before = quantize(model, data, QuantConfig(bias_correction=False)).table
    calibrated = (before.get("0").scale[0], int(before.get("0").zero_point[0]), before.get("1").scale[0],
                  int(before.get("1").zero_point[0]))
    assert (hardswish_kernel_table(*calibrated) != hardswish_exact_table(*calibrated)).any()  # the defect
    assert calibrated[3] == int(entry.zero_point[0])
    assert 0 < abs(entry.scale[0] / calibrated[2] - 1) <= HARDSWISH_SNAP_BOUND
