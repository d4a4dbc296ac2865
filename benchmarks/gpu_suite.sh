#!/usr/bin/env bash
# The GPU suite: everything worth measuring on one H100/H200-class GPU, in <= 8 minutes, under OUT_DIR.
#
#   benchmarks/gpu_suite.sh OUT_DIR          run it (needs CUDA); logs, JSON, CSV, PNG land in OUT_DIR
#   benchmarks/gpu_suite.sh --dry-run [DIR]  no CUDA needed: every step's script exists and its flags parse
#
# Steps (each under its own time budget; a step that fails or runs out of time is recorded and the suite goes
# on):
#   setup         venv with system site packages (an installed CUDA torch is reused), `pip install -e` with
#                 the extras; the CUDA torch wheel from the package index only when no CUDA torch is there
#   env           nvidia-smi, torch/triton/CUDA versions
#   kernels       the Triton kernel tests compiled for real (TRITON_INTERPRET unset) against the PyTorch
#                 reference, plus tests/test_gpu_suite.py's bf16 check at V = 128,256
#   bench_loss    KD+CE vs CE time and peak memory, fused-linear vs materialized logits, on the GPU only
#                 (--device cuda) at BT = 8192, V = 128,256 bf16; results under OUT_DIR/bench_loss/
#   step_overhead a GPT-2-small-shaped student (12 x 768, V 50,304, T 1024, B 8): KD-from-cache step / CE step,
#                 and ce_loader / ce: the cache loader feeding the GPU (pinned memory, non_blocking copies) at
#                 the rate the step consumes
#   bench_build   a ~0.5B-shaped random teacher (Qwen2-0.5B: hidden 896, 24 layers, 14 heads, 2 KV heads,
#                 V 151,936): build overhead over a bare forward, tokens/s; on the GPU in bf16 when
#                 bench_build has --device/--dtype (probed with --help), otherwise recorded as not run
# OUT_DIR/summary.json lists every step with its exit code, seconds and log; it is the last thing written.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
OUT="${1:-}"
if [[ -z "$OUT" ]]; then
    if [[ $DRY_RUN == 1 ]]; then OUT="$(mktemp -d -t gpu_suite_dry_XXXX)"; else
        echo "usage: benchmarks/gpu_suite.sh OUT_DIR | --dry-run [OUT_DIR]" >&2; exit 2; fi
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${KDCACHE_GPU_PYTHON:-$REPO/.venv/bin/python}"
STEPS_TSV="$OUT/steps.tsv"
: > "$STEPS_TSV"

say() { echo "[gpu_suite] $*" >&2; }

# run_step NAME BUDGET_S CMD...: run CMD under `timeout`, log to OUT/NAME.log, record rc and seconds. The
# budget shrinks to what is left of the suite's (SUITE_BUDGET_S, default 480 s): the suite ends within it.
SUITE_BUDGET_S="${KDCACHE_GPU_SUITE_BUDGET_S:-480}"
run_step() {
    local name="$1" budget="$2"; shift 2
    local t0 rc left
    left=$(( SUITE_T0 + SUITE_BUDGET_S - $(date +%s) ))
    if (( left < 15 )); then
        printf '%s\tskipped\t0\tsuite budget of %ss spent\n' "$name" "$SUITE_BUDGET_S" >> "$STEPS_TSV"
        say "$name: skipped (the suite's ${SUITE_BUDGET_S}s are spent)"
        return
    fi
    (( budget > left )) && budget=$left
    say "$name (budget ${budget}s): $*"
    t0=$(date +%s)
    (cd "$REPO" && timeout --kill-after=10 "$budget" "$@") > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$*" >> "$STEPS_TSV"
    say "$name: exit $rc after $(( $(date +%s) - t0 ))s (log $OUT/$name.log)"
}

# A flag is usable when the script's --help lists it (argparse prints every option there).
has_flag() { grep -qE -- "(^|[[:space:],])$2([[:space:],=]|$)" <<< "$1"; }

STEP_OVERHEAD_ARGS=(--device cuda --layers 12 --d-model 768 --vocab 50304 --seq-len 1024 --batch-size 8
                    --topk 32 --sequences 512 --shard-seqs 64 --steps 30 --warmup 5 --out "$OUT/step_overhead")
BENCH_LOSS_ARGS=(--device cuda --dtype bfloat16 --rows 8192 --vocab 128256 --repeats 10 --out "$OUT/bench_loss")
BUILD_SHAPE=(--hidden 896 --layers 24 --heads 14 --kv-heads 2 --vocab 151936 --seq-len 512 --sequences 64
             --batch-size 8 --reps 3 --small-hidden 0 --train-s 20 --tag gpu)
BUILD_GPU_FLAGS=(--device cuda --dtype bfloat16)
KERNEL_TESTS=(tests/test_triton_sparse_kd.py tests/test_triton_ptx.py tests/test_gpu_suite.py)

