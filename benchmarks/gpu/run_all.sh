#!/usr/bin/env bash
# Issue 7's GPU checks in ONE device call (an H200 for the official code at 720p; about 9 minutes). Run
# benchmarks/gpu/prepare.sh on the development machine first, then, from the repository root:
#
#     run(command="bash benchmarks/gpu/run_all.sh", carry=[".whl", ".official"], timeout_s=590)
#
# Every step runs under `timeout`, sized from what is left of BUDGET seconds (default 530), so one
# slow or failing step cannot eat the others' time. Results land in $OUT (at most 8 files come back):
#   summary.txt            machine, versions, one line per step (exit status, seconds)
#   ours_fp8.md            our speed/memory table, full 8.77B model, fp8 weights, 3 cases, host syncs, 24 GB cap
#   ours_480p10_16gb.md    480p 10 s under a 16 GB cap (issue 7's target)
#   parity_480p5.md/.csv   teacher-forced per-step logits vs the official code, bf16 (issue 7: < 2e-2)
#   official_720p5.md      ours vs official, bf16 weights for both, 720p 5 s
#   official_480p5.md      the same at 480p 5 s (only when time is left)
#   official_720p5_warm.md extra: official_720p5 after one warm-up generation per side (first runs in the notes)
#   ours_compile_720p5.md  extra, only with STEPS="ours_compile_720p5": ours at 720p 5 s with torch.compile, bf16
#   official_720p5_graphs.md, ours_graphs_compile_720p5.md, parity_480p5_graphs.md/.csv: extras, with CUDA graphs
#   ours_fp8mm_720p5.md    extra, only with STEPS="ours_fp8mm_720p5": ours at 720p 5 s with fp8 matmuls
#   decode_720p5.md        extra: the 720p 5 s tokenizer decode, ours vs the official tokenizer (same weights)
#   run_all.log            everything else: per-step parity lines, partial tables, warnings, errors
#
# Measured device time (H200 / H100, 2026-11-26; the machine's start comes on top): tests 15 s (before the CUDA graphs test; now up to minutes), ours_fp8
# 118 s, ours_480p10_16gb 68 s, parity_480p5 70 s, official_720p5 about 100 s (an H100 ran out of memory in the
# official 720p run through fragmentation; the bench now sets expandable segments for official runs, untested), official_480p5 57 s, probe_kernels 14 s; the extras in benchmarks/README.md. The fast-settings call
# (issue 7's open speed item, on an H200: the official 720p run peaks at 58.9 GB; kind="nvidia-h200"; the steps
# run in this file's order; 2026-11-27: official_720p5_warm 180 s, ours_compile_720p5 108 s, profile_720p5 107 s,
# parity_480p5 79 s; the "fast" steps measured on an H200 on 2026-11-27: 115 + 207 + 91 + 79 s, 509 s in all,
# results in benchmarks/README.md): the fast settings' parity first, then their timing, then which setting a parity
# failure comes from, and the official code's own floor on cuDNN:
#   STEPS="parity_480p5_fast official_720p5_fast parity_480p5_routed parity_480p5_exact_compiled"
#   BUDGET=560, timeout_s=580
# (gpu_tests, the CUDA graphs' own tests, is left out for time: the parity steps check the graphs at full size)
#
# REHEARSE=1 checks the plumbing on a CPU before device time is spent on it: the same steps, files and
# summary with the tiny model, small cases (mid5, mid10), no memory caps and no sync check
# (tests/unit/test_gpu_kit.py runs it; with an official checkout and its dependencies, every step).
set -u

OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
BUDGET=${BUDGET:-530}
OFFICIAL=${OFFICIAL:-.official}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}  # where the carried wheels are installed
LOG=$OUT/run_all.log
SUMMARY=$OUT/summary.txt
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."

