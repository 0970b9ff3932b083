"""Keeping what the base knew: distillation from the adapter-disabled base, rehearsal mixing,
and the forgetting measure (tiny models, CPU)."""

import json

import pytest
import torch

from test_trainer import SMALL, ok, summary, train

from core.records import DataError


def peft_model_with_trained_looking_adapter(kind: str):
    """The trainer's own model + LoRA (hf backend) with B != 0, as after some training."""
    from finetune.config import resolve
    from finetune.lora import plan_targets
    from finetune.model import add_lora, load_base
    from finetune.run_plan import decide_here

    cfg = resolve("single", "tiny", None, {"model_name": f"tiny-{kind}", "eval_file": ""}, {}, None)
    model, tokenizer = load_base(cfg, decide_here(cfg, "hf")[0])
    torch.manual_seed(0)  # PEFT draws lora_A from the global generator: the same adapter whatever ran before
    model = add_lora(model, cfg, "hf", plan_targets(model, cfg))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return cfg, model, tokenizer


def batch_of(tokenizer, records):
    from core.prompt import record_messages

    rows = [tokenizer.apply_chat_template(record_messages(r), tokenize=True, return_dict=False) for r in records]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :20] = -100  # a prompt part that carries no loss
    return {"input_ids": ids, "attention_mask": mask}, labels


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_teacher_logits_are_the_base_models(kind):
    from transformers import AutoModelForCausalLM

    from data_tools.synth import generate
    from finetune.distill import logits_at, teacher_logits, trained_positions
    from finetune.model import resolve_model_path

    cfg, model, tokenizer = peft_model_with_trained_looking_adapter(kind)
    inputs, labels = batch_of(tokenizer, generate(0, "train", "positive", 2) + generate(0, "train", "negative", 1))
    positions, _ = trained_positions(labels)
    model.train()
    teacher = teacher_logits(model, inputs, positions)
    with torch.no_grad():
        student = logits_at(model, inputs, positions)
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model_name))(**inputs).logits
    assert teacher.shape == (3, positions.numel(), len(tokenizer))
    torch.testing.assert_close(teacher, base[:, positions], rtol=1e-5, atol=1e-5)
    assert (student - teacher).abs().max() > 1e-2  # the adapter is on again after the teacher pass
    assert any(p.requires_grad for p in model.parameters())


def test_kl_term_is_zero_for_equal_logits_and_positive_otherwise():
    from finetune.distill import kl_per_token

    logits = torch.randn(5, 11)
    assert torch.equal(kl_per_token(logits, logits.clone(), 2.0), torch.zeros(5))
    kl = kl_per_token(logits + torch.randn(5, 11), logits, 2.0)
    assert (kl > 0).all()
    # teacher uniform over 2 tokens, student logits [0, ln 3]: at T = 2 the student is
    # [1, sqrt 3] / (1 + sqrt 3), and the term is T^2 * KL(teacher || student)
    q = torch.tensor([1.0, 3 ** 0.5]) / (1 + 3 ** 0.5)
    expected = 4 * float((0.5 * torch.log(0.5 / q)).sum())
    student = torch.tensor([[0.0, float(torch.log(torch.tensor(3.0)))]])
    assert kl_per_token(student, torch.zeros(1, 2), 2.0).item() == pytest.approx(expected, rel=1e-5)


# The distilled run's answers stay at most this share of the plain run's distance (KL) from the base's.
RATIO = 0.8


def kl_to_base(adapter, records) -> float:
    """Mean KL(base || tuned) per answer token of `records`, computed here with PEFT alone (base = the same
    model with its adapter disabled), independent of the trainer's distillation code."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(adapter)).eval()
    inputs, labels = batch_of(tokenizer, records)
    answer = labels[:, 1:] != -100
    with torch.no_grad():
        tuned = torch.log_softmax(model(**inputs).logits[:, :-1].float(), -1)
        with model.disable_adapter():
            base = torch.log_softmax(model(**inputs).logits[:, :-1].float(), -1)
    per_token = (base.exp() * (base - tuned)).sum(-1)
    return float(per_token[answer].mean())


def test_distillation_off_is_the_plain_run_and_on_keeps_the_model_near_the_base(tmp_path):
    """lambda = 0 gives the plain run's losses exactly; lambda > 0 computes the same task loss at step 1
    (B = 0, so student = teacher and the KL term is 0), a positive KL once B moves, and its pull shows
    where it matters: after six steps the distilled adapter's answers are measurably closer to the base's
    (KL measured here, outside the trainer) than the plain run's."""
    from data_tools.synth import generate

    runs, steps = {}, ["max_steps=6"]
    for name, extra in (("plain", []), ("lambda0", ["distill_lambda=0", "distill_temperature=2"]),
                        ("lambda05", ["distill_lambda=0.5", "distill_temperature=2"])):
        ok(train("--mode", "single", "--backend", "hf", f"output_dir={name}", *SMALL, *steps, *extra, cwd=tmp_path))
        runs[name] = summary(tmp_path / name)
    assert runs["lambda0"]["train_losses"] == runs["plain"]["train_losses"]
    assert runs["plain"]["distill_losses"] == []
    parts = runs["lambda05"]["distill_losses"]
    assert [p[0] for p in parts] == [1, 2, 3, 4, 5, 6]
    assert parts[0][2] == 0.0
    assert parts[0][1] == pytest.approx(runs["plain"]["train_losses"][0][1], rel=1e-5)
    assert runs["lambda05"]["train_losses"][0][1] == pytest.approx(parts[0][1], rel=1e-5)
    assert all(p[2] > 0 for p in parts[2:])  # the adapter has moved away from the base
    total, task, distill = runs["lambda05"]["train_losses"][5][1], parts[5][1], parts[5][2]
    assert total == pytest.approx(task + 0.5 * distill, rel=1e-3)
    held_out = generate(7, "val", "positive", 4, held_out_names=True) + generate(7, "val", "negative", 4,
                                                                               held_out_names=True)
    kl = {name: kl_to_base(tmp_path / name / "single" / "adapter", held_out) for name in ("plain", "lambda05")}
    assert kl["lambda05"] < RATIO * kl["plain"], kl


