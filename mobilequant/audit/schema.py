"""JSON Schema (draft 2020-12) of the audit's JSON report, ``schema: "mobilequant.audit/1"``.

docs/audit.md describes every field; ``tests/test_audit.py`` validates real reports against this
schema and checks that the docs name every property, so the three cannot drift apart.
"""

from __future__ import annotations

__all__ = ["REPORT_SCHEMA"]

_NUM = {"type": ["number", "null"]}
_METRICS = {
    "type": "object",
    "properties": {
        "sqnr_db": _NUM,
        "cosine": _NUM,
        "max_abs_error": _NUM,
        "rel_max_abs_error": _NUM,
        "weight_sqnr_db": _NUM,
        "median_channel_sqnr_db": _NUM,
    },
    "required": ["sqnr_db", "cosine", "max_abs_error"],
    "additionalProperties": _NUM,
}

REPORT_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://mobilequant.invalid/schemas/audit-report-1.json",
    "title": "mobilequant accuracy audit report",
    "type": "object",
    "required": ["schema", "verdict", "failures", "artifact", "data", "gate", "end_to_end", "layers",
                 "worst_layers", "unmapped_layers", "findings", "kernel_norms", "warnings", "timings_s"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": "mobilequant.audit/1"},
        "verdict": {"enum": ["pass", "fail"]},
        "failures": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["check", "subject", "message", "value", "limit"],
                "additionalProperties": False,
                "properties": {
                    "check": {"enum": ["artifact_changed", "export_verification", "float_fidelity",
                                       "accuracy_drop", "disagreement", "layer_sqnr", "dead_kernels"]},
                    "subject": {"type": "string"},
                    "message": {"type": "string"},
                    "value": _NUM,
                    "limit": _NUM,
                },
            },
        },
        "artifact": {
            "type": "object",
            "required": ["path", "target", "format", "sha256", "model_name", "quant_table_sha256", "recipe",
                         "mobilequant_version", "verification"],
            "additionalProperties": False,
            "properties": {
                "path": {"type": "string"},
                "target": {"type": "string"},
                "format": {"enum": ["tflite", "onnx"]},
                "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "model_name": {"type": ["string", "null"]},
                "quant_table_sha256": {"type": ["string", "null"]},
                "recipe": {"type": ["string", "null"]},
                "mobilequant_version": {"type": ["string", "null"]},
                "verification": {
                    "oneOf": [
                        {"type": "null"},
                        {
                            "type": "object",
                            "required": ["sidecar", "passed", "sha256_matches"],
                            "additionalProperties": False,
                            "properties": {
                                "sidecar": {"type": "string"},
                                "passed": {"type": ["boolean", "null"]},
                                "sha256_matches": {"type": ["boolean", "null"]},
                            },
                        },
                    ]
                },
            },
        },
        "data": {
            "type": "object",
            "required": ["source", "images", "labels"],
            "additionalProperties": False,
            "properties": {"source": {"type": "string"}, "images": {"type": "integer", "minimum": 1},
                           "labels": {"type": "boolean"}},
        },
        "gate": {
            "type": "object",
            "required": ["max_drop_pp", "min_sqnr_db", "fail_on_dead_kernels"],
            "additionalProperties": False,
            "properties": {"max_drop_pp": _NUM, "min_sqnr_db": _NUM, "fail_on_dead_kernels": {"type": "boolean"}},
        },
        "end_to_end": {
            "type": "object",
            "required": ["images", "labels_used", "float_top1", "quant_top1", "drop_pp", "top1_agreement",
                         "top5_containment", "disagreement_pp", "output_sqnr_db", "float_only_right",
                         "quant_only_right", "ci95_pp", "note"],
            "additionalProperties": False,
            "properties": {
                "images": {"type": "integer"},
                "labels_used": {"type": "boolean"},
                "float_top1": _NUM,
                "quant_top1": _NUM,
                "drop_pp": _NUM,
                "top1_agreement": _NUM,
                "top5_containment": _NUM,
                "disagreement_pp": _NUM,
                "output_sqnr_db": _NUM,
                "float_only_right": {"type": ["integer", "null"], "minimum": 0},
                "quant_only_right": {"type": ["integer", "null"], "minimum": 0},
                "ci95_pp": _NUM,
                "note": {"type": "string"},
            },
        },
        "layers": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "name", "kind", "tensor", "accumulated", "isolated", "segment_ops"],
                "additionalProperties": False,
                "properties": {
                    "index": {"type": "integer", "minimum": 0},
                    "name": {"type": "string"},
                    "kind": {"type": "string"},
                    "tensor": {"type": "string"},
                    "accumulated": _METRICS,
                    "isolated": {"oneOf": [{"type": "null"}, _METRICS]},
                    "segment_ops": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
        "worst_layers": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
        "unmapped_layers": {"type": "array", "items": {"type": "string"}},
        "findings": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["check", "layer", "layer_kind", "stage", "severity", "channels", "channel_count",
                             "value", "why", "remedy", "layer_index"],
                "additionalProperties": False,
                "properties": {
                    "check": {"enum": ["dead_kernel", "weak_kernel", "bn_gamma_zero", "bn_variance_zero",
                                       "dead_activation", "range_spread", "single_code", "kernel_mismatch"]},
                    "layer": {"type": "string"},
                    "layer_kind": {"type": "string"},
                    "stage": {"enum": ["float", "quantized"]},
                    "severity": {"enum": ["error", "warning", "info"]},
                    "channels": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                    "channel_count": {"type": "integer", "minimum": 0},
                    "value": _NUM,
                    "why": {"type": "string"},
                    "remedy": {"type": "string"},
                    "layer_index": {"type": "integer"},
                },
            },
        },
        "kernel_norms": {"type": "object", "additionalProperties": {"type": "array", "items": _NUM}},
        "warnings": {"type": "array", "items": {"type": "string"}},
        "timings_s": {"type": "object", "additionalProperties": {"type": "number"}},
    },
}
