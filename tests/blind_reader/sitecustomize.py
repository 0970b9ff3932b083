"""A deliberately broken reading path for tests/test_reading.py's control run: Python imports this module
at start-up in every process that has this folder on PYTHONPATH, before the trainer exists, so the one
prompt builder (core/prompt.py) leaves the article out of the training rows and the evaluator's prompts
alike."""

from core import prompt

prompt.prompt_messages = lambda instruction, article: [
    {"role": "system", "content": instruction}, {"role": "user", "content": "（記事）"}]
