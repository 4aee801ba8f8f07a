"""The command line shared by the doc generators: write the file, or ``--check`` that it is current."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable


def doc_main(doc: Path, render: Callable[[], str], description: str, script: str,
             argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=description)
    args.add_argument("--check", action="store_true", help=f"exit 1 if {doc.name} is stale")
    ns = args.parse_args(argv)
    text = render()
    if ns.check:
        if not doc.is_file() or doc.read_text() != text:
            print(f"{doc} is stale: run python scripts/{script}", file=sys.stderr)
            return 1
        return 0
    doc.write_text(text)
    print(f"wrote {doc}")
    return 0
