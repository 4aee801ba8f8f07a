"""The HTML audit report: self-contained, and rendered by a real browser (headless Chromium).

The report comes from a real audit (shipped MobileNetV2 0.5 with planted dead depthwise kernels,
quantized, exported to TFLite, audited). Chromium renders it from a file:// URL with networking off;
the test reads back the DOM after scripts ran (the report's script marks ``<body data-audit-ready="1">``
as its last statement), scans the browser's console log for script errors, and checks the screenshot
is a real page. Without Chromium installed the browser tests are skipped, saying so (Debian:
``apt-get install -y chromium``).
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from mobilequant.audit import run_audit
from mobilequant.audit.html import render_html
from mobilequant.data import builtin_dataset, calibration_set

SECTIONS = ("verdict", "failures", "end-to-end", "sqnr-plot", "acc-vs-iso", "kernel-heatmap", "findings", "layers",
            "notes")
DEAD = ("features.4.conv.1.0", (3, 17))


def _plant_dead(model):
    """Same planting as tests/test_audit.py (so an artifact exported there can be reused here)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.features[4].conv[1][0].weight[[3, 17]] = 0.0
        m.features[9].conv[1][1].weight[5] = 0.0
        m.features[12].conv[1][0].weight[40] *= 1e-4
    return m


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from mobilequant.export import load_artifact
    from mobilequant.weights import default_model

    model = _plant_dead(default_model())
    shared = tmp_path_factory.getbasetemp() / "audit-shared" / "planted.tflite"
    if shared.exists():  # exported by tests/test_audit.py in this session
        art = load_artifact(shared)
    else:
        from mobilequant.export import export
        from mobilequant.quant import QuantConfig, quantize

        cal = calibration_set(cfg=model.preprocess)
        qr = quantize(model, (cal.images[i:i + 64] for i in range(0, 256, 64)), QuantConfig(num_calibration=256))
        art = export(qr, "tflite-int8", tmp_path_factory.mktemp("html") / "planted.tflite",
                     overrides=("verification.enabled=false",))
    data = builtin_dataset("fashion-mnist", "test", model.preprocess).subset(slice(0, 150))
    return run_audit(art, data, model=model, min_sqnr=15, max_drop=1.0, fail_on_dead_kernels=True, progress=False)


def test_html_is_self_contained(report, tmp_path):
    path = report.write_html(tmp_path / "audit.html")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in text
    # nothing to fetch: no external scripts, styles, images or fonts
    assert not re.search(r"<(link|img|iframe)\b", text)
    assert not re.search(r"<script[^>]*\bsrc=", text)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", text)
    assert "url(" not in text
    assert text.count("<svg") == 3
    # the dead kernels are marked in the heat map, with a tooltip naming them
    for c in DEAD[1]:
        assert f"{DEAD[0]} channel {c}: dead" in text
    assert 'class="badge fail"' in text and DEAD[0] in text


def test_html_escapes_text(report):
    report = copy.copy(report)
    report.warnings = ["<script>alert(1)</script> & more"]
    html = render_html(report)
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in html


def test_the_noise_note_is_in_every_form_of_the_report(report):
    """'The gate is within the noise' was printed on the terminal only: the JSON's end_to_end.note and
    the HTML report left it out."""
    import dataclasses
    from html import escape

    from mobilequant.audit import end_to_end

    # 1,000 images, 16 that only the float model gets right, 8 only the artifact: drop 0.8 ± 0.96 pp
    labels = np.zeros(1000, np.int64)
    f, q = np.eye(3, dtype=np.float32)[labels], np.eye(3, dtype=np.float32)[labels]
    f[:8], q[8:24] = np.eye(3, dtype=np.float32)[1], np.eye(3, dtype=np.float32)[2]
    r = copy.copy(report)
    r.end_to_end = end_to_end(f, q, labels)
    r.gate = dataclasses.replace(r.gate, max_drop=1.0)  # passes, inside the noise
    r.failures = []
    note = r.end_to_end.noise_note(r.gate.max_drop)
    assert "within the ±0.96 pp noise" in note
    assert note in r.summary() and note in r.to_dict()["end_to_end"]["note"] and escape(note) in render_html(r)


def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


CHROMIUM = _chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")


def _run_chromium(args: list[str], profile, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@needs_chromium
def test_html_renders_in_chromium_without_script_errors(report, tmp_path):
    page = report.write_html(tmp_path / "audit.html")
    proc = _run_chromium(["--virtual-time-budget=3000", "--dump-dom", page.as_uri()], tmp_path / "profile")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not [ln for ln in console if re.search(r"Uncaught|Error|error", ln)], console
    assert 'data-audit-ready="1"' in dom  # the script ran to its last statement
    for sid in SECTIONS:
        assert f'id="{sid}"' in dom
    assert dom.count("<svg") == 3 and dom.count("<circle") > 2 * len(report.layers)
    assert "Accuracy audit" in dom and "FAIL" in dom


@needs_chromium
def test_html_screenshot_shows_a_page(report, tmp_path):
    from PIL import Image

    page = report.write_html(tmp_path / "audit.html")
    shot = tmp_path / "audit.png"
    proc = _run_chromium(["--hide-scrollbars", "--window-size=1100,2600", f"--screenshot={shot}", page.as_uri()],
                         tmp_path / "profile")
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (2600, 1100)
    # a real page: mostly light background, dark text, and the red FAIL badge near the top
    assert img.mean() > 200 and (img.sum(axis=2) < 200).mean() > 0.005
    top = img[:120]
    red = (top[..., 0] > 180) & (top[..., 1] < 80) & (top[..., 2] < 80)
    assert red.sum() > 200
    # the plots are drawn: the SQNR chart's blue and orange series appear
    blue = (img[..., 0] < 60) & (abs(img[..., 1] - 119) < 30) & (img[..., 2] > 160)
    orange = (img[..., 0] > 230) & (abs(img[..., 1] - 127) < 30) & (img[..., 2] < 40)
    assert blue.sum() > 100 and orange.sum() > 100
