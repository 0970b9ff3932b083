"""core/quiet.py: the known harmless library messages are dropped, nothing else from the same logger is."""

import logging

import pytest

from core import quiet


@pytest.fixture
def clean_loggers():
    names = {name for name, _ in quiet.KNOWN_NOISE}
    yield names
    for name in names:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, quiet._DropKnown)]:
            logger.removeFilter(f)


def passes(logger_name: str, message: str, *args) -> bool:
    record = logging.LogRecord(logger_name, logging.WARNING, __file__, 1, message, args, None)
    return bool(logging.getLogger(logger_name).filter(record))


def test_known_messages_are_dropped_and_others_kept(clean_loggers):
    assert quiet.silence_known_noise() == len(clean_loggers)
    assert quiet.silence_known_noise() == len(clean_loggers)  # idempotent: still one filter per logger
    assert all(sum(isinstance(f, quiet._DropKnown) for f in logging.getLogger(n).filters) == 1 for n in clean_loggers)
    assert not passes("torchao", "Failed to load %s: %s", "/x/_C_mxfp8.so", "Could not load this library")
    assert not passes("torch.utils._pytree", "%s is an Enum subclass and is now natively supported by torch.compile",
                      "<enum 'KernelPreference'>")
    assert not passes("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: x")
    assert not passes("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, ...")
    # the same loggers' other messages, and the same text from another library, still show
    assert passes("torchao", "quantization config is invalid")
    assert passes("DeepSpeed", "ZeRO stage 2 with CPU offload")
    assert passes("transformers.trainer", "Failed to load the checkpoint")


def test_verbose_keeps_everything(clean_loggers, monkeypatch):
    assert quiet.silence_known_noise(verbose=True) == 0
    assert passes("torchao", "Failed to load /x.so: y")
    monkeypatch.delenv("QWEN_FINETUNE_VERBOSE", raising=False)
    assert quiet.verbose_requested(["--mode", "single", "--verbose"])
    assert not quiet.verbose_requested(["--mode", "single"]) and not quiet.verbose_requested(None)
    monkeypatch.setenv("QWEN_FINETUNE_VERBOSE", "1")
    assert quiet.verbose_requested(None)
    monkeypatch.setenv("QWEN_FINETUNE_VERBOSE", "0")
    assert not quiet.verbose_requested(None)
