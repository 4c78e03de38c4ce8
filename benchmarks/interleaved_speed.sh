#!/usr/bin/env bash
# Before/after training speed of a change, interleaved: each round trains the same recipes with an older commit's
# code, then with this checkout's, back to back on this machine, and prints training seconds (from metrics.jsonl,
# so without evaluation), delivered accuracy and wall seconds.
#
#   bash benchmarks/interleaved_speed.sh OLD_COMMIT [DATA] [ROUNDS]
#   bash benchmarks/interleaved_speed.sh 46166ff ../shared/data/cifar10-png.tar.gz 3
set -euo pipefail
cd "$(dirname "$0")/.."
old=${1:?usage: interleaved_speed.sh OLD_COMMIT [DATA] [ROUNDS]}
data=${2:-../shared/data/cifar10-png.tar.gz}
rounds=${3:-3}
scratch=$(mktemp -d)
trap 'git worktree remove --force "$scratch/old" >/dev/null 2>&1 || true; rm -rf "$scratch"' EXIT
git worktree add --detach "$scratch/old" "$old" >/dev/null
for round in $(seq "$rounds"); do
  for tree in "$scratch/old" "$PWD"; do
    for run in "fast70" "tutorial-cnn --epochs 1"; do
      recipe=${run%% *}
      out="$scratch/run-$round-$(basename "$tree")-$recipe"
      start=$(date +%s.%N)
      # shellcheck disable=SC2086  # $run carries the recipe and its flags
      PYTHONPATH="$tree/src" .venv/bin/python -m cnnlab train --recipe $run --data "$data" --seed 0 --out "$out" \
        -q --no-report >/dev/null
      wall=$(echo "$(date +%s.%N) - $start" | bc)
      .venv/bin/python - "$out" "$round" "$([ "$tree" = "$PWD" ] && echo after || echo before)" "$recipe" "$wall" <<'PY'
import json, sys
out, round_, side, recipe, wall = sys.argv[1:]
history = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
last = history[-1]  # delivered accuracy, by the name of the release that wrote it
names = ("test_delivered_accuracy", "test_delivered_acc", "test_acc_tta", "test_acc")
accuracy = next(last[name] for name in names if name in last)
print(f"round {round_} {side:6} {recipe:12} train {sum(m['seconds'] for m in history):6.2f} s  "
      f"accuracy {accuracy:.4f}  wall {float(wall):6.1f} s")
PY
    done
  done
done
