"""Recording results in ``benchmarks/RESULTS.md``, shared by every benchmark's ``--write``: a section
per run between marker comments (a re-run replaces its own section), markdown tables, and the CPU's
name for the section's header.
"""
from __future__ import annotations

import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def md_table(df) -> str:
    """A pandas DataFrame as a markdown table; floats with 3 decimals below 10, 1 above."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_section(begin: str, end: str, block: str) -> None:
    """Put ``block`` (which starts with ``begin`` and ends with ``end``) into RESULTS.md, replacing the
    previous run's section between those markers, or appending it."""
    text = RESULTS.read_text() if RESULTS.exists() else \
        "# reftkit benchmark results\n\nSections are written by the benchmark scripts in this folder " \
        "(`--write`); a re-run replaces its own section.\n\n"
    block = block.rstrip("\n") + "\n"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        post = rest.split(end, 1)[1].lstrip("\n")
        text = pre + block + ("\n" + post if post else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")
