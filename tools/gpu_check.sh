#!/usr/bin/env bash
# GPU acceptance run of the ms_deform_attn CUDA kernel (docs/kernel.md, "GPU check"). Runs as is on a
# machine with a CUDA build of torch, nvcc and ninja, and reaches no package registry. Each step has
# its own time limit and the whole run stays within 9 minutes; logs, test results, benchmark JSON and
# summary.txt go to $OUT (default out/gpu_check). Exit status 0 when every required step passed.
#
#   tools/gpu_check.sh
#   PYTHON=/path/to/python PEER_SDIST=torch_ms_deform_attn-0.1.1.tar.gz OUT=/tmp/check tools/gpu_check.sh
#
# The torch-ms-deform-attn peer is benchmarked when it is importable, or when its sdist ($PEER_SDIST,
# else build/peer/torch_ms_deform_attn-*.tar.gz) builds here; without it the benchmarks run without it.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
OUT=${OUT:-$REPO/out/gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

BUDGET_S=540                     # 9 minutes in all
DEADLINE=$((SECONDS + BUDGET_S - 15))  # 15 s kept for the summary
FAILED=0
: >"$OUT/summary.txt"

note() { echo "$*" | tee -a "$OUT/summary.txt"; }

# record NAME RC SECONDS LIMIT REQUIRED: one summary line; a failed required step fails the run.
record() {
  local name=$1 rc=$2 secs=$3 limit=$4 required=$5 status
  case $rc in
    0) status=ok ;;
    124 | 137) status="timed out (${limit}s)" ;;
    skip) status="not run (time budget spent)" ;;
    *) status="failed (exit $rc)" ;;
  esac
  [[ $rc != 0 && $required == required ]] && FAILED=1
  note "$(printf '%-12s %-28s %4ss  %s  (log: %s.log)' "$name" "$status" "$secs" "$required" "$name")"
}

# time_left LIMIT: LIMIT, or less when the run's deadline is closer (0 when it has passed).
time_left() {
  local left=$((DEADLINE - SECONDS))
  ((left < 0)) && left=0
  echo $((left < $1 ? left : $1))
}

# step NAME LIMIT required|optional CMD...: runs CMD under `timeout`, output in $OUT/NAME.log.
step() {
  local name=$1 limit required=$3 start=$SECONDS rc
  limit=$(time_left "$2")
  shift 3
  if ((limit < 10)); then record "$name" skip 0 0 "$required"; return 1; fi
  echo "== $name (up to ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 4 "$OUT/$name.log" | sed 's/^/   /'
  record "$name" "$rc" $((SECONDS - start)) "$limit" "$required"
  return $rc
}

# A step that runs in the background while the others go on; finish_background records it.
declare -A BG_PID BG_LIMIT
start_background() {
  local name=$1 limit
  limit=$(time_left "$2")
  shift 2
  BG_LIMIT[$name]=$limit
  (
    start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "$? $((SECONDS - start))" >"$WORK/$name.rc"
  ) &
  BG_PID[$name]=$!
}
finish_background() {
  local name=$1 required=$2 rc secs
  wait "${BG_PID[$name]}"
  read -r rc secs <"$WORK/$name.rc"
  record "$name" "$rc" "$secs" "${BG_LIMIT[$name]}" "$required"
  return "$rc"
}

# ---- 1. environment: a CUDA torch that sees a GPU, nvcc, compute-sanitizer
SANITIZER=$(command -v compute-sanitizer || true)
CUDA_BIN=${CUDA_HOME:-/usr/local/cuda}/bin
[[ -z $SANITIZER && -x $CUDA_BIN/compute-sanitizer ]] && SANITIZER=$CUDA_BIN/compute-sanitizer
note "compute-sanitizer: ${SANITIZER:-not found}"
export ENV_PY='import sys, torch
print(sys.version)
print("torch", torch.__version__, "CUDA", torch.version.cuda)
assert torch.cuda.is_available(), "torch sees no CUDA GPU"
print(torch.cuda.get_device_name(), "sm_%d%d" % torch.cuda.get_device_capability())'
step env 60 required bash -c 'nvidia-smi; nvcc --version; nproc; "$PYTHON" -c "$ENV_PY"' || {
  note "gpu_check: no usable CUDA torch/GPU (see env.log); nothing else can run"
  exit 1
}
ARCH=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=$ARCH  # build for this GPU only

