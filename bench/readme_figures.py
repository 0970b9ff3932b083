"""Every measured figure README.md and docs/ quote, checked against where it was measured.

    .venv/bin/python -m bench.readme_figures          # exit 1 with a list when a figure disagrees
    .venv/bin/python -m bench.readme_figures --list   # every checked figure, its file:line, value and source

Sources are committed files only: the newest bench/RESULTS.md section of each kind (appended by the
bench scripts: `bench.tiny_runs` for the demo and parity runs, `bench/forgetting.py`,
`bench/train_throughput.py`, `bench/generation_eval.py`), `tiny/build.json` and the shipped tiny MoE's config. A figure
names the file it is quoted in (README.md or a page under docs/), a pattern of that file (one group per
value; a space matches any run of whitespace, so line breaks do not matter) and the values as the file
must write them. When the sentence changes or moves to another file, its pattern stops matching in the
file named: that is an error too, so a figure cannot silently leave the check. `--root DIR` checks the
README.md and docs/ of another folder (an edited copy) against this repository's sources.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.results import RESULTS, Section, newest_section

REPO = Path(__file__).resolve().parent.parent
README = "README.md"
BENCHMARKS = "docs/benchmarks.md"
PARITY = "docs/parity.md"
TRAINING = "docs/training.md"
TINY_MODELS = "docs/tiny-models.md"
NUM = r"([\d.]+)"
COUNT = r"([\d,]+)"  # a count with thousands separators, as the tables print it
SIGNED = r"([+-][\d.]+)"


@dataclass
class Figure:
    what: str
    file: str  # where the figure is quoted, relative to the repository root: README.md, docs/NAME.md
    pattern: str
    source: str  # a RESULTS.md section kind, or a committed file
    values: Callable[[], tuple[str, ...]]


def results(kind: str) -> Section:
    return newest_section(kind, RESULTS)


def number(cell: str) -> float:
    """The first number of a cell: '9330 (8357-9593)' -> 9330.0, '1.00x' -> 1.0."""
    return float(re.match(r"[+-]?[\d.]+", cell.replace(",", "")).group())


def metric_row(section: str, row: str) -> tuple[str, ...]:
    table = results(section).tables[0]
    return tuple(table.cell(row, c) for c in ("parse", "presence F1", "name-set F1", "exact", "hallucination"))


def demo(model: str, *columns: str) -> tuple[str, ...]:
    table = results("demo runs").tables[0]
    return tuple(table.cell(model, c) for c in columns)


def demo_minutes() -> tuple[str, ...]:
    table = results("demo runs").tables[0]
    return (table.cell("tiny-moe", "train, s"), f"{number(table.cell('tiny-moe', 'end to end, s')) / 60:.0f}")


def parity_times() -> tuple[str, ...]:
    measures = results("parity run").tables[1]
    return (measures.cell("total, min", "value"), measures.cell("train ours, s", "value"),
            measures.cell("train Axolotl, s", "value"))


def forgetting(lam: str, ratio: str, column: str) -> float:
    table = results("forgetting").tables[0]
    for cells in table.rows:
        if cells[0] == lam and cells[1].split()[0] == ratio:
            return number(cells[table.header.index(column)])
    raise KeyError(f"forgetting: no row lambda {lam}, rehearsal ratio {ratio}")


def throughput(stack: str, column: str = "trained tokens/s, median (min-max)") -> float:
    """A cell of the newest throughput table: the median tokens/s, or the ratio to plain TRL as the table
    prints it (ratios to Axolotl, which the table lacks, are taken from the medians)."""
    return number(results("training throughput").tables[0].cell(stack, column))


def packed_forwards() -> tuple[str, ...]:
    """The production preset's micro-batch, packed against one example per row (bench/padding.py)."""
    table = results("padding: forward passes, packed vs not").tables[0]
    one, packed = (table.rows[0], table.rows[1])
    assert one[0].endswith("one example per row") and packed[0].endswith("packed"), (one[0], packed[0])
    forwards = table.header.index("forward passes")
    fill = number(packed[table.header.index("token budget filled")])
    return (packed[forwards], one[forwards], f"{number(one[forwards]) / number(packed[forwards]):.2f}",
            f"{fill * 100:.1f}")


