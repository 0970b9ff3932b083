"""The measured figures README.md and docs/ quote agree with their committed sources (bench/RESULTS.md,
tiny/build.json, the tiny MoE's config), and the check says where (file and line) when one does not."""

import shutil
import subprocess
import sys

import pytest

from bench.readme_figures import FIGURES, check
from bench.results import newest_section, read_sections
from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
BENCHMARKS = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")


def test_every_quoted_figure_agrees_with_its_source():
    result = subprocess.run([sys.executable, "-m", "bench.readme_figures"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"all {len(FIGURES)} figures quoted in README.md and docs/ agree" in result.stdout


def test_each_figure_names_the_file_it_is_quoted_in():
    files = {fig.file for fig in FIGURES}
    assert "README.md" in files and any(f.startswith("docs/") for f in files)
    for name in files:
        assert name == "README.md" or (name.startswith("docs/") and name.endswith(".md")), name
        assert (REPO / name).is_file(), name
    # the demo table stays in the README; the benchmark figures live in docs/benchmarks.md
    assert {fig.file for fig in FIGURES if fig.what.startswith("demo: tiny-")} == {"README.md"}
    assert {fig.file for fig in FIGURES if fig.source == "training throughput"} == {"docs/benchmarks.md"}


def test_a_changed_figure_is_reported_with_its_file_line_and_both_values(tmp_path):
    """An edited copy (README.md and docs/ under --root): a README figure and a docs/ figure changed, each
    reported as FILE:LINE with the value written and the source's."""
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    demo_row = next(line for line in README.splitlines() if line.startswith("| `tiny-moe` (the default)"))
    name_f1 = demo_row.split("|")[4].strip().strip("*")
    (tmp_path / "README.md").write_text(README.replace(demo_row, demo_row.replace(f"**{name_f1}**", "**0.999**", 1)),
                                        encoding="utf-8")
    experts = next(line for line in BENCHMARKS.splitlines() if "trains the tiny MoE at" in line)
    ratio = experts.split("trains the tiny MoE at ")[1].split("x")[0]
    (tmp_path / "docs" / "benchmarks.md").write_text(
        BENCHMARKS.replace(experts, experts.replace(f"at {ratio}x", "at 7.77x", 1)), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "bench.readme_figures", "--root", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    line = README.splitlines().index(demo_row) + 1
    assert f"DIFFERS  README.md:{line}: demo: tiny-moe headline metrics" in result.stdout
    assert "0.999" in result.stdout and name_f1 in result.stdout
    line = BENCHMARKS.splitlines().index(experts) + 1
    assert f"DIFFERS  docs/benchmarks.md:{line}: experts implementations on CPU" in result.stdout
    assert "7.77" in result.stdout and ratio in result.stdout
    assert f"2 of {len(FIGURES)} quoted figures disagree" in result.stdout


def test_a_reworded_sentence_drops_out_loudly_instead_of_silently():
    edited = BENCHMARKS.replace("plain run raised the general-text loss by",
                                "plain run increased the general-text loss by")
    assert edited != BENCHMARKS
    findings = {f.figure.what: f for f in check(texts={"docs/benchmarks.md": edited})}
    assert findings["forgetting: plain run"].problem.startswith("the sentence matches 0 times in docs/benchmarks.md")
    assert not findings["forgetting: 20% rehearsal"].problem
    # a figure's sentence moved to another file is a miss in the file its Figure names
    moved = {f.figure.what: f for f in check(texts={"docs/benchmarks.md": edited, "README.md": README + BENCHMARKS})}
    assert moved["forgetting: plain run"].problem.startswith("the sentence matches 0 times in docs/benchmarks.md")


def test_results_sections_newest_wins_and_tables_read_by_column(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text(
        "# Benchmark results\n\n## padding — 2026-01-01 — x86_64\n\n| batch | plain |\n|---:|---:|\n| 8 | 0.700 |\n\n"
        "## padding: real tokens — 2026-02-01 — x86_64\n\ntext\n\n| batch | plain | vs a | vs a |\n"
        "|---:|---:|---:|---:|\n| 8 | **0.785** | 1.00x | 2.00x |\n| 16 | 0.726 | 1.10x | 3.00x |\n\n"
        "| measure | value |\n|---|---:|\n| total, min | 4.3 |\n", encoding="utf-8")
    assert [s.title for s in read_sections(results)] == ["padding", "padding: real tokens"]
    newest = newest_section("padding", results)
    assert newest.line == 9 and len(newest.tables) == 2
    assert newest.tables[0].cell("8", "plain") == "0.785"  # bold dropped
    assert newest.tables[0].cell("16", "vs a") == "1.10x"  # the first column of a repeated name
    assert newest.tables[1].cell("total, min", "value") == "4.3"
    with pytest.raises(LookupError, match="no section 'forgetting"):
        newest_section("forgetting", results)
