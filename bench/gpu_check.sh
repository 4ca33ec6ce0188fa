#!/usr/bin/env bash
# The GPU measurements in one script (<= 10 minutes on one GPU): writes bench/out/gpu_check/gpu_check.json and
# the "gpu" section of BENCHMARKS.md.
#
#   bash bench/gpu_check.sh [--dry-run] [--output FILE] [--python PY]
#
# Steps (each with its own time limit, each recorded with its exit code; a failed step does not stop the rest):
#   1. pytest -m gpu: the CUDA-marked tests (SLI vs full on CUDA in bf16 with pinned buffers + copy stream,
#      a KD step in bf16 autocast, ...);
#   2. SLI vs full load on CUDA, bf16, bench_sli's teacher (bench/gpu_check.py sli);
#   3. the offload comparison of bench/bench_offload.py on CUDA (Nexus SLI, accelerate's offload, AirLLM
#      when bench/out/cache/airllm is there: carry it to the GPU machine, it has no package registry);
#   4. KD step time in bf16 autocast (bench/gpu_check.py kd);
#   5. one NVML temperature read through the thermal monitor's sensor (bench/gpu_check.py nvml);
#   6. the report: one JSON and the BENCHMARKS.md section.
# --dry-run: the same steps on the CPU with tiny sizes (tests/test_gpu.py is collected and skips; AirLLM is left
# out), writing to
# bench/out/gpu_check/BENCHMARKS.dry-run.md unless --output says otherwise: it keeps the script from rotting
# (tests/test_gpu_check.py) and never overwrites real figures.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUTPUT=""
PY="${PYTHON:-python}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --output) OUTPUT="$2"; shift ;;
    --python) PY="$2"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --dry-run, --output FILE, --python PY)" >&2; exit 2 ;;
  esac
  shift
done

DIR=bench/out/gpu_check
mkdir -p "$DIR"
rm -f "$DIR"/*.json
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "$DRY" = 1 ]; then
  DEV=cpu; DRYFLAG=--dry-run; OUTPUT="${OUTPUT:-$DIR/BENCHMARKS.dry-run.md}"
  OFFLOAD_ARGS=(--quick --no-moe)
  TESTS=(tests/test_gpu.py)  # collecting every test module costs more than the check itself on CPU
  LIM_TEST=300; LIM_SLI=300; LIM_OFF=600; LIM_KD=300
else
  DEV=cuda; DRYFLAG=""; OUTPUT="${OUTPUT:-BENCHMARKS.md}"
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA device here; run with --dry-run on a CPU machine" >&2
    exit 2
  fi
  OFFLOAD_ARGS=(--teachers sli --tokens 4096,16384 --budget-fraction 0.28)
  TESTS=(tests/)
  LIM_TEST=150; LIM_SLI=150; LIM_OFF=270; LIM_KD=60
fi
RUNNERS=full,nexus,accelerate
[ "$DRY" = 0 ] && [ -f bench/out/cache/airllm/airllm/__init__.py ] && RUNNERS="$RUNNERS,airllm"

STEPS="$DIR/steps.txt"
: > "$STEPS"
step() {  # step NAME LIMIT_S COMMAND... : run it, record "name rc seconds"
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "[gpu_check] $name: $*" >&2
  timeout "$limit" "$@" > "$DIR/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $((SECONDS - t0))" >> "$STEPS"
  echo "[gpu_check] $name: exit $rc in $((SECONDS - t0)) s" >&2
  tail -n 3 "$DIR/$name.log" >&2
}

step pytest "$LIM_TEST" "$PY" -m pytest -m gpu -q -p no:cacheprovider "${TESTS[@]}"
step sli "$LIM_SLI" "$PY" bench/gpu_check.py sli --device "$DEV" $DRYFLAG --json "$DIR/sli.json"
step offload "$LIM_OFF" "$PY" bench/bench_offload.py --device "$DEV" --runners "$RUNNERS" "${OFFLOAD_ARGS[@]}" \
  --timeout 200 --json "$DIR/offload.json"
step kd "$LIM_KD" "$PY" bench/gpu_check.py kd --device "$DEV" $DRYFLAG --json "$DIR/kd.json"
step nvml 30 "$PY" bench/gpu_check.py nvml --json "$DIR/nvml.json"

# steps.json and pytest.json for the report: exit codes, seconds, pytest's closing line.
"$PY" - "$DIR" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
steps = {}
for line in (d / "steps.txt").read_text().splitlines():
    name, rc, secs = line.split()
    steps[name] = {"rc": int(rc), "seconds": int(secs)}
(d / "steps.json").write_text(json.dumps(steps, indent=2))
log = (d / "pytest.log").read_text(errors="replace").strip().splitlines() if (d / "pytest.log").exists() else []
summary = next((l.strip("= ") for l in reversed(log) if " passed" in l or " skipped" in l or " deselected" in l
                or " failed" in l or "no tests ran" in l), "no summary")
(d / "pytest.json").write_text(json.dumps({"summary": summary}, indent=2))
PY
"$PY" bench/gpu_check.py report --dir "$DIR" --output "$OUTPUT" $DRYFLAG
rc=$?
# The script fails when a step failed (pytest's 5 = "no tests ran" is not a failure of the check).
bad=$(awk '$1 == "pytest" && $2 == 5 {next} $2 != 0 {print $1}' "$STEPS" | tr '\n' ' ')
if [ -n "$bad" ]; then
  echo "gpu_check.sh: failed steps: $bad(logs in $DIR)" >&2
  exit 1
fi
exit $rc
