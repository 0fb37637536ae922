#!/usr/bin/env bash
# One-shot GPU check for a short loan of a CUDA machine (see perf/README.md, "GPU check"):
#
#   bash perf/gpu_check.sh [--dry-run] [OUT_DIR]        (OUT_DIR default: perf/results/)
#
# 0. environment: the Python to use (PYTHON, else .venv/bin/python, else the system python3 with its own torch and
#    triton; qlora/kernels and qlora/reference linked in place, nothing installed, no network needed); torch is installed
#    from QLORA_TORCH only when none imports.
# 1. tests: the kernels against the oracle on the GPU (tests/test_device_pass.py: every family, every dispatch path,
#    bf16/fp16/fp32) and the device-aware optimizer and model tests;
# 2. bench: `python -m perf bench` (fused layer vs dequantize-then-matmul vs dense bf16 vs bitsandbytes when it
#    imports; quantize/dequantize; optimizer steps; decode M = 1, 4, 16 and M = N = K = 4096);
# 3. calibrate: the roofline model's prediction beside every measured time, and their ratio;
# 4. plots: PNG charts of the run;
# 5. profile: `python -m perf.profile_linear 1 16 4096` into OUT_DIR/profile_linear.log, the GPU time of every
#    kernel a layer call launches (what the static model is checked against kernel by kernel; GPU only), then the
#    decode GEMV's variants at M = 1 and 16 timed beside the model.
# Every step has its own time cap (seconds, overridable: CAP_TESTS, CAP_BENCH, CAP_OTHER, CAP_PROFILE) so the whole
# stays under 10 minutes on one H100/H200; a step that fails or runs over is reported in
# OUT_DIR/gpu_check_summary.json and the next step still runs. Exit 0 when every step passed, 1 otherwise, 2 on a
# usage error.
#
# --dry-run: the same steps on CPU under the Triton interpreter, tiny shapes (what the default test suite runs;
# step 5 skipped).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
OUT_DIR=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
        *) if [ -n "$OUT_DIR" ]; then echo "gpu_check.sh: one OUT_DIR only, got $OUT_DIR and $arg" >&2; exit 2; fi
           OUT_DIR="$arg" ;;
    esac
done
OUT_DIR="${OUT_DIR:-perf/results}"
if [ -e "$OUT_DIR" ] && [ ! -d "$OUT_DIR" ]; then echo "gpu_check.sh: OUT_DIR $OUT_DIR is not a folder" >&2; exit 2; fi
mkdir -p "$OUT_DIR" || { echo "gpu_check.sh: cannot create OUT_DIR $OUT_DIR" >&2; exit 2; }
OUT_DIR="$(cd "$OUT_DIR" && pwd)"

if [ "$DRY_RUN" = 1 ]; then
    export QLORA_INTERPRET=1
    CAP_TESTS=${CAP_TESTS:-300}; CAP_BENCH=${CAP_BENCH:-300}; CAP_OTHER=${CAP_OTHER:-120}
    BENCH_ARGS=(--quick)
    TESTS=(tests/test_device_pass.py)
else
    export QLORA_INTERPRET=0
    CAP_TESTS=${CAP_TESTS:-180}; CAP_BENCH=${CAP_BENCH:-220}; CAP_OTHER=${CAP_OTHER:-60}
    # profile: the layer's kernels are in Triton's cache from steps 1-2; the decode variants compile two more.
    CAP_PROFILE=${CAP_PROFILE:-75}
    BENCH_ARGS=()
    TESTS=(tests/test_device_pass.py tests/test_optim.py tests/test_model.py
           tests/test_compile.py::test_cuda_graph_capture_matches_eager_bit_for_bit)
fi
export PYTHONUNBUFFERED=1
SUMMARY="$OUT_DIR/gpu_check_summary.json"
STEPS_FILE="$(mktemp)"
trap 'rm -f "$STEPS_FILE"' EXIT
FAILED=0

# Runs "name cap command..." under `timeout`, records {"step", "rc", "seconds", "status"}.
step() {
    local name=$1 cap=$2; shift 2
    echo "=== step $name (cap ${cap}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$cap" "$@"
    local rc=$?
    local secs=$((SECONDS - start)) status=passed
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="cut at ${cap}s"; elif [ "$rc" -ne 0 ]; then status=failed; fi
    [ "$status" = passed ] || FAILED=1
    echo "=== step $name: $status (rc $rc, ${secs}s)"
    printf '{"step": "%s", "rc": %d, "seconds": %d, "status": "%s"}\n' "$name" "$rc" "$secs" "$status" >>"$STEPS_FILE"
    return 0
}

