#!/usr/bin/env bash
# Every GPU check in one go, for a machine with a CUDA GPU and a python3 that has torch:
#   bash bench/gpu_check.sh OUTDIR
# 1. the benchmark in CUDA mode (bench.run --device cuda: vit_base, batch 64, bf16),
# 2. with COMPILE_S=<seconds> set, the sub-network pairs again under torch.compile
#    (bench.run --compile --only COMPILE_KEYS), once per mode in COMPILE_MODES (default
#    "default reduce-overhead"), with TORCH_LOGS=perf_hints so a skipped CUDA graph says why,
#    then a profile of the compiled vector pair and frozen model in the last of those modes,
# 3. the CUDA tests (tests/test_cuda.py: CUDA against CPU, autocast, the three stages on the GPU),
# 4. the benchmark at batch 256, then a profile of four training contenders (bench.profile) and the
#    elementwise kernels of a vector layer (bench.kernels),
# 5. with HOST_S=<seconds> set, the host-bound CPU proxy (bench.host --amp) on the same code, so the
#    proxy's ratios can be set beside the GPU's batch-64 ones.
# Timings come first, so a loan that ends early still brings back the numbers it was lent for.
# On the H200 (torch 2.11) the eager bench.run takes 30-45 s, the CUDA tests about 90 s, and each
# compile mode about 215 s (5 models), so one call that fits a 10-minute command limit is
#   COMPILE_S=240 COMPILE_MODES=reduce-overhead bash bench/gpu_check.sh /tmp/g; tar czf OUT/gpu.tgz -C /tmp g
# (more than 8 files come back only as an archive).
# Wheels in .whl/ (e.g. the timm and peft versions the project pins) are installed first, without
# dependencies, into a private folder. Each step has its own time limit (BENCH_S, COMPILE_S per
# mode, CUDA_TESTS_S, B256_S, PROFILE_S, KERNELS_S, HOST_S), so one that hangs leaves the others
# their time, and a limit of 0 skips its step; the exit status is the first failure's. On the H200
# each eager bench.run took 30-45 s, so the defaults are caps, not durations.
set -uo pipefail
out=${1:-runs/gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/glora-site .whl/*.whl \
        && export PYTHONPATH=/tmp/glora-site${PYTHONPATH:+:$PYTHONPATH}
fi
status=0
step() {  # step SECONDS LOGFILE COMMAND...; SECONDS 0 skips the step (timeout 0 would mean no limit)
    local limit=$1 log=$2
    shift 2
    if [ "$limit" -le 0 ]; then echo "== skipped (limit 0): $*" | tee -a "$log"; return; fi
    echo "== $* (limit ${limit}s)" | tee -a "$log"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== rc $rc in $((SECONDS - t0))s" | tee -a "$log"
    [ "$status" -ne 0 ] || status=$rc
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import sys, torch, timm, peft; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, 'peft', peft.__version__, 'gpu', torch.cuda.get_device_name())"
} 2>&1 | tee "$out/gpu.txt"
step "${BENCH_S:-240}" "$out/bench_cuda.log" python3 -m bench.run --device cuda --out "$out/results-cuda.json"
# Only the sub-network pairs change under --compile (the supernet pair, merged inference, search
# and memory stay eager), so only they are timed again; each mode compiles five models.
if [ "${COMPILE_S:-0}" -gt 0 ]; then
    for mode in ${COMPILE_MODES:-default reduce-overhead}; do
        step "$COMPILE_S" "$out/bench_cuda_compile.log" env TORCH_LOGS=perf_hints python3 -m bench.run --device cuda --compile --compile-mode "$mode" \
            --only ${COMPILE_KEYS:-subnet_vs_peft_glora_step_lora subnet_vs_peft_glora_step_vector} --out "$out/results-cuda-compile-$mode.json"
    done
    # where the compiled vector step's kernel time goes (CUDA graphs leave no launch cost to see)
    step "${PROFILE_S:-90}" "$out/profile.log" python3 -m bench.profile --device cuda --steps 3 --out /tmp/glora-profile \
        --compile-mode "${COMPILE_MODES##* }" --contenders subnet_vector peft_glora_vector frozen
fi
step "${CUDA_TESTS_S:-300}" "$out/cuda_tests.log" python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py
step "${B256_S:-${BENCH_S:-240}}" "$out/bench_cuda_b256.log" python3 -m bench.run --device cuda --batch 256 --out "$out/results-cuda-b256.json"
step "${PROFILE_S:-90}" "$out/profile.log" python3 -m bench.profile --device cuda --steps 3 --out /tmp/glora-profile \
    --contenders peft_lora supernet subnet_vector peft_glora_vector
step "${KERNELS_S:-60}" "$out/profile.log" python3 -m bench.kernels --device cuda
# Optional (HOST_S=seconds, default off): the host-bound proxy on this machine's CPU, one thread.
if [ "${HOST_S:-0}" -gt 0 ]; then
    step "$HOST_S" "$out/bench_host.log" python3 -m bench.host --amp --rounds 20 --out "$out/results-host-amp.json"
fi
for f in /tmp/glora-profile/profile-*.txt; do [ -e "$f" ] && { echo "### $f"; cat "$f"; }; done > "$out/profiles.txt"
exit "$status"
