"""What every benchmark script does at the end: print its markdown table and keep it."""

from __future__ import annotations

from pathlib import Path


def emit(lines: list[str], out: str | None) -> None:
    """Print the table; write it to ``out`` (the committed results file) when given."""
    text = "\n".join(lines)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
