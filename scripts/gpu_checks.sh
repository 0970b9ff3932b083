#!/usr/bin/env bash
# The GPU checks in one call, for a lent GPU machine whose Python has torch/transformers/accelerate but
# not the rest of our stack: `bash scripts/gpu_checks.sh [STEPS...]` (default: smoke packing pytest bench).
#   smoke   the tiny MoE the user's way (--mode single, generation eval on padded batches of 4, packing,
#           gradient checkpointing) on Unsloth and hf, bf16 and 4-bit; then --mode two-stage on Unsloth
#   packing the packed-batch check on CUDA (each trained token's loss as with its example alone; Unsloth's
#           own attention on dense Qwen3 gets flattened rows; the MoE in bf16 on auto attention, flash-attn
#           where it imports): tests/test_gpu.py -k packed_examples
#   pytest  pytest -m gpu (Qwen3-30B-A3B's widths, 2 layers: train, evaluate, checkpoint, --resume)
#   bench   python -m bench.gpu (tokens/s, MFU, peak memory, evaluation seconds)
# The missing packages come as one tarball, .whl/site.tgz (built by scripts/gpu_site.sh), unpacked to
# /tmp/site and put first on sys.path by a .pth file, so that every child process (torchrun, pytest's
# subprocesses, which set their own PYTHONPATH) sees them. Logs go to $OUT/logs.tgz after each step; a
# table at the end. First measured on an H200 on 2026-11-30 (bench/RESULTS.md).
set -u
OUT=${OUT:-/tmp/gpu-out}
LOGS=$(mktemp -d)
STEPS=${*:-smoke packing pytest bench}
BUDGET_S=${BUDGET_S:-520}  # keep under the call's timeout_s: a killed script returns no table
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
START=$SECONDS
RESULTS=()

if [ -f .whl/site.tgz ] && [ ! -d /tmp/site ]; then
  mkdir -p /tmp/site && tar xzf .whl/site.tgz -C /tmp/site
  SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "import sys; sys.path.insert(0, '/tmp/site')" > "$SITE/000-gpu-checks.pth"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers, trl, peft, datasets, bitsandbytes, accelerate; print('torch', torch.__version__, torch.version.cuda, '| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__, '| datasets', datasets.__version__, '| bitsandbytes', bitsandbytes.__version__, '| accelerate', accelerate.__version__)" 2>&1 | tail -3

record() {  # name, rc, log: one row of the final table
  local tail_line
  tail_line=$(grep -E "summary|FAILED|Error|error:|passed|failed" "$3" | tail -1 | cut -c1-160)
  RESULTS+=("$(printf '%-34s rc=%-4s %4ss  %s' "$1" "$2" "$4" "$tail_line")")
  echo "== $1: rc=$2 (${4}s)"
}

save_logs() {  # after every step: a call stopped at its limit still brings back what ran
  tar czf "$OUT/logs.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' -C "$LOGS" . 2>/dev/null
  [ -f bench/RESULTS.md ] && cp bench/RESULTS.md "$OUT/RESULTS.md"
}

run_step() {  # name, timeout_s, command...: skipped when the time left (BUDGET_S in all) is shorter
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS log="$LOGS/$name.log"
  if (( SECONDS - START + limit > BUDGET_S )); then
    RESULTS+=("$(printf '%-34s skipped: %ss left of BUDGET_S=%s' "$name" $((BUDGET_S - SECONDS + START)) "$BUDGET_S")")
    return
  fi
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  record "$name" "$rc" "$log" $((SECONDS - t0))
  tail -n 4 "$log"
  save_logs
}

MOE=(--mode single model_name=tiny-moe max_train_samples=32 max_steps=4 eval_steps=2 save_steps=4
     eval_max_samples=8 gen_eval_max_samples=8 gen_eval_batch_size=4 micro_batch_size=4 logging_steps=1
     router_aux_loss_coef=0.001 packing=true gradient_checkpointing=true dtype=bfloat16)
for step in $STEPS; do
  case $step in
  smoke)
    for backend in unsloth hf; do
      for quant in false true; do
        # Unsloth's first step compiles each decoder block: about 90 s on a fresh machine
        run_step "tiny-moe-$backend-4bit=$quant" "$([ $backend = unsloth ] && echo 200 || echo 100)" $PY qwen_finetune.py --backend "$backend" \
          "${MOE[@]}" "load_in_4bit=$quant" "output_dir=$LOGS/out-$backend-$quant"
      done
    done
    run_step "tiny-moe-two-stage-unsloth" 200 $PY qwen_finetune.py --mode two-stage --backend unsloth \
      model_name=tiny-moe max_train_samples=16 max_steps=2 eval_steps=1 eval_max_samples=8 \
      gen_eval_max_samples=8 gen_eval_batch_size=4 micro_batch_size=4 "output_dir=$LOGS/out-two-stage"
    ;;
  packing)
    run_step "packing-gpu" 300 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k packed_examples ;;
  pytest)
    run_step "pytest-gpu" 330 $PY -m pytest -m gpu -x -q -p no:cacheprovider tests/test_gpu.py ;;
  bench)
    run_step "bench-gpu" 300 $PY -m bench.gpu --only moe --moe-layers 4 --steps 8 --micro-batch 4 ;;
  esac
done
save_logs
echo; echo "== $(( SECONDS - START ))s in all"; printf '%s\n' "${RESULTS[@]}"
