"""QuantTable: extraction from the converted graph, exact JSON round trip, canonical hash, diff."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn as nn

from mobilequant.errors import InputError
from mobilequant.quant import QuantConfig, QuantEntry, QuantTable, quantize


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(8, 3, 1, bias=False), nn.BatchNorm2d(3))
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        y = x + self.project(self.conv(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


@pytest.fixture(scope="module")
def result():
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    return quantize(Net().eval(), batches, QuantConfig())


def test_every_quantized_tensor_is_listed_by_layer_and_role(result):
    keys = [e.key for e in result.table]
    assert keys == sorted(set(keys), key=keys.index)  # unique
    for key in ("x:input", "conv.0:weight", "conv.0:bias", "conv.0:output", "project.0:weight",
                "project.0:bias", "project.0:output", "add_0:output", "fc:weight", "fc:bias", "fc:output"):
        assert key in keys, key
    assert "conv.2:output" not in keys, "a fused ReLU6 output is listed under its conv"
    w = result.table.get("conv.0", "weight")
    assert (w.dtype, w.axis, w.qmin, w.qmax, len(w.scale)) == ("int8", 0, -127, 127, 8)
    assert set(w.zero_point) == {0}
    b = result.table.get("conv.0", "bias")
    x = result.table.get("x", "input")
    assert b.dtype == "int32" and all(
        bs == pytest.approx(x.scale[0] * ws, rel=1e-6) for bs, ws in zip(b.scale, w.scale)
    )


def test_json_round_trip_is_exact(result):
    table = result.table
    text = table.to_json()
    again = QuantTable.from_json(text)
    assert again == table and again.sha256() == table.sha256()
    assert QuantTable.from_json(again.to_json(indent=None)).canonical_json() == table.canonical_json()
    assert all(a.scale == b.scale for a, b in zip(table, again))  # bit-exact floats


def test_hash_and_diff_see_a_changed_scale(result):
    table = result.table
    entries = list(table)
    e = entries[3]
    changed = dataclasses.replace(e, scale=tuple(s * 1.01 for s in e.scale))
    other = QuantTable(entries[:3] + [changed] + entries[4:])
    assert other.sha256() != table.sha256()
    diff = table.diff(other, rtol=1e-3)
    assert len(diff) == 1 and diff[0].startswith(f"{e.key}: scale[")
    assert table.diff(other, rtol=0.02) == []
    assert QuantTable(entries[1:]).diff(table) == [f"{entries[0].key}: only in the second table"]


def test_from_graph_reads_folded_and_unfolded_graphs_alike(result):
    assert QuantTable.from_graph(result.graph) == result.table


def test_bad_json_is_an_input_error():
    with pytest.raises(InputError):
        QuantTable.from_json("{}")
    with pytest.raises(InputError):
        QuantTable.from_json(json.dumps({"version": 1, "entries": [{"name": "a"}]}))


def test_entry_dict_round_trip():
    e = QuantEntry("features.0.0", "weight", "int8", (0.1, 0.2), (0, 0), 0, -127, 127)
    assert QuantEntry.from_dict(json.loads(json.dumps(e.to_dict()))) == e


def test_the_python_example_of_the_quantization_guide_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/quantization.md's "In Python" block: per-tensor + CLE, findings, a table entry, the table as
    JSON, a verified export — executed as the document shows it (in a scratch folder)."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "quantization.md").read_text()
    block = re.search(r"## In Python\n.*?```python\n(.*?)```", doc, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/quantization.md", "exec"), {})  # the project's own document, not user input
    out = capsys.readouterr().out
    assert out.startswith("CLE: 37 pairs") and "QuantEntry(name='features.1.conv.0.0'" in out
    table = QuantTable.from_json((tmp_path / "table.json").read_text())
    from mobilequant.export import load_artifact

    meta = load_artifact(tmp_path / "mnv2-per-tensor-cle.tflite").metadata
    assert meta["quant_table_sha256"] == table.sha256() and meta["recipe"]["quantization"]["per_channel"] is False
    assert "int8_params: ok" in out
