"""Generation eval throughput: batched (left padding) vs one example at a time.

    .venv/bin/python -m bench.generation_eval [--examples 64] [--batch-size 32] [--model tiny-moe]
                                              [--adapter outputs/tiny/single/adapter] [--static-cache]

Both sides run `callbacks.generation_eval.generate_answers` on the same
validation records with the same settings (greedy, the same max_new_tokens
budget, stop at <|im_end|>), interleaved in one process so machine load hits
both alike; the ratio of examples/s is the figure. The answers must agree
(a check, not a timing). `--profile` adds torch.profiler self time per
example by kind of op for both modes. Also the share of batched decoding steps spent on rows whose
answer had already ended, for the batch order used (by gold answer length) and for ordering by prompt
length alone, counted from the same answers. `--static-cache` also times the batched side with a static
KV cache (transformers' `cache_implementation="static"`) and checks its answers against the dynamic
cache's. Appends the figures to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from bench.profile_ops import kinds_table, op_kinds, profile_ops
from bench.results import append_section


def idle_share(order: list[int], answer_len: list[int], batch_size: int) -> float:
    """Share of a batched run's decoding row-steps spent on rows whose answer had ended: each batch
    decodes as many steps as its longest answer."""
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    steps = sum(len(b) * max(answer_len[i] for i in b) for b in batches)
    return 1 - sum(answer_len) / steps


def device_name(device: str, torch) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{torch.get_num_threads()} threads"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of (batched, one-by-one)")
    p.add_argument("--model", default="tiny-moe", help="tiny-moe (the user's architecture), tiny-dense or a "
                   "model folder; the adapter must have been trained on it")
    p.add_argument("--adapter", default="outputs/tiny/single/adapter",
                   help="LoRA adapter to merge first (default: the demo's; answers then stop like a "
                        "trained model's do; '' for the bare base model)")
    p.add_argument("--profile", action="store_true", help="add a torch.profiler breakdown of both modes")
    p.add_argument("--device", default=None, help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--static-cache", action="store_true",
                   help="also time the batched side with transformers' static KV cache (preallocated to the "
                        "longest prompt + max_new_tokens, cache_implementation='static'), interleaved")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from callbacks.generation_eval import answer_token_budget, batch_order, generate_answers, gold_answer_lengths
    from core.prompt import record_messages
    from data_tools import prepare, synth
    from finetune.model import resolve_model_path

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    if args.adapter and Path(args.adapter).is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    else:
        print("no adapter: measuring the bare base model, whose answers often run to the token limit")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    half = args.examples // 2
    records = prepare.validation_mix(synth.generate(0, "val", "positive", args.examples - half, held_out_names=True),
                                     synth.generate(0, "val", "negative", half, held_out_names=True), 0.5, seed=1)
    budget = answer_token_budget(records, tokenizer)
    timings = {"batched": [], "one_by_one": [], "batched_prefill": [], "one_by_one_prefill": [], "static": []}
    answers = {}

    def timed(key: str, batch: int, max_new_tokens: int = budget) -> list[dict]:
        start = time.perf_counter()
        out = generate_answers(model, tokenizer, records, batch_size=batch, max_new_tokens=max_new_tokens)
        timings[key].append(time.perf_counter() - start)
        return out

    for _ in range(args.rounds):
        if args.static_cache:
            model.generation_config.cache_implementation = "static"
            answers["static"] = timed("static", args.batch_size)
            model.generation_config.cache_implementation = None
        for name, batch in (("batched", args.batch_size), ("one_by_one", 1)):
            answers[name] = timed(name, batch)
            # What dominates: the prompt pass (one new token) costs the same per example whatever the
            # batch, so it bounds the speed-up batching can give on a compute-bound CPU.
            timed(name + "_prefill", batch, max_new_tokens=1)
    median = {k: statistics.median(v) for k, v in timings.items() if v}
    rate = {k: len(records) / median[k] for k in ("batched", "one_by_one")}
    prefill_share = {k: median[k + "_prefill"] / median[k] for k in ("batched", "one_by_one")}
    bound = median["one_by_one"] / median["batched_prefill"]
    ratio = rate["batched"] / rate["one_by_one"]
    agree = sum(a["prediction"] == b["prediction"] for a, b in zip(answers["batched"], answers["one_by_one"]))
    # decoding steps per batch = its longest answer (+ the stop token); the rest of its rows idle
    answer_len = [len(x) + 1 for x in tokenizer([a["prediction"] for a in answers["batched"]],
                                                 add_special_tokens=False)["input_ids"]]
    prompt_len = [len(tokenizer.apply_chat_template(record_messages(r, with_answer=False), tokenize=False,
                                                    add_generation_prompt=True)) for r in records]
    idle = {"by gold answer length": idle_share(batch_order(prompt_len, gold_answer_lengths(records, tokenizer)),
                                                answer_len, args.batch_size),
            "by prompt length only": idle_share(sorted(range(len(records)), key=lambda i: -prompt_len[i]),
                                                answer_len, args.batch_size)}
    print(f"batched (batch {args.batch_size}): {rate['batched']:.1f} examples/s")
    print(f"one at a time:        {rate['one_by_one']:.1f} examples/s")
    print(f"speed-up: {ratio:.1f}x; identical answers: {agree}/{len(records)}; max_new_tokens {budget}")
    print(f"prompt pass (prefill) share of the time: batched {prefill_share['batched']:.0%}, one at a time "
          f"{prefill_share['one_by_one']:.0%}; speed-up bound if decoding cost nothing: {bound:.1f}x")
    print("decoding row-steps on rows already ended: " + ", ".join(f"{k} {v:.0%}" for k, v in idle.items()))
    static = ""
    if args.static_cache:
        same = sum(a["prediction"] == b["prediction"] for a, b in zip(answers["static"], answers["batched"]))
        static = (f"| batched with a static KV cache | {len(records) / median['static']:.1f} examples/s, "
                  f"{median['batched'] / median['static']:.2f}x the dynamic cache; identical answers "
                  f"{same}/{len(records)} |\n")
        print(static.strip("|\n "))

    title = ("generation eval: " + args.model
             + (f" + {args.adapter}" if args.adapter and Path(args.adapter).is_dir() else ""))
    section = ("| measure | value |\n|---|---|\n"
               f"| examples | {len(records)} validation records (half negative), greedy, max_new_tokens {budget} |\n"
               f"| batched, batch {args.batch_size} | {rate['batched']:.1f} examples/s |\n"
               f"| one at a time | {rate['one_by_one']:.1f} examples/s |\n"
               f"| speed-up (median of {args.rounds} interleaved rounds) | **{ratio:.1f}x** (target >= 3x) |\n"
               f"| identical answers | {agree}/{len(records)} |\n"
               f"| prompt pass share of the time | batched {prefill_share['batched']:.0%}, one at a time "
               f"{prefill_share['one_by_one']:.0%} |\n"
               f"| speed-up bound with free decoding (one-at-a-time time / batched prompt pass) | {bound:.1f}x |\n"
               f"| decoding row-steps on rows already ended, batches ordered {' / '.join(idle)} | "
               + " / ".join(f"{v:.0%}" for v in idle.values()) + " |\n" + static)
    if args.profile:
        kinds = {}
        for name, batch in (("batched", args.batch_size), ("one at a time", 1)):
            ops = profile_ops(lambda: generate_answers(model, tokenizer, records, batch_size=batch,
                                                       max_new_tokens=budget))
            kinds[name] = {k: ms / len(records) for k, ms in op_kinds(ops).items()}
        profile = kinds_table(kinds, "mode")
        print("\nself CPU ms per example by kind of op (torch.profiler):\n" + profile)
        section += "\nSelf CPU time per example by kind of op, ms (torch.profiler, one pass each):\n\n" + profile
    append_section(title, section, device=device_name(device, torch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
