"""Documents from record files: one document per record of JSON Lines (``.jsonl``, ``.jsonl.gz``),
Parquet (``.parquet``, read with pyarrow) and Hugging Face datasets saved with ``save_to_disk``
(read with ``datasets.load_from_disk``), the text taken from one field of each record.

Records are read in batches (Parquet by row group, a saved dataset through its memory-mapped
Arrow files), so a source file is never loaded whole; ``nag prepare`` then holds the documents'
text (``preparation.py``).
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
from pathlib import Path
from typing import Iterator

from nag_lightning.errors import NagError

RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def is_record_source(path: Path) -> bool:
    return path.name.endswith(RECORD_SUFFIXES) or is_saved_dataset(path)


def _missing_field(where: str, field: str, available) -> NagError:
    return NagError(f"{where} has no field {field!r} (its fields: {', '.join(sorted(available))}). "
                    f"Name the text field with --text_field.")


def _jsonl(path: Path, field: str) -> Iterator[str | None]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise NagError(f"{path} line {number} is not JSON ({error.msg}); a .jsonl file holds one JSON "
                               "object per line.") from None
            if not isinstance(record, dict):
                raise NagError(f"{path} line {number} is a JSON {type(record).__name__}, not an object with "
                               f"a {field!r} field.")
            if field not in record:
                raise _missing_field(f"{path} line {number}", field, record)
            yield record[field] if isinstance(record[field], str) else None


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise NagError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    return pq.ParquetFile(path)


def _parquet(path: Path, field: str, start: int, stop: int | None) -> Iterator[str | None]:
    table = _parquet_file(path)
    if field not in table.schema_arrow.names:
        raise _missing_field(str(path), field, table.schema_arrow.names)
    offset = 0
    for group in range(table.num_row_groups):  # only the row groups that hold [start, stop)
        rows = table.metadata.row_group(group).num_rows
        if offset + rows > start and (stop is None or offset < stop):
            texts = table.read_row_group(group, columns=[field]).column(0).to_pylist()
            yield from texts[max(start - offset, 0):None if stop is None else stop - offset]
        offset += rows


def _saved_parts(path: Path) -> list:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise NagError(f"reading the saved dataset {path} needs the datasets package: pip install datasets") from None
    dataset = load_from_disk(str(path))
    # Every split of a DatasetDict, one after the other: nag prepare holds out its own validation documents.
    return [dataset[name] for name in sorted(dataset)] if isinstance(dataset, DatasetDict) else [dataset]


def _saved_dataset(path: Path, field: str, start: int, stop: int | None) -> Iterator[str | None]:
    offset = 0
    for part in _saved_parts(path):
        if field not in part.column_names:
            raise _missing_field(str(path), field, part.column_names)
        low, high = max(start - offset, 0), len(part) if stop is None else min(stop - offset, len(part))
        for first in range(low, high, 1024):  # memory-mapped Arrow: a slice reads only its rows
            yield from part[first:min(first + 1024, high)][field]
        offset += len(part)


def record_texts(path: Path, field: str, start: int = 0, stop: int | None = None) -> Iterator[str | None]:
    """The ``field`` of the records ``start`` to ``stop`` (default: every one) of ``path`` in order
    (None where a record's field is not text)."""
    if is_saved_dataset(path):
        return _saved_dataset(path, field, start, stop)
    if path.name.endswith(".parquet"):
        return _parquet(path, field, start, stop)
    return itertools.islice(_jsonl(path, field), start, stop)


def record_ranges(path: Path, records_per_range: int) -> list[tuple[int, int | None]]:
    """How ``path`` is cut into pieces of work, as record ranges: a Parquet file by row group, a
    saved dataset every ``records_per_range`` records, a JSON Lines file (read line by line) whole."""
    if is_saved_dataset(path):
        total = sum(len(part) for part in _saved_parts(path))
        return [(first, min(first + records_per_range, total)) for first in range(0, total, records_per_range)]
    if path.name.endswith(".parquet"):
        metadata, ranges, offset = _parquet_file(path).metadata, [], 0
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            ranges.append((offset, offset + rows))
            offset += rows
        return ranges
    return [(0, None)]
