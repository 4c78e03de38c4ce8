#!/usr/bin/env bash
# Time-to-accuracy of the fast recipes against the tutorial CNN and airbench94, in one run on real CIFAR-10:
# the run behind a machine kind's rows in BENCHMARKS.md.
# Usage: benchmarks/time_to_accuracy.sh [extra cnnlab bench flags, e.g. --seeds 3 --json]
set -euo pipefail
cd "$(dirname "$0")/.."
data=../shared/data/cifar10-png.tar.gz
if [ ! -f "$data" ]; then
    echo "skipped: $data not found (the shared copy of CIFAR-10's original pixels)"
    exit 0
fi
exec .venv/bin/cnnlab bench --data "$data" --recipe fast70,fast90,fast94 --compare tutorial-cnn,airbench94 "$@"