def test_two_stage_4bit_unsloth_with_distillation_rehearsal_and_forgetting(tmp_path):
    """Both stages on the 4-bit base (the teacher is the 4-bit base), Unsloth backend, rehearsal text mixed in,
    and the forgetting measure on the held-out general text; on the MoE (4-bit experts), with a generation
    eval mid-stage and the router aux loss on."""
    result = ok(train("--mode", "two-stage", "--backend", "unsloth", "output_dir=out", *SMALL,
                      "distill_lambda=0.5", "rehearsal_data=data/tiny/general_text.jsonl", "rehearsal_ratio=0.2",
                      "general_eval_samples=16", "model_name=tiny-moe", "eval_steps=2", "gen_eval_max_samples=4",
                      "router_aux_loss_coef=0.001", cwd=tmp_path))
    assert "rehearsal: 12 text examples" in result.stdout
    for stage in ("stage1", "stage2"):
        s = summary(tmp_path / "out", stage)
        assert s["backend"] == "unsloth" and s["global_step"] == 3
        assert s["data"]["sources"]["rehearsal"] == 12  # round(0.2 / 0.8 * 48)
        assert s["data"]["general"]["heldout_examples"] == 16
        assert s["distill_losses"][0][2] == 0.0 if stage == "stage1" else s["distill_losses"][0][2] > 0
        assert set(s["weight_storage_bytes"]["experts"]) == {"4bit"}
        assert len(s["router_aux_loss"]["aux_losses"]) == 3
        assert (tmp_path / "out" / stage / "gen_metrics_step2.json").is_file()
        m = s["metrics"]
        assert m["general_eval_examples"] == 16
        assert m["general_loss_increase"] == pytest.approx(m["general_loss_tuned"] - m["general_loss_base"], abs=1e-5)
        assert m["general_loss_tuned"] != m["general_loss_base"]
    assert summary(tmp_path / "out", "stage1")["metrics"]["general_loss_base"] == \
        summary(tmp_path / "out", "stage2")["metrics"]["general_loss_base"]  # the same base in both stages
    assert "general_loss_increase" in result.stdout  # in the run summary


@pytest.mark.parametrize("n_task, ratio", [(48, 0.2), (3000, 0.2), (7, 0.5), (100, 0.05), (1, 0.9), (500, 0.0)])
def test_rehearsal_ratio_gives_the_requested_share(tmp_path, n_task, ratio):
    from finetune.rehearsal import plan_general

    path = tmp_path / "general.jsonl"
    path.write_text("".join(json.dumps({"text": f"文書{i}"}, ensure_ascii=False) + "\n" for i in range(300)))
    plan = plan_general(str(path), ratio, "", 20, n_task, seed=1)
    n = len(plan.examples)
    assert abs(n - ratio * (n_task + n)) <= 1
    assert not set(plan.examples) & set(plan.heldout)  # never trained on what measures forgetting
    assert plan.report["share"] == pytest.approx(n / (n_task + n), abs=1e-4)
    again = plan_general(str(path), ratio, "", 20, n_task, seed=1)
    assert again.examples == plan.examples  # seeded


