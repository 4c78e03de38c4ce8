#!/usr/bin/env bash
# Time-to-accuracy of the fast recipes against the tutorial CNN and airbench94, in one run on CIFAR-10's original
# pixels: the run behind a machine kind's rows in BENCHMARKS.md. Three seeds where a figure is judged over seeds
# (fast70, fast94, and airbench94: the port's check against its published 94.01%), one for the others.
# Usage: benchmarks/time_to_accuracy.sh [extra cnnlab bench flags, e.g. --json --out runs/speed3]
set -euo pipefail
cd "$(dirname "$0")/.."
data=../shared/data/cifar10-png.tar.gz
if [ ! -f "$data" ]; then
    echo "skipped: $data not found (the shared copy of CIFAR-10's original pixels)"
    exit 0
fi
exec .venv/bin/cnnlab bench --data "$data" --recipe fast70:3,fast90,fast94:3 --compare tutorial-cnn,airbench94:3 "$@"
