"""Interleaved single-image latency of two or more model files (A/B), for ratios that load cannot skew.

    nice -n 19 python benchmarks/latency_ab.py A.tflite B.tflite [C ...] --rounds 20 --runs 50

``benchmarks/compare.py`` times each file once, minutes apart; on a shared machine another process can
start in between. Here every file is loaded once and timed in turns (round 1: A, B, …; round 2: B, …, A;
the order rotates), ``--runs`` calls per turn, one thread (``mobilequant.runtime.bench.measure_latency``'s
settings: LiteRT + XNNPACK / ORT ``intra_op_num_threads=1``). Prints the median of all calls, the minimum,
and each file's ratio to the first file.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

if importlib.util.find_spec("mobilequant") is None:  # run from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _invoker(path: Path, threads: int):
    import numpy as np

    from mobilequant.runtime import OrtRunner, TFLiteRunner, open_runner

    runner = open_runner(path, num_threads=threads)
    rng = np.random.default_rng(0)
    if isinstance(runner, TFLiteRunner):
        inp = runner.input
        x = rng.standard_normal(inp.shape).astype(np.float32)
        if np.dtype(inp.dtype) != np.float32:
            x = np.clip(np.round(x * 30), -128, 127).astype(inp.dtype)
        runner.interpreter.set_tensor(inp.index, x)
        return runner.interpreter.invoke
    assert isinstance(runner, OrtRunner)
    node = runner.input
    shape = [d if isinstance(d, int) else 1 for d in node.shape]
    dtype = np.float16 if "float16" in node.type else np.float32
    feed = {node.name: rng.standard_normal(shape).astype(dtype)}
    return lambda: runner.session.run(None, feed)


def main(argv: list[str] | None = None) -> int:
    from mobilequant.cli import quiet_library_logs

    quiet_library_logs()  # as the CLI does
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--runs", type=int, default=50, help="timed calls per file per round")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    from mobilequant.errors import MobileQuantError

    try:
        calls = [_invoker(f, args.threads) for f in args.files]
    except MobileQuantError as e:  # a missing or unreadable file: one line, as the CLI says it
        ap.error(str(e))
    for call in calls:
        for _ in range(args.warmup):
            call()
    times: list[list[float]] = [[] for _ in calls]
    for r in range(args.rounds):
        for k in range(len(calls)):
            i = (k + r) % len(calls)
            for _ in range(args.runs):
                t = time.perf_counter()
                calls[i]()
                times[i].append((time.perf_counter() - t) * 1e3)
    med = [float(np.median(t)) for t in times]
    low = [float(np.min(t)) for t in times]
    print("| file | median ms | min ms | median / first | min / first |")
    print("|---|---:|---:|---:|---:|")
    for f, m, lo in zip(args.files, med, low):
        print(f"| {f} | {m:.3f} | {lo:.3f} | {m / med[0]:.2f} | {lo / low[0]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
