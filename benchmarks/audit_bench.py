"""Benchmark: full audit of the default MobileNetV2 int8 TFLite on 1,000 Fashion-MNIST test images.

    python benchmarks/audit_bench.py                       # quantize + export the default model, then audit
    python benchmarks/audit_bench.py --artifact out/m.tflite --images 1000 --repeat 3

Budget (issue "Accuracy audit"): < 60 s wall on 2 cores, per-layer checks included. The script prints
the audit's own phase timings, wall and CPU time, and exits 1 when the median wall time is over
``--budget``. Preparing the artifact (quantize + export) is not part of the measured time. Pin the
process to two cores to measure the budget on a bigger machine: ``taskset -c 0,1 python ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _artifact(tmp: Path) -> Path:
    from mobilequant.data import calibration_set
    from mobilequant.export import export
    from mobilequant.quant import QuantConfig, quantize
    from mobilequant.weights import default_model

    model = default_model()
    cal = calibration_set(cfg=model.preprocess)
    qr = quantize(model, (cal.images[i:i + 64] for i in range(0, len(cal), 64)), QuantConfig())
    from mobilequant.errors import CheckFailed

    try:
        return export(qr, "tflite-int8", tmp / "mobilenetv2_050-int8.tflite", verify_data=cal).path
    except CheckFailed as e:  # the file is written either way; auditing it is the point
        print(f"note: {e}")
        return e.artifact.path


def main(argv: list[str] | None = None) -> int:
    from mobilequant.cli import quiet_library_logs

    quiet_library_logs()  # as the CLI does
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", default=None, help="audit this file instead of exporting the default model")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch / LiteRT threads used by the audit")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds (median wall time)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    from mobilequant.audit import run_audit
    from mobilequant.data import builtin_dataset
    from mobilequant.weights import default_model

    model = default_model()
    data = builtin_dataset("fashion-mnist", "test", model.preprocess)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.artifact) if args.artifact else _artifact(Path(tmp))
        runs = []
        for k in range(args.repeat):
            wall, cpu = time.perf_counter(), time.process_time()
            report = run_audit(path, data, model=model, images=args.images, num_threads=args.threads,
                               progress=False)
            runs.append({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                         "phases_s": report.timings_s})
            print(f"run {k + 1}: wall {runs[-1]['wall_s']:.1f} s, cpu {runs[-1]['cpu_s']:.1f} s, "
                  f"{len(report.layers)} layers, verdict {report.verdict}; phases "
                  + ", ".join(f"{n} {v:.2f}" for n, v in report.timings_s.items()))
    med = statistics.median(r["wall_s"] for r in runs)
    figures = {"images": args.images, "layers": len(report.layers), "median_wall_s": med,
               "median_cpu_s": statistics.median(r["cpu_s"] for r in runs), "cpus": os.cpu_count(),
               "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
               "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "runs": runs}
    print(f"median wall {med:.1f} s for {args.images} images (budget {args.budget:g} s) on "
          f"{figures['affinity']} usable cores, load average {figures['load_avg']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0 if med < args.budget else 1


if __name__ == "__main__":
    sys.exit(main())
