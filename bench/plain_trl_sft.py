"""The baseline a user would write: plain TRL SFTTrainer + PEFT LoRA, about 40 lines.

    python -m bench.plain_trl_sft MODEL_DIR TRAIN.json OUT_DIR

Same settings as the tiny preset (LoRA r16/alpha32 on attention + MLP,
lr 4e-3 cosine to 5%, 3% warm-up, micro-batch 8, max_length 640, float32,
seed 3407, one epoch). The one line that is not plain: on a CPU, TRL 1.15's
loss kernel is Triton-only, so finetune/trl_cpu.py swaps in its torch twin.
"""

import sys

from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from bench.step_timer import StepTimer
from core.prompt import record_prompt_completion
from core.records import load_records
from finetune import trl_cpu

model_dir, train_file, out_dir = sys.argv[1:4]
trl_cpu.install_if_needed()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
data = Dataset.from_list([record_prompt_completion(r) for r in load_records(train_file)])
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
args = SFTConfig(output_dir=out_dir, per_device_train_batch_size=8, learning_rate=4e-3, num_train_epochs=1,
                 lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.05},
                 warmup_steps=0.03, max_length=640, seed=3407, logging_steps=10, save_strategy="no",
                 gradient_checkpointing=False,  # TRL turns it on by default; the tiny preset has it off
                 bf16=False, report_to="none")  # float32, as the tiny preset
trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                     peft_config=lora, callbacks=[StepTimer()])
trainer.train()
