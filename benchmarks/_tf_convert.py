"""The TensorFlow Lite converter route (a baseline for benchmarks/compare.py), run as its own process.

    python benchmarks/_tf_convert.py --onnx m.onnx --calibration calib.npy --input-shape 1,1,32,32 \
        --out-dir DIR --json result.json

fp32 ONNX → onnx2tf (NCHW → NHWC SavedModel; onnxsim first when it is installed, as onnx2tf does by
default) → ``tf.lite.TFLiteConverter.from_saved_model`` with ``representative_dataset`` over the given
calibration images, ``TFLITE_BUILTINS_INT8``, int8 input and output: per-channel weights (the converter's
default) and per-tensor weights (``converter._experimental_disable_per_channel = True``). Also keeps
onnx2tf's own float32 ``.tflite`` as the route's float reference.

A separate process: TensorFlow and onnx2tf hold global state (threads, logging, the working directory
onnx2tf reads its sample-data file from) that must not leak into the measuring process. Writes a JSON
with the files and the seconds each step took.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

# onnx2tf downloads "calibration_image_sample_data_20x128x128x3_float32.npy" from the internet for its
# own output check of 3-channel models unless a file of that name is in the working directory; there is
# no internet here, so we write one from our calibration images (it is only used for onnx2tf's check).
ONNX2TF_SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"


def _sample_file(calib_nhwc, workdir: Path) -> None:
    import numpy as np
    import tensorflow as tf

    x = calib_nhwc[:20]
    if x.shape[-1] != 3:
        x = np.repeat(x[..., :1], 3, axis=-1)
    x = tf.image.resize(x, (128, 128)).numpy()
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-6)  # onnx2tf expects [0, 1] images there
    np.save(workdir / ONNX2TF_SAMPLE_FILE, x.astype(np.float32))


def convert(onnx_path: Path, calibration: Path, input_shape: list[int], out_dir: Path) -> dict:
    import numpy as np

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import onnx
    import onnx2tf
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "onnx2tf"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    calib_nchw = np.load(calibration)
    calib = np.ascontiguousarray(calib_nchw.transpose(0, 2, 3, 1)).astype(np.float32)  # onnx2tf makes NHWC inputs
    _sample_file(calib, work)
    local = work / "model.onnx"  # onnx2tf / onnxsim rewrite their input file in place: give them a copy
    shutil.copyfile(onnx_path, local)
    input_name = onnx.load(str(local)).graph.input[0].name
    result: dict = {"files": {}, "seconds": {}}
    cwd = os.getcwd()
    os.chdir(work)
    # onnxsim runs as a subprocess "onnxsim" found on PATH: the one installed next to this interpreter
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    try:
        t = time.perf_counter()
        # A static input shape: with the exporter's dynamic batch dimension onnx2tf's layout tracking
        # mis-transposes the first residual Add (measured on MobileNetV2 0.5, onnx2tf 1.29.24).
        onnx2tf.convert(input_onnx_file_path=str(local), output_folder_path=str(work / "saved_model"),
                        overwrite_input_shape=[f"{input_name}:{','.join(map(str, input_shape))}"],
                        non_verbose=True)
        result["seconds"]["onnx2tf"] = time.perf_counter() - t
    finally:
        os.chdir(cwd)
    fp32 = work / "saved_model" / "model_float32.tflite"
    if fp32.is_file():
        dst = out_dir / "tf-fp32.tflite"
        shutil.copyfile(fp32, dst)
        result["files"]["fp32"] = str(dst)

    def representative_dataset():
        for i in range(len(calib)):
            yield [calib[i:i + 1]]

    for granularity in ("per_channel", "per_tensor"):
        t = time.perf_counter()
        converter = tf.lite.TFLiteConverter.from_saved_model(str(work / "saved_model"))
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        if granularity == "per_tensor":
            converter._experimental_disable_per_channel = True  # the converter's only per-tensor switch
        data = converter.convert()
        result["seconds"][granularity] = time.perf_counter() - t
        dst = out_dir / f"tf-int8-{granularity}.tflite"
        dst.write_bytes(data)
        result["files"][granularity] = str(dst)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True, type=Path)
    ap.add_argument("--calibration", required=True, type=Path, help=".npy of float32 NCHW calibration images")
    ap.add_argument("--input-shape", required=True, help="N,C,H,W of the ONNX input, e.g. 1,1,32,32")
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument("--json", required=True, type=Path)
    args = ap.parse_args(argv)
    result = convert(args.onnx, args.calibration, [int(v) for v in args.input_shape.split(",")], args.out_dir)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
