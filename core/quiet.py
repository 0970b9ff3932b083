"""Hide the library messages that every run prints and that never need an action, so a command's first
screen is ours. `--verbose` (or QWEN_FINETUNE_VERBOSE=1) shows them again.

Each entry names the logger that emits the message and a piece of its text: a filter on that logger drops
those records only, so anything else the same library says still shows.
"""

from __future__ import annotations

import logging
import os

KNOWN_NOISE = (
    # torchao's optional GPU kernels (MX formats, CUTLASS for sm90) are built for another CUDA than this install
    ("torchao", "Failed to load "),
    # torchao registers its enums with torch's pytree the old way; torch says it will stop accepting that
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported"),
    # bitsandbytes' optional faster CPU 4-bit kernel lives in the `kernels` package, which the pins leave out
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # DeepSpeed is imported by transformers on a machine without a GPU
    ("DeepSpeed", "Setting accelerator to CPU"),
)


class _DropKnown(logging.Filter):
    def __init__(self, fragments: list[str]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the library's problem: let it through unchanged
            return True
        return not any(f in message for f in self.fragments)


def verbose_requested(argv: list[str] | None) -> bool:
    return "--verbose" in (argv or []) or os.environ.get("QWEN_FINETUNE_VERBOSE", "") not in ("", "0")


def silence_known_noise(verbose: bool = False) -> int:
    """Install the filters (once per logger; call before the libraries are imported or after, both work:
    a logger is the same object before and after its module creates it). Returns how many loggers got one."""
    if verbose:
        return 0
    by_logger: dict[str, list[str]] = {}
    for name, fragment in KNOWN_NOISE:
        by_logger.setdefault(name, []).append(fragment)
    for name, fragments in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(fragments))
    return len(by_logger)
