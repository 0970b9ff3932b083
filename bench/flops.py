"""The denominator of MFU: the matmul rate of this machine, measured in the same run as the figure."""

from __future__ import annotations

import statistics
import time


def matmul_rate(device: str = "cpu", dtype: str = "float32", size: int | None = None) -> float:
    """FLOP/s of a square matmul (`size` x `size`; 2048 on a CPU, 8192 on a GPU), median of 7 timings."""
    import torch

    size = size or (8192 if device.startswith("cuda") else 2048)
    a, b = (torch.randn(size, size, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    a @ b
    rates = []
    for _ in range(7):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rates.append(2 * size ** 3 / (time.perf_counter() - start))
    return statistics.median(rates)


def mfu(active_parameters: int, tokens_per_s: float, rate: float) -> float:
    """Model FLOP utilisation of LoRA training: forward 2N and backward to the activations 2N per token
    (no weight gradients for the frozen base), over the measured matmul rate."""
    return 4 * active_parameters * tokens_per_s / rate


def active_parameters(model) -> int:
    """The base model's parameters one token goes through: all but the experts it is not routed to (a
    MoE routes each token to num_experts_per_tok of num_experts); LoRA weights left out."""
    total = experts = 0
    for name, p in model.named_parameters():
        if "lora_" not in name:
            total += p.numel()
            experts += p.numel() if ".experts." in name else 0
    if not experts:
        return total
    return total - experts + experts * model.config.num_experts_per_tok // model.config.num_experts
