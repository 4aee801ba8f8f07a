"""Test-session settings shared by every test module."""

from __future__ import annotations

import os

import torch

MAX_WORKERS = 4  # each worker holds torch, LiteRT and ONNX Runtime (1–3 GiB at its peak)


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per core, at least 2 (the CI machine has 2), at most ``MAX_WORKERS``."""
    return max(2, min(MAX_WORKERS, os.cpu_count() or 1))


def pytest_configure(config) -> None:
    # Under xdist each worker gets its share of the cores, so the workers' torch intra-op threads
    # together do not ask for more cores than the machine has.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def validate_audit_report(report: dict) -> None:
    """Validate an audit report (``AuditReport.to_dict()``) against the published JSON schema, after a JSON
    round trip (what a consumer of the file reads). jsonschema is in the dev extra the test command
    installs: a missing install fails here rather than being skipped."""
    import json

    import jsonschema

    from mobilequant.audit.schema import REPORT_SCHEMA

    jsonschema.Draft202012Validator.check_schema(REPORT_SCHEMA)
    jsonschema.validate(json.loads(json.dumps(report)), REPORT_SCHEMA, cls=jsonschema.Draft202012Validator)
