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
#   TOTAL_BUDGET      whole run deadline                          (default 570)
#   BUILD_TIMEOUT     step 1                                      (default 180)
#   TEST_TIMEOUT      step tests                                  (default 240)
#   PRIORITY_TIMEOUT  step tests-priority                         (default 120)
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
#   STEPS             comma-separated steps, run in the order given, from build,tests-priority,
#                     tests,memcheck,racecheck,quick,quick32,profile,tiles,selfcheck,mvbench,sweep (default:
#                     build,quick,quick32,tests-priority,memcheck,racecheck,tests,profile,selfcheck,mvbench,
#                     sweep: timings first, then the tests (verbose: a cut run still names each
#                     result); what the deadline leaves out is listed as SKIPPED)
#   QUICK_ARGS        arguments of benchmarks/gpu_quick.py (step quick; default --sizes 16384,65536 --peers)
#   QUICK_TIMEOUT     step quick                                  (default 150)
#   QUICK_TUNE=1      autotune in step quick (default: each kernel's default config)
#   QUICK32_TIMEOUT   step quick32 (fp32 CLIP and NT-Xent, B = 16384, D = 512; default 60; 0 skips it)
#   PROFILE_TIMEOUT   each run of step profile                    (default 90)
#   PROFILE_ARGS      extra arguments of benchmarks/gpu_profile.py (step profile)
#   PROFILE_TUNE_CASES  cases (loss:B:D,...) profiled again with autotuning (default: none)
#   TILES_TIMEOUT     step tiles (not in the default STEPS: name it; 2 cases x 2 kernels x 16 configs) (default 240)
#   TILES_ARGS        arguments of benchmarks/gpu_tile_sweep.py (default: its cases, both kernels)
#   TEST_FILES        the files or node ids of step tests         (default: tests, less the priority files)
#   PYTEST_WORKERS    pytest-xdist workers of the test steps      (default: nproc, none without xdist)
#   SKIP_BUILD=1      use the extension already built in place
#   RESULTS_DIR       output directory                            (default benchmarks/results/<device>-<date>)
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
START=$(date +%s)
TOTAL_BUDGET=${TOTAL_BUDGET:-570}
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

