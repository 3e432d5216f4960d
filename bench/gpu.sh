#!/usr/bin/env bash
# Every speed benchmark on a GPU, on random-initialised weights of SmolLM2-135M's and of
# a 1B Llama's configuration (bench/_common.py: no download, no data cache), within 8
# minutes start to finish; prints each RESULT line and writes a GPU section for
# BENCHMARKS.md to $OUT/gpu_results.md (when OUT is set) or bench/gpu_results.md.
#
#   bench/gpu.sh            # on CUDA, with whatever torch this machine has
#   bench/gpu.sh --smoke    # on the CPU, smallest shapes (tests/bench runs this)
#
# Each run gets its own time cap and all of them share one deadline (GPU_BUDGET_S,
# default 470 s), so one slow benchmark cannot push the script past 8 minutes: a run
# that is cut off or skipped says so in the section. PYTHON picks the interpreter.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
RESULTS=${OUT:+$OUT/gpu_results.md}
RESULTS=${RESULTS:-bench/gpu_results.md}
BUDGET=${GPU_BUDGET_S:-470}
LOG=$(mktemp -d)
trap 'rm -rf "$LOG"' EXIT

if [ $SMOKE = 1 ]; then
    # a shared CPU can be slow: the smoke run checks that everything runs, not speed
    DEVICE=cpu MODELS="random:tiny" BUDGET=${GPU_BUDGET_S:-1800}
else
    DEVICE=cuda MODELS="random:smollm2-135m random:llama-1b"
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "bench/gpu.sh: this torch sees no CUDA device; run bench/gpu.sh --smoke on a CPU" >&2
        exit 2
    fi
fi

# name, cap in seconds, arguments: the settings of one run per model
args_for() {  # $1 benchmark, $2 model -> "cap args..."
    local tiny=0 big=0
    [ "$2" = random:tiny ] && tiny=1
    [ "$2" = random:llama-1b ] && big=1
    case $1 in
    arrow_forward)
        if [ $tiny = 1 ]; then echo "120 --sizes 8 32 --top-k 4 --paths auto,dense,gather --batch 2 --seq 16 --reps 1 --peft-max 8"
        elif [ $big = 1 ]; then echo "70 --sizes 32 256 1024 --top-k 2 4 --paths dense,gather --batch 8 --seq 256 --reps 3 --peft-max 32"
        else echo "110 --sizes 8 32 128 256 1024 --top-k 2 4 --paths auto,dense,gather --batch 16 --seq 256 --reps 5 --peft-max 256"; fi ;;
    arrow_prototypes)
        if [ $tiny = 1 ]; then echo "60 --experts 8 --dense-sample 2"
        elif [ $big = 1 ]; then echo "30 --experts 256 1024 --dense-sample 8 --peft-max 0"
        else echo "30 --experts 256 1024 --dense-sample 8 --peft-max 256"; fi ;;
    lorahub_speed)
        if [ $tiny = 1 ]; then echo "90 --task synthetic --experts 2 --budget 4 --repeats 1"
        elif [ $big = 1 ]; then echo "40 --task synthetic --experts 20 --budget 24 --repeats 1"
        else echo "40 --task synthetic --experts 20 --budget 40 --repeats 2"; fi ;;
    eval_throughput)
        if [ $tiny = 1 ]; then echo "60 --task synthetic --n 2 --n-fp32 2 --batch-size 4"
        else echo "30 --task synthetic --n 64 --n-fp32 32"; fi ;;
    train_throughput)
        if [ $tiny = 1 ]; then echo "90 --task synthetic --steps 2 --skip 1 --batch-size 2"
        else echo "40 --task synthetic --steps 30 --batch-size 8"; fi ;;
    merge_speed)
        if [ $tiny = 1 ]; then echo "60 --experts 2 --layers 2"
        elif [ $big = 1 ]; then echo "25 --experts 8"
        else echo "25 --experts 20"; fi ;;
    serve_throughput)  # the server over HTTP vs PEFT's mixed-adapter batch and its loop
        if [ $tiny = 1 ]; then echo "90 --experts 2 --requests 4 --new-tokens 4 --threads 1"
        elif [ $big = 1 ]; then echo "50 --experts 8 --requests 16 --new-tokens 32"
        else echo "50 --experts 8 --requests 16 --new-tokens 32"; fi ;;
    esac
}

BENCHES="arrow_forward arrow_prototypes lorahub_speed eval_throughput train_throughput merge_speed serve_throughput"
DEVNAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only')" 2>/dev/null)
TORCHV=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null)
SECTIONS="$LOG/sections.md"
SUMMARY="$LOG/summary.md"
: >"$SECTIONS"
: >"$SUMMARY"
FAILED=0
START=$SECONDS

for bench in $BENCHES; do
    if [ ! -f "bench/$bench.py" ]; then
        echo "== $bench: bench/$bench.py not there yet, skipped"
        continue
    fi
    for model in $MODELS; do
        read -r cap extra <<<"$(args_for "$bench" "$model")"
        [ $SMOKE = 1 ] && cap=300
        left=$((BUDGET - (SECONDS - START)))
        [ "$cap" -gt "$left" ] && cap=$left
        cmd="python bench/$bench.py --device $DEVICE --model $model $extra"
        echo "== $bench ($model): $cmd"
        if [ "$cap" -lt 10 ]; then
            status="skipped: the script's ${BUDGET} s budget is spent"
            out=""
        else
            t0=$SECONDS
            # shellcheck disable=SC2086
            timeout "$cap" "$PY" "bench/$bench.py" --device "$DEVICE" --model "$model" $extra \
                >"$LOG/out" 2>"$LOG/err"
            rc=$?
            out=$(cat "$LOG/out")
            case $rc in
            0) status="ok, $((SECONDS - t0)) s" ;;
            124) status="cut off at its ${cap} s cap"; FAILED=1 ;;
            *) status="FAILED (exit $rc)"; FAILED=1; out="$out
$(tail -c 1500 "$LOG/err")" ;;
            esac
        fi
        echo "$out" | grep '^RESULT ' || true
        echo "   $status"
        grep '^RESULT ' <<<"$out" | while IFS= read -r line; do
            line=${line#RESULT }
            what=${line#*: }
            printf '| `%s` | %s | %s |\n' "${line%%: *}" "$model" "${what//|//}"
        done >>"$SUMMARY"
        {
            printf '\n### %s, %s\n\n`%s` - %s\n\n```\n%s\n```\n' "$bench" "$model" "$cmd" "$status" "$out"
        } >>"$SECTIONS"
    done
done

{
    echo "## GPU: $DEVNAME"
    echo
    echo "Printed by \`bench/gpu.sh$([ $SMOKE = 1 ] && echo ' --smoke')\` in one run of $((SECONDS - START)) s: torch $TORCHV, device $DEVICE ($DEVNAME), random-initialised weights of each named configuration (speed does not depend on the weights' values). Date: $(date -u +%Y-%m-%d)."
    echo
    echo "| benchmark | model | result |"
    echo "|---|---|---|"
    cat "$SUMMARY"
    cat "$SECTIONS"
} >"$RESULTS"
echo "wrote $RESULTS in $((SECONDS - START)) s"
exit $FAILED
