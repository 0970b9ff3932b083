"""The trainer behind qwen_finetune.py and qwen_finetune_legacy.py."""
