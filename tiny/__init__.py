"""The tiny Qwen3 models shipped with this repository (dense and MoE), a test and demo asset.

No weights can be downloaded here, so the demo, the tests and the benchmarks
train these two small models, which load through the same `from_pretrained`
path as a hub model. They are built on a CPU by `python -m tiny.build` (the
recipe is in tiny/build.py) and committed: a first run does not wait for a
build. `tiny/build.json` records the recipe's hash and every shipped file's
hash; tests/test_tiny_model.py fails when the two disagree with the tree.
"""

from __future__ import annotations

from pathlib import Path

HOME = Path(__file__).resolve().parent
TINY_MODELS = {"tiny-dense": HOME / "dense", "tiny-moe": HOME / "moe"}
BUILD_RECORD = HOME / "build.json"


def model_dir(name: str, home: Path = HOME) -> Path:
    """The folder of a shipped tiny model ('tiny-dense' or 'tiny-moe'); a missing build is the user's
    error (one line, exit 1), not a traceback."""
    from core.records import DataError

    path = home / TINY_MODELS[name].name
    if not (path / "config.json").is_file():
        raise DataError(f"{path} has no config.json: the shipped tiny model is missing from this checkout "
                        "(git LFS or a partial clone?); rebuild it with python -m tiny.build")
    return path