def test_rehearsal_rows_enter_the_trainers_dataset(tmp_path, monkeypatch):
    """Plain documents train on every token and carry source "rehearsal"; instruction rows from an
    alpaca file go through the prompt builder and train on the answer."""
    from data_tools.synth import generate
    from finetune.config import resolve
    from finetune.model import load_base
    from finetune.data import stage_data
    from finetune.rehearsal import load_general, plan_general, text_rows
    from finetune.run_plan import decide_here
    from finetune.stages import sft_trainer, stages_for

    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs.txt").write_text("一つ目の文書です。\n\n二つ目の文書です。\n三つ目。\n", encoding="utf-8")
    docs = load_general("docs.txt")
    assert docs.kind == "text" and len(docs.items) == 3 and docs.skipped_empty == 1
    (tmp_path / "alpaca.json").write_text(json.dumps(
        [{"instruction": "日本の首都は？", "input": "", "output": "東京です。"}] * 3, ensure_ascii=False))
    alpaca = load_general("alpaca.json")
    assert alpaca.kind == "records" and alpaca.items[0]["source"] == "rehearsal"

    cfg = resolve("single", "tiny", None, {"eval_file": ""}, {}, None)
    plan = decide_here(cfg, "hf")[0]
    model, tokenizer = load_base(cfg, plan)
    task = generate(0, "train", "positive", 4)
    general = plan_general("alpaca.json", 0.5, "", 1, len(task), seed=0)
    rows = text_rows(docs.items, tokenizer, 8)
    trainer = sft_trainer(cfg, stages_for(cfg)[0], tmp_path / "o", plan, model, tokenizer,
                          stage_data(cfg, task + general.examples, [], tokenizer, rows))
    data = trainer.train_dataset
    assert len(general.examples) == 4  # ratio 0.5 of 4 task examples: the 3-row file cycled
    assert len(data) == 4 + 4 + 3
    sources = [row["source"] for row in data]
    assert sources.count("rehearsal") == 7
    text = [row for row in data if row["source"] == "rehearsal" and row["labels"] == row["input_ids"]]
    assert len(text) == 3 and all(len(row["input_ids"]) <= 8 for row in text)
    answers = [row for row in data if row["source"] == "rehearsal" and row["labels"] != row["input_ids"]]
    trained = [t for t, label in zip(answers[0]["input_ids"], answers[0]["labels"]) if label != -100]
    assert tokenizer.decode(trained) == "東京です。<|im_end|>"
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) >= {"input_ids", "labels"} and "source" not in batch


@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n{"text": 3}\n', "general.jsonl:2: expected a string 'text' field"),
    ('{"instruction": "q", "input": "", "output": ""}\n', "general.jsonl:1: instruction, input and output"),
    ('{"foo": 1}\n', "general.jsonl:1: not an instruction row nor a 'text' row"),
    ('{"text": " "}\n', "no usable documents (empty: 1)"),
])
def test_bad_general_data_names_file_and_line(tmp_path, content, message):
    from finetune.rehearsal import load_general

    (tmp_path / "general.jsonl").write_text(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_general(str(tmp_path / "general.jsonl"))


def test_small_rehearsal_file_is_cycled_without_early_repeats():
    from finetune.rehearsal import draw

    pool = list(range(10))
    out = draw(pool, 25, seed=3)
    assert len(out) == 25 and sorted(out[:10]) == pool and sorted(out[10:20]) == pool
    assert out[:10] != out[10:20]  # each pass reshuffled
    assert len(set(out[20:])) == 5


def test_forgetting_measure_is_zero_for_an_untrained_adapter():
    from finetune.forgetting import measure_forgetting

    cfg, model, tokenizer = peft_model_with_trained_looking_adapter("dense")
    docs = ["山田太郎さんは東京都内で会見した。", "試合は3対1で終わった。"]
    moved = measure_forgetting(model, tokenizer, "text", docs, 64, 2)
    assert moved["general_loss_tuned"] != moved["general_loss_base"]
    assert model.training  # restored
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.zero_()
    same = measure_forgetting(model, tokenizer, "text", docs, 64, 2)
    assert same["general_loss_increase"] == 0 and same["general_loss_base"] == moved["general_loss_base"]


def test_distillation_and_rehearsal_settings_are_checked(tmp_path):
    from finetune.config import ConfigError, resolve

    for overrides, message in (({"distill_lambda": "-1"}, "'distill_lambda' must be >= 0"),
                               ({"distill_temperature": "0"}, "'distill_temperature' > 0"),
                               ({"rehearsal_ratio": "1"}, "'rehearsal_ratio' must be in [0, 1)"),
                               ({"rehearsal_ratio": "0.2"}, "rehearsal_ratio > 0 needs rehearsal_data"),
                               ({"rehearsal_data": str(tmp_path / "no.jsonl")}, "rehearsal_data: file not found")):
        with pytest.raises(ConfigError) as e:
            resolve("single", "tiny", None, overrides, {}, None)
        assert message in str(e.value), overrides


def test_preflight_reports_the_teacher_pass_memory(tmp_path):
    reports = {}
    for lam in ("0", "0.5"):
        result = ok(train("--mode", "single", "model_name=tiny-moe", "--dry-run", f"distill_lambda={lam}",
                          cwd=tmp_path))
        reports[lam] = json.loads(result.stdout.strip().splitlines()[-1])["memory"]
    # the teacher's logits and the KL's softmaxes join the LM head's phase of the step
    assert reports["0.5"]["training_peak_gib"] > reports["0"]["training_peak_gib"]
    assert "teacher pass" in result.stdout
