"""``nag prepare``: corpus -> byte-level BPE tokenizer -> litdata token shards + meta.json.

Folder layout (``meta.json`` is written last, and the whole folder is renamed into place, so a
folder that has ``meta.json`` is complete)::

    DATA_DIR/meta.json        vocab, token counts, bytes per token, corpus fingerprint, version
    DATA_DIR/tokenizer.json   the tokenizer used
    DATA_DIR/train/, val/     litdata chunks written with TokensLoader
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import shutil
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nag_lightning.data.record_corpus import Piece, pieces_of, survey, training_texts, write_split
from nag_lightning.data.records import is_record_source, is_saved_dataset
from nag_lightning.data.remote import cache_folder, check_bucket, is_remote, read_remote_meta, upload_folder
# The folder format's names live in format.py (shared with the tokenizing workers); imported
# here too, where callers have always found them.
from nag_lightning.data.format import (EOT_TOKEN, FORMAT_VERSION, META_FILE, PIECE_TOKENS,  # noqa: F401
                                       SHUFFLE_SEED, TOKENIZER_FILE, is_validation_document)
from nag_lightning.errors import NagError
from nag_lightning.version import __version__

STDLIB = "stdlib"
# Folders under the standard library that are not the standard library (or are its test suite).
_STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass
class PrepareSettings:
    """Everything that decides a dataset's content; part of its fingerprint."""

    corpus: list[str]
    vocab_size: int = 8192
    val_fraction: float = 0.05
    tokenizer: str | None = None  # an existing tokenizer.json to reuse instead of training one
    text_field: str = "text"  # the field holding a record's text (JSONL, Parquet, saved datasets)
    encoding: str = "utf-8"  # of the text files (records are UTF-8 by their formats)


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library ``.py`` files, without its tests or site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def _hidden_or_cache(relative: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in relative.parts)


def resolve_corpus(sources: list[str]) -> list[Path]:
    """Expand ``stdlib``, files, folders (all files below, recursively) and globs into a sorted file list."""
    files: set[Path] = set()
    for source in sources:
        if source == STDLIB:
            files.update(stdlib_files())
            continue
        path = Path(source).expanduser()
        if path.is_file() or is_saved_dataset(path):
            files.add(path)
        elif path.is_dir():
            files.update(p for p in path.rglob("*") if p.is_file() and not _hidden_or_cache(p.relative_to(path)))
        else:
            matches = [Path(p) for p in glob.glob(str(path), recursive=True)]
            if not matches:
                raise NagError(
                    f"Corpus source {source!r} is not a file, a folder or a glob that matches anything. "
                    f"Give existing text files, folders or globs, or {STDLIB!r} for the Python standard library."
                )
            files.update(p for p in matches if p.is_file())
    return sorted(files)


# Above this share of a text corpus's bytes not decodable in its --encoding, preparing stops:
# the corpus is in another encoding, and the tokenizer would learn replacement characters.
UNDECODABLE_LIMIT = 0.001


def read_documents(files: list[Path], skipped: list[tuple[str, str]] | None = None,
                   text_field: str = "text", encoding: str = "utf-8",
                   replaced: list[tuple[str, int]] | None = None) -> list[tuple[str, str]]:
    """(name, text) per non-empty text file, named relative to the files' common folder so the split
    does not depend on where the corpus lives. UTF-16 files with a byte-order mark are decoded;
    binary files (a NUL byte otherwise) and empty ones are skipped, and listed with the reason in
    ``skipped``; other text files are decoded in ``encoding``, undecodable bytes replaced (U+FFFD)
    and counted per file in ``replaced``.
    Record files (``records.py``) give one document per record, named ``FILE#INDEX``, from
    ``text_field``; records without text there are counted in ``skipped``."""
    import codecs

    root = Path(os.path.commonpath([p.parent for p in files])) if files else Path()
    docs = []
    progress = Progress("reading", "docs")
    for path in files:
        name = path.relative_to(root).as_posix()
        if is_record_source(path):
            empty = 0
            for document, text in Piece(str(path), name, 0, None).records(text_field):
                if text is None:
                    empty += 1
                    continue
                docs.append((document, text))
                progress.add(1, megabytes=len(text) / 1e6)
            if empty and skipped is not None:
                skipped.append((name, f"{empty} record(s) without text in {text_field!r}"))
            continue
        raw = path.read_bytes()
        if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            text = raw.decode("utf-16", errors="replace")
        elif b"\x00" in raw:
            if skipped is not None:
                skipped.append((name, "binary: it has NUL bytes and no UTF-16 byte-order mark"))
            continue
        else:
            text = _decode(raw, encoding, name, replaced)
        if text.strip():
            docs.append((name, text))
            progress.add(1, megabytes=len(raw) / 1e6)
        elif skipped is not None:
            skipped.append((name, "no text"))
    progress.close()
    return docs