def experts_ratio() -> tuple[str, ...]:
    """eager's tokens/s over grouped_mm's, from the medians of the newest bench/experts.py table."""
    table = results("experts implementations").tables[0]
    rate = {name: number(table.cell(name, "tokens/s, median (min-max)")) for name in ("eager", "grouped_mm")}
    return (f"{rate['eager'] / rate['grouped_mm']:.2f}",)


def generation_speedup() -> tuple[str, ...]:
    """The batch size and batched-over-one-at-a-time ratio of the newest bench/generation_eval.py table."""
    rows = {row[0]: row[1] for row in results("generation eval").tables[0].rows}
    batch = next(k for k in rows if k.startswith("batched, batch ")).removeprefix("batched, batch ")
    speedup = next(v for k, v in rows.items() if k.startswith("speed-up"))
    return batch, f"{number(speedup.strip('*')):.1f}"


def tiny_build_minutes() -> tuple[str, ...]:
    timings = json.loads((REPO / "tiny" / "build.json").read_text(encoding="utf-8"))["timings"]
    return (f"{sum(timings.values()) / 60:.0f}",)


def nf4_expert_storage() -> tuple[str, ...]:
    """Fused expert weights of the shipped tiny MoE: gate, up and down projections per expert and layer;
    NF4 keeps 4 bits per weight plus one 1-byte block scale per 64 (the scales double-quantised)."""
    c = json.loads((REPO / "tiny" / "moe" / "config.json").read_text(encoding="utf-8"))
    weights = c["num_hidden_layers"] * c["num_local_experts"] * 3 * c["hidden_size"] * c["moe_intermediate_size"]
    bf16, nf4 = weights * 2, weights * (0.5 + 1 / 64)
    return f"{bf16 / 2**20:.1f}", f"{nf4 / 2**20:.1f}", f"{bf16 / nf4:.1f}"


def signed(x: float) -> str:
    return f"{x:+.2f}"


