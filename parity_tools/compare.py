"""`parity.py compare REF.json CAND.json`: every gen_* metric side by side, and a verdict.

The candidate fails when it is worse than the reference by more than a
metric's tolerance: higher is better for the F1s, parse rate and exact
match; lower for hallucination and truncation. Other gen_* values (per
field, per source) are shown, and gated only when given a --tolerance.
Runs scored on different example counts are not comparable: an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core import run_summary
from core.metrics import ERROR_CATEGORIES, HEADLINE, lower_is_better
from core.records import DataError, atomic_write_text, load_json

DEFAULT_TOLERANCES = {name: 0.02 for name in HEADLINE}
ERRORS = "gen_error_rate/"  # the share of each error category: shown as counts in their own table


@dataclass
class Row:
    name: str
    ref: float | None
    cand: float | None
    tolerance: float | None

    @property
    def diff(self) -> float | None:
        return None if self.ref is None or self.cand is None else self.cand - self.ref

    @property
    def worse_by(self) -> float:
        """How much worse the candidate is (> 0 = worse), in the metric's own direction."""
        if self.diff is None:
            return 0.0
        return self.diff if lower_is_better(self.name) else -self.diff

    @property
    def failed(self) -> bool:
        if self.tolerance is None:
            return False
        if self.ref is not None and self.cand is None:
            return True  # a gated metric the candidate lacks
        return self.worse_by > self.tolerance + 1e-12

    @property
    def apart(self) -> bool:
        """Beyond the tolerance in either direction: for two runs meant to be the same (a pair of stacks),
        the reference being worse is as much a difference as the candidate being worse."""
        return self.failed or (self.tolerance is not None and self.diff is not None
                               and abs(self.diff) > self.tolerance + 1e-12)


def load_metrics(path: str | Path) -> dict:
    """gen_* metrics from a gen_metrics_step*.json, a `parity.py evaluate` file or a run_summary.json."""
    data = load_json(path)
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
        data = data["metrics"]
    metrics = {k: v for k, v in data.items() if k.startswith("gen_") and isinstance(v, (int, float))} \
        if isinstance(data, dict) else {}
    if "gen_num_examples" not in metrics:
        raise DataError(f"{path}: no gen_* metrics with gen_num_examples (expected the output of the "
                        "generation eval or `parity.py evaluate`)")
    return metrics


def parse_tolerances(items: list[str]) -> dict[str, float]:
    out = dict(DEFAULT_TOLERANCES)
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.startswith("gen_"):
                raise ValueError
            out[name] = float(value)
        except ValueError:
            raise DataError(f"--tolerance '{item}': expected gen_<metric>=<number>, e.g. "
                            "gen_offender_presence_f1=0.02") from None
    return out


def compare(ref: dict, cand: dict, tolerances: dict[str, float]) -> list[Row]:
    if ref["gen_num_examples"] != cand["gen_num_examples"]:
        raise DataError(f"the runs were scored on different numbers of examples ({ref['gen_num_examples']:g} vs "
                        f"{cand['gen_num_examples']:g}): they are not comparable; evaluate both on the same file")
    names = sorted(set(ref) | set(cand), key=lambda n: (n not in DEFAULT_TOLERANCES, "/" in n, n))
    return [Row(n, ref.get(n), cand.get(n), tolerances.get(n)) for n in names if n != "gen_num_examples"]


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def table(rows: list[Row], ref_name: str, cand_name: str) -> str:
    lines = [f"| metric | {ref_name} | {cand_name} | diff | tolerance | verdict |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.name.startswith(ERRORS) and r.tolerance is None:
            continue
        verdict = "WORSE" if r.failed else ("ok" if r.tolerance is not None else "")
        diff = "—" if r.diff is None else f"{r.diff:+.4f}"
        tol = "" if r.tolerance is None else f"{r.tolerance:g}"
        lines.append(f"| {r.name} | {_fmt(r.ref)} | {_fmt(r.cand)} | {diff} | {tol} | {verdict} |")
    return "\n".join(lines)


def error_table(ref: dict, cand: dict, ref_name: str, cand_name: str) -> str:
    """How many examples of each run fell in each error category (core/metrics.py), side by side;
    '' when neither run has them (metrics from before the categories existed)."""
    if not any(k.startswith(ERRORS) for k in (*ref, *cand)):
        return ""

    def count(metrics: dict, category: str) -> str:
        rate = metrics.get(ERRORS + category)
        return "—" if rate is None else str(round(rate * metrics["gen_num_examples"]))

    lines = [f"| error category | {ref_name} | {cand_name} |", "|---|---:|---:|"]
    lines += [f"| {c} | {count(ref, c)} | {count(cand, c)} |" for c in ERROR_CATEGORIES]
    return "\n".join(lines)


def losses_of(summary_path: str | None) -> list[tuple[int, float]]:
    """Training losses from a run_summary.json (ours or the Axolotl plugin's: one format)."""
    if not summary_path or not Path(summary_path).is_file():
        return []
    return [tuple(x) for x in run_summary.read(Path(summary_path))["train_losses"]]


def write_report(out_dir: Path, rows: list[Row], names: tuple[str, str], sources: tuple[str, str],
                 losses: tuple[list, list], appendix: str = "", errors: str = "",
                 two_sided: bool = False) -> list[Path]:
    """parity_report.md and its charts; `errors`: the error_table of both runs; `two_sided`: the gate fails
    on a difference beyond the tolerance either way (a pair of stacks), not only the candidate worse."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)

    def chart(name: str, draw) -> Path:
        fig, ax = plt.subplots(figsize=(9, 4))
        draw(ax)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        return out_dir / name

    def bars(ax) -> None:
        gated = [r for r in rows if r.tolerance is not None and r.ref is not None and r.cand is not None]
        x = range(len(gated))
        ax.bar([i - 0.2 for i in x], [r.ref for r in gated], width=0.4, label=names[0])
        ax.bar([i + 0.2 for i in x], [r.cand for r in gated], width=0.4, label=names[1])
        ax.set_xticks(list(x), [r.name.removeprefix("gen_") for r in gated], rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title("generation metrics")

    def curves(ax) -> None:
        for name, curve in zip(names, losses):
            ax.plot([s for s, _ in curve], [v for _, v in curve], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")

    written = [chart("parity_metrics.png", bars)]
    if losses[0] and losses[1]:
        written.append(chart("parity_losses.png", curves))
    if two_sided:
        failed = [r.name for r in rows if r.apart]
        verdict = (f"**FAIL**: {names[0]} and {names[1]} differ beyond tolerance (either way) on "
                   f"{', '.join(failed)}" if failed else
                   f"**PASS**: {names[0]} and {names[1]} are within tolerance of each other (either way) on "
                   "every gated metric")
    else:
        failed = [r.name for r in rows if r.failed]
        verdict = (f"**FAIL**: {names[1]} is worse than {names[0]} beyond tolerance on {', '.join(failed)}"
                   if failed else f"**PASS**: {names[1]} is within tolerance of {names[0]} on every gated metric")
    report = [f"# Parity report: {names[0]} vs {names[1]}", "", f"- reference: `{sources[0]}`",
              f"- candidate: `{sources[1]}`", "", verdict, "", table(rows, *names), "",
              *(["Examples per error category (each example in the first that applies):", "", errors, ""]
                if errors else []),
              "![metrics](parity_metrics.png)"]
    if len(written) > 1:
        report.append("![losses](parity_losses.png)")
    atomic_write_text(out_dir / "parity_report.md", ["\n".join(report) + "\n" + appendix])
    return [out_dir / "parity_report.md"] + written
