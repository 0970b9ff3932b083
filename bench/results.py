"""How a bench script appends to bench/RESULTS.md: the same stamp (title, date,
machine, library versions) on every section, then the script's figures."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

from callbacks.runinfo import library_versions

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
STACK = ("torch", "transformers", "trl", "peft", "unsloth", "bitsandbytes")


def append_section(title: str, body: str, *, device: str = "", libraries: tuple[str, ...] = STACK) -> str:
    """`device`: what ran the work beyond the CPU count (torch threads, the GPU's name)."""
    machine = ", ".join(x for x in (platform.machine(), f"{os.cpu_count()} cores", device,
                                    f"Python {platform.python_version()}") if x)
    versions = library_versions()
    stack = ", ".join(f"{lib} {versions[lib]}" for lib in libraries if lib in versions)
    section = (f"\n## {title} — {datetime.date.today()} — {machine}{'; ' + stack if stack else ''}\n\n"
               f"{body.strip()}\n")
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(section)
    return section
