"""``nag prepare`` of a corpus of record files (JSONL, Parquet, saved datasets) in bounded memory,
with worker processes.

The records are cut into pieces of work (``records.record_ranges``) and read three times, never
held whole:

1. a survey, in worker processes: per piece, a digest of its documents' names and texts (the
   corpus fingerprint), and per split the documents and bytes;
2. the tokenizer's training, from a stream of the training texts (when none is given);
3. the shards, by litdata's ``optimize`` with worker processes, once per split: each worker
   tokenizes its pieces' documents of that split and writes its own chunks.

Documents are split by name as for text files (``FILE#INDEX``); the pieces are shuffled with the
preparation seed, documents within a piece stay in order (a text-file corpus, held in memory,
shuffles every document instead). Workers start from a fork server, not by forking this process:
after pyarrow and the tokenizer have run threads here, a forked worker can hang (one did, on a
145 MB corpus).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import numpy as np

from nag_lightning.data.format import PIECE_TOKENS, is_validation_document
from nag_lightning.data.records import record_ranges, record_texts

RECORDS_PER_PIECE = 8192  # a saved dataset's pieces (a Parquet file's are its row groups)


@dataclass(frozen=True)
class Piece:
    path: str
    name: str  # the file's name relative to the corpus root: documents are named NAME#INDEX
    start: int
    stop: int | None

    def records(self, field: str) -> Iterator[tuple[str, str | None]]:
        """(document name, text) of each of the piece's records; text None where ``field`` holds none."""
        for index, text in enumerate(record_texts(Path(self.path), field, self.start, self.stop), start=self.start):
            yield f"{self.name}#{index}", text if text and text.strip() else None

    def documents(self, field: str) -> Iterator[tuple[str, str]]:
        """(name, text) of the piece's records with text in ``field``."""
        return ((name, text) for name, text in self.records(field) if text is not None)


def pieces_of(files: list[Path], root: Path) -> list[Piece]:
    return [Piece(str(path), path.relative_to(root).as_posix(), start, stop)
            for path in files for start, stop in record_ranges(path, RECORDS_PER_PIECE)]


def _survey(job: tuple[Piece, str, float]) -> dict:
    piece, field, val_fraction = job
    digest, splits, last, empty = hashlib.sha256(), {"train": [0, 0], "val": [0, 0]}, None, 0
    for name, text in piece.records(field):
        if text is None:
            empty += 1
            continue
        digest.update(name.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
        split = splits["val" if is_validation_document(name, val_fraction) else "train"]
        split[0] += 1
        split[1] += len(text.encode())
        last = name
    return {"digest": digest.hexdigest(), "splits": splits, "last": last, "empty": empty}


@dataclass
class Survey:
    fingerprint: str
    documents: dict[str, int]  # per split
    bytes: dict[str, int]
    empty: dict[str, int]  # records without text, per file
    forced_val: str | None  # the one held-out document when the hash split held out none


def survey(pieces: list[Piece], settings_json: str, field: str, val_fraction: float, workers: int,
           progress) -> Survey:
    digest = hashlib.sha256(settings_json.encode())
    documents, sizes, empty, last = {"train": 0, "val": 0}, {"train": 0, "val": 0}, {}, None
    jobs = [(piece, field, val_fraction) for piece in pieces]
    with forkserver().Pool(max(1, min(workers, len(jobs)))) as pool:
        for piece, found in zip(pieces, pool.imap(_survey, jobs)):  # in order: the fingerprint is too
            digest.update(found["digest"].encode())
            for split, (count, size) in found["splits"].items():
                documents[split] += count
                sizes[split] += size
            if found["empty"]:
                empty[piece.name] = empty.get(piece.name, 0) + found["empty"]
            last = found["last"] or last
            progress.add(sum(c for c, _ in found["splits"].values()),
                         megabytes=sum(s for _, s in found["splits"].values()) / 1e6)
    forced = None
    if documents["val"] == 0 and documents["train"] > 1:  # a tiny corpus still gets one held-out document
        forced = last
    return Survey(digest.hexdigest(), documents, sizes, empty, forced)


def in_split(name: str, split: str, val_fraction: float, forced_val: str | None) -> bool:
    held_out = name == forced_val or is_validation_document(name, val_fraction)
    return held_out == (split == "val")


def training_texts(pieces: list[Piece], field: str, val_fraction: float, forced_val: str | None) -> Iterator[str]:
    for piece in pieces:
        for name, text in piece.documents(field):
            if in_split(name, "train", val_fraction, forced_val):
                yield text


def forkserver():
    """The fork-server context, its server preloaded with what every worker imports (torch above
    all), so that each worker starts in milliseconds rather than seconds."""
    context = get_context("forkserver")
    context.set_forkserver_preload(["torch", "litdata", "nag_lightning.data.record_corpus"])
    return context


_TOKENIZERS: dict[str, object] = {}


def _tokenize_piece(job: tuple) -> Iterator:
    """litdata worker function: one piece -> its documents of one split as token tensors, each
    document followed by the end-of-text token, in pieces of at most ``PIECE_TOKENS``."""
    import torch
    from tokenizers import Tokenizer

    piece, split, field, val_fraction, forced_val, tokenizer_path, eot_id, dtype = job
    if tokenizer_path not in _TOKENIZERS:
        _TOKENIZERS[tokenizer_path] = Tokenizer.from_file(tokenizer_path)
    tokenizer = _TOKENIZERS[tokenizer_path]
    texts = (text for name, text in piece.documents(field) if in_split(name, split, val_fraction, forced_val))
    pending, size = [], 0
    while True:
        batch = [text for _, text in zip(range(256), texts)]
        if not batch:
            break
        for encoding in tokenizer.encode_batch(batch):
            pending += [np.asarray(encoding.ids, dtype=dtype), np.asarray([eot_id], dtype=dtype)]
            size += len(encoding.ids) + 1
        if size >= PIECE_TOKENS:
            yield torch.from_numpy(np.concatenate(pending))
            pending, size = [], 0
    if pending:
        yield torch.from_numpy(np.concatenate(pending))


def write_split(pieces: list[Piece], split: str, output_dir: Path, field: str, val_fraction: float,
                forced_val: str | None, tokenizer_path: Path, eot_id: int, dtype, workers: int) -> int:
    """The split's shards in ``output_dir``, tokenized by ``workers`` processes; its token count."""
    from litdata import TokensLoader, optimize

    forkserver()  # litdata's workers start from the same, preloaded server
    shuffled = list(pieces)
    random.Random(0).shuffle(shuffled)
    jobs = [(piece, split, field, val_fraction, forced_val, str(tokenizer_path), eot_id, dtype) for piece in shuffled]
    optimize(fn=_tokenize_piece, inputs=jobs, output_dir=str(output_dir), chunk_bytes="4MB",
             item_loader=TokensLoader(), num_workers=max(1, min(workers, len(jobs))), verbose=False,
             reorder_files=False, start_method="forkserver")
    index = json.loads((output_dir / "index.json").read_text())
    return sum(chunk["dim"] for chunk in index["chunks"])
