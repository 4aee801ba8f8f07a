"""The architecture is one-directional: each stage imports only from stages before it.

zoo (models, data, weights, train) → capture → fusion → quant → export → runtime → verify → audit → qat
→ api → cli. A module may import its own stage and any earlier one; importing a later stage is a defect.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mobilequant"

# Stage rank of each top-level module/package of mobilequant. Unlisted modules fail the test, so a new
# module has to be placed in the order on purpose.
RANK = {
    "__init__": 0, "errors": 0,
    "models": 1,
    "data": 2, "weights": 2,
    "train": 3,
    "capture": 4,
    "fusion": 5,
    "quant": 6,
    "export": 7,
    "runtime": 8,
    "verify": 9,
    "audit": 10,
    "qat": 11,
    "api": 12,
    "cli": 13, "__main__": 13,
}


def _stage(module_path: Path) -> str:
    rel = module_path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _is_module(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()


def _imported_stages(path: Path) -> set[str]:
    return _stages_in(path.read_text(), path.relative_to(PACKAGE).parts[:-1])


def _stages_in(source: str, own_pkg: tuple[str, ...]) -> set[str]:
    """Top-level mobilequant modules imported by ``source``; ``own_pkg``: its package below mobilequant."""
    tree = ast.parse(source)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.split(".")[0] == "mobilequant":
                    parts = node.module.split(".")[1:]
                    found.add(parts[0] if parts else node.names[0].name)
                continue
            base = list(own_pkg[: max(0, len(own_pkg) - (node.level - 1))])
            parts = base + (node.module.split(".") if node.module else [])
            if parts:
                found.add(parts[0])
            else:  # `from . import x` at package top level: a module, or a name from __init__
                found.update(a.name if _is_module(a.name) else "__init__" for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "mobilequant" and len(parts) > 1:
                    found.add(parts[1])
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_backwards(path):
    stage = _stage(path)
    assert stage in RANK, f"place the new stage {stage!r} in RANK (tests/test_layering.py)"
    for dep in _imported_stages(path):
        assert dep in RANK, f"{path.relative_to(PACKAGE)} imports unknown stage {dep!r}"
        assert RANK[dep] <= RANK[stage], (
            f"{path.relative_to(PACKAGE)} (stage {stage}) imports the later stage {dep!r}")


def test_the_parser_sees_every_import_form():
    """The import parser must find relative and absolute imports (else the test above passes vacuously)."""
    src = ("from ..quant.table import QuantTable\nfrom . import recipes\nfrom .. import errors\n"
           "import mobilequant.runtime.tflite\nfrom mobilequant.models import create_model\n"
           "def f():\n    from ..audit import x\n")
    assert _stages_in(src, ("export",)) == {"quant", "export", "errors", "runtime", "models", "audit"}
    assert _stages_in("from ...models import x\n", ("export", "sub")) == {"models"}
    assert _stages_in("from . import api, __version__\n", ()) == {"api", "__init__"}
