"""Distillation from the frozen base (learning without forgetting), with no second model copy.

With a LoRA adapter the base model *is* the student with its adapter disabled,
so the teacher pass runs the same weights under `disable_adapter()` and
`no_grad`: no extra weights, only its logits at the trained positions. On a
4-bit run the teacher is the 4-bit base.

    loss = CE(task) + lambda * T^2 * KL(teacher_T || student_T)

averaged over every token that carries a task loss (the answer of an
instruction record, every token of a plain rehearsal document), normalised
like TRL's own loss so lambda = 0 leaves the task term unchanged. On a MoE
with `router_aux_loss_coef` > 0 the router load-balancing term is added as
TRL adds it, so the objective is the plain run's plus the KL term, nothing else. The two parts
are logged as `loss_task` and `loss_distill` (the KL term before lambda).
Evaluation (`eval_loss`) stays the plain task loss, comparable across runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) for each row of [N, V] logits, in float32."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1) * temperature ** 2


def trained_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, mask): the sequence positions whose next token carries a loss in any row, and
    which rows at those positions do. Logits are needed only there."""
    next_labels = labels[:, 1:]
    mask = next_labels != -100
    positions = mask.any(0).nonzero().squeeze(-1)
    return positions, mask[:, positions]


def forward_at(model, inputs: dict, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([B, K, V] logits at `positions`, the MoE router aux loss or None). transformers' forward
    computes only those logits (`logits_to_keep`); Unsloth's ignores a tensor there and returns all."""
    out = model(**inputs, logits_to_keep=positions, use_cache=False)
    logits = out.logits if out.logits.shape[1] == positions.numel() else out.logits[:, positions]
    return logits, getattr(out, "aux_loss", None)


def logits_at(model, inputs: dict, positions: torch.Tensor) -> torch.Tensor:
    return forward_at(model, inputs, positions)[0]


def teacher_logits(peft_model, inputs: dict, positions: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), peft_model.disable_adapter():
        return logits_at(peft_model, inputs, positions)


class DistillationMixin:
    """compute_loss for a (TRL / Unsloth) SFTTrainer; mixed in by `distilling_trainer`."""

    distill_lambda: float = 0.0
    distill_temperature: float = 1.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        positions, mask = trained_positions(labels)
        target = labels[:, 1:][:, positions][mask]
        peft_model = self.accelerator.unwrap_model(model)
        aux_on = getattr(self, "aux_loss_enabled", False)  # TRL: router_aux_loss_coef > 0 on a MoE
        if aux_on:  # the teacher's routing is not trained: no aux loss for it
            teacher = teacher_logits(peft_model, {**forward, "output_router_logits": False}, positions)[mask]
            forward["output_router_logits"] = True
        else:
            teacher = teacher_logits(peft_model, forward, positions)[mask]
        student, aux = forward_at(model, forward, positions)  # through the wrapper: DDP/DeepSpeed hooks
        student = student[mask]
        task = F.cross_entropy(student.float(), target, reduction="sum")
        distill = kl_per_token(student, teacher, self.distill_temperature).sum()
        tokens = mask.sum()
        denominator = tokens.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = (task + self.distill_lambda * distill) / denominator
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as TRL: DDP averages the gradients over ranks
        if aux_on and aux is not None:  # the same load-balancing term, scaled as TRL scales it
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * aux / steps
            self._metrics["train"]["aux_loss"].append(self.accelerator.gather_for_metrics(aux.detach()).mean().item())
        count = max(int(tokens), 1)
        self._metrics["train"]["loss_task"].append(task.item() / count)
        self._metrics["train"]["loss_distill"].append(distill.item() / count)
        # padded rows count their mask; packed rows carry none (side by side, their padding counts too)
        real = inputs["attention_mask"].sum() if "attention_mask" in inputs else \
            torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
        self._total_train_tokens += int(self.accelerator.gather_for_metrics(real).sum())
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return (loss, None) if return_outputs else loss


def distilling_trainer(trainer_class, distill_lambda: float, temperature: float):
    """`trainer_class` (TRL's SFTTrainer, or Unsloth's patched one) with the distillation loss."""
    return type("Distilling" + trainer_class.__name__, (DistillationMixin, trainer_class),
                {"distill_lambda": distill_lambda, "distill_temperature": temperature})