# --- 0. environment ------------------------------------------------------------------------------------------
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "no torch for $PY: installing ${QLORA_TORCH:-torch}"
    "$PY" -m pip install -q "${QLORA_TORCH:-torch}" || { echo "gpu_check.sh: cannot install torch" >&2; exit 2; }
fi
if ! "$PY" -c "import qlora.kernels, qlora.reference, hypothesis, pytest_benchmark" 2>/dev/null; then
    # The machine's own torch and triton stay in use: nothing is installed or fetched. The folders are linked where
    # the installed package has them (kernels/ as qlora/kernels, reference/ as qlora/reference; links ignored by
    # git), so `import qlora.kernels` works from the repository root, which Python and pytest put on sys.path.
    for sub in kernels reference; do
        [ -L "qlora/$sub" ] || ln -s "../$sub" "qlora/$sub" || exit 2
    done
    "$PY" -c "import qlora.kernels, qlora.reference" || { echo "gpu_check.sh: qlora does not import" >&2; exit 2; }
fi
"$PY" - <<'EOF' | tee "$OUT_DIR/gpu_check_env.txt"
import platform, subprocess, torch, triton
import qlora
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__,
      "cuda", torch.version.cuda, "interpreter", qlora.interpreter_active())
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
try:
    import bitsandbytes
    print("bitsandbytes", bitsandbytes.__version__)
except Exception as err:  # a peer that is not installed is reported, not fatal
    print("bitsandbytes missing:", type(err).__name__, err)
EOF
if [ "$DRY_RUN" = 0 ] && ! "$PY" -c "import torch, qlora, sys; sys.exit(0 if torch.cuda.is_available() and not qlora.interpreter_active() else 1)"; then
    echo "gpu_check.sh: no CUDA device with the kernels compiled; use --dry-run on a CPU machine" >&2
    exit 2
fi

# --- 1. tests against the oracle on the device ----------------------------------------------------------------
# On a GPU machine the time goes to compiling each kernel specialization: spread it over processes when
# pytest-xdist is there (measured on an H200 with 16 cores: 73 s with 8 workers; serially the step ran past 150 s).
PARALLEL=()
if [ "$DRY_RUN" = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then PARALLEL=(-n 8); fi
step tests "$CAP_TESTS" "$PY" -m pytest -q -p no:cacheprovider -m "not slow" "${PARALLEL[@]}" "${TESTS[@]}" \
    --junitxml="$OUT_DIR/gpu_check_tests.xml"

# --- 2. benchmarks ---------------------------------------------------------------------------------------------
BENCH_JSON="$OUT_DIR/gpu_check_bench.json"
rm -f "$BENCH_JSON"
step bench "$CAP_BENCH" "$PY" -m perf bench "${BENCH_ARGS[@]}" --out "$BENCH_JSON"

# --- 3. the model beside the timings, 4. charts ----------------------------------------------------------------
if [ -f "$BENCH_JSON" ]; then
    step calibrate "$CAP_OTHER" "$PY" -m perf calibrate "$BENCH_JSON" --out "$OUT_DIR/gpu_check_calibration.md"
    step plot "$CAP_OTHER" "$PY" -m perf plot "$BENCH_JSON" --out "$OUT_DIR/plots"
else
    echo "=== no benchmark results: calibrate and plot skipped"
    printf '{"step": "calibrate", "rc": -1, "seconds": 0, "status": "skipped: no results"}\n' >>"$STEPS_FILE"
    FAILED=1
fi

# --- 5. kernel times of one layer call -------------------------------------------------------------------------
if [ "$DRY_RUN" = 0 ]; then
    step profile "$CAP_PROFILE" bash -c '"$0" -m perf.profile_linear 1 16 4096 >"$1" 2>&1' "$PY" \
        "$OUT_DIR/profile_linear.log"
else
    echo "=== step profile: skipped (the interpreter launches no CUDA kernels to time)"
    printf '{"step": "profile", "rc": 0, "seconds": 0, "status": "skipped: no GPU"}\n' >>"$STEPS_FILE"
fi

"$PY" - "$STEPS_FILE" "$SUMMARY" "$DRY_RUN" <<'EOF'
import json, subprocess, sys
from datetime import datetime, timezone
import torch, triton
steps = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
except OSError:
    commit = None
summary = {
    "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "dry_run": sys.argv[3] == "1",
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda},
    "commit": commit,
    "steps": steps,
}
with open(sys.argv[2], "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps(summary, indent=1))
EOF
exit "$FAILED"