# Peer libraries for the benchmarks (the GPU machine has no network): wheels carried in .whl/ are
# installed into a private directory (see benchmarks/README.md for the download command).
if [ -d "$ROOT/.whl" ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/co-peers \
            "$ROOT"/.whl/*.whl >> "$RES/environment.txt" 2>&1; then
        export PYTHONPATH="/tmp/co-peers${PYTHONPATH:+:$PYTHONPATH}"
        echo "peers installed from .whl/: $(cd "$ROOT/.whl" && ls *.whl | tr '\n' ' ')" | tee -a "$SUMMARY"
    else
        echo "peers from .whl/: install FAILED (see environment.txt)" | tee -a "$SUMMARY"
    fi
fi

STEPS=${STEPS:-build,quick,quick32,tests-priority,memcheck,racecheck,tests,profile,selfcheck,mvbench,sweep}

# Test, sanitizer and self-check steps compile one Triton config per kernel (autotuning over the
# full lists would spend the run in the compiler); a fresh cache counts what each step compiled.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$RES/triton-cache}
mkdir -p "$TRITON_CACHE_DIR"
compiled() { find "$TRITON_CACHE_DIR" -name '*.cubin' 2>/dev/null | wc -l; }
note_compiles() { echo "    triton kernels compiled so far (one per kernel, config and specialization): $(compiled)" | tee -a "$SUMMARY"; }
ONE_CONFIG=(env CONTRASTIVE_OPS_TRITON_CONFIGS=default)

XDIST=()
WORKERS=${PYTEST_WORKERS:-$(nproc)}
if [ "$WORKERS" != "0" ] && $PY -c "import xdist" 2>/dev/null; then XDIST=(-n "$WORKERS"); fi
HAS_TIMEOUT=()
$PY -c "import pytest_timeout" 2>/dev/null && HAS_TIMEOUT=(--timeout 120)

do_build() {
    [ "${SKIP_BUILD:-0}" = "1" ] || step build "${BUILD_TIMEOUT:-180}" $PY -m pip install --no-build-isolation --no-deps -v -e .
    $PY -c "import contrastive_ops as co; print('backends:', co.available_backends())" 2>&1 | tee -a "$SUMMARY"
}

# Priority tests first: large logits, run-to-run determinism, the extension's ops, a case larger than
# one CUDA tile, the Triton kernels.  Then the rest of the suite (not slow).
PRIORITY=(tests/test_large_values.py tests/test_determinism.py tests/test_cext.py tests/test_triton_kernels.py)
for f in tests/test_cuda_tiling.py tests/test_triton_minwork.py; do [ -f "$f" ] && PRIORITY+=("$f"); done
do_tests_priority() {
    # shellcheck disable=SC2086
    step tests-priority "${PRIORITY_TIMEOUT:-120}" "${ONE_CONFIG[@]}" $PY -m pytest -v -p no:cacheprovider -rfE \
        "${XDIST[@]}" "${HAS_TIMEOUT[@]}" --junitxml "$RES/junit-priority.xml" "${PRIORITY[@]}" ${PYTEST_ARGS:-}
    note_compiles
}
do_tests() {
    local DESELECT=()
    for f in "${PRIORITY[@]}"; do DESELECT+=(--ignore "$f"); done
    # shellcheck disable=SC2086
    step tests "${TEST_TIMEOUT:-240}" "${ONE_CONFIG[@]}" $PY -m pytest -v -p no:cacheprovider -rfE -m "not slow" \
        "${XDIST[@]}" "${HAS_TIMEOUT[@]}" --junitxml "$RES/junit-tests.xml" ${TEST_FILES:-tests "${DESELECT[@]}"} \
        ${PYTEST_ARGS:-}
    note_compiles
}

# One loss per kernel primitive: sim_lse, siglip, sinkhorn.
SAN_LOSSES=${SANITIZER_LOSSES:-info_nce,siglip_loss,sinkhorn_knopp}
# The caching allocator hides out-of-bounds accesses inside its pooled blocks: turn it off.
do_sanitizer() {
    local tool=$1
    if ! command -v compute-sanitizer >/dev/null 2>&1; then
        echo "sanitizer-$tool: SKIPPED (compute-sanitizer not found)" | tee -a "$SUMMARY"
        return
    fi
    step "sanitizer-$tool" "${SANITIZER_TIMEOUT:-45}" "${ONE_CONFIG[@]}" PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
            compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all \
            $PY -m contrastive_ops --quick --no-bench --no-progress --backends cuda,triton --dtype float32 \
            --losses "$SAN_LOSSES"
    if [ "$tool" = memcheck ] && [ -n "${SANITIZER_PYTEST:-}" ]; then
        # shellcheck disable=SC2086
        step sanitizer-memcheck-pytest "${SANITIZER_TIMEOUT:-45}" "${ONE_CONFIG[@]}" PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
            compute-sanitizer --tool memcheck --error-exitcode 1 --target-processes all \
            $PY -m pytest -q -x -p no:cacheprovider $SANITIZER_PYTEST
    fi
}

do_quick() {
    # The default config of each kernel unless QUICK_TUNE=1: autotuning compiles every config in turn
    # (seconds each), which a short run cannot afford at four losses and two widths.
    local cfg=("${ONE_CONFIG[@]}")
    [ "${QUICK_TUNE:-0}" = "1" ] && cfg=()
    # shellcheck disable=SC2086
    step quick "${QUICK_TIMEOUT:-150}" "${cfg[@]}" $PY benchmarks/gpu_quick.py --json "$RES/quick.json" \
        --budget $(( ${QUICK_TIMEOUT:-150} - 30 )) ${QUICK_ARGS:---sizes 16384,65536 --peers}
    cat "$RES/quick.log" >> "$SUMMARY"
}

# fp32 inputs (F.normalize under autocast returns fp32): the Triton backward's two paths, whose fp32 rates
# the cost model only assumes (contrastive_ops/backends/_triton/costs.py), beside the CUDA backend.
do_quick32() {
    [ "${QUICK32_TIMEOUT:-60}" = "0" ] && return
    # shellcheck disable=SC2086
    step quick32 "${QUICK32_TIMEOUT:-60}" "${ONE_CONFIG[@]}" $PY benchmarks/gpu_quick.py --json "$RES/quick32.json" \
        --budget $(( ${QUICK32_TIMEOUT:-60} - 20 )) --dtype float32 --sizes 16384 --dims 512 \
        --losses clip_loss,nt_xent --backends triton,triton:deterministic,cuda
    cat "$RES/quick32.log" >> "$SUMMARY"
}

# Per-kernel device time of a few steps and what the compiler made of each kernel (PROFILE_ARGS: the
# cases and backends of benchmarks/gpu_profile.py); one run with each kernel's default config, and with
# PROFILE_TUNE_CASES set, one more that autotunes those cases.
do_profile() {
    # shellcheck disable=SC2086
    step profile "${PROFILE_TIMEOUT:-90}" "${ONE_CONFIG[@]}" $PY benchmarks/gpu_profile.py --json "$RES/profile.json" \
        ${PROFILE_ARGS:-}
    if [ -n "${PROFILE_TUNE_CASES:-}" ]; then
        step profile-tuned "${PROFILE_TIMEOUT:-90}" $PY benchmarks/gpu_profile.py --json "$RES/profile-tuned.json" \
            --backends triton --cases "$PROFILE_TUNE_CASES"
    fi
}

# The Triton tile loops (the forward and the GEMM backward's dS kernel) over a wider config space than
# the autotune lists (benchmarks/gpu_tile_sweep.py): the rate the cost model and the "50 % of peak" goal
# hang on.  Not in the default STEPS (it compiles 16 configs per kernel and case); TILES_ARGS: its arguments.
do_tiles() {
    # shellcheck disable=SC2086
    step tiles "${TILES_TIMEOUT:-240}" $PY benchmarks/gpu_tile_sweep.py --json "$RES/tiles.json" ${TILES_ARGS:-}
    grep -E "^(fwd|ds) |best:" "$RES/tiles.log" >> "$SUMMARY"
}

do_selfcheck() {
    step selfcheck "${CHECK_TIMEOUT:-45}" "${ONE_CONFIG[@]}" $PY -m contrastive_ops --no-bench --no-progress -v
}

# Multi-view benchmark (its default CUDA grid, see the file's docstring), before the sweep.  Its limit is
# the smaller of MV_BENCH_TIMEOUT and what the deadline leaves after the sweep's least (a 10s budget plus
# its 60s margin), so that the sweep still runs; with under 30s left it is skipped (not a failure).  The
# benchmark starts no case in the last 30s of its limit, so that pytest ends and writes the JSON.
do_mvbench() {
    local MVT=${MV_BENCH_TIMEOUT:-120}
    local MVL=$(( $(remaining) - 70 ))
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
}

do_sweep() {
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
}

# The steps, in the order STEPS names them.
for s in ${STEPS//,/ }; do
    case $s in
        build) do_build ;;
        tests-priority) do_tests_priority ;;
        tests) do_tests ;;
        memcheck|racecheck) do_sanitizer "$s" ;;
        quick) do_quick ;;
        quick32) do_quick32 ;;
        profile) do_profile ;;
        tiles) do_tiles ;;
        selfcheck) do_selfcheck ;;
        mvbench) do_mvbench ;;
        sweep) do_sweep ;;
        *) echo "unknown step: $s" | tee -a "$SUMMARY"; FAILED=1 ;;
    esac
done

echo "total: $(( $(date +%s) - START ))s, $([ $FAILED -eq 0 ] && echo 'all steps passed' || echo 'some steps FAILED')" \
    | tee -a "$SUMMARY"
if [ -n "${OUT:-}" ]; then
    # At most a few files come back from a lent machine: one archive of the results (without the
    # Triton cache) and the summary beside it.
    tar -czf "$OUT/$(basename "$RES").tgz" -C "$(dirname "$RES")" --exclude triton-cache "$(basename "$RES")"
    cp "$SUMMARY" "$OUT/summary.txt"
fi
exit $FAILED