def _decode(raw: bytes, encoding: str, name: str, replaced: list[tuple[str, int]] | None) -> str:
    """``raw`` in ``encoding`` (UTF-8: a byte-order mark dropped); undecodable bytes replaced and
    their count recorded."""
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        return raw.decode(codec)
    except UnicodeDecodeError:
        text = raw.decode(codec, errors="replace")
        if replaced is not None:  # U+FFFD characters that were not in the bytes already
            already = raw.count("\ufffd".encode("utf-8")) if codec == "utf-8-sig" else 0
            replaced.append((name, text.count("\ufffd") - already))
        return text


def check_decoding(replaced: list[tuple[str, int]], files: int, total_bytes: int, encoding: str, log) -> None:
    """Say how many files had bytes that are not ``encoding``; refuse above ``UNDECODABLE_LIMIT`` of the bytes."""
    if not replaced:
        return
    count = sum(n for _, n in replaced)
    names = ", ".join(name for name, _ in replaced[:5]) + (" ..." if len(replaced) > 5 else "")
    summary = (f"{len(replaced)} of {files} file(s) are not valid {encoding}: {count:,} byte(s) replaced "
               f"({count / max(total_bytes, 1):.2%} of {total_bytes:,}), e.g. {names}")
    if count > UNDECODABLE_LIMIT * total_bytes:
        raise NagError(f"{summary}. Give the corpus's encoding (e.g. --encoding latin-1 or cp1252), or convert "
                       f"the files to UTF-8 (e.g. iconv -f latin1 -t utf-8).")
    log(f"Warning: {summary}; kept with U+FFFD in their place.")


class Progress:
    """A progress bar on a terminal (tqdm, off when stderr is not one): items, and megabytes or
    tokens with their rate."""

    def __init__(self, description: str, unit: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc=description, unit=f" {unit}", disable=None, mininterval=0.5, leave=False)
        self.started, self.megabytes, self.tokens = time.perf_counter(), 0.0, 0

    def add(self, items: int, megabytes: float = 0.0, tokens: int = 0) -> None:
        self.megabytes += megabytes
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        extra = f"{self.tokens:,} tokens, {self.tokens / elapsed:,.0f} tokens/s" if self.tokens else \
            f"{self.megabytes:,.1f} MB, {self.megabytes / elapsed:,.1f} MB/s"
        self.bar.set_postfix_str(extra, refresh=False)
        self.bar.update(items)

    def close(self) -> None:
        self.bar.close()


def fingerprinted_settings(settings: PrepareSettings) -> str:
    recorded = asdict(settings)
    # Defaults are left out: datasets prepared before these options keep their fingerprint.
    for name, default in (("text_field", "text"), ("encoding", "utf-8")):
        if recorded[name] == default:
            del recorded[name]
    return json.dumps(recorded, sort_keys=True)


def fingerprint(docs: list[tuple[str, str]], settings: PrepareSettings) -> str:
    digest = hashlib.sha256()
    digest.update(fingerprinted_settings(settings).encode())
    if settings.tokenizer:
        digest.update(Path(settings.tokenizer).read_bytes())
    for name, text in docs:  # names too: the validation split is chosen by name
        digest.update(name.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()


def split_documents(docs: list[tuple[str, str]], val_fraction: float) -> tuple[list[str], list[str]]:
    """Train and validation texts, each in a deterministic shuffled order.

    The shards are read nearly in order (litdata shuffles chunks and a window of blocks), so the
    documents are shuffled here: otherwise a run sees the corpus file by file, in sorted order.
    """
    train, val = [], []
    if len(docs) == 1:  # one book: its last val_fraction, cut at a line boundary, is held out
        text = docs[0][1]
        cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction))) + 1 or int(len(text) * (1 - val_fraction))
        train, val = [t for t in (text[:cut],) if t.strip()], [t for t in (text[cut:],) if t.strip()]
    for name, text in docs if len(docs) > 1 else []:
        (val if is_validation_document(name, val_fraction) else train).append(text)
    if not val and len(docs) > 1:  # a tiny corpus still gets one held-out document, the last one
        val.append(train.pop())
    random.Random(SHUFFLE_SEED).shuffle(train)
    random.Random(SHUFFLE_SEED).shuffle(val)
    if not train or not val:
        raise NagError(
            f"The corpus has {len(docs)} non-empty document(s), too little text to hold out a validation "
            "split from. Add more text to the corpus."
        )
    return train, val


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def encode(tokenizer, texts: list[str], eot_id: int, dtype: np.dtype) -> np.ndarray:
    """All documents' token ids, each followed by the end-of-text token, as one flat array."""
    pieces = []
    batch = 256
    progress = Progress("tokenizing", "docs")
    for start in range(0, len(texts), batch):
        encodings = tokenizer.encode_batch(texts[start : start + batch])
        for encoding in encodings:
            pieces.append(np.asarray(encoding.ids, dtype=dtype))
            pieces.append(np.asarray([eot_id], dtype=dtype))
        progress.add(len(encodings), tokens=sum(len(e.ids) + 1 for e in encodings))
    progress.close()
    return np.concatenate(pieces)


