"""A torch fallback for TRL's fused LM-head loss, for training without a GPU.

TRL 1.15's SFTTrainer always computes its loss through
`trl.trainer.utils._ChunkedLogProbFunction`, a Triton kernel. Without a GPU,
Triton has no driver and the first step fails with "0 active drivers"; the
maintainers plan to keep a torch fallback (huggingface/trl#7244) but 1.15 has
none. This computes the same per-token outputs (log-prob of the target,
entropy, log sum p^2, mean logit, is-top-1) from the full logits in torch and
lets autograd do the backward. Fine for the tiny CPU models; on a GPU the
kernel is used unchanged. Unsloth's backend brings its own CPU path.
"""

from __future__ import annotations

import torch


class TorchLogProbs:
    """Drop-in for `_ChunkedLogProbFunction` (same `apply` signature and outputs)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        logits = torch.nn.functional.linear(hidden, weight, bias).float() * logit_scale
        if final_logit_softcapping is not None:
            logits = final_logit_softcapping * torch.tanh(logits / final_logit_softcapping)
        logits = logits / temperature
        log_p = torch.log_softmax(logits, dim=-1)
        log_probs = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_p.exp() * log_p).sum(-1).detach() if "entropy" in outputs else None
        sq = torch.logsumexp(2 * log_p, dim=-1).detach() if "log_sum_sq_probs" in outputs else None
        mean = logits.mean(-1).detach() if "mean_logits" in outputs else None
        # argmax picks the first maximum, as the kernel's tie rule does
        top1 = (logits.argmax(-1) == targets) if "is_top1" in outputs else None
        return log_probs, entropy, sq, mean, top1


def install_if_needed() -> bool:
    """Swap the fallback in when no GPU is present; returns whether it did."""
    if torch.cuda.is_available():
        return False
    import trl.trainer.utils as trl_utils

    trl_utils._ChunkedLogProbFunction = TorchLogProbs
    return True
