"""How much general ability training cost: loss on held-out general data, base vs tuned.

The base is the same model with its adapter disabled, so no second copy is
loaded. Logged as `general_loss_base`, `general_loss_tuned` and
`general_loss_increase` (tuned - base; > 0 means forgotten). The loss is the
mean over every trained token (all tokens of a plain document, the answer of
an instruction record).
"""

from __future__ import annotations

from callbacks.generation_eval import input_device
from finetune.data import record_rows
from finetune.rehearsal import text_rows


def token_loss(model, rows: list[dict], pad_id: int, batch_size: int, desc: str) -> float:
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    device = input_device(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False):
            batch = rows[start:start + batch_size]
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in batch])
            labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in batch])
            mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch])
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            target = labels[:, 1:].to(device)
            total += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(),
                                     ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    return total / max(count, 1)


def measure_forgetting(peft_model, tokenizer, kind: str, heldout: list, max_length: int,
                       batch_size: int) -> dict:
    rows = text_rows(heldout, tokenizer, max_length) if kind == "text" else \
        record_rows(heldout, tokenizer, max_length)
    was_training = peft_model.training
    peft_model.eval()
    try:
        tuned = token_loss(peft_model, rows, tokenizer.pad_token_id, batch_size, "general loss (tuned)")
        with peft_model.disable_adapter():
            base = token_loss(peft_model, rows, tokenizer.pad_token_id, batch_size, "general loss (base)")
    finally:
        peft_model.train(was_training)
    return {"general_loss_base": round(base, 6), "general_loss_tuned": round(tuned, 6),
            "general_loss_increase": round(tuned - base, 6), "general_eval_examples": len(rows)}