# ---- the peer builds in the background, next to our own build
PEER_DIR=$WORK/peer
PEER_SDIST=${PEER_SDIST:-$(ls "$REPO"/build/peer/torch_ms_deform_attn-*.tar.gz 2>/dev/null | head -n 1)}
if "$PYTHON" -c "import torch_ms_deform_attn" 2>/dev/null; then
  note "peer: torch_ms_deform_attn is already importable"
  PEER=installed
elif [[ -n "$PEER_SDIST" ]]; then
  start_background peer_build 360 env FORCE_CUDA=1 "$PYTHON" -m pip install --no-index --no-deps \
    --no-build-isolation --target "$PEER_DIR" "$PEER_SDIST"
  PEER=building
else
  note "peer: no torch_ms_deform_attn and no sdist (PEER_SDIST or build/peer/*.tar.gz): benchmarks without it"
  PEER=none
fi

# ---- 2. build the op; fail unless the CUDA kernel is in
step build 300 required "$PYTHON" -c '
import sys
from bev3d.ops import build
reason = build.load_extension(verbose=True)
if reason is not None:
    sys.exit(f"gpu_check: the extension did not build: {reason}")
if not build._with_cuda:
    sys.exit(f"gpu_check: only the CPU kernel built: {build._cuda_error}")
print(f"gpu_check: CPU + CUDA kernels ready in {build.build_directory()}")'
BUILT=$?

# Registers and spills per kernel for this GPU (ptxas -v), meanwhile: for the performance notes.
SM=${ARCH/./}
start_background ptxas 90 nvcc -c csrc/ms_deform_attn_cuda_kernel.cu -o "$WORK/kernel.o" -std=c++17 -O3 \
  -gencode "arch=compute_$SM,code=sm_$SM" -Xptxas -v --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ \
  -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__

if ((BUILT == 0)); then
  # ---- 3. every test of the op, the CUDA ones (marker `cuda`) among them: with a GPU and nvcc none
  # may skip, so a skip fails the run too
  step tests 180 required "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_ms_deform_attn.py \
    --junitxml="$OUT/pytest.xml"
  if grep -Eq '[0-9]+ skipped' "$OUT/tests.log"; then
    note "tests: some tests were skipped on a GPU machine (see tests.log)"
    FAILED=1
  fi

  # ---- 4. compute-sanitizer memcheck on small cases; without the caching allocator every tensor is
  # its own allocation, so a read past one is not hidden inside a pooled block
  if [[ -n "$SANITIZER" ]]; then
    step memcheck 150 required env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
      --error-exitcode 1 --print-limit 20 "$PYTHON" tools/msda_small_case.py --device cuda
  else
    note "memcheck: compute-sanitizer not found (PATH, \$CUDA_HOME/bin)"
    record memcheck 127 0 0 required
  fi

  # ---- 5. benchmarks: fp32 and bf16, against the reference and the peer where it builds
  if [[ $PEER == building ]]; then
    if finish_background peer_build optional; then
      PEER=built
      export PYTHONPATH="$PEER_DIR:$PYTHONPATH"
    else
      PEER=failed
    fi
  fi
  for dtype in float32 bfloat16; do
    step "bench_$dtype" 100 required "$PYTHON" tools/bench_ms_deform_attn.py --device cuda --dtype "$dtype" \
      --shapes decoder900,detr3d,encoder --repeat 30 --out "$OUT/bench_$dtype.json"
  done

  # ---- 6. synccheck: illegal warp-synchronous shuffles on the hardware (the emulator's check, for real)
  if [[ -n "$SANITIZER" ]]; then
    step synccheck 90 optional "$SANITIZER" --tool synccheck --error-exitcode 1 --print-limit 20 \
      "$PYTHON" tools/msda_small_case.py --device cuda
  fi
else
  note "gpu_check: the build failed, so tests, memcheck and benchmarks did not run"
fi
[[ $PEER == building ]] && finish_background peer_build optional
finish_background ptxas optional

note "gpu_check: $( ((FAILED)) && echo FAILED || echo passed) in ${SECONDS}s; outputs in $OUT"
exit $FAILED
