"""The self-contained HTML report: one file, inline CSS, inline SVG plots, a few lines of script.

Opens offline (no external resource of any kind). Sections, in order (element ids in brackets): the
verdict (``verdict``), failing items (``failures``), end to end (``end-to-end``), per-layer SQNR along
the network (``sqnr-plot``), accumulated vs isolated error (``acc-vs-iso``), depthwise kernel norms
with dead channels marked (``kernel-heatmap``), weight and channel health (``findings``), the layer
table, sortable by any column (``layers``), and notes (``notes``).
"""

from __future__ import annotations

import math
import os
from html import escape
from pathlib import Path

from . import svg
from .health import DEAD_CHECKS
from .report import AuditReport, _atomic_write

__all__ = ["render_html", "write_html"]

_CSS = """
body{font:14px/1.45 system-ui,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1000px;margin:0 auto;padding:16px 20px 40px}
h1{font-size:22px;margin:8px 0}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.badge{display:inline-block;padding:2px 12px;border-radius:4px;color:#fff;font-weight:700;letter-spacing:.05em}
.pass{background:#2ca02c}.fail{background:#d62728}
table{border-collapse:collapse;width:100%;font-size:12.5px;background:#fff}
th,td{border:1px solid #e3e3e3;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f0f0f0;cursor:pointer;user-select:none;white-space:nowrap}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{background:#fdecea}tr.error td:first-child{border-left:3px solid #d62728}tr.warning td:first-child{border-left:3px solid #ff9900}
ul.failures li{color:#a11;margin:2px 0}.muted{color:#777}.kv td:first-child{width:220px;color:#555}
figure{margin:8px 0;background:#fff;border:1px solid #e3e3e3;padding:6px}figcaption{font-size:12px;color:#555}
code{font-size:12px}
td code{word-break:break-all}td{overflow-wrap:break-word}
table.findings,table.layers{table-layout:fixed}table.findings td{font-size:12px}
"""

_SCRIPT = """
(function(){
  function key(td){var v=td.getAttribute('data-v');if(v===null)v=td.textContent;var n=parseFloat(v);return isNaN(n)?v.toLowerCase():n;}
  document.querySelectorAll('table.sortable').forEach(function(t){
    t.querySelectorAll('th').forEach(function(th,i){
      th.addEventListener('click',function(){
        var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows),asc=th.getAttribute('data-asc')!=='1';
        rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);return (x>y?1:x<y?-1:0)*(asc?1:-1);});
        rows.forEach(function(r){body.appendChild(r);});th.setAttribute('data-asc',asc?'1':'0');
      });
    });
  });
  document.body.setAttribute('data-audit-ready','1');
})();
"""


def _f(v, fmt="{:.2f}", none="n/a") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return fmt.format(v)


def _pct(v) -> str:
    return _f(None if v is None else 100 * v, "{:.2f} %")


def _section(id_: str, title: str, body: str) -> str:
    return f'<section id="{id_}"><h2>{escape(title)}</h2>{body}</section>'


