"""Generation-based evaluation: generate answers for the eval set, score them
with `core.metrics`, log `gen_*` metrics and write predictions.

One evaluator for every stack: `GenerationEvalCallback` (our trainer and, via
`callbacks.axolotl_plugins`, Axolotl) and `evaluate_records` (offline, the
parity harness) run the same code. Depends on transformers, torch and this
repository's pure modules only (it must import in Axolotl's environment).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Sequence

from callbacks.error_report import render as render_errors
from core.metrics import DEFAULT_FIELDS, HEADLINE, classify, compute_metrics, flatten, parse_prediction, record_context
from core.chat_template import prompt_lengths, prompt_texts  # noqa: F401 (prompt_lengths: part of the evaluator's API)
from core.records import atomic_write_text, gold_offenders, seeded_subset, write_rows

ANSWER_MARGIN_TOKENS = 16


def gold_answer_lengths(records: Sequence[dict], tokenizer) -> list[int]:
    """Each record's gold answer in tokens (0 where it has none)."""
    texts = [r.get("output") or "" for r in records]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def answer_token_budget(records: Sequence[dict], tokenizer) -> int:
    """Longest gold answer in tokens plus a margin: enough for a right answer, no more."""
    return max(gold_answer_lengths(records, tokenizer)) + ANSWER_MARGIN_TOKENS


ANSWER_BUCKET_TOKENS = 16


def batch_order(prompt_lengths: Sequence[int], answer_lengths: Sequence[int]) -> list[int]:
    """The order in which records are batched. A batch decodes until its longest answer ends, so a
    5-token "no offender" answer batched with 70-token ones idles for 65 steps: rows whose gold answers
    are about as long (within ANSWER_BUCKET_TOKENS) share batches. The gold length predicts the model's
    once it has learnt the task; it only orders the work, since each left-padded row's greedy answer is
    its own. Longest answers first, so the batches that need the most memory come early; inside a
    bucket, longest prompts first, for less left padding."""
    return sorted(range(len(prompt_lengths)),
                  key=lambda i: (-(answer_lengths[i] // ANSWER_BUCKET_TOKENS), -prompt_lengths[i]))


def _stop_token_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)


def generate_answers(model, tokenizer, records: Sequence[dict], *, batch_size: int = 32,
                     max_new_tokens: int | None = None, progress: bool = False) -> list[dict]:
    """Greedy answers, batched with left padding. Returns, per record,
    {"prediction": text, "truncated": hit the limit without an end-of-turn}."""
    import torch
    from tqdm.auto import tqdm

    if not records:
        return []
    gold = gold_answer_lengths(records, tokenizer)
    max_new_tokens = max_new_tokens or max(gold) + ANSWER_MARGIN_TOKENS
    stop_ids = _stop_token_ids(tokenizer, model)
    prompts = prompt_texts(records, tokenizer)
    order = batch_order([len(p) for p in prompts], gold)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = input_device(model)
    results: list[dict | None] = [None] * len(records)
    try:
        with without_router_logits(model):  # once per call: the walk over modules is not free
            batches = range(0, len(order), batch_size)
            for start in tqdm(batches, desc="generation eval", unit="batch", disable=not progress):
                idx = order[start:start + batch_size]
                enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)
                with torch.inference_mode():
                    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                         eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                                         temperature=None, top_p=None, top_k=None)
                new = out[:, enc["input_ids"].shape[1]:]
                for row, i in enumerate(idx):
                    tokens = new[row].tolist()
                    stopped = any(t in stop_ids for t in tokens)
                    results[i] = {"prediction": tokenizer.decode(tokens, skip_special_tokens=True),
                                  "truncated": not stopped and len(tokens) >= max_new_tokens}
    finally:
        tokenizer.padding_side = padding_side
    return results  # type: ignore[return-value]


# The headline metrics repeated for each part of the eval set (by `source`, by article `shape`); the
# truncation rate is the whole set's only.
PER_PART = (*(m for m in HEADLINE if m != "gen_truncation_rate"), "gen_ungrounded_name_rate", "gen_num_examples")


def score(records: Sequence[dict], answers: Sequence[dict], fields: Sequence[str] = DEFAULT_FIELDS) -> dict:
    """All gen_* metrics, overall, per source (positive/negative) and per article shape where records
    carry them (`gen_offender_name_set_f1/positive`, `gen_offender_name_set_f1/shape/court`)."""
    gold = [gold_offenders(r) for r in records]
    preds = [a["prediction"] for a in answers]
    metrics = compute_metrics(gold, preds, fields, **record_context(records, [a["truncated"] for a in answers]))
    metrics["gen_truncation_rate"] = sum(a["truncated"] for a in answers) / len(answers)
    for key, prefix in (("source", ""), ("shape", "shape/")):
        for value in sorted({str(r[key]) for r in records if r.get(key)}):
            idx = [i for i, r in enumerate(records) if str(r.get(key)) == value]
            part = compute_metrics([gold[i] for i in idx], [preds[i] for i in idx], fields,
                                   **record_context([records[i] for i in idx], [answers[i]["truncated"] for i in idx]))
            metrics.update({f"{name}/{prefix}{value}": part[name] for name in PER_PART if name in part})
    return metrics


