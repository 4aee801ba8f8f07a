#!/usr/bin/env python3
"""QAT vs PTQ vs float on the shipped Fashion-MNIST models, and what QAT costs per step.

    python benchmarks/qat_bench.py                         # full: 60k training images, 1 epoch, 10k test
    python benchmarks/qat_bench.py --schemes "w8a8 per-tensor + CLE" --models shufflenetv2_x0_5
    python benchmarks/qat_bench.py --train-images 2048 --test-images 2000   # a reduced run

For each model (default: MobileNetV2 0.5 and ShuffleNetV2 0.5 with their shipped weights), float top-1,
then for each quantization scheme (``--schemes``):

* ``w8a8 per-channel``, ``w8a8 per-tensor``: PTQ (the default calibration, 512 images) and ≤ 1 epoch of
  QAT from the float weights, judged by the int8 top-1 of the converted graph (the exported model);
* ``w8a8 per-tensor + CLE``: PTQ with CLE, with CLE + bias correction, and QAT from the equalized graph;
* ``w4a8 per-channel``: 4-bit weights / 8-bit activations, PTQ vs QAT, and QAT with the depthwise
  oscillation remedies (dampening, freezing; Nagel et al. 2022) and with learned scales (LSQ);

the 8-bit QAT results exported to tflite-int8 and run in LiteRT (file top-1, top-1 agreement with the
torch int8 graph and with the trained fake-quant graph), and the time of one QAT training step / one
float training step (same batch, same threads, train mode).
QAT: SGD Nesterov, cosine from ``--lr`` (``--lr4`` at 4 bits), BN frozen at half the steps, ranges at
three quarters (``--freeze-observers``), no augmentation; ``--start ptq`` starts from the scheme's PTQ
result, ``--distill W`` adds distillation from the float model.

Accuracies are measured on the first ``--test-images`` of a stratified subset of the 10k test split.
``--weights NAME=PATH`` uses a float state dict instead of the shipped weights (e.g. before they ship).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared machines: idle OpenMP threads sleep

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mobilequant.data import builtin_dataset, calibration_set, stratified_indices  # noqa: E402
from mobilequant.models import FASHION_MNIST, create_model  # noqa: E402
from mobilequant.qat import QATJobConfig, run_qat  # noqa: E402
from mobilequant.qat.graph import build_qat_graph, set_mode  # noqa: E402
from mobilequant.qat.quantizer import qat_quantizer  # noqa: E402
from mobilequant.quant import QuantConfig, quantize  # noqa: E402

DEFAULT_MODELS = ("mobilenetv2_050", "shufflenetv2_x0_5")


def predictions(fn, data, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(data.images[i:i + batch]).argmax(1) for i in range(0, len(data), batch)])


def accuracy(fn, data, batch: int = 500) -> float:
    return float((predictions(fn, data, batch) == data.labels).float().mean())


def file_agreement(result, data) -> tuple[float, float, float]:
    """Export ``result`` to tflite-int8 and run the file in LiteRT: (file top-1, agreement with the torch
    int8 graph, agreement with the trained fake-quant graph)."""
    from mobilequant.export import export
    from mobilequant.runtime import open_runner

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "qat.tflite"
        export(result, "tflite-int8", path, overrides=["verification.enabled=false"])
        runner = open_runner(path)
        pred = torch.cat([torch.from_numpy(runner.run(data.images[i:i + 500])).argmax(1)
                          for i in range(0, len(data), 500)])
    int8, fq = predictions(result.graph, data), predictions(result.prepared, data)
    return (float((pred == data.labels).float().mean()), float((pred == int8).float().mean()),
            float((pred == fq).float().mean()))


def load(name: str, weights: dict[str, str]) -> nn.Module:
    if name in weights:
        model = create_model(name, num_classes=10, in_chans=1)
        model.load_state_dict(torch.load(weights[name], map_location="cpu", weights_only=True))
        model.preprocess = FASHION_MNIST
        return model.eval()
    from mobilequant.weights import default_model

    return default_model(name)


def step_time_ratio(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[float, float]:
    """Seconds per training step: (float eager model, QAT fake-quant graph), SGD, train mode."""
    def timed(net, params) -> float:
        opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
        for i in range(steps + 3):
            if i == 3:
                t0 = time.perf_counter()
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (time.perf_counter() - t0) / steps

    import copy

    float_model = copy.deepcopy(model).train()
    t_float = timed(float_model, float_model.parameters())
    graph = build_qat_graph(model, x[:2], qat_quantizer(QuantConfig()))
    with torch.no_grad():
        graph(x)  # observe once
    set_mode(graph, train=True)
    t_qat = timed(graph, graph.parameters())
    return t_float, t_qat


# Each scheme: (QuantConfig of the QAT job, PTQ rows [(label, QuantConfig)], QAT variants [(label, job options)]).
def _w8_per_channel(args):
    return QuantConfig(), [("PTQ", QuantConfig())], [("QAT", {})]


def _w8_per_tensor(args):
    qc = QuantConfig(per_channel=False)
    return qc, [("PTQ", qc)], [("QAT", {})]


def _w8_per_tensor_cle(args):
    qc = QuantConfig(per_channel=False, cle=True)  # bias correction on, QuantConfig's default
    return qc, [("PTQ", dataclasses.replace(qc, bias_correction=False)), ("PTQ + bias correction", qc)], \
        [("QAT", {})]


def _w4_per_channel(args):
    osc = {"osc_momentum": args.osc_momentum}
    return QuantConfig(weight_bits=4), [("PTQ", QuantConfig(weight_bits=4))], [
        ("QAT", osc),
        ("QAT + osc. dampening", {"osc_dampen": args.osc_dampen, **osc}),
        ("QAT + osc. freezing", {"osc_freeze_threshold": args.osc_threshold, **osc}),
        ("QAT + LSQ", {"learn_scales": True}),
    ]


SCHEMES = {
    "w8a8 per-channel": _w8_per_channel,
    "w8a8 per-tensor": _w8_per_tensor,
    "w8a8 per-tensor + CLE": _w8_per_tensor_cle,
    "w4a8 per-channel": _w4_per_channel,
}


def main(argv: list[str] | None = None) -> int:
    from mobilequant.cli import quiet_library_logs

    quiet_library_logs()  # as the CLI does
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    ap.add_argument("--weights", nargs="*", default=[], metavar="NAME=PATH")
    ap.add_argument("--train-images", type=int, default=60_000, help="QAT training images (≤ 1 epoch)")
    ap.add_argument("--test-images", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4, help="QAT peak learning rate, 8-bit weights")
    ap.add_argument("--lr4", type=float, default=2e-3, help="QAT peak learning rate, 4-bit weights")
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES), metavar="SCHEME",
                    help=f"quantization schemes (default: all of {', '.join(SCHEMES)})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timing-steps", type=int, default=10)
    ap.add_argument("--osc-momentum", type=float, default=0.1,
                    help="EMA momentum of oscillation frequencies (the paper's 0.01 suits long runs)")
    ap.add_argument("--osc-threshold", type=float, default=0.15, help="freeze above this frequency")
    ap.add_argument("--osc-dampen", type=float, default=0.05, help="λ of the dampening loss (step units)")
    ap.add_argument("--skip", nargs="*", default=[], help="variants to skip, e.g. lsq dampen")
    ap.add_argument("--start", nargs="+", choices=("float", "ptq"), default=["float"],
                    help="QAT starts: 'float' (ranges observed on the float model) and / or 'ptq' (from the "
                         "scheme's PTQ result with bias correction: its ranges and corrected biases)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="QAT job seeds (data order): one row each")
    ap.add_argument("--distill", type=float, default=0.0, metavar="W",
                    help="QAT loss: (1 − W)·label CE + W·KL to the float model's predictions (default 0)")
    ap.add_argument("--freeze-observers", type=float, default=0.75, metavar="FRACTION",
                    help="freeze the QAT ranges after this fraction of the steps (0: from the first step)")
    ap.add_argument("--no-export", action="store_true",
                    help="do not export the 8-bit QAT results to tflite-int8 (file top-1 and agreement)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = dict(w.split("=", 1) for w in args.weights)

    full_train = builtin_dataset("fashion-mnist", "train")
    train = full_train.subset(stratified_indices(full_train.labels.numpy(), args.train_images, 0)) \
        if args.train_images < len(full_train) else full_train
    full_test = builtin_dataset("fashion-mnist", "test")
    test = full_test.subset(stratified_indices(full_test.labels.numpy(), args.test_images, 1)) \
        if args.test_images < len(full_test) else full_test
    calib = calibration_set()
    steps = len(train) // args.batch_size
    print(f"QAT: {len(train)} training images, 1 epoch = {steps} steps of {args.batch_size}; "
          f"test: {len(test)} images; {args.threads} threads")

    rows: list[tuple] = []
    timing: list[tuple] = []
    files: list[tuple] = []
    for name in args.models:
        try:
            model = load(name, weights)
        except Exception as e:  # a model without weights is reported, not fatal
            print(f"{name}: skipped ({e})")
            continue
        f_acc = accuracy(model, test)
        rows.append((name, "float", "-", f_acc, 0.0))
        for scheme in args.schemes:
            qc, ptq_rows, variants = SCHEMES[scheme](args)
            for label, ptq_qc in ptq_rows:
                t0 = time.perf_counter()
                ptq = quantize(model, calib.batches(64), ptq_qc)
                rows.append((name, scheme, label, accuracy(ptq.graph, test), time.perf_counter() - t0))
            lr = args.lr4 if qc.weight_bits < 8 else args.lr
            ptq_start = None
            for (label, extra), start, seed in [(v, s, k) for s in args.start for v in variants for k in args.seeds]:
                key = "lsq" if "LSQ" in label else "dampen" if "damp" in label else "freeze" if "freez" in label \
                    else "qat"
                if key in args.skip:
                    continue
                if start == "ptq" and ptq_start is None:  # the PTQ default on the QAT job's scheme: BC on
                    ptq_start = quantize(model, calib.batches(64), dataclasses.replace(qc, bias_correction=True))
                with tempfile.TemporaryDirectory() as out:
                    cfg = QATJobConfig(model=name, out_dir=out, epochs=1, batch_size=args.batch_size, lr=lr,
                                       quant=qc, freeze_bn_step=steps // 2,
                                       freeze_observer_step=int(args.freeze_observers * steps), start=start,
                                       augment=False, ckpt_every=max(steps, 1), threads=args.threads,
                                       progress=False, val_data=None, distill=args.distill, seed=seed, **extra)
                    t0 = time.perf_counter()
                    result = run_qat(cfg, model=model, train_data=train, val_data=None,
                                     ptq_result=ptq_start if start == "ptq" else None)
                    seconds = time.perf_counter() - t0
                label = label if start == "float" else f"{label} from PTQ"
                label = label if not args.distill else f"{label} + KD {args.distill:g}"
                label = label if args.seeds == [0] else f"{label}, seed {seed}"
                row = (name, scheme, f"{label}, lr {lr:g}", accuracy(result.graph, test), seconds)
                if qc.weight_bits < 8:
                    row += (result.history[-1]["osc_freq"], result.history[-1]["osc_frozen"])
                rows.append(row)
                print(f"  {name} {scheme} {row[2]}: {row[3] * 100:.2f} % ({seconds:.0f} s)", flush=True)
                if qc.weight_bits == 8 and not args.no_export:
                    files.append((name, scheme, row[2], *file_agreement(result, test)))
        x, y = train.images[:args.batch_size], train.labels[:args.batch_size]
        t_float, t_qat = step_time_ratio(model, x, y, args.timing_steps)
        timing.append((name, t_float, t_qat))

    print()
    print(f"{'model':<20} {'scheme':<22} {'method':<38} {'top-1':>7} {'Δ float':>8} {'time':>7}  osc. (freq / frozen)")
    floats = {r[0]: r[3] for r in rows if r[1] == "float"}
    for r in rows:
        osc = f"  {r[5]:.1e} / {r[6] * 100:.3f} %" if len(r) > 5 else ""
        delta = "" if r[1] == "float" else f"{(r[3] - floats[r[0]]) * 100:+.2f}"
        spent = "" if r[1] == "float" else f"{r[4]:.0f} s"
        print(f"{r[0]:<20} {r[1]:<22} {r[2]:<38} {r[3] * 100:6.2f}% {delta:>8} {spent:>7}{osc}")
    if files:
        print()
        print(f"{'model':<20} {'scheme':<22} {'method':<38} {'file top-1':>10} {'agree int8':>10} "
              f"{'agree fake-quant':>16}   (the exported tflite-int8 in LiteRT vs the torch QAT result)")
        for r in files:
            print(f"{r[0]:<20} {r[1]:<22} {r[2]:<38} {r[3] * 100:9.2f}% {r[4] * 100:9.2f}% {r[5] * 100:15.2f}%")
    print()
    print(f"{'model':<20} {'float step':>11} {'QAT step':>10} {'ratio':>6}   (batch {args.batch_size}, "
          f"{args.threads} threads)")
    for name, tf, tq in timing:
        print(f"{name:<20} {tf * 1000:9.1f}ms {tq * 1000:8.1f}ms {tq / tf:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
