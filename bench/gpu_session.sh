#!/usr/bin/env bash
# Everything a GPU lease owes, in stages that each fit one 10-minute device call (issues 4 and 8;
# bench/RESULTS.md says how the numbers are recorded):
#
#   bash bench/gpu_session.sh tests       # install, environment, tests/gpu, then the rest of the suite as CI runs it
#   bash bench/gpu_session.sh throughput  # 8B shape, BT head: rmserve (graphs and eager) vs transformers padded rows
#   bash bench/gpu_session.sh profile     # 8B ArmoRM throughput, single-request latency, the batch profile
#   bash bench/gpu_session.sh pytest      # pytest bench/ --benchmark-only (kernels and the same comparisons)
#   bash bench/gpu_session.sh offline     # `rmserve score` on HH-RLHF pairs, 8B layer shape (LAYERS=8), shared vs whole
#
# Logs and JSON go to $OUT (the device tool brings that folder back) or ./gpu_out. The real
# workload is read from $RMSERVE_DATA (default out/data: copy alpaca_eval_bon.jsonl.gz,
# hh_rlhf_harmless_test.jsonl.gz and llama3-tokenizer/ from ../shared/data there and carry `out`); without it the benchmarks use
# synthetic lengths and say so. RMSERVE_COMMIT names the commit (the device gets no .git).
# DEVICE=cpu runs every stage on the CPU with the small shape (a dry run of this script).
set -uo pipefail
stage=${1:?usage: bench/gpu_session.sh tests|throughput|profile|pytest|offline}
out=${OUT:-gpu_out}
mkdir -p "$out"
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 RMSERVE_DATA=${RMSERVE_DATA:-out/data}
export RMSERVE_COMMIT=${RMSERVE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
if [ "$device" = cpu ]; then
  size=(--device cpu --shape small --rows 48)
  export RMSERVE_BENCH_DEVICE=cpu RMSERVE_BENCH_ROWS=8
else
  size=(--device cuda --shape 8b --rows "${ROWS:-1000}")
fi

# rmserve itself, offline (the device machine reaches no package index); its dependencies are in the image.
if ! $py -c "import rmserve.kernels" 2>/dev/null; then
  $py -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 \
    || { cat "$out/install.log"; exit 1; }
fi

run() {   # run NAME CMD...: the command's output to the screen and $out/NAME.log; its status is kept
  echo "== $*" | tee "$out/$1.log"
  local name=$1; shift
  "$@" 2>&1 | tee -a "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc" | tee -a "$out/$name.log"
  return "$rc"
}

status=0
case "$stage" in
  tests)
    {
      date -u; echo "commit $RMSERVE_COMMIT"; nvidia-smi 2>&1 | head -15
      $py -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__); \
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
      $py -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>&1 | tail -1
    } >"$out/env.txt" 2>&1
    cat "$out/env.txt"
    run tests_gpu timeout 240 $py -m pytest -q -rfEs tests/gpu --junitxml="$out/tests_gpu.xml" || status=1
    # The rest of the suite as CI runs it (CPU, Triton interpreter): its CLI tests take the default device
    # and compare with fp32 CPU engines, so CUDA is hidden from it.
    run tests_all env CUDA_VISIBLE_DEVICES= timeout 300 $py -m pytest -q -rfE tests --ignore=tests/gpu || status=1
    ;;
  throughput)
    run throughput_bt $py bench/throughput.py "${size[@]}" --families bt --eager \
      --json "$out/throughput_bt.json" || status=1
    ;;
  profile)
    run throughput_armorm $py bench/throughput.py "${size[@]}" --families armorm --batch-sizes "" --no-naive \
      --json "$out/throughput_armorm.json" || status=1
    run latency $py bench/latency.py --device "$device" --json "$out/latency.json" || status=1
    run profile $py bench/profile_batch.py "${size[@]}" --json "$out/profile.json" --trace "$out/trace.json" \
      || status=1
    [ -f "$out/trace.json" ] && gzip -f "$out/trace.json"
    ;;
  offline)   # the main command end to end: a sharded bf16 checkpoint of the 8B layer shape on disk, HH-RLHF pairs
    ckpt=${CKPT:-/tmp/rmserve-armorm-8b-shape}
    if [ "$device" = cpu ]; then shape='hidden=64, heads=4, kv_heads=2, intermediate=160, layers=2'
    else shape="hidden=4096, heads=32, kv_heads=8, intermediate=14336, layers=${LAYERS:-8}, gating_hidden_dim=1024"; fi
    run write_checkpoint $py -c "import torch; from rmserve.tiny import write_tiny_checkpoint; \
write_tiny_checkpoint('$ckpt', 'armorm', $shape, dtype=torch.bfloat16, shards=4)" || status=1
    pairs=$RMSERVE_DATA/hh_rlhf_harmless_test.jsonl.gz
    for mode in shared whole; do
      flag=(); [ $mode = whole ] && flag=(--no-share-prefix)
      run "offline_$mode" $py -m rmserve.cli score "$pairs" --model "$ckpt" --output "/tmp/hh_$mode.parquet" \
        --id-field pair_id --device "$device" --overwrite --quiet "${flag[@]}"
      rc=$?; [ $rc = 0 ] || [ $rc = 3 ] || status=1   # 3: done, some rows could not be scored (listed)
      cp "/tmp/hh_$mode.parquet.summary.json" "$out/offline_$mode.summary.json" 2>/dev/null
    done
    ;;
  pytest)
    run pytest_bench timeout 540 $py -m pytest -q bench/ --benchmark-only --benchmark-json="$out/pytest_bench.json" \
      || status=1
    ;;
  *)
    echo "unknown stage '$stage'" >&2
    exit 2
    ;;
esac
echo "stage $stage: $([ $status = 0 ] && echo ok || echo 'FAILED (see the logs)'); files in $out"
exit $status