if ls .whl/*.whl >/dev/null 2>&1; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/*.whl >>"$LOG" 2>&1; then
        export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "wheel install failed (see run_all.log); the official steps will likely fail" >>"$SUMMARY"
    fi
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$PY" -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)" 2>&1
    [ -f "$OFFICIAL/PREPARED" ] && cat "$OFFICIAL/PREPARED"
    echo "budget ${BUDGET} s"
} >>"$SUMMARY"

# step NAME CAP_SECONDS MIN_SECONDS CMD... : run CMD with stdout -> $OUT/NAME.md, stderr -> the log
step() {
    local name=$1 cap=$2 min=$3
    shift 3
    # caps and minimums are device seconds; a rehearsal (a CPU, maybe a busy one) runs in whatever is left
    [ -n "${REHEARSE:-}" ] && min=1 && cap=$BUDGET
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then
        return  # STEPS="a b" runs only those steps (a second call for what the first left out)
    fi
    if [[ " $EXTRA " == *" $name "* ]] && [[ " ${STEPS:-} " != *" $name "* ]]; then
        return  # extra steps run only when STEPS names them
    fi
    local left=$((BUDGET - SECONDS - 5))
    if ((left < min)); then
        echo "$name: skipped (${left} s left, needs ${min})" | tee -a "$SUMMARY"
        STATUS=1
        return
    fi
    local t=$((cap < left ? cap : left)) start=$SECONDS rc
    echo "=== $name (timeout ${t} s): $*" >>"$LOG"
    timeout -k 10 "$t" "$@" >"$OUT/$name.md" 2>>"$LOG"
    rc=$?
    local what=ok
    ((rc == 124 || rc == 137)) && what="TIMEOUT"
    ((rc != 0 && rc != 124 && rc != 137)) && what="failed"
    [ "$what" = ok ] || STATUS=1
    echo "$name: rc=$rc ($what) in $((SECONDS - start)) s (timeout ${t} s)" | tee -a "$SUMMARY"
}
STATUS=0
EXTRA="ours_compile_720p5 ours_fp8mm_720p5 probe_kernels parity_img_official32 parity_img_ours32"
EXTRA+=" official_720p5_cudnn parity_img_fp32 parity_img_cudnn ours_cudnn_fp8mm_720p5 parity_img_fast"
EXTRA+=" parity_480p5_whole profile_720p5 official_720p5_warm decode_720p5"
EXTRA+=" official_720p5_graphs ours_graphs_compile_720p5 parity_480p5_graphs"
EXTRA+=" parity_480p5_fast official_720p5_fast parity_480p5_routed parity_480p5_exact_compiled profile_720p5_fast"
EXTRA+=" ours_gguf_720p5 ours_gguf_q4k_720p5 official_720p5_fast_whole official_interact480"

# the CUDA-only unit tests (GQA-native SDPA, offloaded K/V, ...): a few seconds, output in the log
if [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" gpu_tests "* ]]; then
    mapfile -t GPU_TESTS < <(grep -rl "mark.gpu" tests)
    # up to 300 s: the CUDA graphs test compiles the tiny model's block parts with torch.compile (Triton) once
    timeout -k 10 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu "${GPU_TESTS[@]}" >>"$LOG" 2>&1
    rc=$?
    ((rc == 0)) || STATUS=1
    echo "gpu_tests: rc=$rc (pytest -m gpu; details in run_all.log)" | tee -a "$SUMMARY"
fi

if [ -n "${REHEARSE:-}" ]; then
    BENCH=(benchmarks/bench_generate.py --device cpu --config tiny --threads 2)
    C720=mid5 C480=mid5 C480_10=mid10 CIMG=0.06M:1 CINT=interact_mid CAP24=() CAP16=() SYNCS=()
    GRAPHS=()  # CUDA graphs: CUDA only
    PROBE=(benchmarks/gpu/probe_kernels.py --device cpu --config tiny --cases mid5 --sweep mid5)
    DECODE=(benchmarks/bench_decode.py --device cpu --config full --threads 2 --cells 1x2 --latents 3)
else
    BENCH=(benchmarks/bench_generate.py --device cuda --config full)
    PROBE=(benchmarks/gpu/probe_kernels.py --cases 720p5,480p5)
    DECODE=(benchmarks/bench_decode.py --device cuda --config full --cells 45x80 --latents 21)
    C720=720p5 C480=480p5 C480_10=480p10 CIMG=480p:1 CINT=interact480 CAP24=(--memory-cap-gb 24)
    CAP16=(--memory-cap-gb 16) SYNCS=(--check-syncs)
    GRAPHS=(--cuda-graphs)
fi
FAST=(--compile --norms composite "${GRAPHS[@]}")
step ours_fp8 210 60 "$PY" "${BENCH[@]}" --cases $C720,$C480,$C480_10 --weights fp8 "${SYNCS[@]}" \
    "${CAP24[@]}"
step ours_480p10_16gb 100 60 "$PY" "${BENCH[@]}" --cases $C480_10 --weights fp8 "${CAP16[@]}"
step parity_480p5 170 90 "$PY" "${BENCH[@]}" --cases $C480 --weights fp8 --official "$OFFICIAL" \
    --parity --parity-csv "$OUT/parity_480p5.csv" --parity-trace 12 --norms composite --attention sdpa_flash
step official_720p5 200 100 "$PY" "${BENCH[@]}" --cases $C720 --weights bf16 --official "$OFFICIAL"
# extra: the same with one warm-up generation per side first (the table times the second, the notes keep both)
step official_720p5_warm 330 230 "$PY" "${BENCH[@]}" --cases $C720 --weights bf16 --official "$OFFICIAL" --warmup
# extras: CUDA graphs for the steps of up to 6,144 tokens (infinitystar/cuda_graphs.py), against the official code in
# one process (warm: the warm-up generation captures, the timed one replays); with torch.compile; parity with them
step official_720p5_graphs 330 230 "$PY" "${BENCH[@]}" --cases $C720 --weights bf16 --official "$OFFICIAL" --warmup \
    "${GRAPHS[@]}"
step ours_graphs_compile_720p5 240 130 "$PY" "${BENCH[@]}" --cases $C720 --weights bf16 --compile --warmup "${GRAPHS[@]}"
step parity_480p5_graphs 170 90 "$PY" "${BENCH[@]}" --cases $C480 --weights fp8 --official "$OFFICIAL" \
    --parity --parity-csv "$OUT/parity_480p5_graphs.csv" --norms composite --attention sdpa_flash "${GRAPHS[@]}"
# extras: "fast" = the settings that time best (torch.compile with the official roundings kept, composite norms, CUDA
# graphs, the default attention routing: FlashAttention-2 below 4096 x 4096 tokens, cuDNN above), timed against the
# official code and parity-checked with the SAME settings (issue 7 asks for both at once); then which setting a parity
# failure comes from: the routing alone (eager), and compile + graphs on the official kernel (FlashAttention-2)
step parity_480p5_fast 240 120 "$PY" "${BENCH[@]}" --cases $C480 --weights fp8 --official "$OFFICIAL" \
    --parity --parity-csv "$OUT/parity_480p5_fast.csv" "${FAST[@]}"
step official_720p5_fast 360 240 "$PY" "${BENCH[@]}" --cases $C720 --weights bf16 --official "$OFFICIAL" --warmup \
    "${FAST[@]}"
# extra: the same with whole steps (no token blocks; 11.5 GB more peak): 1.496x in blocks, 1.503x whole (two calls)
step official_720p5_fast_whole 360 240 "$PY" "${BENCH[@]}" --cases $C720 --weights bf16 --official "$OFFICIAL" \
    --warmup "${FAST[@]}" --chunk 0
# extra: one InfinityStar-Interact clip at 480p (random 21-frame context): ours in bf16, the official code at its
# interact script's precision (fp32 blocks, 35 GB, under bf16 autocast): time, peak and equal codes
step official_interact480 240 120 "$PY" "${BENCH[@]}" --cases $CINT --weights bf16 --official "$OFFICIAL" \
    --warmup
# (the routed step also runs the official code a second time on cuDNN's kernel (forced), replaying its own
# draws: the parity check's noise floor, i.e. whether the official code itself stays under 2e-2 of itself when only
# its attention kernel changes; about 30 s more)
step parity_480p5_routed 200 120 "$PY" "${BENCH[@]}" --cases $C480 --weights fp8 --official "$OFFICIAL" \
    --parity --parity-csv "$OUT/parity_480p5_routed.csv" --norms composite --parity-floor cudnn
step parity_480p5_exact_compiled 240 120 "$PY" "${BENCH[@]}" --cases $C480 --weights fp8 --official "$OFFICIAL" \
    --parity --parity-csv "$OUT/parity_480p5_exact_compiled.csv" "${FAST[@]}" --attention sdpa_flash
# extra: where the fast settings' time goes (GPU kernel time by kind and GPU busy time by step size, warm: after
# a generation that compiles and captures), for the case where official_720p5_fast falls short of 1.5x
step profile_720p5_fast 240 150 "$PY" "${BENCH[@]}" --cases $C720 --weights bf16 --warmup --profile --no-memory \
    "${FAST[@]}"
step official_480p5 110 100 "$PY" "${BENCH[@]}" --cases $C480 --weights bf16 --official "$OFFICIAL"
# extras next: what issue 7's ratio needs besides official_720p5_warm (steps run in this file's order, not STEPS'):
# kernel timings at the largest steps' shapes and the attention routing's sweep, torch.compile, the decode
step probe_kernels 60 20 "$PY" "${PROBE[@]}"
# extra: torch.compile's speed-up at 720p 5 s, bf16 like official_720p5_warm's rows (compile time in the first run;
# H200: 108 s in all, of which the warm-up with compilation 68 s)
step ours_compile_720p5 240 120 "$PY" "${BENCH[@]}" --cases $C720 --weights bf16 --compile --warmup
# extra: the tokenizer decode of a 720p 5 s video (21 latents), ours (official latent plan) against the official
# tokenizer with the same weights, in bf16 as its scripts run it: time, peak memory, largest difference
step decode_720p5 150 60 "$PY" "${DECODE[@]}" --chunks official --official "$OFFICIAL" --warmup
# extra (only when STEPS names them), the follow-ups of the first run: each side's own bf16 error against an fp32 run of the other (480p image: the first clip)
step parity_img_official32 90 40 "$PY" "${BENCH[@]}" --cases $CIMG --weights fp8 --official "$OFFICIAL" --parity \
    --parity-fp32 official
step parity_img_ours32 90 40 "$PY" "${BENCH[@]}" --cases $CIMG --weights fp8 --official "$OFFICIAL" --parity \
    --parity-fp32 ours
# extra, for the next GPU session (the first found cuDNN's attention 1.6x flash's): ours with cuDNN attention vs
# the official code at 720p 5 s; both sides in fp32 (the method check at full size); cuDNN's own bf16 error;
# the fastest settings (cuDNN attention + fp8 matmuls)
step official_720p5_cudnn 200 100 "$PY" "${BENCH[@]}" --cases $C720 --weights bf16 --official "$OFFICIAL" \
    --attention cudnn
step parity_img_fp32 120 50 "$PY" "${BENCH[@]}" --cases $CIMG --weights fp8 --official "$OFFICIAL" --parity \
    --parity-fp32 both --parity-tol 1e-3
step parity_img_cudnn 90 40 "$PY" "${BENCH[@]}" --cases $CIMG --weights fp8 --official "$OFFICIAL" --parity \
    --parity-fp32 official --attention cudnn
step ours_cudnn_fp8mm_720p5 100 60 "$PY" "${BENCH[@]}" --cases $C720 --weights fp8 --fp8-matmul --attention cudnn
step parity_img_fast 90 40 "$PY" "${BENCH[@]}" --cases $CIMG --weights fp8 --official "$OFFICIAL" --parity \
    --attention cudnn --parity-trace 12
step parity_480p5_whole 170 90 "$PY" "${BENCH[@]}" --cases $C480 --weights fp8 --official "$OFFICIAL" \
    --parity --parity-trace 12 --norms composite --attention sdpa_flash --chunk none
step profile_720p5 150 90 "$PY" "${BENCH[@]}" --cases $C720 --weights bf16 --profile --no-memory
# extra: fp8 matmuls (torch._scaled_mm) at 720p 5 s, against ours_fp8's 720p row
step ours_fp8mm_720p5 150 90 "$PY" "${BENCH[@]}" --cases $C720 --weights fp8 --fp8-matmul
# extra: GGUF blocks (Q8_0 and Q4_K, dequantized per layer and call) at 720p 5 s under the 24 GB cap: time and peak
step ours_gguf_720p5 240 120 "$PY" "${BENCH[@]}" --cases $C720 --weights gguf_q8_0 "${CAP24[@]}"
step ours_gguf_q4k_720p5 240 120 "$PY" "${BENCH[@]}" --cases $C720 --weights gguf_q4_k "${CAP24[@]}"

echo "total ${SECONDS} s" >>"$SUMMARY"
shopt -s nullglob
for f in "$SUMMARY" "$OUT"/*.md; do
    echo "----- $(basename "$f")"
    cat "$f"
done
exit "$STATUS"  # 1 when a step failed (a parity FAIL included), timed out or was skipped
