"""Plain-text tables and files written so that a reader never sees half of one."""

from __future__ import annotations

import os
from pathlib import Path


def render_table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    row = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([row.format(*header), row.format(*("-" * w for w in widths))] + [row.format(*ln) for ln in lines])


def temporary_sibling(path: Path) -> Path:
    """A name in the same folder (so the final rename stays on one filesystem) that readers skip."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def write_atomically(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary sibling, flush it to disk, then rename it over ``path``."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
