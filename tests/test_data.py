"""`nag prepare` and TokenShardDataModule: metadata, determinism, atomic writes, streaming, resume."""

import pytest
import torch

from conftest import TINY_CORPUS, TINY_VOCAB
from nag_lightning.data import PrepareSettings, TokenShardDataModule, prepare, read_meta
import nag_lightning.data.preparation as prepare_module
from nag_lightning.errors import NagError


def test_metadata_describes_the_dataset(tiny_data):
    meta = read_meta(tiny_data)
    assert meta["vocab_size"] == TINY_VOCAB
    assert meta["dtype"] == "uint16"
    assert (tiny_data / meta["tokenizer"]).is_file()
    for split in ("train", "val"):
        stats = meta["splits"][split]
        assert stats["documents"] > 0 and stats["tokens"] > 0
        assert stats["bytes_per_token"] == pytest.approx(stats["bytes"] / stats["tokens"])
    assert meta["corpus"]["documents"] == meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"]
    assert len(meta["corpus"]["fingerprint"]) == 64


def test_tokens_decode_back_to_the_corpus(tiny_data):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_data / "tokenizer.json"))
    data = TokenShardDataModule(str(tiny_data), context_length=64, batch_size=2)
    data.setup("fit")
    block = next(iter(data.val_dataloader()))[0]
    assert block.dtype == torch.uint16 and block.shape == (65,)
    text = tokenizer.decode(block.long().tolist())
    corpus_text = "".join(p.read_text() for pattern in TINY_CORPUS for p in prepare_module.resolve_corpus([pattern]))
    assert text.replace("<|endoftext|>", "")[:40] in corpus_text


def test_rerun_on_same_inputs_is_a_noop(tiny_data):
    before = {p: p.stat().st_mtime_ns for p in tiny_data.rglob("*")}
    messages = []
    prepare(tiny_data, PrepareSettings(TINY_CORPUS, vocab_size=TINY_VOCAB, val_fraction=0.2), log=messages.append)
    assert "up to date" in messages[0]
    assert before == {p: p.stat().st_mtime_ns for p in tiny_data.rglob("*")}


def test_other_inputs_need_overwrite(tiny_data):
    with pytest.raises(NagError, match="--overwrite"):
        prepare(tiny_data, PrepareSettings(TINY_CORPUS, vocab_size=TINY_VOCAB + 1, val_fraction=0.2))


def test_split_is_deterministic_and_by_document():
    docs = [(f"pkg/mod{i}.py", f"x = {i}\n") for i in range(200)]
    train1, val1 = prepare_module.split_documents(docs, 0.1)
    train2, val2 = prepare_module.split_documents(list(reversed(docs)), 0.1)
    assert sorted(val1) == sorted(val2) and 5 < len(val1) < 40
    assert not set(train1) & set(val1)
    # Shuffled, the same way every time: the shards are streamed nearly in order.
    assert train1 == prepare_module.split_documents(docs, 0.1)[0]
    assert train1 != sorted(train1, key=lambda text: int(text.split("= ")[1]))


def test_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "write_shards", fail)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "out", PrepareSettings(TINY_CORPUS, vocab_size=300))
    assert list(tmp_path.iterdir()) == []


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(NagError, match="empty"):
        prepare(tmp_path / "out", PrepareSettings([str(tmp_path / "empty.txt")]))
    with pytest.raises(NagError, match="does not match anything|not a file"):
        prepare(tmp_path / "out", PrepareSettings([str(tmp_path / "nothing-*.txt")]))
    assert not (tmp_path / "out").exists()


def test_missing_and_half_written_folders_name_the_fix(tmp_path):
    with pytest.raises(NagError, match="does not exist.*nag prepare"):
        read_meta(tmp_path / "missing")
    (tmp_path / "half" / "train").mkdir(parents=True)
    with pytest.raises(NagError, match="incomplete.*nag prepare"):
        read_meta(tmp_path / "half")


def test_datamodule_builds_a_missing_dataset_from_its_corpus(tmp_path):
    data = TokenShardDataModule(str(tmp_path / "auto"), corpus=TINY_CORPUS[:1], vocab_size=300, context_length=16)
    data.prepare_data()
    data.setup("fit")
    assert data.tokenizer_vocab_size == 300


