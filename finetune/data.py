"""Training data for the trainer: records -> finished token rows.

The datasets a trainer gets are final when it gets them (TRL's own
preparation is skipped): every row is the one prompt builder's chat (`core.prompt`) in the
tokenizer's template, the loss on the answer through its `<|im_end|>` and not
the newline the template adds after it (Axolotl's `train_on_eos: turn` does
the same, and inference stops at `<|im_end|>`), cut at `max_length`. With
`packing`, rows are then packed best-fit-decreasing into rows of at most
`max_length` tokens (TRL's `pack_dataset`); the collator restarts position
ids at each example, which is what keeps attention inside each example.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from core.distributed import is_rank_zero, world_size
from core.prompt import record_messages
from core.records import file_sha256, load_records, seeded_subset
from data_tools.stats import summarize_lengths
from finetune import rehearsal
from finetune.report import say

ROW_COLUMNS = ["input_ids", "labels", "source"]


def load_split(path: str, limit: int, seed: int) -> list[dict]:
    """Records of one file; `limit` > 0 keeps a seeded random subset (order kept)."""
    records = seeded_subset(load_records(path), limit, seed)
    return records


def tokenising_processes(dataset_num_proc: int, examples: int, ranks: int = 1) -> int | None:
    """Processes each rank tokenises with: None (one) for small sets, where spawning costs more than it
    saves; else up to 8, the machine's cores shared by the ranks (which all tokenise at once)."""
    if dataset_num_proc:
        return dataset_num_proc
    return max(1, min(8, (os.cpu_count() or 1) // ranks)) if examples >= 10_000 else None


def labels_ending_at(labels: list[int], end_of_turn_id: int) -> list[int]:
    """Labels after the last trained <|im_end|> become -100 (the template's trailing newline)."""
    labels = list(labels)
    ends = [i for i, label in enumerate(labels) if label == end_of_turn_id]
    if ends:
        labels[ends[-1] + 1:] = [-100] * (len(labels) - ends[-1] - 1)
    return labels


def record_rows(records: list[dict], tokenizer, max_length: int) -> list[dict]:
    """{input_ids, labels} of each record, as TRL tokenises a prompt/completion pair: the chat with the
    answer, trained from where it leaves the prompt-with-generation-prompt, then cut at `max_length`."""
    from trl.data_utils import common_prefix_length  # here: the backend (Unsloth) is imported before TRL

    end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def render(record: dict, with_answer: bool) -> str:
        return tokenizer.apply_chat_template(record_messages(record, with_answer), tokenize=False,
                                             add_generation_prompt=not with_answer)

    # apply_chat_template(tokenize=True) renders, then tokenises without special tokens: done here in
    # batches, which the fast tokenizer runs far quicker than one chat at a time.
    prompts = tokenizer([render(r, False) for r in records], add_special_tokens=False)["input_ids"]
    fulls = tokenizer([render(r, True) for r in records], add_special_tokens=False)["input_ids"]
    rows = []
    for prompt, full in zip(prompts, fulls):
        start = common_prefix_length(prompt, full)
        labels = labels_ending_at([-100] * start + full[start:], end)
        # the uncut lengths: what max_length cuts is reported from this one tokenisation (stage_inputs)
        rows.append({"input_ids": full[:max_length], "labels": labels[:max_length], "length": len(full),
                     "prompt_length": len(prompt)})
    return rows


def _tokenise_batch(batch: dict, tokenizer, max_length: int) -> dict:
    records = [dict(zip(batch, values)) for values in zip(*batch.values())]
    rows = record_rows(records, tokenizer, max_length)
    return {key: [r[key] for r in rows] for key in ("input_ids", "labels", "length", "prompt_length")}


@dataclass
class StageData:
    """What one stage trains and evaluates on, finished; `dropped`: records whose answer `max_length` cut
    away entirely (no trained token left), left out and reported. `examples` rows of `tokens` tokens in
    all went into `len(train)` training rows (fewer when packed)."""
    train: object  # datasets.Dataset
    eval: object | None
    dropped: int
    packed: bool
    examples: int
    tokens: int
    max_length: int
    eval_dropped: int = 0  # eval records without a trained token left: out of eval_loss, still generated
    record_lengths: tuple = ([], [])  # each training record's uncut (chat, prompt) tokens, in order

    def report(self) -> dict:
        rows = len(self.train)
        return {"packing": self.packed, "examples": self.examples, "rows": rows, "tokens": self.tokens,
                "examples_per_row": round(self.examples / max(rows, 1), 3),
                "row_fill": round(self.tokens / max(rows * self.max_length, 1), 4),
                "dropped_without_target": self.dropped, "eval_dropped_without_target": self.eval_dropped}


def describe_packing(report: dict) -> str:
    if not report["packing"]:
        return (f"packing off: {report['examples']:,} examples, one per row "
                f"({report['row_fill']:.1%} of max_length on average)")
    return (f"packing: {report['examples']:,} examples in {report['rows']:,} rows "
            f"({report['examples_per_row']:.2f} per row, {report['row_fill']:.1%} of max_length filled)")


def token_count(dataset) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(dataset.data.column("input_ids"))).as_py() or 0)


