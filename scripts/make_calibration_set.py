#!/usr/bin/env python3
"""Write the calibration subset shipped in the top-level ``calibration/``.

    python scripts/make_calibration_set.py

Reads the Fashion-MNIST training split from the Debian package ``dataset-fashion-mnist`` (or
``$MOBILEQUANT_FASHION_MNIST``), picks ``--count`` images stratified by class with ``--seed``
(:func:`mobilequant.data.stratified_indices`), and writes

* ``fashion-mnist-<count>.npz``: ``images`` (uint8 N×28×28, raw pixels) and ``labels`` (int64), stored
  uncompressed in a zip with fixed timestamps, so the same inputs give a byte-identical file;
* ``fashion-mnist-<count>.json``: the manifest (source, indices, seed, preprocessing, licence, sha256).

Running it again with the same arguments reproduces both files exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mobilequant.data import FASHION_MNIST_CLASSES, load_fashion_mnist, stratified_indices  # noqa: E402
from mobilequant.data.builtin import CALIBRATION_DIR  # noqa: E402
from mobilequant.data.fashion_mnist import fashion_mnist_root  # noqa: E402
from mobilequant.models import FASHION_MNIST  # noqa: E402

DEFAULT_SEED = 0
DEFAULT_COUNT = 512


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed .npz (readable by ``numpy.load``) with fixed zip timestamps: deterministic bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="number of images (default 512)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="selection seed (default 0)")
    parser.add_argument("--root", default=None, help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--out-dir", type=Path, default=CALIBRATION_DIR, help="where to write the files")
    args = parser.parse_args(argv)

    images, labels = load_fashion_mnist("train", args.root)
    indices = stratified_indices(labels, args.count, args.seed)
    subset, sublabels = images[indices], labels[indices]
    stem = f"fashion-mnist-{args.count}"
    blob = npz_bytes({"images": subset, "labels": sublabels})
    root = fashion_mnist_root(args.root)
    source_files = {}
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        p = root / name
        source_files[name] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None

    command = "python scripts/make_calibration_set.py"
    if (args.count, args.seed) != (DEFAULT_COUNT, DEFAULT_SEED):
        command += f" --count {args.count} --seed {args.seed}"
    manifest = {
        "name": stem,
        "file": f"{stem}.npz",
        "sha256": hashlib.sha256(blob).hexdigest(),
        "bytes": len(blob),
        "count": int(args.count),
        "arrays": {"images": f"uint8 {list(subset.shape)}, raw pixels", "labels": f"int64 [{len(sublabels)}]"},
        "source": {
            "dataset": "Fashion-MNIST",
            "split": "train (60,000 images)",
            "url": "https://github.com/zalandoresearch/fashion-mnist",
            "debian_package": "dataset-fashion-mnist",
            "files_sha256": source_files,
        },
        "licence": "MIT",
        "copyright": "Copyright (c) 2017 Zalando SE",
        "selection": {
            "method": "mobilequant.data.stratified_indices: count // 10 per class, the remainder one each to "
                      "the lowest class ids; numpy.random.default_rng(seed).choice per class; sorted",
            "seed": int(args.seed),
            "class_counts": {c: int((sublabels == i).sum()) for i, c in enumerate(FASHION_MNIST_CLASSES)},
        },
        "preprocessing": {
            "stored": "none: raw 28x28 uint8 pixels as in the IDX file",
            "at_load": "mobilequant.data.preprocess_images with the model's PreprocessConfig; for the "
                       "Fashion-MNIST models: zero-pad 2 pixels per side to 32x32, x/255, "
                       f"(x - {FASHION_MNIST.mean[0]}) / {FASHION_MNIST.std[0]}",
        },
        "command": command,
    }
    # Indices on one line: the manifest stays short enough to read.
    text = json.dumps(manifest, indent=1)[:-2] + ',\n "indices": ' + json.dumps([int(i) for i in indices]) + "\n}\n"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out_dir / f"{stem}.npz", blob)
    write_atomic(args.out_dir / f"{stem}.json", text.encode())
    print(f"wrote {args.out_dir / stem}.npz ({len(blob)} bytes, sha256 {manifest['sha256'][:12]}…) and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
