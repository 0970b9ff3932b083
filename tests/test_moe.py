"""The user's architecture, run the way the user runs it: the tiny Qwen3-MoE with generation
evaluation during training (batch > 1, left padding), on both backends.

The router load-balancing loss is switched on here (the checkpoint's 0.001): that is the setting
under which `generate` used to fail at the first evaluation (transformers#42100), and the one where
the aux loss must be logged apart from the task loss and added the same way with distillation.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from test_trainer import ok, summary, train

MOE = ["model_name=tiny-moe", "max_train_samples=16", "max_steps=3", "eval_steps=1", "save_steps=3",
       "eval_max_samples=8", "gen_eval_max_samples=6", "gen_eval_batch_size=4", "micro_batch_size=4",
       "logging_steps=1", "router_aux_loss_coef=0.001"]


def assert_moe_stage(out, stage: str, backend: str, steps: int = 3) -> dict:
    s = summary(out, stage)
    assert s["backend"] == backend and s["global_step"] == steps
    # a generation eval after every step, mid-training included, on a padded batch
    for step in range(1, steps + 1):
        metrics = json.loads((out / stage / f"gen_metrics_step{step}.json").read_text())
        assert metrics["gen_num_examples"] == 6
    assert "gen_json_parse_rate" in s["metrics"]
    aux = s["router_aux_loss"]
    assert aux["moe"] and aux["on"] and aux["coef"] == 0.001 and aux["checkpoint_coef"] == 0.001
    # logged at every step, apart from the task loss (loss_task = loss - coef * aux_loss)
    assert [a[0] for a in aux["aux_losses"]] == list(range(1, steps + 1))
    for step, task, value in aux["aux_losses"]:
        assert value > 0.5  # top-2 of 8 experts: about 2 when balanced
    assert s["metrics"]["eval_aux_loss"] > 0.5
    assert s["metrics"]["eval_loss_task"] == pytest.approx(
        s["metrics"]["eval_loss"] - 0.001 * s["metrics"]["eval_aux_loss"], rel=1e-4)
    return s


@pytest.mark.parametrize("backend, packing", [("hf", "false"), ("unsloth", "true")])
def test_moe_single_with_generation_eval_keeps_training_as_it_was(tmp_path, backend, packing):
    """The user's command on the MoE: no crash at the evaluations, and after each generation eval the
    model trains as before it: gradient checkpointing, train mode, the tokenizer's padding side, use_cache and
    torch.compile's stance.
    On Unsloth packed (the production preset's setting), on hf padded."""
    result = ok(train("--mode", "single", "--backend", backend, "output_dir=out", *MOE, f"packing={packing}",
                      "gradient_checkpointing=true",
                      "extra_callbacks=trainer_hooks.RecordTrainingState,trainer_hooks.EagerStanceInGenerate",
                      cwd=tmp_path))
    s = assert_moe_stage(tmp_path / "out", "single", backend)
    assert s["experts_implementation"] == "eager" and "MoE experts run as eager" in result.stdout  # auto, CPU
    # read from the loaded model: on a CPU Unsloth leaves PEFT's expert LoRA (the fold) in place
    assert s["expert_lora"] == "peft-fold" and s["memory_plan"] is None  # no plan without a GPU
    assert s["packing"]["packing"] == (packing == "true") and s["packing"]["examples"] == 16
    assert (s["packing"]["rows"] < 16) == (packing == "true")
    # the attention the loaded model runs: on a CPU, packed rows get sdpa_varlen
    assert s["attn_implementation"] == ("sdpa_varlen" if packing == "true" else "sdpa")
    # the run plan it trained by (confirmed against the loaded model) is the one the dry run of the same
    # command prints on this machine, line and record
    dry = ok(train("--mode", "single", "--backend", backend, "output_dir=dry", *MOE, f"packing={packing}",
                   "gradient_checkpointing=true", "--dry-run", cwd=tmp_path))
    assert json.loads(dry.stdout.strip().splitlines()[-1])["run_plan"] == s["run_plan"]
    assert s["run_plan"]["rows_flattened"] == (packing == "true") and s["run_plan"]["experts"] == "eager"
    printed = [line.split("run plan", 1)[1].strip(" :") for line in result.stdout.splitlines() + dry.stdout.splitlines()
               if line.startswith(("run plan: ", "run plan     "))]
    assert len(printed) == 2 and printed[0] == printed[1], printed
    # the aux term is in the loss that is optimised: step 1 (same weights, same batch) without it is lower
    # by exactly coef * aux_loss
    ok(train("--mode", "single", "--backend", backend, "output_dir=off", *MOE, "router_aux_loss_coef=0",
             f"packing={packing}", "max_steps=1", "gen_eval=false", "eval_file=", cwd=tmp_path))
    off = summary(tmp_path / "off")
    assert off["router_aux_loss"]["on"] is False and off["router_aux_loss"]["aux_losses"] == []
    step1, aux1 = s["train_losses"][0][1], s["router_aux_loss"]["aux_losses"][0][2]
    assert step1 - off["train_losses"][0][1] == pytest.approx(0.001 * aux1, rel=0.05)
    if backend == "unsloth":
        assert s["libraries"]["unsloth"]
    assert s["train_losses"][-1][1] < s["train_losses"][0][1] + 1.0  # trains, does not diverge
    assert "router aux loss coef 0.001" in result.stdout and f"backend: {backend}" in result.stdout
    # Unsloth was imported before transformers/TRL/PEFT, so its patches apply (the H200 run showed the
    # warning it prints otherwise)
    assert "should be imported before" not in result.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "single" / "training_state.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    before = {k: v for k, v in rows[0].items() if k != "step"}
    assert any(v > 0 for k, v in before["checkpointing"].items() if k != "False"), before  # it is on
    # also as before: the config's use_cache (a KV cache makes transformers drop packed-sequence masks) and
    # the compile stance, which Unsloth's compiled generate leaves at eager_on_recompile on a GPU (else every
    # later recompile runs eager; trainer_hooks.EagerStanceInGenerate does the same here)
    assert before["compile_stance"] == "default"
    for later in rows[1:]:  # steps 2 and 3 follow a generation eval
        assert {k: v for k, v in later.items() if k != "step"} == before
    saved = json.loads((tmp_path / "out" / "single" / "adapter" / "tokenizer_config.json").read_text())
    assert saved.get("padding_side", "right") == before["padding_side"]
    # every evaluation's error analysis: grounding, categories, the per-shape breakdown and the report
    m = s["metrics"]
    assert 0 <= m["gen_ungrounded_name_rate"] <= 1 and 0 <= m["gen_non_offender_extracted_rate"] <= 1
    assert sum(v for k, v in m.items() if k.startswith("gen_error_rate/")) == pytest.approx(1.0)
    assert any(k.startswith("gen_offender_name_set_f1/shape/") for k in m)
    report = (tmp_path / "out" / "single" / f"gen_errors_step{s['global_step']}.md").read_text()
    assert report.startswith(f"# Errors at step {s['global_step']}") and "| correct |" in report
    # adapter/ is the best evaluated step by name F1 (saved mid-run through the backend's own save path)
    best = s["best"]
    assert best["metric"] == "gen_offender_name_set_f1" and [e["step"] for e in best["evaluations"]] == [1, 2, 3]
    f1 = {step: json.loads((tmp_path / "out" / "single" / f"gen_metrics_step{step}.json").read_text())[
        "gen_offender_name_set_f1"] for step in (1, 2, 3)}
    assert best["adapter_step"] == max((value, step) for step, value in f1.items())[1]  # a tie: the later
    held, last = (load_file(str(tmp_path / "out" / "single" / d / "adapter_model.safetensors"))
                  for d in ("adapter", "adapter_last"))
    assert held.keys() == last.keys()
    assert all(torch.equal(held[k], last[k]) for k in held) == (best["adapter_step"] == 3)
    assert f"adapter: out/single/adapter (step {best['adapter_step']})" in result.stdout


def test_experts_implementation_is_set_reported_and_computes_the_same_loss():
    """auto: the loop over experts on a CPU (measured faster there); on a GPU the library's choice
    (transformers' grouped GEMM, Unsloth's kernels on its backend). Each forced implementation is the one
    that runs and gives the same loss on the same batch; a dense model has none."""
    from transformers import AutoModelForCausalLM

    from finetune.model import resolve_model_path
    from finetune.moe import use_experts_implementation

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-moe"))
    assert model.config._experts_implementation == "grouped_mm"  # transformers' own default
    ids = torch.randint(3, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    losses = {}
    for name in ("auto", "batched_mm", "grouped_mm", "eager"):
        used = use_experts_implementation(model, name, on_gpu=False)
        assert used == ("eager" if name == "auto" else name)
        with torch.no_grad():
            losses[name] = float(model(input_ids=ids, labels=ids).loss)
    assert max(losses.values()) - min(losses.values()) < 1e-4, losses
    model.set_experts_implementation("batched_mm")
    assert use_experts_implementation(model, "auto", on_gpu=True) == "batched_mm"  # on a GPU: left as loaded
    dense = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-dense"))
    assert use_experts_implementation(dense, "grouped_mm", on_gpu=False) is None
    # Unsloth's GPU backend replaces the experts' forward (transformers' setting is then not read): reported
    # as such, and a forced implementation is refused instead of shown as running
    from finetune.config import ConfigError

    experts = model.model.layers[0].mlp.experts

    def forward_moe_backend(self, *args, **kwargs):
        raise AssertionError("not called")

    experts.__class__ = type("UnslothExperts", (type(experts),), {"forward": forward_moe_backend})
    assert use_experts_implementation(model, "auto", on_gpu=True) == "unsloth"
    with pytest.raises(ConfigError, match="Unsloth runs the experts with its own MoE kernels"):
        use_experts_implementation(model, "grouped_mm", on_gpu=True)


def test_moe_distillation_adds_the_router_loss_like_the_plain_run(tmp_path):
    """distill_lambda > 0: loss = task + lambda * KL + coef * aux; step 1's KL is 0 (B = 0). Packed rows."""
    ok(train("--mode", "single", "--backend", "hf", "output_dir=out", *MOE, "distill_lambda=0.1", "packing=true",
             cwd=tmp_path))
    s = summary(tmp_path / "out")
    assert s["packing"]["rows"] < s["packing"]["examples"]
    parts = {step: (task, kl) for step, task, kl in s["distill_losses"]}
    aux = {step: value for step, _, value in s["router_aux_loss"]["aux_losses"]}
    assert parts[1][1] == 0.0 and parts[3][1] > 0
    for step, loss in s["train_losses"]:
        task, kl = parts[step]
        assert aux[step] > 0.5
        assert loss == pytest.approx(task + 0.1 * kl + 0.001 * aux[step], rel=1e-4)
    assert (tmp_path / "out" / "single" / "gen_metrics_step2.json").is_file()


def test_4bit_load_stores_the_experts_in_4bit_and_trains_their_lora(tmp_path, monkeypatch):
    """load_in_4bit through the trainer's own loading code: the fused experts (3-D parameters that
    transformers' bitsandbytes path leaves alone) are NF4 too, the model still computes the same
    function, and LoRA on them trains while their storage stays frozen 4-bit."""
    import torch

    from data_tools.synth import generate
    from finetune.config import resolve
    from finetune.lora import count_parameters, plan_targets
    from finetune.model import add_lora, load_base
    from finetune.quant_experts import storage_by_category
    from finetune.run_plan import decide_here
    from test_distill import batch_of

    monkeypatch.chdir(tmp_path)
    cfg = resolve("two-stage", "tiny", None, {"model_name": "tiny-moe", "eval_file": ""}, {}, None)
    assert cfg.load_in_4bit and cfg.dtype == "bfloat16"
    quantized, tokenizer = load_base(cfg, decide_here(cfg, "hf")[0])
    bf16 = resolve("single", "tiny", None, {"model_name": "tiny-moe", "eval_file": "", "dtype": "bfloat16"}, {}, None)
    plain, _ = load_base(bf16, decide_here(bf16, "hf")[0])
    storage = storage_by_category(quantized)
    assert set(storage["experts"]) == {"4bit"} and set(storage["attention"]) == {"4bit"}
    assert storage["experts"]["4bit"] < 0.3 * storage_by_category(plain)["experts"]["bfloat16"]
    assert count_parameters(quantized)["total"] == count_parameters(plain)["total"]  # packed: 2 per byte

    inputs, labels = batch_of(tokenizer, generate(0, "train", "positive", 2) + generate(0, "train", "negative", 1))
    with torch.no_grad():
        got, want = quantized(**inputs).logits.float(), plain(**inputs).logits.float()
    # NF4 noise, not a different function: close logits (measured 0.10 relative on the shipped tiny MoE)
    # and the same next token almost everywhere
    assert ((got - want).norm() / want.norm()).item() < 0.15
    real = inputs["attention_mask"].bool()
    assert (got.argmax(-1) == want.argmax(-1))[real].float().mean().item() > 0.9

    model = add_lora(quantized, cfg, "hf", plan_targets(quantized, cfg))
    model.train()
    for _ in range(2):  # B starts at 0: A gets its gradient from the second step on
        model(**inputs, labels=labels).loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.01 * p.grad
    expert_lora = {n: p for n, p in model.named_parameters() if "experts" in n and "lora_" in n}
    assert expert_lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in expert_lora.values())
    packed = [p for n, p in model.named_parameters() if "experts" in n and "lora_" not in n]
    assert packed and all(p.dtype == torch.uint8 and not p.requires_grad and p.grad is None for p in packed)


def test_dry_run_reports_aux_loss_and_the_storage_of_each_category(tmp_path):
    """--dry-run on the MoE: the router aux loss (off by default, the checkpoint's value not used; refused on
    a dense model) and the weights as they will be stored, per category, in bf16 and in 4-bit."""
    reports = {}
    for mode in ("single", "two-stage"):
        result = ok(train("--mode", mode, "model_name=tiny-moe", "--dry-run", "dtype=bfloat16", cwd=tmp_path))
        reports[mode] = json.loads(result.stdout.strip().splitlines()[-1])
        assert "weights      " in result.stdout and "experts " in result.stdout
        assert "load-balancing aux loss off" in result.stdout
    assert reports["single"]["router_aux_loss"] == {"moe": True, "on": False, "coef": 0.0, "checkpoint_coef": 0.001}
    bf16, nf4 = reports["single"]["weight_storage_bytes"], reports["two-stage"]["weight_storage_bytes"]
    assert set(bf16["experts"]) == {"bfloat16"} and set(nf4["experts"]) == {"4bit"}
    assert set(nf4["attention"]) == {"4bit"} and "4bit" not in nf4["embeddings"] and "4bit" not in nf4["router"]
    # 4 bits + block scales against 16 bits: about 3.9x less for the quantized parts
    assert nf4["experts"]["4bit"] == pytest.approx(bf16["experts"]["bfloat16"] * (0.5 + 1 / 64) / 2, rel=0.01)
    weights = {mode: reports[mode]["memory"]["training_gib"]["weights"] for mode in reports}
    assert weights["two-stage"] < 0.5 * weights["single"]
    # the experts are quantized after loading: the load peaks at their bf16 size, and the report says so
    assert reports["two-stage"]["memory"]["weights_while_loading_gib"] > weights["two-stage"]
    assert reports["single"]["memory"]["weights_while_loading_gib"] is None

    dense = train("--mode", "single", "model_name=tiny-dense", "--dry-run", "router_aux_loss_coef=0.001",
                  cwd=tmp_path)
    assert dense.returncode == 1 and "Traceback" not in dense.stderr
    assert "mixture-of-experts models only" in dense.stderr
