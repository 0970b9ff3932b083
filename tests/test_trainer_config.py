"""Configuration resolution and the errors that must come before any model loads."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from finetune.cli import split_overrides
from finetune.config import ConfigError, parse_overrides, resolve, to_dict
from finetune.config_schema import CONCERNS, FinetuneConfig, field_names

REPO = Path(__file__).resolve().parent.parent


def resolve_with(*items, mode="single", preset="tiny", config_file=None, flags=None, fixed=None):
    return resolve(mode, preset, config_file, parse_overrides(list(items)), flags or {}, fixed)


def test_layers_apply_in_order(tmp_path):
    cfg = resolve_with()
    assert cfg.model_name == "tiny-moe" and cfg.dtype == "float32" and not cfg.load_in_4bit
    two = resolve_with(mode="two-stage")
    assert two.load_in_4bit and two.dtype == "bfloat16"
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("learning_rate: 0.0005\nlora_r: 4\n")
    cfg = resolve_with("lora_r=8", config_file=str(yaml_file))
    assert cfg.learning_rate == 5e-4 and cfg.lora_r == 8  # command line beats the file
    frozen = resolve_with(fixed={"lora_r": 16, "mode": "two-stage"}, mode=None)
    assert frozen.mode == "two-stage" and frozen.lora_r == 16


def test_production_preset_matches_the_axolotl_plan(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the preset's data files must exist to validate
    for name in ("hawks_train.json", "hawks_train_curriculum.json", "hawks_val_mixed.json"):
        (tmp_path / "data" / "train").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "train" / name).write_text("[]")
    cfg = resolve("single", "qwen3-30b-a3b", None, {}, {}, None)
    assert cfg.model_name == "unsloth/Qwen3-30B-A3B-Instruct-2507" and cfg.max_length == 1536
    # the plan's micro-batch 1 x accumulation 16, one example per row; packed, a row holds ~5.6 of its
    # ~260-token examples (Qwen3's tokenizer), so 3 rows keep an optimizer step at about the plan's examples
    assert (cfg.micro_batch_size, cfg.gradient_accumulation_steps, cfg.optim) == (1, 3, "adamw_torch")
    assert cfg.packing and not cfg.group_by_length
    assert (cfg.save_steps, cfg.save_total_limit) == (400, 3)
    # evaluations every 800 steps (~54K examples; the plan's 200 x 64) on a fixed subset of 256, the
    # generation batch auto: ~10% of the predicted training time (finetune/timing.py, tests/test_timing.py)
    assert (cfg.eval_steps, cfg.gen_eval_max_samples, cfg.gen_eval_batch_size) == (800, 256, 0)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.num_epochs) == (16, 32, 0.0, 1.5)
    assert (cfg.lr_scheduler, cfg.min_lr_ratio, cfg.warmup_ratio) == ("cosine_with_min_lr", 0.05, 0.03)
    assert cfg.gradient_checkpointing and cfg.weight_decay == 0 and cfg.max_grad_norm == 1.0
    assert not cfg.load_in_4bit and not cfg.trust_remote_code
    two = resolve("two-stage", "qwen3-30b-a3b", None, {}, {}, None)
    assert two.load_in_4bit and (two.stage1_learning_rate, two.stage2_learning_rate) == (2e-4, 1e-4)


@pytest.mark.parametrize("items, message", [
    (["learning_rte=1e-4"], "unknown key 'learning_rte'; did you mean 'learning_rate'?"),
    (["chat_template=qwen3_instruct"], "unknown chat_template 'qwen3_instruct'; valid names: tokenizer_default"),
    (["lora_r=sixteen"], "'lora_r' must be int"),
    (["train_file=nope/missing.json", "preset=tiny"], "train_file: file not found: nope/missing.json"),
    (["lora_target_parameters=mlp.experts.down_proj", "lora_dropout=0.1"], "lora_dropout must be 0"),
    (["dtype=float32", "load_in_4bit=true"], "load_in_4bit needs a 16-bit compute dtype"),
    (["backend=vllm"], "'backend' is 'vllm'; valid values: auto, unsloth, hf"),
    (["gradient_accumulation_steps=0"], "'gradient_accumulation_steps' must be at least 1"),
    (["ddp_timeout=0"], "'ddp_timeout' >= 1 second"),
    (["dataset_num_proc=-1"], "'dataset_num_proc' must be >= 0"),
    (["packing=true", "group_by_length=true"], "packing and group_by_length both remove padding"),
    (["experts_implementation=fast"], "valid values: auto, eager, batched_mm, grouped_mm"),
    (["attn_implementation=flash_attention_2", "dtype=float32"], "computes in bfloat16/float16 only"),
    (["learning_rate=0"], "'learning_rate' must be > 0, got 0.0"),
    (["watchdog_step_s=0"], "'watchdog_step_s' must be > 0"),
    (["max_train_samples=-5"], "'max_train_samples' must be >= 0"),
    (["save_total_limit=0"], "'save_total_limit' must be at least 1"),
    (["stage2_train_file=data/other.json"], "command line: 'stage2_train_file' is not used by --mode single, "
                                            "which reads train_file instead"),
])
def test_configuration_errors(items, message):
    with pytest.raises(ConfigError) as e:
        resolve_with(*items)
    assert message in str(e.value)


def test_a_key_the_mode_never_reads_is_refused_unless_it_changes_nothing(tmp_path):
    """two-stage trains each stage with its own rate, epochs and file: a learning_rate set for it would be
    silently ignored. A value equal to what the layers below give changes nothing (a saved config.yaml of
    the run, read back with --config, holds every key) and passes."""
    with pytest.raises(ConfigError, match="'learning_rate' is not used by --mode two-stage, which reads "
                                          "stage1_learning_rate and stage2_learning_rate instead"):
        resolve_with("learning_rate=1e-4", mode="two-stage")
    config = tmp_path / "c.yaml"
    config.write_text("num_epochs: 3\n")
    with pytest.raises(ConfigError, match=f"{config}: 'num_epochs' is not used by --mode two-stage"):
        resolve_with(mode="two-stage", config_file=str(config))
    saved = resolve_with(mode="two-stage")
    config.write_text(yaml.safe_dump(to_dict(saved)))
    assert resolve_with(mode="two-stage", config_file=str(config)) == saved


def test_help_config_lists_every_key_with_type_default_and_description():
    result = subprocess.run([sys.executable, str(REPO / "qwen_finetune.py"), "--help-config"], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    # a key per line; the concerns' headings ("# ...") and the blank lines between them are not keys
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines() if line and not line.startswith("#"))
    assert list(lines) == field_names()
    assert lines["learning_rate"].split(None, 2)[:2] == ["float", "0.0002"]
    assert "single mode's peak learning rate" in lines["learning_rate"]
    assert all(len(rest.split()) >= 3 for rest in lines.values())  # type, default and some description


def test_help_config_groups_the_keys_by_concern_with_each_rule():
    """Each key belongs to exactly one concern; --help-config prints each concern's heading, then its keys,
    each with its own rule where it has one."""
    owners = {name: [c.__name__ for c in CONCERNS if name in {f.name for f in dataclasses.fields(c)}]
              for name in field_names()}
    assert {name: len(found) for name, found in owners.items() if len(found) != 1} == {}
    assert sum(len(dataclasses.fields(c)) for c in CONCERNS) == len(field_names())
    out = subprocess.run([sys.executable, str(REPO / "qwen_finetune.py"), "--help-config"], capture_output=True,
                         text=True, cwd=REPO).stdout.splitlines()
    headings = [line for line in out if line.startswith("# ")]
    assert headings == [f"# {c.__doc__}" for c in CONCERNS]
    for concern in CONCERNS:
        below = out[out.index(f"# {concern.__doc__}") + 1:]
        for f, line in zip(dataclasses.fields(concern), below):
            assert line.split()[0] == f.name
            check = f.metadata["check"]
            assert line.endswith(f"  [{check.rule}]") if check else not line.endswith("]")
    by_key = {line.split()[0]: line for line in out if line and not line.startswith("#")}
    assert by_key["learning_rate"].endswith("[> 0]") and by_key["lora_r"].endswith("[>= 1]")
    assert by_key["lora_dropout"].endswith("[in [0, 1)]") and by_key["min_lr_ratio"].endswith("[in [0, 1]]")
    assert by_key["backend"].endswith("[one of: auto, unsloth, hf]")


def _numeric_rules():
    fields = [f for f in dataclasses.fields(FinetuneConfig) if f.metadata["check"] and f.metadata["check"].lo
              is not None]
    assert len(fields) >= 30  # every key check_values checked by its range before the rules moved to the schema
    return [pytest.param(f.name, f.metadata["check"], id=f.name) for f in fields]


@pytest.mark.parametrize("name, check", _numeric_rules())
def test_each_numeric_rule_refuses_just_outside_and_accepts_inside(name, check):
    """Values built from the rule's own bounds: past an open bound or one step past a closed one is refused
    with a message naming the key; the bound itself (closed) or one step in (open) is accepted."""
    from finetune.config import check_values

    step = 1 if isinstance(getattr(FinetuneConfig(), name), int) else 1e-6
    cases = [(check.lo, check.lo_open, -step)] + ([(check.hi, check.hi_open, step)] if check.hi is not None else [])
    for bound, is_open, outward in cases:
        outside = bound if is_open else bound + outward
        inside = bound - outward if is_open else bound
        with pytest.raises(ConfigError) as e:
            check_values(dataclasses.replace(FinetuneConfig(), **{name: outside}))
        assert str(e.value).startswith(f"'{name}'") and str(outside) in str(e.value)
        check_values(dataclasses.replace(FinetuneConfig(), **{name: inside}))


def test_every_former_check_still_stands_beside_its_field():
    """The keys check_values checked before each got its rule beside its field: the same kind of rule."""
    rules = {f.name: f.metadata["check"].rule for f in dataclasses.fields(FinetuneConfig) if f.metadata["check"]}
    expect = {**dict.fromkeys(("learning_rate", "stage1_learning_rate", "stage2_learning_rate",
                               "watchdog_first_step_s", "watchdog_step_s", "watchdog_pause_s",
                               "distill_temperature"), "> 0"),
              **dict.fromkeys(("lora_r", "lora_alpha", "micro_batch_size", "gradient_accumulation_steps",
                               "max_length", "logging_steps", "eval_steps", "save_steps", "eval_batch_size",
                               "general_eval_samples", "save_total_limit", "ddp_timeout"), ">= 1"),
              **dict.fromkeys(("gen_eval_batch_size", "expert_lora_r", "eval_max_samples", "max_train_samples",
                               "gen_eval_max_samples", "router_aux_loss_coef", "device_memory_gib",
                               "dataset_num_proc", "weight_decay", "max_grad_norm", "distill_lambda"), ">= 0"),
              **dict.fromkeys(("lora_dropout", "warmup_ratio", "rehearsal_ratio"), "in [0, 1)"),
              "min_lr_ratio": "in [0, 1]", "backend": "one of: auto, unsloth, hf",
              "dtype": "one of: bfloat16, float16, float32",
              "attn_implementation": "one of: auto, sdpa, sdpa_varlen, eager, flash_attention_2, flash_attention_3",
              "experts_implementation": "one of: auto, eager, batched_mm, grouped_mm",
              "chat_template": "one of: tokenizer_default, qwen3_2507"}
    assert rules == expect
    with pytest.raises(ConfigError, match=r"^epochs must be > 0 \(or set max_steps\)$"):
        resolve_with("num_epochs=0")
    assert resolve_with("num_epochs=0", "max_steps=2").num_epochs == 0  # max_steps decides the length


def test_tokenising_processes_only_on_a_large_set_and_shared_by_the_ranks(monkeypatch):
    """Every rank tokenises its copy at once: the production mix (174K records) gets processes, the machine's
    cores shared by the ranks; the tiny sets get none (spawning costs more than it saves); an explicit
    value always wins. The trainer prepares nothing itself: the datasets come finished."""
    from finetune.data import tokenising_processes
    from finetune.run_plan import Machine, attention_for, decide
    from finetune.stages import sft_config, stages_for

    cpu = Machine(gpu=False, world=1, nodes=1, unsloth_installed=True)

    def plan(cfg, machine=cpu, backend=None, model_type="qwen3"):
        return decide(cfg, SimpleNamespace(model_type=model_type), machine, backend)

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert tokenising_processes(0, 3_000) is None and tokenising_processes(0, 9_999) is None
    assert tokenising_processes(0, 174_663) == 8
    assert tokenising_processes(0, 174_663, ranks=4) == 4
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert tokenising_processes(0, 174_663) == 2 and tokenising_processes(0, 174_663, ranks=4) == 1
    assert tokenising_processes(resolve_with("dataset_num_proc=3").dataset_num_proc, 10) == 3
    stage = stages_for(resolve_with())[0]
    timeout = resolve_with("ddp_timeout=5400")
    args = sft_config(timeout, stage, Path("o"), plan(timeout))
    assert args.ddp_timeout == 5400 and args.dataset_kwargs == {"skip_prepare_dataset": True}
    assert args.packing is False and args.padding_free is False  # never Unsloth's automatic choice
    # packed rows are flattened into one padding-free sequence only where the attention splits the examples
    # by position ids: auto on a CPU is sdpa_varlen (finetune/attention.py) when packing
    sdpa_packed = resolve_with("packing=true", "attn_implementation=sdpa")
    sdpa = sft_config(sdpa_packed, stage, Path("o"), plan(sdpa_packed))
    assert sdpa.packing is False and sdpa.padding_free is False  # side by side (finetune/collate.py)
    auto = resolve_with("packing=true")
    assert attention_for(auto, cpu) == "sdpa_varlen" and attention_for(resolve_with(), cpu) == "sdpa"
    varlen = sft_config(auto, stage, Path("o"), plan(auto))
    assert varlen.packing is True and varlen.padding_free is True
    # Unsloth's own attention on a GPU: test_unsloths_own_attention_gets_flattened_rows
    # the plan, without the model, expects it from the model type: dense Qwen3 on Unsloth on a GPU
    gpu = Machine(gpu=True, world=1, nodes=1, unsloth_installed=True, flash_attention=True)
    # auto on a GPU: flash-attn where it imports and the dtype is 16-bit (it has no float32 kernel), else sdpa
    bf16 = resolve_with("packing=true", "dtype=bfloat16")
    assert attention_for(bf16, gpu) == "flash_attention_2"
    assert auto.dtype == "float32" and attention_for(auto, gpu) == "sdpa"  # the tiny preset
    no_flash = dataclasses.replace(gpu, flash_attention=False)
    assert attention_for(bf16, no_flash) == "sdpa"
    # deepspeed=auto on a GPU waits for the memory plan (finetune/checks.py); undecided, the trainer gets no file
    undecided = plan(resolve_with(), gpu)
    assert undecided.launcher == "auto" and undecided.deepspeed_config() is None
    assert undecided.with_launcher("zero2.json").deepspeed_config() == "zero2.json"
    assert plan(resolve_with(), cpu).launcher == ""  # a CPU run is not planned: no DeepSpeed
    assert plan(sdpa_packed, no_flash, ("unsloth", "")).rows_flattened
    assert not plan(sdpa_packed, no_flash, ("unsloth", ""), "qwen3_moe").rows_flattened
    assert not plan(sdpa_packed, no_flash, ("hf", "")).rows_flattened
    assert not plan(sdpa_packed, cpu, ("unsloth", "")).rows_flattened  # Unsloth patches nothing on a CPU
    flash_cfg = resolve_with("packing=true", "attn_implementation=flash_attention_2", "dtype=bfloat16")
    flash = sft_config(flash_cfg, stage, Path("o"), plan(flash_cfg))
    assert flash.packing is True and flash.padding_free is True


UNSLOTH_PATCHED = """
import json, sys
import unsloth
from unsloth.models.qwen3 import FastQwen3Model
from unsloth_zoo.compiler import COMBINED_UNSLOTH_NAME
FastQwen3Model.pre_patch()  # what Unsloth does to transformers' Qwen3 classes before loading dense Qwen3 on a GPU
from transformers import AutoModelForCausalLM
from finetune.config import resolve
from finetune.run_plan import Machine, confirm, decide
from tiny import model_dir
dense = AutoModelForCausalLM.from_pretrained(model_dir("tiny-dense"))
moe = AutoModelForCausalLM.from_pretrained(model_dir("tiny-moe"))
# on a GPU Unsloth compiles Qwen3-MoE's transformers modeling into a module of this name, masks and all
attention = next(m for m in moe.modules() if type(m).__name__.endswith("Attention"))
type(attention).forward.__module__ = COMBINED_UNSLOTH_NAME + "_qwen3_moe"
packed = resolve("single", "tiny", None, {"packing": True, "attn_implementation": "sdpa"}, {}, None)
plain = resolve("single", "tiny", None, {"attn_implementation": "sdpa"}, {}, None)
def flattened(cfg, model):  # the plan on this CPU, confirmed against the loaded model as the trainer does
    planned = decide(cfg, model.config, Machine(gpu=False, world=1, nodes=1, unsloth_installed=True), ("unsloth", ""))
    return confirm(planned, model, None)[0].rows_flattened
