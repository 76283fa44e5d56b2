"""Plain-text tables and files written so that a reader never sees half of one."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def render_table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    row = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([row.format(*header), row.format(*("-" * w for w in widths))] + [row.format(*ln) for ln in lines])


def temporary_sibling(path: Path) -> Path:
    """A name in the same folder (so the final rename stays on one filesystem) that readers skip."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def temporary_siblings(path: Path) -> list[Path]:
    """Every process's temporary siblings of ``path`` (``temporary_sibling``), e.g. left by a killed write."""
    return sorted(path.parent.glob(f".{path.stem}.tmp-*{path.suffix}"))


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A file to write ``path`` through: a temporary sibling, flushed to disk and renamed over
    ``path`` when the block ends; removed, with ``path`` untouched, when it raises."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through ``atomic_file``."""
    with atomic_file(path) as f:
        f.write(text)
    return Path(path)
