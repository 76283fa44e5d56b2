"""What a dataset folder is, shared by the orchestrator (``preparation.py``) and the workers that
tokenize records (``record_corpus.py``): its file names, format version, end-of-text token,
piece size, and the rule that puts a document in the validation split."""

from __future__ import annotations

import hashlib

META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 2  # 2: documents shuffled before tokenizing, 4 MB chunks
SHUFFLE_SEED = 0
EOT_TOKEN = "<|endoftext|>"
# Tokens per litdata input piece; each piece is one item streamed by TokensLoader.
PIECE_TOKENS = 1 << 20


def is_validation_document(name: str, val_fraction: float) -> bool:
    """Deterministic per-document split by a hash of the document's file name."""
    bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return bucket / 2**64 < val_fraction
