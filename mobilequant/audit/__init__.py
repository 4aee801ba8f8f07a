"""Accuracy audit: may an exported artifact ship, and if not, which layer to fix?

``run_audit(artifact, data, model=..., max_drop=0.5, min_sqnr=..., fail_on_dead_kernels=False) -> AuditReport``
compares the real artifact (TFLite via LiteRT with every intermediate tensor kept, ONNX via ONNX Runtime
with intermediates exposed as outputs) with the float torch model, layer by layer — each layer both as
it runs in the artifact (accumulated error) and alone on float inputs (isolated error) — and end to end;
checks depthwise / pointwise kernels and channels for dead or int8-hostile weights before and after
quantization; and gates the result. ``AuditReport.summary()`` / ``.write_json()`` / ``.write_html()``
give the terminal summary, the JSON report (schema in docs/audit.md) and a self-contained HTML report.

The steps are plain functions that can be used alone (the shape of onnxruntime's ``qdq_loss_debug``):
:func:`open_artifact`, :func:`fused_layers`, :func:`match_layers`, :func:`build_segments`,
:func:`compare_batches`, :func:`layer_results`, :func:`end_to_end`, the health checks and
:func:`evaluate_gate`.
"""

from .artifact import artifact_provenance, open_artifact
from .compare import build_segments, compare_batches, layer_results, match_layers
from .endtoend import end_to_end
from .gate import evaluate_gate
from .health import (DEAD_CHECKS, Finding, HealthThresholds, dead_activation_findings, float_weight_findings,
                     kernel_mismatch_findings, kernel_norms, quantized_weight_findings)
from .layers import FusedLayer, fused_layers
from .metrics import LAYER_METRICS, ErrorStats, compute_metrics
from .reference import FloatReference
from .report import SCHEMA, AuditReport, EndToEnd, Gate, GateFailure, LayerResult
from .run import DEFAULT_IMAGES, run_audit

__all__ = [
    "run_audit",
    "AuditReport",
    "Gate",
    "GateFailure",
    "LayerResult",
    "EndToEnd",
    "Finding",
    "HealthThresholds",
    "DEAD_CHECKS",
    "LAYER_METRICS",
    "ErrorStats",
    "SCHEMA",
    "DEFAULT_IMAGES",
    "compute_metrics",
    "open_artifact",
    "artifact_provenance",
    "fused_layers",
    "FusedLayer",
    "FloatReference",
    "match_layers",
    "build_segments",
    "compare_batches",
    "layer_results",
    "end_to_end",
    "float_weight_findings",
    "quantized_weight_findings",
    "kernel_mismatch_findings",
    "dead_activation_findings",
    "kernel_norms",
    "evaluate_gate",
]