FIGURES = [
    Figure("demo: tiny-moe training seconds, end-to-end minutes", README,
           rf"naming people never seen in training\): training {NUM} s \(about {NUM} minutes end to end",
           "demo runs", demo_minutes),
    Figure("demo: tiny-moe headline metrics", README,
           rf"\| `tiny-moe` \(the default\) \| {NUM} \| {NUM} \| \*\*{NUM}\*\* \| \*\*{NUM}\*\* \| {NUM} \|",
           "demo runs", lambda: metric_row("demo runs", "tiny-moe")),
    Figure("demo: tiny-dense training seconds and headline metrics", README,
           rf"\| `tiny-dense` \(`model_name=tiny-dense`, {NUM} s\) \| {NUM} \| {NUM} \| \*\*{NUM}\*\* \| "
           rf"\*\*{NUM}\*\* \| {NUM} \|",
           "demo runs", lambda: demo("tiny-dense", "train, s") + metric_row("demo runs", "tiny-dense")),
    Figure("demo: the step adapter/ keeps", TRAINING,
           rf"adapter/ = step {NUM}, highest gen_offender_name_set_f1: {NUM}; adapter_last/ = step 375 \({NUM}\)",
           "demo runs", lambda: demo("tiny-moe", "adapter/ step", "its name-set F1", "last step's")),
    Figure("parity run: total minutes, training seconds", PARITY,
           rf"states the router aux-loss setting of both stacks\), {NUM} min in all \(training {NUM} s ours, "
           rf"{NUM} s Axolotl\)", "parity run", parity_times),
    Figure("parity run: base", PARITY, rf"\| base \(untrained\) \| {NUM} \| {NUM} \| {NUM} \| {NUM} \| {NUM} \|",
           "parity run", lambda: metric_row("parity run", "base")),
    Figure("parity run: ours", PARITY, rf"\| ours \(Unsloth backend\) \| {NUM} \| {NUM} \| {NUM} \| {NUM} \| {NUM} \|",
           "parity run", lambda: metric_row("parity run", "ours (unsloth)")),
    Figure("parity run: Axolotl", PARITY, rf"\| Axolotl 0\.19 \| {NUM} \| {NUM} \| {NUM} \| {NUM} \| {NUM} \|",
           "parity run", lambda: metric_row("parity run", "axolotl")),
    Figure("parity run: the command's comment", PARITY, rf"ours vs Axolotl \(~{NUM} min\)", "parity run",
           lambda: (parity_times()[0],)),
    Figure("forgetting: plain run", BENCHMARKS,
           rf"plain run raised the general-text loss by {SIGNED} \({NUM} -> {NUM}\) while reaching name-set F1 "
           rf"{NUM}\.", "forgetting",
           lambda: (signed(forgetting("0.0", "0.0", "increase")), f"{forgetting('0.0', '0.0', 'general loss base'):.2f}",
                    f"{forgetting('0.0', '0.0', 'tuned'):.2f}", f"{forgetting('0.0', '0.0', 'name F1'):.2f}")),
    Figure("forgetting: 20% rehearsal", BENCHMARKS,
           rf"20% rehearsal removed the forgetting \({SIGNED}\) at a small task cost \(name-set F1 {NUM}, exact "
           rf"{NUM}\)", "forgetting",
           lambda: (signed(forgetting("0.0", "0.2", "increase")), f"{forgetting('0.0', '0.2', 'name F1'):.2f}",
                    f"{forgetting('0.0', '0.2', 'exact'):.2f}")),
    Figure("forgetting: distillation at lambda 0.5", BENCHMARKS,
           rf"Distillation at lambda 0\.5 cut the increase to {SIGNED}, but the tiny model then learned no JSON "
           rf"answer in one epoch \(parse rate {NUM}\), with or without rehearsal, and a step is about {NUM}x "
           rf"slower", "forgetting",
           lambda: (signed(forgetting("0.5", "0.0", "increase")),
                    f"{max(forgetting('0.5', r, 'parse') for r in ('0.0', '0.2')):g}",
                    f"{forgetting('0.5', '0.0', 'train s') / forgetting('0.0', '0.0', 'train s'):.1f}")),
    Figure("training throughput: default", BENCHMARKS,
           rf"Measured on the shipped tiny models \(the newest run\): ours {NUM}x plain TRL and {NUM}x Axolotl",
           "training throughput",
           lambda: (f"{throughput('ours-unsloth', 'vs plain-trl'):.2f}",
                    f"{throughput('ours-unsloth') / throughput('axolotl'):.2f}")),
    Figure("training throughput: length-grouped", BENCHMARKS,
           rf"{NUM}x plain TRL and {NUM}x Axolotl with length-grouped batches", "training throughput",
           lambda: (f"{throughput('ours-grouped', 'vs plain-trl'):.2f}",
                    f"{throughput('ours-grouped') / throughput('axolotl'):.2f}")),
    Figure("padding: packed forward passes at the production micro-batch", BENCHMARKS,
           rf"{COUNT} forward passes per epoch instead of {COUNT} \({NUM}x fewer\), {NUM}% of the token budget "
           rf"filled",
           "padding: forward passes, packed vs not", packed_forwards),
    Figure("training throughput: MFU", BENCHMARKS,
           rf"fp32 matmul rate measured in the same run, `bench/flops.py`\): about {NUM}% for ours",
           "training throughput", lambda: (f"{throughput('ours-unsloth', 'MFU'):.0f}",)),
    Figure("training throughput: packed", BENCHMARKS,
           rf"ours packed trains at {NUM}x plain TRL and {NUM}x Axolotl", "training throughput",
           lambda: (f"{throughput('ours-packed', 'vs plain-trl'):.2f}",
                    f"{throughput('ours-packed') / throughput('axolotl'):.2f}")),
    Figure("training throughput: packed over Axolotl packed", BENCHMARKS,
           rf"{NUM}x\s+Axolotl with its own `sample_packing`\), against the length-grouped batches'\s+{NUM}x",
           "training throughput",
           lambda: (f"{throughput('ours-packed') / throughput('axolotl-packed'):.2f}",
                    f"{throughput('ours-grouped', 'vs plain-trl'):.2f}")),
    Figure("training throughput: packed with sdpa's masks", BENCHMARKS,
           rf"\(`attn_implementation=sdpa`\) it trains at {NUM}x", "training throughput",
           lambda: (f"{throughput('ours-packed-sdpa', 'vs plain-trl'):.2f}",)),
    Figure("experts implementations on CPU", BENCHMARKS,
           rf"`eager` trains the tiny MoE at {NUM}x `grouped_mm`", "experts implementations",
           experts_ratio),
    Figure("generation eval: batched over one at a time", BENCHMARKS,
           rf"batches of {NUM}: {NUM}x one at a time, with identical answers", "generation eval",
           generation_speedup),
    Figure("tiny build time", TINY_MODELS, rf"rebuild tiny/ in place \(about {NUM} minutes on 2 cores\)",
           "tiny/build.json",
           tiny_build_minutes),
    Figure("4-bit experts of the tiny MoE", TRAINING,
           rf"experts {NUM} MiB bf16 → {NUM} MiB NF4 \({NUM}x less\)", "tiny/moe/config.json",
           nf4_expert_storage),
]


