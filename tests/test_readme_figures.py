"""The README's measured figures agree with their committed sources (bench/RESULTS.md, tiny/build.json,
the tiny MoE's config), and the check says where when one does not."""

import subprocess
import sys

import pytest

from bench.readme_figures import FIGURES, check
from bench.results import newest_section, read_sections
from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_every_readme_figure_agrees_with_its_source():
    result = subprocess.run([sys.executable, "-m", "bench.readme_figures"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"all {len(FIGURES)} README figures agree" in result.stdout


def test_a_changed_figure_is_reported_with_its_line_and_both_values(tmp_path):
    demo_row = next(line for line in README.splitlines() if line.startswith("| `tiny-moe` (the default)"))
    name_f1 = demo_row.split("|")[4].strip().strip("*")
    edited = README.replace(demo_row, demo_row.replace(f"**{name_f1}**", "**0.999**", 1))
    (tmp_path / "README.md").write_text(edited, encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "bench.readme_figures", "--readme", str(tmp_path / "README.md")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    line = README.splitlines().index(demo_row) + 1
    assert f"DIFFERS  README.md:{line}: demo: tiny-moe headline metrics" in result.stdout
    assert "0.999" in result.stdout and name_f1 in result.stdout
    assert f"1 of {len(FIGURES)} README figures disagree" in result.stdout


def test_a_reworded_sentence_drops_out_loudly_instead_of_silently():
    edited = README.replace("plain run raised the general-text loss by", "plain run increased the general-text loss by")
    assert edited != README
    findings = {f.figure.what: f for f in check(edited)}
    assert findings["forgetting: plain run"].problem.startswith("the README sentence matches 0 times")
    assert not findings["forgetting: 20% rehearsal"].problem


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
