#!/usr/bin/env bash
# What a GPU lease owes (issue 12 §3), as two prepared commands of at most 8 minutes each. A lease
# gives 15 minutes of device time for the whole task (machine start and idle included), at most 10
# a command: run `main` first; run `rest` only with the time that is left (bench/RESULTS.md).
#
#   bash bench/gpu_session.sh          # stage main: env, tests/gpu, 8B bf16 throughput, the batch profile
#   bash bench/gpu_session.sh rest     # stage rest: 8B ArmoRM throughput, latency, the offline job with the
#                                      # Llama 3 tokenizer, pytest-benchmark, the CPU suite on the GPU image
#   bash bench/gpu_session.sh fp8      # stage fp8: build csrc/, its GPU tests, FP8 vs bf16 speed (issue 15)
#
# Every step has its own timeout (the budgets, in seconds, are in the table below; each stage's sum
# with its ~1 min of install and imports is at most 8 minutes) and writes its JSON and junit XML to
# $OUT (the device tool brings that folder back; ./gpu_out otherwise) as soon as it ends, its output
# to the stage's one log, $OUT/<stage>.log, so a device call cut short still returns every step that
# finished. One log a stage: the device tool brings back at most 8 files a call (main 7, rest 8, fp8
# 4). A step that fails or times out is marked in $OUT/steps.tsv and the next step runs.
#
# Data: $RMSERVE_DATA (default out/data; carry ["out"]) holds alpaca_eval_bon.jsonl.gz,
# hh_rlhf_harmless_test.jsonl.gz and llama3-tokenizer/ copied from ../shared/data; without it the
# benchmarks fall back to synthetic lengths and say so, and the offline step is skipped.
# RMSERVE_COMMIT names the commit (the device gets no .git).
# DEVICE=cpu runs both stages here on the CPU (small shape, few rows, budgets doubled; tests/gpu skips
# itself and the suite step only collects): a dry run of this script, each stage under 8 minutes.
set -uo pipefail
stage=${1:-main}
export out=${OUT:-gpu_out}
mkdir -p "$out"
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 RMSERVE_DATA=${RMSERVE_DATA:-out/data}
export RMSERVE_COMMIT=${RMSERVE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
data=$RMSERVE_DATA

# Step budgets in seconds (estimates for an H100/H200: no GPU has run this yet; steps.tsv of the first
# lease says how they held). main: 40 install/env + 160 + 190 + 80 = 470; rest: 20 + 100 + 70 + 140 + 60 + 90 = 480;
# fp8: 20 + 300 (the csrc build with nvcc, tests/gpu/test_fp8_cuda.py, bench/fp8_speed.py) = 320.
declare -A budget=([tests_gpu]=160 [throughput_8b]=190 [profile]=80
                   [throughput_armorm]=100 [latency]=70 [offline]=140 [pytest_bench]=60 [suite]=90 [fp8]=300)
if [ "$device" = cpu ]; then   # a dry run: every step with little work, twice the time (2 shared cores)
  size=(--device cpu --shape small)
  rows=8 profile=(--rows 16 --max-batch-tokens 1024 --reps 2) latency=(--tokens 128 --reps 2)
  bench=(--benchmark-max-time=0.05 --benchmark-min-rounds=1 --benchmark-warmup=off)
  export RMSERVE_BENCH_DEVICE=cpu RMSERVE_BENCH_ROWS=4
  for name in "${!budget[@]}"; do budget[$name]=$((2 * budget[$name])); done
else
  size=(--device cuda --shape 8b)
  rows=${ROWS:-800} profile=(--rows "${ROWS:-800}" --reps 5) latency=() bench=()
  # pytest_bench: the 8B layer shape at 8 layers (BENCH_LAYERS): its 60 s hold the engine's graph capture
  # and 8 transformers runs, and pytest-benchmark writes its JSON only when the session ends, so a
  # timeout would lose it all; throughput_8b measures full depth
  export RMSERVE_BENCH_ROWS=${BENCH_ROWS:-32} RMSERVE_BENCH_LAYERS=${BENCH_LAYERS:-8}
fi

log=$out/$stage.log
step() {   # step NAME CMD...: run CMD under NAME's time budget; output to the screen and the stage's log
  local name=$1; shift
  local start=$SECONDS
  echo "== $name (budget ${budget[$name]} s): $*" | tee -a "$log"
  timeout --kill-after=10 "${budget[$name]}" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  local what=ok; [ "$rc" = 0 ] || what="exit $rc"; [ "$rc" = 124 ] && what="TIMED OUT"
  echo "== $name: $what after $((SECONDS - start)) s" | tee -a "$log"
  printf '%s\t%s\t%s\t%s\n' "$stage" "$name" "$what" "$((SECONDS - start))" >>"$out/steps.tsv"
  [ "$rc" = 0 ] || status=1
}

# rmserve itself, offline (the device machine reaches no package index); its dependencies are in the image.
# Without csrc/ (its nvcc build takes minutes): stage fp8 builds it.
if ! $py -c "import rmserve.kernels" 2>/dev/null; then
  RMSERVE_BUILD_CSRC=0 timeout 60 $py -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$log" 2>&1 \
    || { cat "$log"; exit 1; }
fi
timeout_flag=(); $py -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout=90)
xdist=(); [ "$device" != cpu ] && $py -c "import xdist" 2>/dev/null && xdist=(-n 8)   # the GPU image: 16 cores