@dataclass
class Finding:
    figure: Figure
    line: int  # 0: the pattern matched nowhere (or more than once), or the file is unreadable
    quoted: tuple[str, ...]
    expected: tuple[str, ...] | None
    problem: str = ""

    @property
    def where(self) -> str:
        """`docs/benchmarks.md:LINE`, or the file alone when no single line matched."""
        return f"{self.figure.file}:{self.line}" if self.line else self.figure.file


def check(root: Path = REPO, figures: list[Figure] = FIGURES, texts: dict[str, str] | None = None) -> list[Finding]:
    """Each figure against its source, in the file it names under `root`; `texts` (file -> text) stands in
    for files not to be read from disk."""
    texts = dict(texts or {})
    findings = []
    for fig in figures:
        if fig.file not in texts:
            try:
                texts[fig.file] = (root / fig.file).read_text(encoding="utf-8")
            except OSError as e:
                texts[fig.file] = e
        text = texts[fig.file]
        if isinstance(text, OSError):
            findings.append(Finding(fig, 0, (), None, f"{fig.file} unreadable: {text}"))
            continue
        matches = list(re.finditer(fig.pattern.replace(" ", r"\s+"), text))
        line = text.count("\n", 0, matches[0].start()) + 1 if len(matches) == 1 else 0
        found = matches[0].groups() if line else ()
        try:
            expected = tuple(fig.values())
        except (LookupError, ValueError, OSError) as e:
            findings.append(Finding(fig, line, found, None, f"source unreadable: {e}"))
            continue
        if not line:
            problem = (f"the sentence matches {len(matches)} times in {fig.file}, not once: update its pattern "
                       "(or its file) in bench/readme_figures.py")
        else:
            problem = "" if found == expected else f"{fig.file} says other values than the source"
        findings.append(Finding(fig, line, found, expected, problem))
    return findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="show every checked figure, not only disagreements")
    parser.add_argument("--root", type=Path, default=REPO,
                        help="the folder holding the README.md and docs/ to check (default: this repository)")
    args = parser.parse_args(argv)
    findings = check(args.root)
    bad = [f for f in findings if f.problem]
    for f in findings if args.list else bad:
        status = "DIFFERS" if f.problem else "ok"
        print(f"{status:8} {f.where}: {f.figure.what} (source: {f.figure.source})")
        if f.problem:
            print(f"         {f.problem}")
            if f.quoted:
                print(f"         {f.figure.file}: {', '.join(f.quoted)}")
        if f.expected is not None and (f.problem or args.list):
            print(f"         source: {', '.join(f.expected)}")
    files = sorted({fig.file for fig in FIGURES})
    if bad:
        print(f"{len(bad)} of {len(findings)} quoted figures disagree with their sources; write the source's "
              "values into the file named, or re-run the bench script that measures them")
        return 1
    print(f"all {len(findings)} figures quoted in README.md and docs/ agree with bench/RESULTS.md, tiny/build.json "
          f"and tiny/moe ({', '.join(files)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