@dataclass
class TokenRows:
    """Records tokenised once: their rows (ROW_COLUMNS; fully cut rows dropped, `dropped` of them) and every
    record's uncut chat and prompt lengths, in the records' order."""
    rows: object  # datasets.Dataset
    dropped: int
    lengths: list[int]
    prompt_lengths: list[int]


def tokenised(records: list[dict], tokenizer, max_length: int, num_proc: int | None = None,
              name: str = "train") -> TokenRows:
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    if not is_rank_zero():
        disable_progress_bar()  # every rank tokenises its copy; one set of bars is enough
    fields = {"instruction": [r["instruction"] for r in records], "input": [r["input"] for r in records],
              "output": [r["output"] for r in records], "source": [r.get("source") or "" for r in records]}
    dataset = Dataset.from_dict(fields).map(
        _tokenise_batch, batched=True, num_proc=num_proc, remove_columns=["instruction", "input", "output"],
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length}, desc=f"Tokenising the {name} set")
    lengths, prompt_lengths = list(dataset["length"]), list(dataset["prompt_length"])
    kept = dataset.filter(lambda row: any(label != -100 for label in row["labels"]), num_proc=num_proc,
                          desc=f"Dropping {name} rows with no trained token")
    # flattened: the filter leaves an index over the full table, which token_count would read past
    return TokenRows(kept.select_columns(ROW_COLUMNS).flatten_indices(), len(dataset) - len(kept), lengths,
                     prompt_lengths)


def token_dataset(records: list[dict], tokenizer, max_length: int, num_proc: int | None = None,
                  name: str = "train"):
    """(the records' rows, how many were dropped): `tokenised` without the lengths (the benchmarks)."""
    tokens = tokenised(records, tokenizer, max_length, num_proc, name)
    return tokens.rows, tokens.dropped


def stage_data(cfg, train_records: list[dict], eval_records: list[dict], tokenizer,
               text_rows: list[dict] = ()) -> StageData:
    """The finished datasets of a stage: tokenised, masked, rehearsal rows (`text_rows`) mixed in, packed
    when `cfg.packing`; with the uncut token lengths of the training records (`StageData.record_lengths`)."""
    from datasets import Dataset, concatenate_datasets

    tokens = tokenised(train_records, tokenizer, cfg.max_length,
                       tokenising_processes(cfg.dataset_num_proc, len(train_records), world_size()))
    train = tokens.rows
    if text_rows:
        train = concatenate_datasets([train, Dataset.from_list(list(text_rows)).select_columns(ROW_COLUMNS)])
    # The eval set is never packed: eval_loss averages per batch, and packing would regroup it.
    evals, eval_dropped = token_dataset(eval_records, tokenizer, cfg.max_length, name="eval") \
        if eval_records else (None, 0)
    return packed_if_asked(cfg, train, evals, tokens.dropped, eval_dropped, (tokens.lengths, tokens.prompt_lengths))


def packed_if_asked(cfg, train, evals, dropped: int, eval_dropped: int = 0,
                    record_lengths: tuple = ([], [])) -> StageData:
    """The stage's data from its token rows, packed best-fit-decreasing into rows of max_length when
    `cfg.packing`; `record_lengths`: the records' uncut (chat, prompt) tokens (`tokenised`)."""
    examples, tokens = len(train), token_count(train)
    if cfg.packing:
        from trl.data_utils import pack_dataset

        train = pack_dataset(train.select_columns(["input_ids", "labels"]), cfg.max_length, "bfd",
                             {"desc": "Packing the train set"})
    return StageData(train, evals, dropped, cfg.packing, examples, tokens, cfg.max_length, eval_dropped,
                     record_lengths)


