"""The quick commands of README.md and docs/*.md, as those files write them today.

Every command in the ```bash blocks of README.md and of each page under docs/
is read from the file it lives in (an edited page is what gets tested) and
either run here, in a scratch folder that mirrors the repository, or named
below as not quick (training, installs, GPUs, cluster launchers). A new
command that is neither fails `test_every_readme_command_is_run_or_named_as_slow`.
Each quick command must exit 0 and print its key line; every documented
entry point must answer `--help`.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from conftest import REPO

# Commands that take minutes, a GPU, an install or the user's own files: documented, not run here.
SLOW = (
    "bash scripts/", "torchrun ", ".venv/bin/pip install", "-m pytest", "-m bench.gpu", "-m bench.probe",
    "-m tiny.build",
    "sbatch ", "deepspeed --hostfile",  # cluster launchers (docs/multi-node.md)
    "-m bench.tiny_runs",
    "tests/legacy_reference.py", "tests/mutations/run.py",  # training runs (docs/testing.md)
    "parity.py run ", "parity.py evaluate ",  # training runs / an adapter of one
    "parity.py tokens --config-unsloth my.yaml",  # the user's own two configs
    # Qwen3's tokenizer over the whole generated mix (~120K records, ~45 s); tests/test_token_lengths.py runs
    # the same command on a slice
    "data_tools stats data/train/hawks_train_curriculum.json",
    # the same command on 30 examples is tests/test_parity.py::test_tokens_cuts_our_packed_rows_back_into_axolotls_examples
    "parity.py tokens -n 50 --set packing=true",
    # Axolotl tokenises the whole full-scale file first (minutes); tests/test_parity.py runs this pair on a slice
    "--config-axolotl axolotl_configs/qwen_finetune.yml",
)
SLOW_TRAINING = re.compile(r"qwen_finetune(_legacy)?\.py (?!.*--dry-run)")
# Placeholders in the documented commands -> what stands in for them here (CONFIG.yml: each shipped Axolotl
# config in turn).
PLACEHOLDERS = {"DIR": "tiny/dense"}
SHIPPED_AXOLOTL_CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "axolotl_configs").glob("*.yml"))
# The line a working command prints (a regex on stdout + stderr).
KEY_LINES = {
    "--dry-run": r"memory\s+training [\d.]+ GiB, generation eval [\d.]+ GiB per device with ZeRO-2 \(auto: bf16 "
                 r"LoRA on 4 GPUs\): fits a device of 80 GiB",
    "data_tools synth": r"wrote\s+26,221 records",
    "data_tools validate": r"hawks_train\.json",
    "data_tools prepare": r"val:\s+1,000 positives",
    "data_tools convert": r"train_messages\.jsonl",
    "data_tools split": r"val\.json",
    "data_tools stats": r"'p100': \d+",
    "parity.py tokens": r"identical: input_ids and trained-token masks of all (50|60) compared examples",
    # a/b below differ within the tolerance: the diff is shown and the gate passes (the gate failing on a
    # difference beyond it is checked after the commands)
    "parity.py compare": r"gen_offender_presence_f1 \| 0\.9000 \| 0\.8900 \| -0\.0100 \| 0\.02 \| ok[\s\S]*"
                         r"PASS: candidate vs reference, every gated metric within tolerance",
    "parity.py check-axolotl": r": 0 error\(s\)",
    # the predictions below are the gold answers: every rate is perfect
    "parity.py score": r'"gen_json_parse_rate": 1\.0,[\s\S]*"gen_offender_name_set_f1": 1\.0,[\s\S]*'
                       r'"gen_all_fields_exact_match_rate": 1\.0,',
    "bench.readme_figures": r"all \d+ figures quoted in README\.md and docs/ agree",
}
# Lines a working command must not print: every shipped Axolotl config has its LoRA targets checked against
# its model (base_model found) and states the MoE router aux loss (model_config).
NOT_LINES = {"parity.py check-axolotl": r"(?m)^warning: \S+: (base_model|model_config):"}


def documented_files() -> list[str]:
    """README.md, then each page under docs/, relative to the repository root."""
    return ["README.md"] + sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))


def documented_commands() -> list[tuple[str, str]]:
    """(file, command) for each command of each ```bash block of README.md and docs/*.md: continuations
    joined, comments dropped, `name=value` lines expanded where a later command of the same file uses
    `$name` (as a reader's shell would, one file at a time)."""
    commands = []
    for name in documented_files():
        variables = {}
        for block in re.findall(r"```bash\n(.*?)```", (REPO / name).read_text(encoding="utf-8"), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = re.sub(r"(^|\s+)#.*$", "", line).strip()
                if not line:
                    continue
                if m := re.fullmatch(r"(\w+)=(\S+)", line):
                    variables[m.group(1)] = m.group(2)
                    continue
                for var, value in variables.items():
                    line = line.replace(f"${var}", value)
                commands.append((name, line))
    return commands


def readme_commands() -> list[str]:
    """Every documented command, README.md's first, then each docs/ page's."""
    return [command for _, command in documented_commands()]


def is_slow(command: str) -> bool:
    return any(s in command for s in SLOW) or bool(SLOW_TRAINING.search(command))


def quick_commands() -> list[str]:
    return [c for c in readme_commands() if not is_slow(c)]


def test_every_readme_command_is_run_or_named_as_slow():
    documented = documented_commands()
    commands = [command for _, command in documented]
    assert len(commands) > 30
    for name, command in documented:
        assert "$" not in command, f"{name}: a variable the file does not set: {command}"
        if not is_slow(command):
            assert any(key in command for key in KEY_LINES), f"{name}: command with no expected output here: {command}"
    # the first-command pair is documented in the README and named slow, not forgotten
    assert ("README.md", "bash scripts/setup.sh && bash scripts/demo.sh") in documented
    assert ("README.md", "bash scripts/setup.sh && bash scripts/setup_axolotl.sh && .venv/bin/python -m pytest -q") \
        in documented
    # the pages under docs/ are read too: the data tools and the parity harness live there
    assert {name for name, _ in documented} >= {"README.md", "docs/data.md", "docs/parity.md"}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """The repository's files linked into a scratch folder (commands write data/ and report folders
    there, not into the checkout), plus stand-ins for the README's example inputs."""
    root = tmp_path_factory.mktemp("readme")
    for item in REPO.iterdir():
        if item.name not in {"data", "outputs", ".git"}:
            (root / item.name).symlink_to(item)
    return root


def run(command: str, cwd) -> subprocess.CompletedProcess:
    argv = shlex.split(re.sub(r"\s*\[[^\]]*\]", "", command))  # [optional parts] left out
    argv = [PLACEHOLDERS.get(a, a) for a in argv]
    if argv[0] == ".venv/bin/python":
        argv[0] = sys.executable
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(cwd), "HF_HUB_OFFLINE": "1"})


def test_quick_readme_commands_run_as_written(scratch):
    commands = [c.replace("CONFIG.yml", config) if "CONFIG.yml" in c else c
                for c in quick_commands() for config in (SHIPPED_AXOLOTL_CONFIGS if "CONFIG.yml" in c else [c])]
    # The data tools first (they write the files the other commands read), then in documented order.
    commands.sort(key=lambda c: "data_tools" not in c)
    ran = []
    for command in commands:
        if "data_tools split all.json" in command:
            (scratch / "all.json").write_bytes((scratch / "data/train/hawks_val.json").read_bytes())
        if "parity.py score" in command:
            gold = json.loads((scratch / "data/train/hawks_val_mixed.json").read_text(encoding="utf-8"))
            (scratch / "predictions.jsonl").write_text(
                "".join(json.dumps({"prediction": r["output"]}, ensure_ascii=False) + "\n" for r in gold))
        if "parity.py compare eval/a/metrics.json eval/b/metrics.json" in command:
            for side, presence in (("a", 0.9), ("b", 0.89)):
                (scratch / "eval" / side).mkdir(parents=True, exist_ok=True)
                (scratch / "eval" / side / "metrics.json").write_text(json.dumps(
                    {"gen_num_examples": 10, "gen_json_parse_rate": 1.0, "gen_offender_presence_f1": presence}))
        started = time.perf_counter()
        result = run(command, scratch)
        print(f"{time.perf_counter() - started:6.1f}s  {command}")
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{command}\n{output[-3000:]}"
        key = next(k for k in KEY_LINES if k in command)
        assert re.search(KEY_LINES[key], output), f"{command}: no line matching {KEY_LINES[key]!r}\n{output[-3000:]}"
        assert not re.search(NOT_LINES.get(key, "$^"), output), f"{command}: {NOT_LINES[key]!r}\n{output[-3000:]}"
        ran.append(command)
    assert sum("check-axolotl" in c for c in ran) == len(SHIPPED_AXOLOTL_CONFIGS) >= 3
    assert any("--dry-run" in c for c in ran)
    # the same commands tell a worse run apart: b's presence F1 0.05 below a's fails compare's gate, and
    # half the answers blanked halve score's parse rate
    compare = next(c for c in ran if "parity.py compare" in c)
    (scratch / "eval" / "b" / "metrics.json").write_text(json.dumps(
        {"gen_num_examples": 10, "gen_json_parse_rate": 1.0, "gen_offender_presence_f1": 0.85}))
    worse = run(compare, scratch)
    assert worse.returncode == 1 and "gen_offender_presence_f1" in worse.stdout and "FAIL" in worse.stdout, \
        worse.stdout[-2000:]
    score = next(c for c in ran if "parity.py score" in c)
    rows = (scratch / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    (scratch / "predictions.jsonl").write_text("".join(
        (row if i % 2 else json.dumps({"prediction": ""})) + "\n" for i, row in enumerate(rows)))
    blanked = run(score, scratch)
    parse_rate = re.search(r'"gen_json_parse_rate": ([\d.]+)', blanked.stdout)
    assert blanked.returncode == 0 and parse_rate, blanked.stdout[-2000:]
    assert float(parse_rate.group(1)) == pytest.approx((len(rows) // 2) / len(rows), abs=1e-3)


def entry_points() -> set[tuple[str, ...]]:
    """(program, subcommand) of every python command README.md and docs/ show."""
    found = set()
    for command in readme_commands():
        argv = shlex.split(re.sub(r"\s*\[[^\]]*\]", "", command))
        if argv[0] not in (".venv/bin/python", "torchrun"):
            continue
        if argv[0] == "torchrun":  # torchrun's own options (--nproc_per_node=4, --nnodes=2, --rdzv-...) left out
            argv = [argv[0]] + argv[next(i for i, a in enumerate(argv[1:], 1) if not a.startswith("-")):]
        rest = argv[1:]
        if rest[:1] == ["-m"]:
            program, rest = ("-m", rest[1]), rest[2:]
        else:
            program, rest = (rest[0],), rest[1:]
        if program[-1] in ("pytest", "pip"):
            continue
        sub = rest[0] if rest and not rest[0].startswith("-") and "=" not in rest[0] else None
        found.add(program + ((sub,) if sub else ()))
    return found


@pytest.mark.parametrize("entry", sorted(entry_points()), ids=" ".join)
def test_every_documented_entry_point_answers_help(entry):
    result = run(".venv/bin/python " + " ".join(entry) + " --help", REPO)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stdout + result.stderr[-2000:]
