"""The shipped Fashion-MNIST checkpoints: every one re-evaluated on the full 10k test split.

One checkpoint per required family, each at least 90 % top-1; the manifest's accuracy must be reproduced
within 0.1 percentage point; files must match their sha256 and stay small. Needs the Debian package
``dataset-fashion-mnist``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from mobilequant.data import builtin_dataset
from mobilequant.errors import InputError, UsageError
from mobilequant.models import FASHION_MNIST, list_models
from mobilequant.train import evaluate
from mobilequant import weights as weights_mod
from mobilequant.weights import WEIGHTS_DIR, default_model, list_default_weights, weights_info, weights_table_markdown

MANIFEST = json.loads((WEIGHTS_DIR / "manifest.json").read_text())


@pytest.fixture(scope="module")
def test_set():
    return builtin_dataset("fashion-mnist", "test", FASHION_MNIST)


# The families the foundation issue requires a trained checkpoint for (MobileNetV3-Small at width 0.75:
# at 1.0 its 1,024-wide head makes a 6.1 MB checkpoint).
REQUIRED = ("mobilenetv1_050", "mobilenetv2_050", "mobilenetv3_small_075", "shufflenetv1_g3", "shufflenetv2_x0_5",
            "squeezenet1_1")


def test_every_required_family_ships_a_checkpoint_of_at_least_90_percent():
    for name in REQUIRED:
        assert name in MANIFEST["weights"], f"no shipped checkpoint for {name}"
        assert MANIFEST["weights"][name]["test_top1"] >= 90.0, name


def test_manifest_lists_the_default():
    names = list_default_weights()
    assert names == sorted(MANIFEST["weights"])
    assert MANIFEST["default"] == "mobilenetv2_050" == weights_mod.DEFAULT_WEIGHTS
    assert set(names) <= set(list_models())


@pytest.mark.parametrize("name", sorted(MANIFEST["weights"]))
def test_shipped_checkpoint_reproduces_its_accuracy(name, test_set):
    info = weights_info(name)
    path = WEIGHTS_DIR / info["file"]
    assert path.stat().st_size < 5_000_000
    assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"]
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    model = default_model(name)
    assert not model.training and model.preprocess == FASHION_MNIST
    assert sum(p.numel() for p in model.parameters()) == info["params"]
    accuracy = evaluate(model, test_set, batch_size=500) * 100
    assert accuracy == pytest.approx(info["test_top1"], abs=0.1)


def test_default_model_is_mobilenetv2_050():
    model = default_model()
    assert model.model_name == "mobilenetv2_050"
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_unknown_or_tampered_weights_are_refused(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="did you mean"):
        default_model("mobilenetv2_05")
    info = weights_info("mobilenetv2_050")
    blob = bytearray((WEIGHTS_DIR / info["file"]).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (tmp_path / info["file"]).write_bytes(bytes(blob))
    monkeypatch.setattr(weights_mod, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(InputError, match="sha256"):
        default_model("mobilenetv2_050")


def test_docs_table_matches_the_manifest():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "zoo.md").read_text()
    start, end = "<!-- weights-table:start -->\n", "\n<!-- weights-table:end -->"
    block = doc[doc.index(start) + len(start):doc.index(end)]
    assert block == weights_table_markdown(), "run: python scripts/train_defaults.py --update-doc docs/zoo.md"