@dataclass
class StageInputs:
    """What a stage trains and evaluates on: its eval records, its finished datasets, the rehearsal plan
    (None without one) and the data's identity for the summary."""
    eval_records: list[dict]
    rows: StageData
    general: object
    identity: dict


def stage_inputs(cfg, stage, data: dict, tokenizer, timer) -> StageInputs:
    """The stage's records (rehearsal mixed in) and their finished datasets, with what was cut or left
    out said before training starts. `data`: what the run read once (finetune.checks.read_run_data);
    `timer`: the run's phase timer."""
    with timer(f"{stage.name}.data_load"):
        train_records = seeded_subset(data[stage.train_file], cfg.max_train_samples, cfg.seed)
        eval_records = (seeded_subset(data[cfg.eval_file], cfg.eval_max_samples, cfg.seed)
                        if cfg.eval_file else [])
        general = rehearsal.plan_general(data.get(("general", cfg.rehearsal_data), cfg.rehearsal_data),
                                         cfg.rehearsal_ratio,
                                         data.get(("general", cfg.general_eval_file), cfg.general_eval_file),
                                         cfg.general_eval_samples, len(train_records), cfg.seed)
    task_records = len(train_records)  # rehearsal records, if any, are appended after these
    rehearsal_text: list[dict] = []
    if general is not None and general.examples:
        r = general.report
        say(f"rehearsal: {r['examples']:,} {general.kind} examples from {r['file']} mixed with "
            f"{r['task_examples']:,} task examples (share {r['share']:.1%}, {r['passes_over_pool']} passes "
            f"over {r['pool']:,}; {r['skipped_empty_documents']} empty documents skipped)")
        if general.kind == "records":
            train_records = train_records + general.examples
        else:
            rehearsal_text = rehearsal.text_rows(general.examples, tokenizer, cfg.max_length)
    with timer(f"{stage.name}.tokenise"):
        stage_rows = stage_data(cfg, train_records, eval_records, tokenizer, rehearsal_text)
    lengths = task_lengths(stage_rows, task_records, cfg.max_length)
    if lengths["over_max_length"]:
        say(f"warning: {lengths['over_max_length']:,} of {task_records:,} training examples "
            f"are longer than max_length {cfg.max_length} and are cut (answer end lost); "
            f"token length percentiles: {lengths['tokens']}")
    say(f"{stage.name}: {describe_packing(stage_rows.report())}")
    if stage_rows.dropped:
        say(f"warning: {stage_rows.dropped:,} training examples left out: max_length {cfg.max_length} cuts "
            "away their whole answer (no trained token left); raise max_length to keep them")
    if stage_rows.eval_dropped:
        say(f"warning: {stage_rows.eval_dropped:,} eval examples leave eval_loss: max_length {cfg.max_length} cuts "
            "away their whole answer (the generation eval still scores them)")
    data_identity = {"train_file": stage.train_file, "train_sha256": file_sha256(stage.train_file),
                     "train_examples": len(train_records), "eval_file": cfg.eval_file,
                     "eval_sha256": file_sha256(cfg.eval_file) if cfg.eval_file else None,
                     "eval_examples": len(eval_records), "token_lengths": lengths,
                     "sources": dict(Counter(r.get("source") or "(none)" for r in train_records)
                                     + Counter(r["source"] for r in rehearsal_text)),
                     "general": general.report if general else None}
    return StageInputs(eval_records, stage_rows, general, data_identity)


def task_lengths(rows: StageData, task_records: int, max_length: int) -> dict:
    """The token-length report (data_tools.stats) of the task's training records, from the lengths their one
    tokenisation measured (rehearsal rows left out)."""
    full, prompts = (values[:task_records] for values in rows.record_lengths)
    return summarize_lengths(full, [p for n, p in zip(full, prompts) if n > max_length], max_length,
                             examples=task_records)


def gen_eval_records(cfg) -> list[dict] | None:
    """The records the generation eval will score (None without an eval file or generation eval)."""
    if not (cfg.gen_eval and cfg.eval_file and Path(cfg.eval_file).is_file()):
        return None
    return seeded_subset(load_split(cfg.eval_file, cfg.eval_max_samples, cfg.seed), cfg.gen_eval_max_samples,
                         cfg.seed) or None
