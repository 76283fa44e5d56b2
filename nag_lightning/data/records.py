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


def _text(record: dict, field: str, where: str, available) -> str | None:
    if field not in record:
        raise NagError(f"{where} has no field {field!r} (its fields: {', '.join(sorted(available))}). "
                       f"Name the text field with --text_field.")
    value = record[field]
    return value if isinstance(value, str) else None


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
            yield _text(record, field, f"{path} line {number}", record)


def _parquet(path: Path, field: str) -> Iterator[str | None]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise NagError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        _text({}, field, str(path), table.schema_arrow.names)
    for batch in table.iter_batches(columns=[field], batch_size=1024):
        yield from batch.column(0).to_pylist()


def _saved_dataset(path: Path, field: str) -> Iterator[str | None]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise NagError(f"reading the saved dataset {path} needs the datasets package: pip install datasets") from None
    dataset = load_from_disk(str(path))
    # Every split of a DatasetDict: nag prepare holds out its own validation documents.
    for part in (dataset[name] for name in sorted(dataset)) if isinstance(dataset, DatasetDict) else (dataset,):
        if field not in part.column_names:
            _text({}, field, str(path), part.column_names)
        for batch in part.iter(batch_size=1024):
            yield from batch[field]


def record_texts(path: Path, field: str) -> Iterator[str | None]:
    """The ``field`` of every record of ``path`` in order (None where a record's field is not text)."""
    if is_saved_dataset(path):
        return _saved_dataset(path, field)
    if path.name.endswith(".parquet"):
        return _parquet(path, field)
    return _jsonl(path, field)
