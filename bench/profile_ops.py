"""torch.profiler self time by kind of op: what dominates a training step or an evaluation.

Shared by bench/train_throughput.py (--profile, via bench/step_timer.py) and
bench/generation_eval.py (--profile). Self time, so nested ops are not counted twice.
"""

from __future__ import annotations

OP_KINDS = (  # first match wins: "aten::" names exactly, other patterns as substrings
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm")),
    ("attention", ("attention", "aten::_softmax", "aten::_softmax_backward_data")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "logsumexp")),
    ("optimizer", ("Optimizer", "_foreach", "aten::addcdiv_", "aten::addcmul_", "aten::lerp_", "aten::sqrt")),
    ("copies/casts", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone", "aten::cat",
                      "aten::index", "aten::index_select", "aten::gather", "aten::scatter_")),
    ("elementwise", ("aten::mul", "aten::add", "aten::silu", "aten::pow", "aten::rsqrt", "aten::mean", "aten::neg",
                     "aten::sum", "aten::div", "aten::sub", "aten::fill_", "aten::zero_", "aten::where",
                     "aten::mul_", "aten::add_", "aten::silu_backward", "aten::sigmoid", "aten::exp")),
)


def _matches(name: str, pattern: str) -> bool:
    return name == pattern if pattern.startswith("aten::") else pattern in name


def op_kinds(ops: list[dict]) -> dict[str, float]:
    """Self CPU ms by kind; `ops`: [{"name", "self_cpu_us"}] (bench/step_timer.py writes these)."""
    out = {kind: 0.0 for kind, _ in OP_KINDS} | {"other": 0.0}
    for op in ops:
        kind = next((k for k, patterns in OP_KINDS if any(_matches(op["name"], p) for p in patterns)), "other")
        out[kind] += op["self_cpu_us"] / 1000
    return out


def op_rows(prof) -> list[dict]:
    """Each op's self CPU time from a stopped torch.profiler.profile."""
    return [{"name": e.key, "self_cpu_us": e.self_cpu_time_total, "calls": e.count} for e in prof.key_averages()]


def profile_ops(fn) -> list[dict]:
    """Run fn() under torch.profiler (CPU) and return each op's self time."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return op_rows(prof)


def kinds_table(rows: dict[str, dict[str, float]], label: str) -> str:
    names = list(next(iter(rows.values())))
    return (f"| {label} | " + " | ".join(names) + " | total |\n|---|" + "---:|" * (len(names) + 1) + "\n"
            + "".join(f"| {n} | " + " | ".join(f"{k[x]:.1f}" for x in names) + f" | {sum(k.values()):.1f} |\n"
                      for n, k in rows.items()))