print(json.dumps({"dense": flattened(packed, dense), "compiled_moe": flattened(packed, moe),
                  "not_packed": flattened(plain, dense)}))
"""


def test_unsloths_own_attention_gets_flattened_rows(tmp_path):
    """Unsloth's own attention (dense Qwen3 on a GPU) ignores transformers' masks, so packed rows reach it
    flattened. Unsloth's real patch, run in a fresh process on this CPU (it patches nothing here when it
    loads a model itself), marks the tiny dense model; Qwen3-MoE, compiled from transformers' modeling, keeps
    the masks and its rows side by side; nothing packed, nothing flattened."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", UNSLOTH_PATCHED], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"dense": True, "compiled_moe": False,
                                                                  "not_packed": False}


def test_preset_follows_the_same_precedence_as_every_key(tmp_path):
    yaml_file = str(tmp_path / "c.yaml")
    Path(yaml_file).write_text("preset: qwen3-30b-a3b\n")

    def preset(flag, items=(), config_file=None, **kw):  # dry_run: the production data need not exist here
        return resolve(None, flag, config_file, parse_overrides(list(items)), {}, None, dry_run=True, **kw).preset

    assert preset(None, config_file=yaml_file) == "qwen3-30b-a3b"
    assert preset(None, ["preset=tiny"], yaml_file) == "tiny"  # the command line beats the file
    assert preset("tiny", ["preset=qwen3-30b-a3b"]) == "tiny"  # the dedicated flag beats key=value
    # a script's own default (the legacy script's production preset) is the lowest layer
    assert preset(None, ["preset=tiny"], default_preset="qwen3-30b-a3b") == "tiny"
    assert preset(None, default_preset="qwen3-30b-a3b") == "qwen3-30b-a3b"


