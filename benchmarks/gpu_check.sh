#!/usr/bin/env bash
# One-GPU first-contact check (~7-8 minutes on one H100/H200; each part under its own `timeout`): the device and its
# peak; 20-step tiny runs (MAE bf16, MAE fp16, SplitMask pixels and k-means, MAE compiled), each stopped by SIGTERM
# after step 11 and resumed, matching the uninterrupted run; a one-rank NCCL FSDP2 step with its dtypes, a DCP save and
# load and a model.pt export reloaded; LiT under FSDP2; a ViT-B/16 MAE through `parallelize` on one rank (FSDP2, bf16),
# eager and compiled per block with activation checkpointing none / full / selective (losses, compile s, peak memory); MAE train-step images/s, MFU and peak memory for ViT-B/16,
# L/16 and H/14 at bf16, compile off and on (benchmarks/mae_throughput.py); the loader with pinned memory; a ViT-L/16 MAE's
# checkpoint blocking the loop, synchronous against asynchronous (benchmarks/checkpoint_async.py).
# Prints one table and writes a JSON.
#
#   bash benchmarks/gpu_check.sh                        # on a GPU machine, after `make install` (README)
#   bash benchmarks/gpu_check.sh --cpu-smoke            # the tiny parts on the CPU (what the tests run)
#   bash benchmarks/gpu_check.sh --dry-run              # print the parts, their commands and timeouts; run nothing
#   options: --json FILE (default gpu_check.json) --python PY (default .venv/bin/python) --only a,b (part names)
#            --steps N --warmup N (throughput, default 10 / 3) --keep (keep the log folder)
#            --budget S (default 540 s, 900 s with --cpu-smoke: a part gets at most what is left of it; parts that no longer fit are skipped)
set -u -o pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
JSON=gpu_check.json
MODE=gpu
ONLY=""
STEPS=10
WARMUP=3
KEEP=0
DRY=0
BUDGET=
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) MODE=cpu ;;
    --dry-run) DRY=1 ;;
    --json) JSON="$2"; shift ;;
    --python) PY="$2"; shift ;;
    --only) ONLY="$2"; shift ;;
    --steps) STEPS="$2"; shift ;;
    --warmup) WARMUP="$2"; shift ;;
    --keep) KEEP=1 ;;
    --budget) BUDGET="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -z "$BUDGET" ] && { [ "$MODE" = gpu ] && BUDGET=540 || BUDGET=900; }
case "$STEPS$WARMUP$BUDGET" in *[!0-9]*|"") echo "gpu_check.sh: --steps, --warmup and --budget take whole numbers" >&2; exit 2 ;; esac
if [ "$DRY" = 0 ] && [ ! -x "$PY" ]; then
  echo "gpu_check.sh: no python at $PY: run 'make install' first (README), or pass --python" >&2; exit 2
fi

# name | timeout (s) | command ("@LOG" is replaced by the part's log file)
CHECK="benchmarks/gpu_check.py"
if [ "$MODE" = gpu ]; then
  DEV="--device cuda"
  THR="--precision bf16 --device cuda --ours-only --steps $STEPS --warmup $WARMUP"
  PARTS=(
    "device|60|$PY $CHECK device"
    "tiny-mae-bf16|90|$PY $CHECK tiny --objective mae --precision bf16 $DEV"
    "tiny-mae-fp16|90|$PY $CHECK tiny --objective mae --precision fp16 $DEV"
    "tiny-splitmask-pixels|90|$PY $CHECK tiny --objective splitmask --target pixels --precision bf16 $DEV"
    "tiny-splitmask-kmeans|90|$PY $CHECK tiny --objective splitmask --target kmeans --precision bf16 $DEV"
    "tiny-mae-compiled|180|$PY $CHECK tiny --objective mae --precision bf16 --compile $DEV"
    "fsdp|90|$PY $CHECK fsdp $DEV"
    "lit-fsdp|90|$PY $CHECK lit-fsdp $DEV"
    "parallel|240|$PY $CHECK parallel $DEV"
    "loader-pinned|90|$PY $CHECK loader $DEV"
    "async-checkpoint|150|$PY $CHECK async-checkpoint $DEV"
    "mae-vit_b16|90|$PY benchmarks/mae_throughput.py --model vit_b16 $THR"
    "mae-vit_b16-compiled|150|$PY benchmarks/mae_throughput.py --model vit_b16 --compile $THR"
    "mae-vit_l16|90|$PY benchmarks/mae_throughput.py --model vit_l16 $THR"
    "mae-vit_l16-compiled|180|$PY benchmarks/mae_throughput.py --model vit_l16 --compile $THR"
    "mae-vit_h14|120|$PY benchmarks/mae_throughput.py --model vit_h14 $THR"
    "mae-vit_h14-compiled|210|$PY benchmarks/mae_throughput.py --model vit_h14 --compile $THR"
  )