def _emit_piece(piece: np.ndarray):
    """litdata worker function: one input piece -> one token tensor."""
    import torch

    yield torch.from_numpy(piece)


def write_shards(tokens: np.ndarray, output_dir: Path) -> None:
    from litdata import TokensLoader, optimize

    pieces = [tokens[i : i + PIECE_TOKENS] for i in range(0, len(tokens), PIECE_TOKENS)]
    optimize(
        fn=_emit_piece, inputs=pieces, output_dir=str(output_dir), chunk_bytes="4MB",
        item_loader=TokensLoader(), num_workers=1, verbose=False, reorder_files=False,
        keep_data_ordered=True,
        # The tokens are already in memory: a forked writer starts in milliseconds and needs no
        # re-import of the caller's __main__, where spawn costs seconds and breaks under `python -`.
        start_method="fork",
    )


def read_meta(data_dir: str | Path, check_shards: bool = True) -> dict:
    """The dataset's metadata, or a NagError that says how to build the folder (``check_shards``:
    also that every chunk its indexes list is there, whole)."""
    data_dir = Path(data_dir)
    meta_path = data_dir / META_FILE
    fix = f"Build it with: nag prepare --output {data_dir} --corpus {STDLIB}   (or your own files/folders/globs)."
    if not data_dir.exists():
        raise NagError(f"Dataset folder {data_dir} does not exist. {fix}")
    if not meta_path.is_file():
        raise NagError(
            f"Dataset folder {data_dir} is incomplete: it has no {META_FILE}, so it was not written by a finished "
            f"`nag prepare`. Remove it or pass --overwrite. {fix}"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise NagError(
            f"Dataset folder {data_dir} has format version {meta.get('format_version')}, this package reads "
            f"{FORMAT_VERSION}. Rebuild it with `nag prepare --output {data_dir} --overwrite ...`."
        )
    problems = dataset_problems(data_dir) if check_shards else []
    if problems:
        listed = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise NagError(f"Dataset folder {data_dir} is damaged: {listed}. Rebuild it with: {rebuild_command(data_dir, meta)}")
    return meta


def dataset_problems(data_dir: Path) -> list[str]:
    """What is missing or truncated in a dataset folder: each split's index, and every chunk it
    lists at the size it records (a truncated chunk would otherwise stall litdata's reader until
    a timeout)."""
    problems = []
    for split in ("train", "val"):
        index = data_dir / split / "index.json"
        if not index.is_file():
            problems.append(f"{split}/index.json is missing")
            continue
        try:
            chunks = json.loads(index.read_text())["chunks"]
        except (ValueError, KeyError, TypeError):
            problems.append(f"{split}/index.json is unreadable")
            continue
        for chunk in chunks:
            path = data_dir / split / chunk["filename"]
            if not path.is_file():
                problems.append(f"{split}/{chunk['filename']} is missing")
            elif path.stat().st_size != chunk["chunk_bytes"]:
                problems.append(f"{split}/{chunk['filename']} has {path.stat().st_size:,} bytes where its index "
                                f"records {chunk['chunk_bytes']:,} (truncated or overwritten)")
    return problems


def rebuild_command(data_dir: Path, meta: dict) -> str:
    """The ``nag prepare`` command that rebuilds ``data_dir`` from the inputs it records."""
    settings = meta.get("settings") or {}
    sources = settings.get("corpus") or (meta.get("corpus") or {}).get("sources") or [STDLIB]
    command = f"nag prepare --output {data_dir} --corpus {' '.join(map(str, sources))}"
    for option, default in (("vocab_size", 8192), ("val_fraction", 0.05), ("tokenizer", None), ("text_field", "text")):
        if settings.get(option, default) != default:
            command += f" --{option} {settings[option]}"
    return command


def remove_stale_staging(output: Path) -> None:
    """Remove the staging and retired folders of earlier ``prepare`` runs of ``output`` whose
    process is gone (killed, or failed without cleaning up)."""
    if not output.parent.is_dir():
        return
    for folder in output.parent.glob(f".{output.name}.*-*"):
        kind, _, rest = folder.name[len(output.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare(output: str | Path, settings: PrepareSettings, overwrite: bool = False, log=print) -> dict:
    """Build the dataset folder ``output``; a no-op when it already holds the same inputs."""
    from tokenizers import Tokenizer

    if is_remote(output):
        return prepare_remote(str(output), settings, overwrite, log)
    output = Path(output)
    started = time.perf_counter()
    if settings.vocab_size < 257:
        raise NagError(f"--vocab_size must be at least 257 (256 byte tokens + end-of-text), got {settings.vocab_size}.")
    if not 0.0 < settings.val_fraction < 1.0:
        raise NagError(f"--val_fraction must be in (0, 1), got {settings.val_fraction}.")
    files = resolve_corpus(settings.corpus)
    skipped: list[tuple[str, str]] = []
    # A corpus of record files only is read in pieces, in worker processes, never whole (record_corpus.py).
    records = survey_records(files, settings) if files and all(is_record_source(p) for p in files) else None
    if records is not None and sum(records[1].documents.values()) < 2:
        records = None  # one record: split inside it like one book, in memory
    if records is None:
        replaced: list[tuple[str, int]] = []
        docs = read_documents(files, skipped, settings.text_field, settings.encoding, replaced)
        text_bytes = sum(p.stat().st_size for p in files if not is_record_source(p))
        check_decoding(replaced, len(files), text_bytes, settings.encoding, log)
        count, corpus_fingerprint = len(docs), fingerprint(docs, settings)
    else:
        pieces, found = records
        skipped = [(name, f"{n} record(s) without text in {settings.text_field!r}") for name, n in found.empty.items()]
        count, corpus_fingerprint = sum(found.documents.values()), found.fingerprint
    if skipped:
        shown = ", ".join(f"{name} ({reason})" for name, reason in skipped[:10])
        log(f"Skipped {len(skipped)} of {len(files)} file(s): {shown}" + (" ..." if len(skipped) > 10 else ""))
    if not count:
        raise NagError(
            f"The corpus {settings.corpus} is empty: {len(files)} file(s) matched and none has any text. "
            "Point --corpus at text files, folders or globs that contain text."
        )
    remove_stale_staging(output)
    if (output / META_FILE).is_file():
        existing = json.loads((output / META_FILE).read_text())
        same = existing.get("corpus", {}).get("fingerprint") == corpus_fingerprint
        if same and existing.get("format_version") == FORMAT_VERSION and not overwrite:
            problems = dataset_problems(output)
            if not problems:
                log(f"{output} is up to date (same corpus and settings); nothing to do.")
                return existing
            log(f"{output} holds the same corpus and settings but is damaged ({problems[0]}); rebuilding it.")
            overwrite = True  # the same inputs: replacing it loses nothing
        if not overwrite:
            raise NagError(
                f"{output} already holds a dataset built from other inputs, settings or format version. "
                "Pass --overwrite to replace it, or choose another --output."
            )
    elif output.exists() and any(output.iterdir()) and not overwrite:
        raise NagError(
            f"{output} exists and is not a complete dataset (no {META_FILE}). "
            "Pass --overwrite to replace it, or choose another --output."
        )

    if records is None:
        train_texts, val_texts = split_documents(docs, settings.val_fraction)
    else:
        field, fraction, forced = settings.text_field, settings.val_fraction, found.forced_val
        train_texts = training_texts(pieces, field, fraction, forced)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-{os.getpid()}-", dir=output.parent))
    try:
        os.environ.setdefault("DATA_OPTIMIZER_CACHE_FOLDER", str(staging / ".cache"))
        os.environ.setdefault("DATA_OPTIMIZER_DATA_CACHE_FOLDER", str(staging / ".data-cache"))
        if settings.tokenizer:
            tokenizer = Tokenizer.from_file(settings.tokenizer)
            if tokenizer.token_to_id(EOT_TOKEN) is None:
                raise NagError(f"Tokenizer {settings.tokenizer} has no {EOT_TOKEN!r} token; train one with nag prepare.")
        else:
            tokenizer = train_tokenizer(train_texts, settings.vocab_size)
        tokenizer.save(str(staging / TOKENIZER_FILE))
        vocab_size = tokenizer.get_vocab_size()
        eot_id = tokenizer.token_to_id(EOT_TOKEN)
        dtype = np.uint16 if vocab_size <= 2**16 else np.int32
        splits = {}
        for split in ("train", "val"):
            if records is None:
                texts = train_texts if split == "train" else val_texts
                tokens = encode(tokenizer, texts, eot_id, dtype)
                write_shards(tokens, staging / split)
                documents, n_bytes, n_tokens = len(texts), sum(len(t.encode()) for t in texts), int(tokens.size)
            else:
                tokenizer_path = staging / TOKENIZER_FILE
                n_tokens = write_split(pieces, split, staging / split, field, fraction, forced, tokenizer_path, eot_id,
                                      dtype, os.cpu_count() or 1)
                documents, n_bytes = found.documents[split], found.bytes[split]
            splits[split] = {"documents": documents, "tokens": n_tokens, "bytes": n_bytes,
                             "bytes_per_token": n_bytes / n_tokens}
        meta = {
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "tokenizer": TOKENIZER_FILE,
            "vocab_size": vocab_size,
            "eot_token_id": eot_id,
            "dtype": np.dtype(dtype).name,
            "splits": splits,
            "corpus": {"sources": settings.corpus, "files": len(files), "documents": count,
                       "fingerprint": corpus_fingerprint},
            "settings": asdict(settings),
        }
        for leftover in (".cache", ".data-cache"):
            shutil.rmtree(staging / leftover, ignore_errors=True)
        (staging / META_FILE).write_text(json.dumps(meta, indent=2))
        if output.exists():
            retired = output.with_name(f".{output.name}.old-{os.getpid()}")
            output.rename(retired)
            staging.rename(output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(
        f"Wrote {output}: vocab {vocab_size}, train {splits['train']['tokens']:,} tokens "
        f"({splits['train']['documents']} docs), val {splits['val']['tokens']:,} tokens "
        f"({splits['val']['documents']} docs), {splits['val']['bytes_per_token']:.2f} bytes/token, "
        f"in {time.perf_counter() - started:.1f}s."
    )
    return meta


def survey_records(files: list[Path], settings: PrepareSettings):
    """(pieces, survey) of a corpus of record files (``record_corpus.py``), read by worker processes."""
    root = Path(os.path.commonpath([p.parent for p in files]))
    pieces = pieces_of(files, root)
    settings_json = fingerprinted_settings(settings)
    if settings.tokenizer:  # as in fingerprint(): the tokenizer's content is an input too
        settings_json += hashlib.sha256(Path(settings.tokenizer).read_bytes()).hexdigest()
    progress = Progress("reading", "docs")
    try:
        return pieces, survey(pieces, settings_json, settings.text_field, settings.val_fraction,
                              os.cpu_count() or 1, progress)
    finally:
        progress.close()


def prepare_remote(url: str, settings: PrepareSettings, overwrite: bool, log=print) -> dict:
    """``prepare`` into ``s3://bucket/prefix``: built in a local staging folder (under the cache
    folder of ``remote.py``), then uploaded, ``meta.json`` last; a no-op upload when the bucket
    already holds the same inputs."""
    check_bucket(url)  # before minutes of tokenizing: the bucket exists and takes these credentials
    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=_mkdir(cache_folder(url, None))))
    try:
        meta = prepare(staging / "dataset", settings, log=log)
        existing = read_remote_meta(url)
        if existing is not None and not overwrite:
            if existing.get("corpus", {}).get("fingerprint") == meta["corpus"]["fingerprint"]:
                log(f"{url} is up to date (same corpus and settings); nothing to upload.")
                return existing
            raise NagError(f"{url} already holds a dataset built from other inputs, settings or format version. "
                           "Pass --overwrite to replace it, or choose another --output.")
        upload_folder(staging / "dataset", url)
        log(f"Uploaded to {url}.")
        return meta
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _mkdir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder
