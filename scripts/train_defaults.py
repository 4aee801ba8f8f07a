#!/usr/bin/env python3
"""Train the shipped Fashion-MNIST checkpoints (``mobilequant/weights/``), one model after another.

    python scripts/train_defaults.py                      # every model in RECIPES
    python scripts/train_defaults.py mobilenetv2_050      # just one (its manifest entry is replaced)

Each model is built with ``torch.manual_seed(seed)`` and trained by
:func:`mobilequant.train.train_classifier` on the 60k training split (Debian package
``dataset-fashion-mnist``), preprocessed with ``FASHION_MNIST`` (28×28 grey, zero-padded to 32×32).
Written per model: ``<name>_fashion_mnist.pt`` (float32 ``state_dict``) and its entry in
``manifest.json`` (kwargs, preprocessing, top-1 on the full 10k test split, params, mult-adds, recipe,
sha256, and the command that reproduces it). Training is deterministic for a given machine and thread
count; another CPU may give slightly different weights (and accuracy within a few tenths of a point).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Must precede the OpenMP runtime start (torch import): on a shared machine, waiting threads that spin
# instead of sleeping make training several times slower. It does not change any result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mobilequant.data import builtin_dataset  # noqa: E402
from mobilequant.models import FASHION_MNIST, create_model  # noqa: E402
from mobilequant.train import evaluate, train_classifier  # noqa: E402
from mobilequant.weights import WEIGHTS_DIR, weights_table_markdown  # noqa: E402

# name → create_model kwargs beyond num_classes / in_chans, and train_classifier arguments beyond TRAIN.
# Epochs: about 12 CPU-minutes each (about 6 minutes on 2 free cores), for >= 90 % top-1 with margin.
RECIPES: dict[str, dict] = {
    "mobilenetv2_050": {"kwargs": {}, "train": {"epochs": 12, "lr": 0.05}},
    "mobilenetv1_050": {"kwargs": {}, "train": {"epochs": 14, "lr": 0.05}},
    # MobileNetV3-Small at width 0.75: at 1.0 its 1,024-wide head makes a 6.1 MB checkpoint (limit 5 MB).
    "mobilenetv3_small_075": {"kwargs": {}, "train": {"epochs": 16, "lr": 0.05}},
    "shufflenetv1_g3": {"kwargs": {}, "train": {"epochs": 10, "lr": 0.05}},
    "shufflenetv2_x0_5": {"kwargs": {}, "train": {"epochs": 20, "lr": 0.05}},
    # No BatchNorm: with SGD (peak 0.02 or 0.05) every ReLU died within an epoch; AdamW trains it.
    "squeezenet1_1": {"kwargs": {}, "train": {"epochs": 30, "lr": 1e-3, "optimizer": "adamw", "weight_decay": 0.05}},
}
# train_classifier arguments shared by every recipe.
TRAIN = {"batch_size": 128, "seed": 0, "optimizer": "sgd", "weight_decay": 5e-5, "label_smoothing": 0.1,
         "crop_padding": 0, "hflip": True, "threads": 2, "precise_bn_images": 10_000}
DOC_START, DOC_END = "<!-- weights-table:start -->", "<!-- weights-table:end -->"


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def madds_at_32(model: torch.nn.Module) -> int | None:
    try:
        from mobilequant.models import count_madds
    except ImportError:
        return None
    return int(count_madds(model, (1, 32, 32)))


def train_one(name: str, recipe: dict, train, test, progress: bool) -> dict:
    kwargs = {"num_classes": 10, "in_chans": 1, **recipe["kwargs"]}
    train_kwargs = {**TRAIN, **recipe["train"]}
    torch.manual_seed(train_kwargs["seed"])
    model = create_model(name, **kwargs, preprocess=FASHION_MNIST)
    print(f"== {name} {kwargs}: {train_kwargs}", flush=True)
    # The test split is evaluated after each epoch for the log only; the last epoch's weights are kept.
    cpu_start = time.process_time()
    history = train_classifier(model, train, **train_kwargs, eval_data=test, progress=progress)
    cpu_seconds = time.process_time() - cpu_start  # with the per-epoch evaluations
    seconds = history.seconds  # wall clock, training only: depends on what else the machine runs
    accuracy = evaluate(model, test, threads=train_kwargs["threads"])
    state = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    blob = buf.getvalue()
    file = f"{name}_fashion_mnist.pt"
    write_atomic(WEIGHTS_DIR / file, blob)
    print(f"   {name}: top-1 {accuracy * 100:.2f} % on the 10k test split, {seconds:.0f} s, "
          f"{len(blob) / 1e6:.2f} MB", flush=True)
    return {
        "model": name,
        "kwargs": kwargs,
        "preprocess": dataclasses.asdict(FASHION_MNIST),
        "file": file,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "bytes": len(blob),
        "test_top1": round(accuracy * 100, 2),
        "params": sum(p.numel() for p in model.parameters()),
        "madds_1x32x32": madds_at_32(model),
        "epochs": train_kwargs["epochs"],
        "train_classifier": train_kwargs,
        "recipe": "mobilequant.train.train_classifier: one-cycle lr (15 % warm-up, cosine), no weight decay on "
                  "1-D params, label smoothing, flips, precise-BN statistics at the end",
        "train_seconds": round(seconds),
        "train_cpu_seconds": round(cpu_seconds),
        "torch": torch.__version__,
        "command": f"python scripts/train_defaults.py {name}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"models to train (default: all of {', '.join(RECIPES)})")
    parser.add_argument("--no-progress", action="store_true", help="no per-batch progress bar")
    parser.add_argument("--update-doc", type=Path, metavar="MD",
                        help="rewrite the weights table between the weights-table markers of MD, and exit")
    args = parser.parse_args(argv)
    if args.update_doc:
        text = args.update_doc.read_text()
        start, end = text.index(DOC_START), text.index(DOC_END)
        text = text[:start + len(DOC_START)] + "\n" + weights_table_markdown() + "\n" + text[end:]
        write_atomic(args.update_doc, text.encode())
        return 0
    unknown = [n for n in args.names if n not in RECIPES]
    if unknown:
        parser.error(f"no recipe for {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    names = args.names or list(RECIPES)

    train = builtin_dataset("fashion-mnist", "train", FASHION_MNIST)
    test = builtin_dataset("fashion-mnist", "test", FASHION_MNIST)
    manifest_path = WEIGHTS_DIR / "manifest.json"
    for name in names:
        entry = train_one(name, RECIPES[name], train, test, progress=not args.no_progress)
        # Re-read and update one entry at a time, so an interrupted run keeps what it finished.
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        manifest.setdefault("dataset", "Fashion-MNIST (Debian package dataset-fashion-mnist), MIT licence")
        manifest.setdefault("evaluation", "top-1 % on the full 10,000-image test split")
        manifest.setdefault("default", "mobilenetv2_050")
        manifest.setdefault("weights", {})[name] = entry
        manifest["weights"] = dict(sorted(manifest["weights"].items()))
        write_atomic(manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