status=0
case "$stage" in
  main)
    {
      date -u; echo "commit $RMSERVE_COMMIT, stage main, device $device"; nvidia-smi 2>&1 | head -15
      $py - <<'EOF'
import importlib, torch, triton, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "transformers", transformers.__version__)
print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
for name in ("flash_attn", "fastapi", "uvicorn", "pydantic", "httpx", "prometheus_client", "ray", "datasets",
             "pandas", "pyarrow", "pytest_timeout", "pytest_benchmark"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', 'present')}")
    except ImportError:
        print(f"{name} missing")
EOF
    } >"$out/env.txt" 2>&1
    cat "$out/env.txt"
    # GPU tests first: engines with small token budgets (the graph ladder captures fast), per-test timeouts.
    step tests_gpu $py -m pytest -q -rfEs -p no:cacheprovider tests/gpu "${timeout_flag[@]}" \
      --junitxml="$out/tests_gpu.xml"
    # 8B bf16, BT head: rmserve with graphs, sharing on (the default) and off, eager; transformers padded b16.
    step throughput_8b $py bench/throughput.py "${size[@]}" --rows "$rows" --families bt --share-prefix both \
      --eager --batch-sizes 16 --orders input,sorted --no-naive --json "$out/throughput_8b.json"
    step profile $py bench/profile_batch.py "${size[@]}" "${profile[@]}" --json "$out/profile.json" \
      --trace "$out/trace.json"
    [ -f "$out/trace.json" ] && gzip -f "$out/trace.json"
    ;;
  rest)
    step throughput_armorm $py bench/throughput.py "${size[@]}" --rows "$rows" --families armorm --batch-sizes "" \
      --no-naive --json "$out/throughput_armorm.json"
    step latency $py bench/latency.py --device "$device" "${latency[@]}" --json "$out/latency.json"
    # The main command end to end: a sharded bf16 ArmoRM checkpoint of the 8B layer shape (LAYERS, default 8)
    # with the real Llama 3 tokenizer (vocabulary 128,256), on HH-RLHF pairs, prompts shared and not.
    export pairs=$data/hh_rlhf_harmless_test.jsonl.gz data device py
    if [ -f "$pairs" ] && [ -f "$data/llama3-tokenizer/tokenizer.json" ]; then
      offline() {
        local ckpt=/tmp/rmserve-armorm-ckpt input=$pairs shape=(--shape 8b --layers "${LAYERS:-8}" --dtype bfloat16)
        if [ "$device" = cpu ]; then   # a few pairs through the small shape
          shape=(--shape small --layers 2 --dtype float32)
          input=/tmp/rmserve-hh-head.jsonl; gzip -dc "$pairs" | head -n "${OFFLINE_ROWS:-24}" >"$input"
        fi
        $py bench/write_checkpoint.py "$ckpt" --family armorm "${shape[@]}" --shards 4 \
          --tokenizer "$data/llama3-tokenizer" || return 1
        local rc=0 mode
        for mode in shared whole; do
          local flag=(); [ $mode = whole ] && flag=(--no-share-prefix)
          echo "-- rmserve score ($mode prompts)"
          $py -m rmserve.cli score "$input" --model "$ckpt" --output "/tmp/hh_$mode.parquet" --id-field pair_id \
            --device "$device" --overwrite --quiet "${flag[@]}"
          local r=$?; [ $r = 0 ] || [ $r = 3 ] || rc=1   # 3: done, some rows could not be scored (listed)
          cp "/tmp/hh_$mode.parquet.summary.json" "$out/offline_$mode.summary.json" 2>/dev/null
        done
        return $rc
      }
      export -f offline
      step offline bash -c offline
    else
      echo "== offline: skipped, no $pairs or $data/llama3-tokenizer (copy them from ../shared/data)" \
        | tee -a "$log"
    fi
    # pytest-benchmark's JSON of the same comparisons, on $RMSERVE_BENCH_ROWS samples (BENCH_ROWS, default 32).
    step pytest_bench $py -m pytest -q -p no:cacheprovider bench/ --benchmark-only "${bench[@]}" \
      --benchmark-json="$out/pytest_bench.json" "${timeout_flag[@]}"
    # The CPU suite on the GPU image's packages (its torch, Triton interpreter and transformers), CUDA hidden
    # (its CLI tests take the default device and compare with fp32 CPU engines); optional extras skip cleanly.
    # On DEVICE=cpu only collected: CI runs it here.
    collect=(); [ "$device" = cpu ] && collect=(--collect-only)
    step suite env CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 $py -m pytest -q -rfEs -p no:cacheprovider tests --ignore=tests/gpu \
      "${collect[@]}" "${xdist[@]}" "${timeout_flag[@]}" --junitxml="$out/suite.xml"
    ;;
  fp8)
    # csrc/ built here (nvcc, sm_90a), its kernels against their references, then FP8 vs bf16 GEMMs, the
    # csrc ops' GB/s and engine tokens/s at the 8B layer shape (bench/fp8_speed.py: no data needed).
    [ "$device" = cpu ] && { echo "stage fp8 needs CUDA"; exit 2; }
    step fp8 bash -c "RMSERVE_BUILD_CSRC=1 $py -m pip install -q --no-deps --no-build-isolation --no-index -e . \
      && RMSERVE_REQUIRE_CSRC=1 $py -m pytest -q -rfEs -p no:cacheprovider tests/gpu/test_fp8_cuda.py \
      ${timeout_flag[*]} --junitxml=$out/fp8_tests.xml && $py bench/fp8_speed.py --json $out/fp8_speed.json"
    ;;
  *)
    echo "unknown stage '$stage' (main, rest or fp8)" >&2
    exit 2
    ;;
esac
echo "stage $stage: $([ $status = 0 ] && echo ok || echo 'FAILED (see the logs)'); files in $out"
exit $status