def _blocks(loader, n):
    iterator = iter(loader)
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_position_resumes_exactly(tiny_data, num_workers):
    def make():
        data = TokenShardDataModule(str(tiny_data), context_length=32, batch_size=4, num_workers=num_workers, seed=7)
        data.setup("fit")
        return data

    reference = _blocks(make().train_dataloader(), 6)
    first = make()
    loader = first.train_dataloader()
    iterator = iter(loader)
    seen = [next(iterator) for _ in range(3)]
    state = first.state_dict()
    del iterator
    resumed = make()
    resumed.load_state_dict(state)
    rest = _blocks(resumed.train_dataloader(), 3)
    for a, b in zip(reference, seen + rest):
        assert torch.equal(a, b)


def test_shuffle_depends_on_seed(tiny_data):
    def first_batch(seed):
        data = TokenShardDataModule(str(tiny_data), context_length=32, batch_size=4, seed=seed)
        data.setup("fit")
        return _blocks(data.train_dataloader(), 1)[0]

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))


def test_one_large_file_is_a_corpus_and_odd_files_are_reported(tmp_path, capsys):
    """One book: validation is held out from its end, at a line boundary. A UTF-16 file (with its
    byte-order mark) is decoded; a binary file is skipped and reported with the reason."""
    import json

    from conftest import STDLIB
    from nag_lightning.commands.main import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    book = (STDLIB / "argparse.py").read_text() * 3
    (corpus / "book.txt").write_text(book)
    main(["prepare", "--output", str(tmp_path / "one"), "--corpus", str(corpus / "book.txt"), "--vocab_size", "300"])
    meta = json.loads((tmp_path / "one" / "meta.json").read_text())
    train_bytes, val_bytes = meta["splits"]["train"]["bytes"], meta["splits"]["val"]["bytes"]
    assert train_bytes + val_bytes == len(book.encode())
    assert val_bytes == pytest.approx(0.05 * len(book.encode()), rel=0.05)
    assert book[len(book) - val_bytes - 1] == "\n"  # the held-out part starts a line (the book is ASCII)

    (corpus / "letter.txt").write_bytes("Grüße aus Köln\n".encode("utf-16"))
    (corpus / "image.bin").write_bytes(b"\x89PNG\x00\x01\x02")
    capsys.readouterr()
    main(["prepare", "--output", str(tmp_path / "three"), "--corpus", str(corpus), "--vocab_size", "300"])
    out = capsys.readouterr().out
    assert "Skipped 1 of 3 file(s): image.bin (binary: it has NUL bytes and no UTF-16 byte-order mark)" in out
    meta = json.loads((tmp_path / "three" / "meta.json").read_text())
    assert meta["corpus"]["documents"] == 2
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == len(book.encode()) + len(
        "Grüße aus Köln\n".encode())


def test_a_corpus_in_another_encoding_is_refused_with_the_fix_and_read_with_encoding(tmp_path, capsys):
    """31 Latin-1 files: not prepared silently with replacement characters, but refused, naming
    --encoding; with it they decode. A stray undecodable byte in a large corpus is reported and kept."""
    from nag_lightning.commands.main import main

    corpus = tmp_path / "latin1"
    corpus.mkdir()
    for i in range(31):
        (corpus / f"brief{i:02d}.txt").write_bytes(f"Grüße aus Köln, Brief {i}: Straße, Bäcker, Öl.\n".encode("latin-1") * 20)
    with pytest.raises(NagError, match=r"31 of 31 file\(s\) are not valid utf-8: .* --encoding latin-1"):
        prepare(tmp_path / "refused", PrepareSettings([str(corpus)], vocab_size=300))
    assert not (tmp_path / "refused").exists()
    main(["prepare", "--output", str(tmp_path / "ok"), "--corpus", str(corpus), "--vocab_size", "300",
          "--encoding", "latin-1"])
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tmp_path / "ok" / "tokenizer.json"))
    assert tokenizer.decode(tokenizer.encode("Grüße aus Köln").ids) == "Grüße aus Köln"

    mostly = tmp_path / "mostly"
    mostly.mkdir()
    (mostly / "a.txt").write_text("plain text line\n" * 5000)
    (mostly / "b.txt").write_bytes(b"one stray byte \xe9 here\n")
    capsys.readouterr()
    prepare(tmp_path / "kept", PrepareSettings([str(mostly)], vocab_size=300))
    assert "Warning: 1 of 2 file(s) are not valid utf-8: 1 byte(s) replaced" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["prepare", "--output", str(tmp_path / "x"), "--corpus", str(mostly), "--encoding", "no-such-codec"])
    assert "no such encoding" in capsys.readouterr().err
