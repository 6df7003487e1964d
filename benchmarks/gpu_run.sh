#!/usr/bin/env bash
# The one script a GPU machine (no network) runs from the working tree:
#
#   1. build and install the package with its CUDA extension
#      (pip install --no-build-isolation --no-deps -e .);
#   2. the test suite on CUDA tensors (pytest -q tests);
#   3. compute-sanitizer memcheck and racecheck over a small kernel selection
#      (the self-check of one loss per kernel primitive on the CUDA and Triton
#      backends, N=37);
#   4. the command line's self-check in float32/float16/bfloat16 (strict);
#   5. the multi-view benchmark (pytest benchmarks/test_bench_multiview.py,
#      JSON in multiview.json), short, skipped with MV_BENCH_TIMEOUT=0;
#   6. the benchmark sweep (python -m contrastive_ops bench --out ...).
#
# Everything (logs, results.json, charts, summary) goes to
# benchmarks/results/<device>-<date>/ and, when $OUT is set, to $OUT/ too.
# Each step has a time limit and the whole run a deadline; a step that fails
# or runs out of time is recorded and the next one still runs.  Exit status:
# 0 if every step passed, 1 otherwise.
#
# Knobs (environment variables, seconds unless said otherwise):
#   TOTAL_BUDGET      whole run deadline                          (default 540)
#   BUILD_TIMEOUT     step 1                                      (default 180)
#   TEST_TIMEOUT      step 2                                      (default 120)
#   SANITIZER_TIMEOUT each of memcheck and racecheck              (default 45)
#   SANITIZER_LOSSES  losses for the sanitizers (comma-separated) (default info_nce,siglip_loss,sinkhorn_knopp)
#   SANITIZER_PYTEST  extra pytest arguments also run under memcheck (default: none)
#   CHECK_TIMEOUT     step 4                                      (default 45)
#   MV_BENCH_TIMEOUT  step 5; 0 skips it                          (default 120; less if the
#                     run deadline leaves less after the sweep's minimum; the benchmark starts
#                     no case in the last 30s, so that its JSON is written)
#   MV_BENCH_ARGS     extra pytest arguments of step 5            (default: none)
#   SWEEP_BUDGET      sweep time budget passed to --budget        (default 100; less if the
#                     run deadline leaves less, so that the JSON and charts are written)
#   SWEEP_SIZES       comma-separated batch sizes                 (default 1024,4096,16384,65536)
#   SWEEP_ARGS        extra arguments of "bench"                  (default: none)
#   PYTEST_ARGS       extra arguments of step 2                   (default: none)
#   SKIP_BUILD=1      use the extension already built in place
#   RESULTS_DIR       output directory                            (default benchmarks/results/<device>-<date>)
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
START=$(date +%s)
TOTAL_BUDGET=${TOTAL_BUDGET:-540}
PY=${PYTHON:-python}

device_name() {
    local n=""
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
    fi
    if [ -z "$n" ]; then
        n=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>/dev/null)
    fi
    echo "${n:-unknown}" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//'
}

DEVICE=$(device_name)
DATE=$(date +%Y-%m-%d)
RES=${RESULTS_DIR:-$ROOT/benchmarks/results/$DEVICE-$DATE}
mkdir -p "$RES"
SUMMARY="$RES/summary.txt"
: > "$SUMMARY"
FAILED=0

# Build only for this GPU's architecture, with the machine's cores.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ')
    [ -n "$cap" ] && export TORCH_CUDA_ARCH_LIST="$cap"
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# Without the build step the package is imported from the working tree.
[ "${SKIP_BUILD:-0}" = "1" ] && export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

remaining() { echo $(( TOTAL_BUDGET - ($(date +%s) - START) )); }

# step NAME LIMIT CMD...: run CMD with the smaller of LIMIT and the time left, log to $RES/NAME.log
step() {
    local name=$1 limit=$2; shift 2
    local left; left=$(remaining)
    if [ "$left" -le 5 ]; then
        echo "$name: SKIPPED (run deadline of ${TOTAL_BUDGET}s reached)" | tee -a "$SUMMARY"
        FAILED=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $*" | tee -a "$SUMMARY"
    local t0; t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$RES/$name.log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    local verdict=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMEOUT"; FAILED=1
    elif [ $rc -ne 0 ]; then verdict="FAILED (exit $rc)"; FAILED=1; fi
    echo "$name: $verdict in ${dt}s" | tee -a "$SUMMARY"
    tail -n 5 "$RES/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
}

