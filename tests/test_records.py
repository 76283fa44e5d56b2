"""`nag prepare` from record files: JSONL (plain and gzipped), Parquet and a saved Hugging Face
dataset give the same documents, split by document; bad fields are one clear error."""

import gzip
import json

import numpy as np
import pytest

from conftest import STDLIB, TINY_VOCAB
from nag_lightning.data import PrepareSettings, TokenShardDataModule, prepare
from nag_lightning.data.preparation import read_documents, resolve_corpus
from nag_lightning.errors import NagError

# Real text: the standard library's json and email modules, one file per record.
TEXTS = sorted((p.name, p.read_text(encoding="utf-8")) for p in [*(STDLIB / "json").glob("*.py"),
                                                               *(STDLIB / "email").glob("*.py")])


def records():
    return [{"id": i, "source": name, "content": text} for i, (name, text) in enumerate(TEXTS)]


def write_jsonl(path, rows):
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines + "\n", encoding="utf-8")  # a trailing blank line is allowed


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same records as .jsonl, .jsonl.gz (split over two files in a folder), .parquet and a saved dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    root = tmp_path_factory.mktemp("records")
    rows = records()
    write_jsonl(root / "all.jsonl", rows)
    (root / "gz").mkdir()
    write_jsonl(root / "gz" / "part-0.jsonl.gz", rows[:10])
    write_jsonl(root / "gz" / "part-1.jsonl.gz", rows[10:])
    pq.write_table(pa.Table.from_pylist(rows), root / "all.parquet", row_group_size=7)
    Dataset.from_list(rows).save_to_disk(str(root / "saved"))
    return root


def test_every_record_format_gives_the_same_documents(sources):
    expected = [text for _, text in TEXTS]
    for corpus in ([sources / "all.jsonl"], [sources / "gz"], [sources / "all.parquet"], [sources / "saved"]):
        files = resolve_corpus([str(c) for c in corpus])
        docs = read_documents(files, text_field="content")
        assert [text for _, text in docs] == expected, corpus
        assert len({name for name, _ in docs}) == len(docs)  # one named document per record
    names = [name for name, _ in read_documents(resolve_corpus([str(sources / "gz")]), text_field="content")]
    assert names[0] == "part-0.jsonl.gz#0" and names[10] == "part-1.jsonl.gz#0"


def test_records_prepare_and_train_like_text_files(sources, tmp_path):
    meta = prepare(tmp_path / "jsonl", PrepareSettings([str(sources / "all.jsonl")], vocab_size=TINY_VOCAB,
                                                      val_fraction=0.2, text_field="content"), log=lambda *_: None)
    parquet = prepare(tmp_path / "parquet", PrepareSettings([str(sources / "all.parquet")], vocab_size=TINY_VOCAB,
                                                           val_fraction=0.2, text_field="content"), log=lambda *_: None)
    assert meta["corpus"]["documents"] == len(TEXTS)
    for key in ("documents", "bytes"):  # the same documents (split by name, which includes the file's)
        assert sum(split[key] for split in meta["splits"].values()) == \
            sum(split[key] for split in parquet["splits"].values()) == (len(TEXTS) if key == "documents" else
                                                                         sum(len(t.encode()) for _, t in TEXTS))
    assert meta["settings"]["text_field"] == "content"
    held_out = meta["splits"]["val"]["documents"]
    assert 0 < held_out < len(TEXTS)

    data = TokenShardDataModule(str(tmp_path / "jsonl"), context_length=32, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch.shape == (4, 33) and int(batch.long().max()) < TINY_VOCAB


def test_a_missing_field_and_bad_lines_are_one_clear_error(sources, tmp_path):
    with pytest.raises(NagError, match=r"has no field 'text' \(its fields: content, id, source\).*--text_field"):
        read_documents(resolve_corpus([str(sources / "all.jsonl")]))
    for source in ("all.parquet", "saved"):
        with pytest.raises(NagError, match="has no field 'body'"):
            read_documents(resolve_corpus([str(sources / source)]), text_field="body")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(NagError, match="line 2 is not JSON"):
        read_documents([broken])
    skipped = []
    mixed = tmp_path / "mixed.jsonl"
    write_jsonl(mixed, [{"text": "some text"}, {"text": ""}, {"text": None}, {"text": "more"}])
    docs = read_documents([mixed], skipped)
    assert [text for _, text in docs] == ["some text", "more"]
    assert skipped == [("mixed.jsonl", "2 record(s) without text in 'text'")]


def test_bench_data_times_the_loader_alone(tiny_data, tmp_path, capsys):
    from test_cli import run_main

    code, printed, err = run_main(["bench", "--data", str(tiny_data), "--steps", "5", "--warmup", "1",
                                   "--context_length", "32", "--batch_size", "2", "--num_workers", "0",
                                   "--json", str(tmp_path / "data.json")], capsys)
    assert code == 0, err
    (row,) = json.loads((tmp_path / "data.json").read_text())
    assert row["data"] == str(tiny_data) and row["tokens_per_s"] > 0 and row["batches_per_s"] > 0
    assert "tokens/s" in printed
    code, _, err = run_main(["bench", "--data", str(tiny_data), "--steps", "100000", "--context_length", "32", "--batch_size", "64",
                             "--num_workers", "0"], capsys)
    assert code == 2 and "ran out of training blocks" in err
    code, _, err = run_main(["bench", "configs/quickstart.yaml", "--data", str(tiny_data)], capsys)
    assert code == 2 and "nag bench data runs without configs (configs/quickstart.yaml)" in err


def split_tokens(folder):
    """Every token of a split, from its litdata chunks (a header of item count and offsets, then uint16 tokens)."""
    tokens = []
    for chunk in json.loads((folder / "index.json").read_text())["chunks"]:
        raw = (folder / chunk["filename"]).read_bytes()
        items = int(np.frombuffer(raw[:4], np.uint32)[0])
        offsets = np.frombuffer(raw[4:4 * (items + 2)], np.uint32)
        tokens.append(np.frombuffer(raw[offsets[0]:offsets[-1]], np.uint16))
    return np.concatenate(tokens)


def test_record_corpora_are_tokenized_in_pieces_by_workers_and_lose_no_document(sources, tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    from nag_lightning.data import record_corpus
    from nag_lightning.data.preparation import is_validation_document

    monkeypatch.setattr(record_corpus, "RECORDS_PER_PIECE", 5)  # several pieces, spread over the workers
    meta = prepare(tmp_path / "saved", PrepareSettings([str(sources / "saved")], vocab_size=TINY_VOCAB, val_fraction=0.3,
                                                      text_field="content"), log=lambda *_: None)
    tokenizer = Tokenizer.from_file(str(tmp_path / "saved" / "tokenizer.json"))
    for split in ("train", "val"):
        tokens = split_tokens(tmp_path / "saved" / split)
        assert meta["splits"][split]["tokens"] == tokens.size
        cuts = np.flatnonzero(tokens == meta["eot_token_id"])
        decoded = sorted(tokenizer.decode(part.tolist()) for part in np.split(tokens, cuts + 1)[:-1])
        expected = sorted(text for index, (_, text) in enumerate(TEXTS)
                          if is_validation_document(f"saved#{index}", 0.3) == (split == "val"))
        assert decoded == expected and len(expected) == meta["splits"][split]["documents"]
    again = []
    prepare(tmp_path / "saved", PrepareSettings([str(sources / "saved")], vocab_size=TINY_VOCAB, val_fraction=0.3,
                                                text_field="content"), log=again.append)
    assert again[-1].endswith("up to date (same corpus and settings); nothing to do.")