else
  DEV="--device cpu"
  PARTS=(
    "device|60|$PY $CHECK device"
    "tiny-mae-fp32|120|$PY $CHECK tiny --objective mae --precision fp32 --steps 6 $DEV"
    "tiny-splitmask-kmeans|300|$PY $CHECK tiny --objective splitmask --target kmeans --precision fp32 --steps 6 $DEV"
    "fsdp|120|$PY $CHECK fsdp $DEV"
    "lit-fsdp|120|$PY $CHECK lit-fsdp $DEV"
    "parallel|300|$PY $CHECK parallel $DEV --preset tiny --batch 8 --precision fp32 --backend aot_eager --steps 2 --tolerance 1e-5"
    "mae-tiny|120|$PY benchmarks/mae_throughput.py --model tiny --precision fp32 --device cpu --ours-only --steps 2 --warmup 1 --matmul-size 256"
    "loader|120|$PY $CHECK loader $DEV --images 256 --workers 0"
    "async-checkpoint|120|$PY $CHECK async-checkpoint $DEV --preset tiny --rounds 2 --batch 2"
  )
fi

selected() { [ -z "$ONLY" ] && return 0; case ",$ONLY," in *",$1,"*) return 0 ;; esac; return 1; }
if [ -n "$ONLY" ]; then           # every name given must be a part of this mode
  for want in ${ONLY//,/ }; do
    found=0; for spec in "${PARTS[@]}"; do [ "${spec%%|*}" = "$want" ] && found=1; done
    if [ "$found" = 0 ]; then
      echo "gpu_check.sh: --only: no part '$want' in the $MODE check; parts: $(for s in "${PARTS[@]}"; do printf '%s ' "${s%%|*}"; done)" >&2
      exit 2
    fi
  done
fi

if [ "$DRY" = 1 ]; then
  total=0
  for spec in "${PARTS[@]}"; do
    IFS='|' read -r name limit cmd <<< "$spec"
    selected "$name" || continue
    total=$((total + limit))
    printf '%-24s timeout %4ss  %s\n' "$name" "$limit" "$cmd"
  done
  echo "at most ${total}s of timeouts in all; the run stops at --budget ${BUDGET}s (parts that no longer fit are skipped)"
  exit 0
fi

LOGS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
RESULTS="$LOGS/results.jsonl"
: > "$RESULTS"
export PYTHONUNBUFFERED=1
began=$(date +%s)
for spec in "${PARTS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$spec"
  selected "$name" || continue
  log="$LOGS/$name.log"
  left=$((BUDGET - ($(date +%s) - began)))
  if [ "$left" -lt 20 ]; then
    "$PY" -c 'import json, sys; print(json.dumps({"part": sys.argv[1], "name": sys.argv[1], "ok": False, "status": "skipped", "error": "over --budget"}))' "$name" >> "$RESULTS"
    echo "== $name: skipped (the --budget of ${BUDGET}s is spent)"; continue
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (timeout ${limit}s)"
  start=$(date +%s.%N)
  timeout --signal=TERM --kill-after=10 "$limit" $cmd > "$log" 2>&1
  rc=$?
  wall=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if [[ "$name" == mae-* ]] && [ "$rc" = 0 ]; then          # mae_throughput.py prints a table: read it
    compiled=""; [[ "$name" == *-compiled ]] && compiled="--compile"
    model=${name#mae-}; model=${model%-compiled}
    "$PY" "$CHECK" throughput --model "$model" $compiled "$log" >> "$log" 2>&1
  fi
  line=$(grep '^RESULT ' "$log" | tail -n 1 | cut -c8-)
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=timeout; elif [ "$rc" != 0 ]; then status="exit $rc"; else status=""; fi
  if [ -z "$line" ] || [ -n "$status" ]; then
    why=$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-160)
    "$PY" -c 'import json, sys; print(json.dumps({"part": sys.argv[1], "name": sys.argv[1], "ok": False, "status": sys.argv[2] or "no result", "wall_s": float(sys.argv[4]), "error": sys.argv[3]}))' \
      "$name" "$status" "$why" "$wall" >> "$RESULTS"
    echo "   $name: ${status:-no result} ($why)"
  else
    "$PY" -c 'import json, sys; d = json.loads(sys.argv[1]); d["wall_s"] = float(sys.argv[2]); print(json.dumps(d))' "$line" "$wall" >> "$RESULTS"
    grep -v '^RESULT ' "$log" | tail -n 3 | sed 's/^/   /'
  fi
done
"$PY" "$CHECK" report "$RESULTS" --json "$JSON"
ok=$?
if [ "$KEEP" = 1 ]; then echo "logs: $LOGS"; else rm -rf "$LOGS"; fi
failed=$("$PY" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["failed"]))' "$JSON" 2>/dev/null || echo 1)
[ "$ok" = 0 ] && [ "$failed" = 0 ]