# ---------------------------------------------------------------------------------------------- dry run
if [[ $DRY_RUN == 1 ]]; then
    PY="${KDCACHE_GPU_PYTHON:-$(command -v python3)}"
    [[ -x "$REPO/.venv/bin/python" && -z "${KDCACHE_GPU_PYTHON:-}" ]] && PY="$REPO/.venv/bin/python"
    fail=0
    check() { if "$@"; then say "ok: ${CHECK_WHAT}"; else say "FAIL: ${CHECK_WHAT}"; fail=1; fi; }
    for f in "${KERNEL_TESTS[@]}" benchmarks/bench_loss.py benchmarks/step_overhead.py benchmarks/bench_build.py \
             pyproject.toml; do
        CHECK_WHAT="$f exists"; check test -f "$REPO/$f"
    done
    for extra in build server triton train dev; do
        CHECK_WHAT="pyproject extra [$extra]"; check grep -q "^$extra = \[" "$REPO/pyproject.toml"
    done
    CHECK_WHAT="kernel tests collect"
    check bash -c "cd '$REPO' && '$PY' -m pytest -q --collect-only ${KERNEL_TESTS[*]} > '$OUT/collect.log' 2>&1"
    for spec in "bench_loss.py:BENCH_LOSS_ARGS" "step_overhead.py:STEP_OVERHEAD_ARGS" "bench_build.py:BUILD_SHAPE"; do
        script="${spec%%:*}"; declare -n args_ref="${spec##*:}"
        help="$(cd "$REPO" && "$PY" "benchmarks/$script" --help 2>&1)"
        CHECK_WHAT="benchmarks/$script --help"; check test -n "$help"
        for a in "${args_ref[@]}"; do
            [[ "$a" == --* ]] || continue
            CHECK_WHAT="benchmarks/$script accepts $a"; check has_flag "$help" "$a"
        done
        unset -n args_ref
    done
    help="$(cd "$REPO" && "$PY" benchmarks/bench_build.py --help 2>&1)"
    for a in "${BUILD_GPU_FLAGS[@]}"; do
        [[ "$a" == --* ]] || continue
        if has_flag "$help" "$a"; then say "ok: bench_build accepts $a (GPU build will run)"; else
            say "note: bench_build has no $a: the suite records bench_build_gpu as not run"; fi
    done
    CHECK_WHAT="this script parses (bash -n)"; check bash -n "${BASH_SOURCE[0]}"
    say "dry run: $([[ $fail == 0 ]] && echo all checks passed || echo SOME CHECKS FAILED) (logs in $OUT)"
    exit $fail
fi

# ---------------------------------------------------------------------------------------------- the run
SUITE_T0=$(date +%s)
setup() {
    set -e
    cd "$REPO"
    [[ -x .venv/bin/python ]] || python3 -m venv --system-site-packages .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        .venv/bin/python -m pip install --quiet torch  # the package index's default Linux wheel is the CUDA one
    fi
    .venv/bin/python -m pip install --quiet -e ".[build,server,triton,train,dev]"
}
export -f setup
run_step setup 180 bash -c setup
run_step env 30 bash -c "nvidia-smi; '$PY' -c 'import torch, triton; print(torch.__version__, torch.version.cuda, \
triton.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'"
run_step kernels 120 env -u TRITON_INTERPRET "$PY" -m pytest -q -p no:cacheprovider "${KERNEL_TESTS[@]}" \
    --junitxml "$OUT/kernels.xml"
run_step bench_loss 90 "$PY" benchmarks/bench_loss.py "${BENCH_LOSS_ARGS[@]}"
run_step step_overhead 120 "$PY" benchmarks/step_overhead.py "${STEP_OVERHEAD_ARGS[@]}"
help="$(cd "$REPO" && "$PY" benchmarks/bench_build.py --help 2>&1)"
if has_flag "$help" --device && has_flag "$help" --dtype; then
    run_step bench_build_gpu 90 "$PY" benchmarks/bench_build.py "${BUILD_SHAPE[@]}" "${BUILD_GPU_FLAGS[@]}"
    cp "$REPO"/benchmarks/results/bench_build*_gpu* "$OUT/" 2>/dev/null
else
    printf 'bench_build_gpu\tnot run\t0\tbench_build.py has no --device/--dtype\n' >> "$STEPS_TSV"
    say "bench_build_gpu: not run (benchmarks/bench_build.py has no --device/--dtype option)"
fi
"$PY" - "$STEPS_TSV" "$OUT/summary.json" "$SUITE_T0" <<'EOF'
import json, sys, time
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
steps = [{"step": n, "exit": rc, "seconds": int(s), "command": c} for n, rc, s, c in rows]
summary = {"suite": "gpu_suite", "total_s": int(time.time()) - int(sys.argv[3]), "steps": steps,
           "failed": [s["step"] for s in steps if s["exit"] not in ("0", "not run", "skipped")],
           "skipped": [s["step"] for s in steps if s["exit"] == "skipped"]}
open(sys.argv[2], "w").write(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary))
EOF
