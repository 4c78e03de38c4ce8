#!/usr/bin/env bash
# The GPU path in one run (about 5 minutes on one H100): the model, training and export tests on CUDA,
# `cnnlab bench` of fast94 against the airbench94 recipe on CIFAR-10 with and without torch.compile
# (time to 90/93/94% in the same run), and a one-process torchrun job on nccl.
#
# Here, first:  benchmarks/gpu.sh --prepare
#   copies the CIFAR-10 archive (original pixels, PNG) into .gpu/ and downloads, into .gpu/wheels, the pure-Python packages
#   that the GPU machine's Python 3.12 image lacks (it has torch, numpy, scikit-learn, matplotlib, ...).
# There:        benchmarks/gpu.sh                      (device tool: carry .gpu)
# Dry run here: benchmarks/gpu.sh --device cpu --epochs 0.05
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda
epochs=""
prepare=0
while [ $# -gt 0 ]; do
    case "$1" in
        --prepare) prepare=1 ;;
        --device) device="$2"; shift ;;
        --epochs) epochs="$2"; shift ;;
        *) echo "usage: benchmarks/gpu.sh [--prepare] [--device cuda|cpu] [--epochs N]" >&2; exit 2 ;;
    esac
    shift
done

if [ "$prepare" = 1 ]; then
    mkdir -p .gpu/wheels
    cp ../shared/data/cifar10-png.tar.gz .gpu/
    # What `cnnlab` imports beyond the GPU image (see the device tool's KINDS.md), at this venv's versions.
    for name in tomli-w fastapi starlette pydantic pydantic-core annotated-types typing-inspection uvicorn \
        python-multipart; do
        version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))")
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .gpu/wheels "$name==$version"
    done
    du -sh .gpu
    exit 0
fi

if [ -x .venv/bin/python ]; then
    python=.venv/bin/python
else  # the GPU machine: its python3 holds torch; cnnlab runs from src/ with the carried wheels beside it
    python=python3
    $python -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/cnnlab-site .gpu/wheels/*.whl
    export PYTHONPATH="$PWD/src:/tmp/cnnlab-site"
fi
data=.gpu/cifar10-png.tar.gz
[ -f "$data" ] || data=../shared/data/cifar10-png.tar.gz
out=/tmp/cnnlab-gpu  # run folders; the two bench summaries are also copied to $OUT, where the device tool sets it
rm -rf "$out" && mkdir -p "$out"
export PYTHONUNBUFFERED=1
epochs_flag=()
[ -n "$epochs" ] && epochs_flag=(--epochs "$epochs")

echo "== machine"
$python -c "import torch; from cnnlab.machine import this_machine; print('torch', torch.__version__); print(this_machine().describe())"
[ "$device" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== tests (device auto: CUDA where present)"
$python -m pytest -q -x -p no:cacheprovider tests/test_models.py tests/test_train.py tests/test_speed.py \
    tests/test_machine.py -k "not chromium and not load_1000" 2>&1 | tail -15 || echo "== tests failed; the benches run anyway"

echo "== bench: fast94 against airbench94, eager"
$python -m cnnlab bench --data "$data" --device "$device" --recipe fast94 --compare airbench94 \
    "${epochs_flag[@]}" --out "$out/eager" --json > "$out/eager.json"
echo "== bench: the same with torch.compile"
compile_args="--compile"
$python -m cnnlab bench --data "$data" --device "$device" --recipe fast94 --compare airbench94 \
    "${epochs_flag[@]}" --train-args "$compile_args" --out "$out/compiled" --json > "$out/compiled.json"
$python - "$out/eager.json" "$out/compiled.json" <<'EOF'
import json
import sys

for path in sys.argv[1:]:
    summary = json.load(open(path))
    for result in summary["results"]:
        marks = "  ".join(f"{float(m):.0%}@{'-' if s is None else f'{s:.1f}s'}" for m, s in result["time_to"].items())
        print(
            f"{path.split('/')[-1]:>14} {result['recipe']:>10}: {result['accuracy']:.2%} (epoch {result['kept_epoch']})"
            f" in {result['train_seconds']:.1f}s ({result['precision']}, {result['images_per_s']:,.0f} img/s)  {marks}"
        )
EOF

[ -n "${OUT:-}" ] && cp "$out/eager.json" "$out/compiled.json" "$OUT/"

echo "== torchrun, one process ($([ "$device" = cuda ] && echo nccl || echo gloo))"
$python -m torch.distributed.run --standalone --nproc-per-node=1 -m cnnlab train --recipe fast94 --data "$data" \
    --device "$device" --epochs "${epochs:-1}" --out "$out/torchrun" --no-report -q