def reported_metrics(records: Sequence[dict], fields: Sequence[str] = DEFAULT_FIELDS) -> set[str]:
    """The names `score` reports for these records (they depend on the sources, shapes, negatives and
    listed people the records carry), found by scoring empty answers: no model needed."""
    return set(score(records, [{"prediction": "", "truncated": False}] * len(records), fields)) if records else set()


def prediction_rows(records: Sequence[dict], answers: Sequence[dict], fields: Sequence[str]) -> list[dict]:
    rows = []
    for r, a in zip(records, answers):
        pred = parse_prediction(a["prediction"])
        gold = gold_offenders(r)
        matches = None
        if pred is not None:
            g, p = flatten(gold, fields), flatten(pred, fields)
            matches = {k: g[k] == p[k] for k in g}
        category, names, wrong = classify(gold, a["prediction"], r["input"], a["truncated"], fields)
        rows.append({"id": r.get("id"), "source": r.get("source"), "shape": r.get("shape"), "gold": r["output"],
                     "prediction": a["prediction"], "parseable": pred is not None,
                     "truncated": a["truncated"], "field_matches": matches, "category": category,
                     "names": names, "wrong_fields": wrong})
    return rows


def write_results(out_dir: str | os.PathLike, step: int, metrics: dict, rows: list[dict],
                  records: Sequence[dict]) -> None:
    """gen_metrics_step{N}.json, gen_predictions_step{N}.jsonl and the error report gen_errors_step{N}.md,
    each written atomically."""
    out = Path(out_dir)
    atomic_write_text(out / f"gen_metrics_step{step}.json", [json.dumps(metrics, indent=2, ensure_ascii=False)])
    write_rows(out / f"gen_predictions_step{step}.jsonl", rows)
    atomic_write_text(out / f"gen_errors_step{step}.md", [render_errors(rows, records, f"Errors at step {step}")])


def evaluate_records(model, tokenizer, records: Sequence[dict], *, batch_size: int = 32,
                     fields: Sequence[str] = DEFAULT_FIELDS, max_new_tokens: int | None = None,
                     progress: bool = True) -> tuple[dict, list[dict]]:
    """Offline evaluation of a loaded model: (metrics, prediction rows)."""
    answers = generate_answers(model, tokenizer, records, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, progress=progress)
    return score(records, answers, fields), prediction_rows(records, answers, fields)


def _shard(items: list, rank: int, world: int) -> list:
    return items[rank::world]


def _unshard(shards: list[list], total: int) -> list:
    out = [None] * total
    for rank, shard in enumerate(shards):
        out[rank::len(shards)] = shard
    return out


try:
    from transformers import TrainerCallback
except ImportError:  # the pure helpers above stay importable without transformers
    TrainerCallback = object


class GenerationEvalCallback(TrainerCallback):
    """On each evaluation and at the end of training: generate, score, log `gen_*`.

    Every rank generates its own shard of the eval records; rank 0 gathers,
    scores, logs and writes the files."""

    def __init__(self, records: Sequence[dict], tokenizer=None, *, batch_size: int = 32,
                 max_samples: int = 0, seed: int = 0, fields: Sequence[str] = DEFAULT_FIELDS,
                 output_dir: str | None = None, max_new_tokens: int | None = None,
                 at_step_zero: bool = True):
        self.records = seeded_subset(list(records), max_samples, seed)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.fields = tuple(fields)
        self.output_dir = output_dir
        self.max_new_tokens = max_new_tokens
        # An evaluation before training (Axolotl always asks for one) only measures the base model.
        self.at_step_zero = at_step_zero
        self.history: list[dict] = []
        self._budget = max_new_tokens
        self._last_step = None
        self.trainer = None  # set by the owner so metrics reach every logger via trainer.log

    def run(self, model, tokenizer, step: int, args=None) -> dict | None:
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        tokenizer = self.tokenizer or tokenizer
        if self._budget is None:
            self._budget = answer_token_budget(self.records, tokenizer)
        with generation_mode(model, tokenizer):
            mine = generate_answers(model, tokenizer, _shard(self.records, rank, world),
                                    batch_size=self.batch_size, max_new_tokens=self._budget,
                                    progress=rank == 0)
        self._last_step = step  # on every rank: the ranks must agree on which evaluations run
        if world > 1:
            gathered = [None] * world if rank == 0 else None
            dist.gather_object(mine, gathered, dst=0)
            if rank != 0:
                return None
            answers = _unshard(gathered, len(self.records))
        else:
            answers = mine
        metrics = score(self.records, answers, self.fields)
        out_dir = self.output_dir or (args.output_dir if args is not None else None)
        if out_dir:
            write_results(out_dir, step, metrics, prediction_rows(self.records, answers, self.fields),
                          self.records)
        self.history.append({"step": step, **metrics})
        return metrics

    def _run_and_log(self, args, state, model, processing_class):
        metrics = self.run(model, processing_class, state.global_step, args)
        if metrics is not None and self.trainer is not None:
            self.trainer.log(dict(metrics))
        elif metrics is not None:
            state.log_history.append({"step": state.global_step, **metrics})

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step == 0 and not self.at_step_zero:
            return
        if self._last_step != state.global_step:
            self._run_and_log(args, state, model, processing_class)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self._last_step != state.global_step:
            self._run_and_log(args, state, model, processing_class)