def render_html(report: AuditReport) -> str:
    """The report as one HTML document (a string)."""
    r, e = report, report.end_to_end
    verdict = "PASS" if r.passed else "FAIL"
    parts = [f'<section id="verdict"><h1>Accuracy audit <span class="badge {"pass" if r.passed else "fail"}">'
             f'{verdict}</span></h1><table class="kv">'
             f'<tr><td>artifact</td><td><code>{escape(str(r.artifact.get("path")))}</code> '
             f'({escape(str(r.artifact.get("target")))})</td></tr>'
             f'<tr><td>model</td><td>{escape(str(r.artifact.get("model_name") or "not recorded"))}</td></tr>'
             f'<tr><td>data</td><td>{e.images} images of {escape(str(r.data.get("source")))}'
             f'{"" if e.labels_used else " (no labels)"}</td></tr>'
             f'<tr><td>gate</td><td>max drop {_f(r.gate.max_drop, "{:g} pp", "off")}, min SQNR '
             f'{_f(r.gate.min_sqnr, "{:g} dB", "off")}, dead kernels '
             f'{"fail" if r.gate.fail_on_dead_kernels else "reported only"}</td></tr>'
             f'<tr><td>artifact sha256</td><td><code>{escape(str(r.artifact.get("sha256")))}</code></td></tr>'
             f'</table></section>']

    if r.failures:
        items = "".join(f"<li>{escape(f.message)}</li>" for f in r.failures)
        parts.append(_section("failures", f"Failing items ({len(r.failures)})", f'<ul class="failures">{items}</ul>'))
    else:
        parts.append(_section("failures", "Failing items", '<p class="muted">None: every gate check passed.</p>'))

    rows = []
    if e.labels_used:
        rows += [("top-1 accuracy, float model", _pct(e.float_top1)), ("top-1 accuracy, artifact", _pct(e.quant_top1)),
                 ("accuracy drop", _f(e.drop_pp, "{:+.2f} pp"))]
    rows += [("95 % interval of the " + ("drop" if e.labels_used else "disagreement") + " on these images",
              _f(e.ci95_pp, "± {:.2f} pp"))]
    rows += [("top-1 agreement with float", _pct(e.top1_agreement)),
             ("top-5 containment (float top-1 in artifact top-5)", _pct(e.top5_containment)),
             ("logits SQNR", _f(e.output_sqnr_db, "{:.1f} dB"))]
    note = "".join(f'<p class="muted">{escape(n)}</p>' for n in r.end_to_end_notes())
    parts.append(_section("end-to-end", "End to end", '<table class="kv">' + "".join(
        f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in rows) + "</table>" + note))

    layers = r.layers
    names = [l.name for l in layers]
    bad = [r.gate.min_sqnr is not None and math.isfinite(l.iso_sqnr) and l.iso_sqnr < r.gate.min_sqnr for l in layers]
    if layers:
        chart = svg.line_chart(names, {"acc": [l.acc_sqnr for l in layers], "iso": [l.iso_sqnr for l in layers]},
                               threshold=r.gate.min_sqnr, bad=bad)
        worst = r.worst_layers(1)[0]
        parts.append(_section("sqnr-plot", "Per-layer SQNR along the network", (
            f"<figure>{chart}<figcaption>Accumulated: the artifact's tensor against the float model (all earlier "
            "layers quantized too). Isolated: the layer alone, fed the float model's input. Worst layer in "
            f"isolation: <b>{escape(worst.name)}</b> ({_f(worst.iso_sqnr, '{:.1f} dB')}).</figcaption></figure>")))
        scatter = svg.scatter_chart(names, [l.iso_sqnr for l in layers], [l.acc_sqnr for l in layers], bad=bad)
        parts.append(_section("acc-vs-iso", "Accumulated vs isolated error", (
            f"<figure>{scatter}<figcaption>Each point is a layer. On the diagonal the layer's error is its own; "
            "far below it the layer inherits error from earlier layers. The layer to fix is the one far to the "
            "left (low isolated SQNR).</figcaption></figure>")))
    else:
        parts.append(_section("sqnr-plot", "Per-layer SQNR along the network",
                              '<p class="muted">Per-layer checks were not run (no name map or layer checks off).</p>'))
        parts.append(_section("acc-vs-iso", "Accumulated vs isolated error", '<p class="muted">Not run.</p>'))

    hm_rows = list(r.kernel_norms)
    if hm_rows:
        marks = {}
        index = {n: i for i, n in enumerate(hm_rows)}
        for f in r.findings:
            if f.layer in index and f.check in ("dead_kernel", "bn_gamma_zero", "bn_variance_zero", "weak_kernel"):
                kind = "weak" if f.check == "weak_kernel" else "dead"
                for c in f.channels:
                    if marks.get((index[f.layer], c)) != "dead":
                        marks[(index[f.layer], c)] = kind
        hm = svg.heatmap(hm_rows, [r.kernel_norms[n] for n in hm_rows], marks)
        n_dead = sum(1 for v in marks.values() if v == "dead")
        parts.append(_section("kernel-heatmap", "Depthwise kernel norms per channel", (
            f"<figure>{hm}<figcaption>One row per depthwise layer, one cell per channel: the channel's kernel L2 "
            f"norm divided by the layer's median (log colour scale). {n_dead} dead channel(s) marked red."
            "</figcaption></figure>")))
    else:
        parts.append(_section("kernel-heatmap", "Depthwise kernel norms per channel",
                              '<p class="muted">The model has no depthwise layers.</p>'))

    frows = []
    for f in sorted(r.findings, key=lambda f: f.sort_key):
        chans = ", ".join(map(str, f.channels[:24])) + (f" … (+{len(f.channels) - 24})" if len(f.channels) > 24 else "")
        frows.append(f'<tr class="{f.severity}"><td>{f.severity}</td><td>{escape(f.check)}</td><td>{escape(f.layer)}</td>'
                     f'<td>{escape(f.layer_kind)}</td><td>{f.stage}</td><td data-v="{len(f.channels)}">'
                     f'{len(f.channels)}/{f.channel_count}: {chans}</td><td>{escape(f.why)}</td>'
                     f'<td>{escape(f.remedy)}</td></tr>')
    n_dead = sum(1 for f in r.findings if f.check in DEAD_CHECKS)
    parts.append(_section("findings", f"Weight and channel health ({len(r.findings)} findings, {n_dead} dead-channel)", (
        '<table class="sortable findings"><colgroup><col style="width:70px"><col style="width:122px"><col style="width:150px">'
        '<col style="width:82px"><col style="width:84px"><col style="width:150px"><col><col></colgroup>'
        '<thead><tr><th>severity</th><th>check</th><th>layer</th><th>kind</th><th>stage</th>'
        '<th>channels</th><th>why it matters</th><th>remedy</th></tr></thead><tbody>' + "".join(frows) + "</tbody></table>"
        if frows else '<p class="muted">No findings.</p>')))

    lrows = []
    for l, is_bad in zip(layers, bad):
        a, i = l.accumulated, l.isolated or {}
        short = l.tensor if len(l.tensor) <= 48 else "…" + l.tensor[-47:]
        lrows.append(
            f'<tr class="{"bad" if is_bad else ""}"><td class="num">{l.index}</td><td>{escape(l.name)}</td>'
            f'<td>{escape(l.kind)}</td>'
            f'<td class="num">{_f(i.get("sqnr_db"), "{:.1f}")}</td><td class="num">{_f(a.get("sqnr_db"), "{:.1f}")}</td>'
            f'<td class="num">{_f(a.get("median_channel_sqnr_db"), "{:.1f}")}</td>'
            f'<td class="num">{_f(a.get("cosine"), "{:.5f}")}</td><td class="num">{_f(a.get("max_abs_error"), "{:.4g}")}</td>'
            f'<td class="num">{_f(a.get("weight_sqnr_db"), "{:.1f}")}</td>'
            f'<td><code>{escape(" ".join(l.segment_ops))}</code></td>'
            f'<td title="{escape(l.tensor)}"><code>{escape(short)}</code></td></tr>')
    parts.append(_section("layers", f"Layers ({len(layers)} compared)", (
        '<p class="muted">SQNR in dB; "acc." = accumulated (as in the artifact), "iso." = isolated (the layer alone), '
        '"median ch." = median over channels of the accumulated per-channel SQNR, "weight" = the artifact\'s kernel '
        'against the float kernel. Click a column to sort; hover a tensor for its full name.</p>'
        '<table class="sortable layers"><colgroup><col style="width:34px"><col style="width:150px"><col style="width:86px">'
        '<col style="width:52px"><col style="width:52px"><col style="width:60px"><col style="width:66px">'
        '<col style="width:62px"><col style="width:56px"><col style="width:120px"><col></colgroup>'
        '<thead><tr><th>#</th><th>layer</th><th>kind</th><th>iso.</th><th>acc.</th><th>median ch.</th><th>cosine</th>'
        '<th>max |err|</th><th>weight</th><th>ops run in isolation</th><th>artifact tensor</th></tr></thead><tbody>'
        + "".join(lrows) + "</tbody></table>"
        if lrows else '<p class="muted">No layers compared.</p>')))

    notes = [escape(w) for w in r.warnings]
    if r.unmapped_layers:
        notes.append("Layers with no tensor in the artifact (not compared): " + escape(", ".join(r.unmapped_layers)))
    if r.timings_s:
        notes.append("Timings: " + ", ".join(f"{escape(k)} {v:.2f} s" for k, v in r.timings_s.items()))
    parts.append(_section("notes", "Notes", "<ul>" + "".join(f"<li>{n}</li>" for n in notes) + "</ul>"))

    title = f"mobilequant audit: {verdict} — {Path(str(r.artifact.get('path'))).name}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><main>" + "".join(parts) +
            f"</main><script>{_SCRIPT}</script></body></html>\n")


def write_html(report: AuditReport, path: str | os.PathLike) -> Path:
    """Write the HTML report atomically."""
    return _atomic_write(path, render_html(report))