{
    echo "device: $DEVICE   date: $(date -Iseconds)   commit: $(git rev-parse --short HEAD 2>/dev/null || echo none)"
    git status --short 2>/dev/null | head -n 20 | sed 's/^/    /'
    nvidia-smi 2>/dev/null | head -n 15
    $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
    $PY -c "import triton; print('triton', triton.__version__)" 2>/dev/null
    command -v compute-sanitizer || echo "compute-sanitizer not found"
} > "$RES/environment.txt" 2>&1
cat "$RES/environment.txt" | head -n 3

if [ "${SKIP_BUILD:-0}" != "1" ]; then
    step build "${BUILD_TIMEOUT:-180}" $PY -m pip install --no-build-isolation --no-deps -v -e .
fi

# shellcheck disable=SC2086
step tests "${TEST_TIMEOUT:-120}" $PY -m pytest -q -p no:cacheprovider tests ${PYTEST_ARGS:-}

# One loss per kernel primitive: sim_lse, siglip, sinkhorn.
SAN_LOSSES=${SANITIZER_LOSSES:-info_nce,siglip_loss,sinkhorn_knopp}
if command -v compute-sanitizer >/dev/null 2>&1; then
    # The caching allocator hides out-of-bounds accesses inside its pooled blocks: turn it off.
    for tool in memcheck racecheck; do
        step "sanitizer-$tool" "${SANITIZER_TIMEOUT:-45}" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
            compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all \
            $PY -m contrastive_ops --quick --no-bench --no-progress --backends cuda,triton --dtype float32 \
            --losses "$SAN_LOSSES"
    done
    if [ -n "${SANITIZER_PYTEST:-}" ]; then
        # shellcheck disable=SC2086
        step sanitizer-memcheck-pytest "${SANITIZER_TIMEOUT:-45}" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
            compute-sanitizer --tool memcheck --error-exitcode 1 --target-processes all \
            $PY -m pytest -q -x -p no:cacheprovider $SANITIZER_PYTEST
    fi
else
    echo "sanitizers: SKIPPED (compute-sanitizer not found)" | tee -a "$SUMMARY"
fi

step selfcheck "${CHECK_TIMEOUT:-45}" $PY -m contrastive_ops --no-bench --no-progress --strict -v

# Multi-view benchmark (its default CUDA grid, see the file's docstring), before the sweep.  Its limit is
# the smaller of MV_BENCH_TIMEOUT and what the deadline leaves after the sweep's least (a 10s budget plus
# its 60s margin), so that the sweep still runs; with under 30s left it is skipped (not a failure).  The
# benchmark starts no case in the last 30s of its limit, so that pytest ends and writes the JSON.
MVT=${MV_BENCH_TIMEOUT:-120}
MVL=$(( $(remaining) - 70 ))
[ "$MVT" -lt "$MVL" ] && MVL=$MVT
if [ "$MVT" -le 0 ]; then
    echo "multiview-bench: SKIPPED (MV_BENCH_TIMEOUT=0)" | tee -a "$SUMMARY"
elif [ "$MVL" -lt 30 ]; then
    echo "multiview-bench: SKIPPED (the run deadline leaves ${MVL}s before the sweep)" | tee -a "$SUMMARY"
else
    # shellcheck disable=SC2086
    step multiview-bench "$MVL" env CONTRASTIVE_OPS_BENCH_DEADLINE_S=$(( MVL - 30 )) \
        $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_multiview.py --benchmark-only \
        --benchmark-json "$RES/multiview.json" ${MV_BENCH_ARGS:-}
fi

# The sweep's budget: what is asked, at most what the deadline leaves after a margin for the
# first calls of the last points and the charts.
MARGIN=60
SB=${SWEEP_BUDGET:-100}
LEFT=$(( $(remaining) - MARGIN ))
[ "$SB" -gt "$LEFT" ] && SB=$LEFT
[ "$SB" -lt 10 ] && SB=10
SWEEP=(bench --out "$RES/bench" --no-progress --budget "$SB" --sizes "${SWEEP_SIZES:-1024,4096,16384,65536}")
# shellcheck disable=SC2086
step sweep $(( SB + MARGIN )) $PY -m contrastive_ops "${SWEEP[@]}" ${SWEEP_ARGS:-}

echo "total: $(( $(date +%s) - START ))s, $([ $FAILED -eq 0 ] && echo 'all steps passed' || echo 'some steps FAILED')" \
    | tee -a "$SUMMARY"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/$(basename "$RES")"
    cp -r "$RES"/. "$OUT/$(basename "$RES")/"
fi
exit $FAILED