def _unsloth_loaded() -> bool:
    # Only a process that imported Unsloth (its backend) has Unsloth-patched models.
    import sys

    return "unsloth" in sys.modules


def input_device(model):
    """Where a forward's inputs go: the output head's device, as the trainer's batches go to the GPU. Not the
    first parameter's: that is the input embedding, which Unsloth keeps in host RAM on a GPU short of memory
    (offload_embedding, with hooks that move the ids there), and the rest of the forward runs on the GPU."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return weight.device if weight is not None else next(model.parameters()).device


def _unsloth_mode_switches(model):
    """(for_inference, for_training) of a model Unsloth loaded, else None: the ones Unsloth binds to the model
    itself first (a model its FastModel loads, Qwen3-MoE, has FastBaseModel's), else FastLanguageModel's,
    which are FastLlamaModel's."""
    if not _unsloth_loaded():
        return None
    own = (getattr(model, "for_inference", None), getattr(model, "for_training", None))
    if all(callable(f) for f in own):
        return own
    from unsloth import FastLanguageModel

    return (lambda: FastLanguageModel.for_inference(model), lambda: FastLanguageModel.for_training(model))


def _compile_stance():
    """torch.compile's stance (process-wide). Unsloth's compiled generate leaves it at eager_on_recompile
    on a GPU, and not every for_training of Unsloth's puts it back: every recompile in later training
    steps would then run eager, silently. Read where torch's own set_stance keeps it; None if it moved."""
    from torch._dynamo import eval_frame

    return getattr(eval_frame, "_stance", None)


def _set_compile_stance(stance) -> None:
    from torch._dynamo import eval_frame

    if stance is not None and hasattr(eval_frame, "_set_stance"):
        eval_frame._set_stance(stance)


def _router_configs(model) -> list:
    """The (text) configs of an MoE model that carry `output_router_logits`."""
    configs = []
    for module in model.modules():
        config = getattr(module, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if text is not None and hasattr(text, "output_router_logits") and all(text is not c for c in configs):
            configs.append(text)
    return configs


@contextlib.contextmanager
def without_router_logits(model):
    """No router logits (so no load-balancing loss) while decoding. A trainer that trains with the
    MoE aux loss turns `output_router_logits` on in the shared config; `generate` would then compute
    that loss at every decoding step against the whole padded mask and fail (transformers#42100)."""
    on = [c for c in _router_configs(model) if c.output_router_logits]
    for c in on:
        c.output_router_logits = False
    try:
        yield
    finally:
        for c in on:
            c.output_router_logits = True


def _tokenizers(model, tokenizer) -> list:
    """The tokenizer in use and any Unsloth keeps on the model chain (it flips their padding side)."""
    found = [tokenizer] if tokenizer is not None else []
    m = model
    while True:  # the same walk as Unsloth's for_inference
        saved = getattr(m, "_saved_temp_tokenizer", None)
        if saved is not None and all(saved is not t for t in found):
            found.append(saved)
        if not hasattr(m, "model"):
            return found
        m = m.model


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def generation_mode(model, tokenizer=None):
    """Switch a model that is being trained to inference, and back to exactly what it was.

    Unsloth's `for_inference` turns gradient checkpointing off on every module and sets its
    tokenizer's padding side to left; its `for_training` would re-enable checkpointing on its own
    terms. So every flag is recorded first and put back as found: checkpointing per module,
    train/eval mode, the tokenizers' padding sides."""
    was_training = model.training
    checkpointing = {m: m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")}
    tokenizers = _tokenizers(model, tokenizer)
    padding = [t.padding_side for t in tokenizers]
    stance = _compile_stance()
    _empty_cuda_cache()  # the training step's freed blocks back to the device before the KV cache grows
    model.eval()
    switches = _unsloth_mode_switches(model)
    if switches:
        switches[0]()
    try:
        yield
    finally:
        if switches:
            switches[1]()  # undoes its inference patching (fast LoRA, caches)
        _set_compile_stance(stance)
        for module, value in checkpointing.items():
            module.gradient_checkpointing = value
        model.train(was_training)
        for t, side in zip(tokenizers, padding):
            t.padding_side = side
