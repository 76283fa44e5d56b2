"""``nag prepare``: corpus -> byte-level BPE tokenizer -> litdata token shards + meta.json.

The options; the work is ``nag_lightning.data.preparation``'s."""

from __future__ import annotations

from nag_lightning.commands.typed import TypedCommand
from nag_lightning.data.preparation import PrepareSettings, prepare
from nag_lightning.errors import NagError


def prepare_dataset(output: str, corpus: list[str] = ["stdlib"], text_field: str = "text",  # noqa: B006
                    encoding: str = "utf-8", vocab_size: int = 8192, val_fraction: float = 0.05,
                    tokenizer: str | None = None, overwrite: bool = False) -> None:
    """Tokenize a corpus with a byte-level BPE and write litdata token shards for training.

    Args:
        output: dataset folder to write (renamed into place when complete), or s3://BUCKET/PREFIX.
        corpus: text files, folders, globs, or 'stdlib' (the Python standard library; default);
            .jsonl, .jsonl.gz and .parquet files and Hugging Face datasets saved with save_to_disk
            give one document per record.
        text_field: the field of a record that holds its text (JSONL, Parquet, saved datasets).
        encoding: the text files' encoding (e.g. latin-1); bytes that do not decode are replaced,
            and above 0.1% of the corpus preparing stops.
        vocab_size: BPE vocabulary size.
        val_fraction: fraction of documents held out for validation.
        tokenizer: reuse this tokenizer.json instead of training one.
        overwrite: replace an existing dataset built from other inputs.
    """
    import codecs

    try:
        codecs.lookup(encoding)
    except LookupError:
        raise NagError(f"nag prepare --encoding {encoding!r}: no such encoding (e.g. utf-8, latin-1, cp1252).") from None
    prepare(output, PrepareSettings(corpus, vocab_size, val_fraction, tokenizer, text_field, encoding),
            overwrite=overwrite)


COMMAND = TypedCommand(prepare_dataset)
add_arguments, normalise = COMMAND.add_to, COMMAND.normalise


def run(args) -> None:
    COMMAND(args)
