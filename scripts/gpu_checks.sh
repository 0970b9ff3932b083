#!/usr/bin/env bash
# The GPU checks for one 15-minute window on a lent GPU machine whose Python has torch/transformers/
# accelerate but not the rest of our stack: `bash scripts/gpu_checks.sh [STEPS...]`, in order of evidence
# per minute (default: probe probe8):
#   probe     the real-width probe (bench/probe.py): Qwen3-30B-A3B's widths at 4 layers, bf16 and 4-bit,
#             Unsloth and hf: peak memory and time of a packed 1 x 1536 training step, a prefill and decode
#             steps of a generation batch of 64 (the preset's auto batch), each against the dry run's plan
#   probe8    the same at 8 layers, bf16 on Unsloth (the user's run): the per-layer slope
#   two-stage the 4-bit two-stage run at 2 real-width layers killed in stage 2 and resumed (tests/test_gpu.py)
#   zero2     torchrun --nproc_per_node=1 with each shipped ZeRO-2 config (DeepSpeed carried; zero2.json
#             compiles CPU Adam), killed after a checkpoint and resumed (tests/test_gpu.py)
#   pytest    the rest of pytest -m gpu (both backends x precisions at 2 real-width layers, packing on CUDA)
#   smoke     (not by default: ran on 2026-11-30) the tiny MoE on Unsloth and hf, bf16 and 4-bit
#   bench     (not by default) python -m bench.gpu: tokens/s and MFU over several steps
# A call may run 10 minutes: the default is the probe; the window's second call names the rest,
# `bash scripts/gpu_checks.sh two-stage zero2 pytest`.
# Each step has its own time limit and is skipped when the budget left is shorter; logs and
# bench/RESULTS.md go to $OUT after every step. The missing packages come as one tarball, .whl/site.tgz
# (built by scripts/gpu_site.sh), unpacked to /tmp/site and put first on sys.path by a .pth file, so that
# every child process (torchrun, pytest's subprocesses, which set their own PYTHONPATH) sees them.
set -u
OUT=${OUT:-/tmp/gpu-out}
LOGS=$(mktemp -d)
STEPS=${*:-probe probe8}
BUDGET_S=${BUDGET_S:-560}  # keep under the call's timeout_s (600 at most): a killed script returns no table
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
START=$SECONDS
RESULTS=()

if [ -f .whl/site.tgz ] && [ ! -d /tmp/site ]; then
  mkdir -p /tmp/site && tar xzf .whl/site.tgz -C /tmp/site
  SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "import sys; sys.path.insert(0, '/tmp/site')" > "$SITE/000-gpu-checks.pth"
fi
# the ninja wheel's binary (DeepSpeed's CPU Adam JIT build runs `ninja`; torch looks for it on PATH)
for d in /tmp/site/ninja-*.data/scripts; do [ -d "$d" ] && export PATH="$d:$PATH"; done
command -v c++ >/dev/null || echo "warning: no c++ compiler: zero2.json's CPU Adam cannot be built (zero2 step)"
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
  # a run started in its own session (the tests' setsid, torchrun's workers) outlives a timeout: free the GPU
  pkill -9 -f "qwen_finetune.py|torch.distributed.run|bench.probe" 2>/dev/null; sleep 2
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
  probe)
    run_step "probe-4-layers" 330 $PY -m bench.probe --layers 4 --precisions bf16,4bit --backends unsloth,hf \
      --gen-batch 64 --new-tokens 8 ;;
  probe8)
    run_step "probe-8-layers" 180 $PY -m bench.probe --layers 8 --precisions bf16 --backends unsloth \
      --gen-batch 64 --new-tokens 8 ;;
  two-stage)
    run_step "two-stage-resume" 240 $PY -m pytest -m gpu -x -q -p no:cacheprovider tests/test_gpu.py \
      -k killed_in_stage2 ;;
  zero2)
    run_step "zero2-torchrun" 300 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py \
      -k one_gpu_deepspeed ;;
  packing)
    run_step "packing-gpu" 300 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k packed_examples ;;
  pytest)
    run_step "pytest-gpu" 330 $PY -m pytest -m gpu -x -q -p no:cacheprovider tests/test_gpu.py \
      -k "not killed_in_stage2 and not one_gpu_deepspeed" ;;
  bench)
    run_step "bench-gpu" 300 $PY -m bench.gpu --only moe --moe-layers 4 --steps 8 --micro-batch 4 ;;
  esac
done
save_logs
echo; echo "== $(( SECONDS - START ))s in all"; printf '%s\n' "${RESULTS[@]}"