def test_unknown_preset_and_mode_list_the_valid_ones():
    with pytest.raises(ConfigError, match="valid presets: tiny, qwen3-30b-a3b"):
        resolve_with(preset="huge")


def test_override_syntax():
    assert split_overrides(["a=1", "--b", "2", "--c=3", "--flag", "--d", "x"]) == ["a=1", "b=2", "c=3", "flag=true", "d=x"]
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["oops"])


def _deepspeed(tmp_path, **values):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **values}))
    return str(path)


def test_deepspeed_batch_sizes_must_agree_with_the_trainer(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    ok = _deepspeed(tmp_path, train_batch_size=64, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=16)
    cfg = resolve_with("micro_batch_size=1", "gradient_accumulation_steps=16", flags={"deepspeed": ok})
    assert cfg.deepspeed == ok
    # the first Axolotl attempt's error: 64 by hand vs 1 x 4 x 4 = 16 from the trainer
    bad = _deepspeed(tmp_path, train_batch_size=64)
    with pytest.raises(ConfigError) as e:
        resolve_with("micro_batch_size=1", "gradient_accumulation_steps=4", flags={"deepspeed": bad})
    assert "train_batch_size is 64" in str(e.value) and "gives 16" in str(e.value) and '"auto"' in str(e.value)


def test_shipped_zero2_config_is_all_auto(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    ds = json.loads((REPO / "deepspeed_configs" / "zero2.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert all(ds[k] == "auto" for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                         "gradient_accumulation_steps"))
    assert "scheduler" not in ds  # the trainer's cosine schedule applies
    for micro, accum in ((1, 16), (2, 8)):
        resolve_with(f"micro_batch_size={micro}", f"gradient_accumulation_steps={accum}",
                     flags={"deepspeed": str(REPO / "deepspeed_configs" / "zero2.json")})


def test_four_bit_with_deepspeed_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="4-bit QLoRA with DeepSpeed"):
        resolve_with(mode="two-stage", flags={"deepspeed": _deepspeed(tmp_path)})


@pytest.mark.parametrize("script", ["qwen_finetune.py", "qwen_finetune_legacy.py"])
def test_cli_reports_config_errors_without_traceback(tmp_path, script):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / script), "--preset", "tiny", "lora_alpah=8"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "error: command line: unknown key 'lora_alpah'; did you mean 'lora_alpha'?" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "outputs").exists()
