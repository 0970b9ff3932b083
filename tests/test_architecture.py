"""The import arrows of ARCHITECTURE.md, read from every module's own imports (top-level and inside
functions alike): a new import that runs the wrong way fails here with the file and line."""

import ast
from pathlib import Path

from conftest import REPO

SCRIPTS = {"qwen_finetune", "qwen_finetune_legacy", "parity"}
# package -> the packages of this repository it may import (itself always)
ALLOWED = {
    "core": set(),
    "callbacks": {"core"},
    "data_tools": {"core"},
    "finetune": {"core", "callbacks", "data_tools", "tiny"},
    "tiny": {"core", "data_tools"},
    "parity_tools": {"core", "callbacks", "data_tools", "finetune", "tiny"},
    "bench": {"core", "callbacks", "data_tools", "finetune", "parity_tools", "tiny"},
    "scripts": {"core", "callbacks", "data_tools", "finetune", "parity_tools", "tiny"},
}
# modules of an allowed package that a lower layer still must not reach: the tiny-model builder
# (a test and demo asset with a pre-training loop) is imported by nothing but its own command line
FORBIDDEN_MODULES = {"tiny.build": {"finetune", "parity_tools", "data_tools", "callbacks", "core"}}
OURS = set(ALLOWED) - {"scripts"} | SCRIPTS


def layer(rel: Path) -> str:
    return "scripts" if len(rel.parts) == 1 else rel.parts[0]


def imports(path: Path):
    """(line, names) for each import of this repository's code in `path`: the module, and for
    `from package import name` also package.name (which may be a module)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            groups = [[a.name] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            groups = [[node.module] + [f"{node.module}.{a.name}" for a in node.names]]
        else:
            continue
        for names in groups:
            if names[0].split(".")[0] in OURS:
                yield node.lineno, names


def sources(root: Path) -> list[Path]:
    files = list(root.glob("*.py"))
    for package in set(ALLOWED) - {"scripts"}:
        files += (root / package).rglob("*.py")
    return sorted(files)


def wrong_imports(root: Path) -> list[str]:
    wrong = []
    for path in sources(root):
        rel = path.relative_to(root)
        here = layer(rel)
        for line, names in imports(path):
            for name in names:
                top = name.split(".")[0]
                if top in SCRIPTS:
                    problem = f"imports the script {top}.py (nothing imports the scripts)"
                elif top != here and top not in ALLOWED[here]:
                    problem = f"{here} imports {name} (allowed: {sorted(ALLOWED[here]) or 'nothing'})"
                elif any(name == m and here in banned for m, banned in FORBIDDEN_MODULES.items()):
                    problem = f"{here} imports {name}"
                else:
                    continue
                wrong.append(f"{rel}:{line}: {problem}")
                break
    return wrong


def test_imports_run_one_way():
    wrong = wrong_imports(REPO)
    assert not wrong, "imports against ARCHITECTURE.md:\n" + "\n".join(wrong)


def test_the_metrics_are_pure_stdlib():
    """core/metrics.py is imported in Axolotl's environment and by every tool: the standard library only."""
    import sys

    path = REPO / "core" / "metrics.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]):
                assert name.split(".")[0] in sys.stdlib_module_names or name == "__future__", \
                    f"core/metrics.py:{node.lineno} imports {name}"


def test_the_check_names_each_wrong_arrow(tmp_path):
    (tmp_path / "callbacks").mkdir()
    (tmp_path / "callbacks" / "eval.py").write_text("def f():\n    from finetune.config import FinetuneConfig\n")
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "x.py").write_text("import data_tools.synth\nfrom core import metrics\n")
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "m.py").write_text("from tiny.build import build\nfrom tiny import model_dir\n")
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "t.py").write_text("import parity\n")
    assert wrong_imports(tmp_path) == [
        "callbacks/eval.py:2: callbacks imports finetune.config (allowed: ['core'])",
        "core/x.py:1: core imports data_tools.synth (allowed: nothing)",
        "finetune/m.py:1: finetune imports tiny.build",
        "tiny/t.py:1: imports the script parity.py (nothing imports the scripts)"]


# Inside finetune/: module -> the finetune modules that may import it. The recipe is entered once, from the
# command line; the dry run is reached from the recipe's dry-run branch only, so the real run depends on no
# part of it; the schema and the presets are data every module may read.
FINETUNE_IMPORTED_ONLY_BY = {"finetune.pipeline": {"finetune.cli"}, "finetune.preflight": {"finetune.pipeline"}}
FINETUNE_LEAVES = {"finetune.config_schema", "finetune.presets", "finetune.memory"}  # import no finetune module


def wrong_finetune_imports(root: Path) -> list[str]:
    wrong = []
    for path in sorted((root / "finetune").glob("*.py")):
        module = f"finetune.{path.stem}"
        for line, names in imports(path):
            target = next((n for n in names if n in FINETUNE_IMPORTED_ONLY_BY or n.startswith("finetune.")), None)
            if target is None or target == module:
                continue
            if module in FINETUNE_LEAVES and target.startswith("finetune"):
                wrong.append(f"finetune/{path.name}:{line}: {module} is a leaf and imports {target}")
            allowed = FINETUNE_IMPORTED_ONLY_BY.get(target)
            if allowed is not None and module not in allowed:
                wrong.append(f"finetune/{path.name}:{line}: {module} imports {target} "
                             f"(only {', '.join(sorted(allowed))} may)")
    return wrong


def test_inside_the_trainer_the_recipe_and_the_dry_run_are_entered_once():
    wrong = wrong_finetune_imports(REPO)
    assert not wrong, "imports against ARCHITECTURE.md (inside finetune/):\n" + "\n".join(wrong)


def test_the_finetune_check_names_each_wrong_arrow(tmp_path):
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "checks.py").write_text("def f():\n    from finetune.preflight import plan\n")
    (tmp_path / "finetune" / "presets.py").write_text("from finetune.config import resolve\n")
    (tmp_path / "finetune" / "data.py").write_text("from finetune import pipeline\n")
    assert wrong_finetune_imports(tmp_path) == [
        "finetune/checks.py:2: finetune.checks imports finetune.preflight (only finetune.pipeline may)",
        "finetune/data.py:1: finetune.data imports finetune.pipeline (only finetune.cli may)",
        "finetune/presets.py:1: finetune.presets is a leaf and imports finetune.config"]
