"""bench/RESULTS.md: how a bench script appends a section (the same stamp on every one: title, date,
machine, library versions, then the figures), and how a section is read back (the newest of a kind)."""

from __future__ import annotations

import datetime
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

from core.runinfo import library_versions

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


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]

    def cell(self, row: str, column: str) -> str:
        """The cell in the first row whose first cell is `row` and the first column named `column`
        (bold marks dropped)."""
        col = self.header.index(column)
        for cells in self.rows:
            if cells[0] == row:
                return cells[col]
        raise KeyError(f"no row '{row}' (rows: {', '.join(c[0] for c in self.rows)})")


@dataclass
class Section:
    title: str  # up to the first " — " (the date and machine follow)
    heading: str
    line: int  # 1-based, in RESULTS.md
    tables: list[Table]


def read_sections(path: Path = RESULTS) -> list[Section]:
    sections: list[Section] = []
    table: Table | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("## "):
            heading = line[3:].strip()
            sections.append(Section(heading.split(" — ")[0].strip(), heading, number, []))
            table = None
        elif sections and line.startswith("|"):
            cells = [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]
            if table is None:
                table = Table(cells, [])
                sections[-1].tables.append(table)
            elif not re.fullmatch(r"[\s|:-]+", line):
                table.rows.append(cells)
        else:
            table = None
    return sections


def newest_section(kind: str, path: Path = RESULTS) -> Section:
    """The last section whose title starts with `kind` (sections are appended, so the last is newest)."""
    found = [s for s in read_sections(path) if s.title.startswith(kind)]
    if not found:
        raise LookupError(f"{path}: no section '{kind} — ...'; run the bench script that measures it")
    return found[-1]
