"""``TokenShardDataModule``: streams fixed-length token blocks from a ``nag prepare`` folder with litdata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from litdata import StreamingDataLoader, StreamingDataset, TokensLoader, train_test_split

from nag_lightning.data import remote
from nag_lightning.data.preparation import META_FILE, PrepareSettings, prepare, read_meta
from nag_lightning.errors import NagError


class TokenShardDataModule(pl.LightningDataModule):
    """Blocks of ``context_length + 1`` tokens (inputs and shifted targets) from litdata shards.

    Args:
        data_dir: folder written by ``nag prepare``, or ``s3://bucket/prefix`` it wrote to (streamed
            into ``cache_dir``; endpoint and credentials from the standard AWS settings, ``data/remote.py``).
        context_length: tokens per training example (the model sees ``context_length``, predicts as many).
        batch_size: blocks per micro-batch and per rank.
        global_batch_size: blocks per optimizer step over all ranks. The Trainer's
            ``accumulate_grad_batches`` must then be ``accumulation(ranks)`` =
            ``global_batch_size / (ranks * batch_size)`` (which must divide): ``nag fit`` sets it
            when it builds the Trainer; from Python, pass it to the Trainer. ``setup`` checks it.
        num_workers: loader worker processes per rank.
        seed: shuffling seed of the training stream (validation is read in order).
        test_fraction: the last ``test_fraction`` of the validation split's blocks form a test split
            held out from validation (``nag test``, and the test metrics a fit reports), which
            then reads only the rest: rates chosen on validation are reported on blocks they never
            saw. The split's documents are shuffled before tokenizing, so its end is a random set
            of documents (one may straddle the cut). 0 (the default): test reads the validation split.
        corpus: if set and ``data_dir`` does not hold a dataset yet, ``prepare_data`` builds it from
            these sources (files, folders, globs, record files, or ``stdlib``) with
            ``vocab_size``/``val_fraction``/``text_field``, as ``nag prepare`` does.
        cache_dir: for a remote ``data_dir``, the local folder of its metadata and streamed chunks
            (default: ``$NAG_CACHE`` or ``~/.cache/nag_lightning``, a folder per dataset).
        max_cache_size: for a remote ``data_dir``, the most chunk data kept per split before the
            oldest chunks are evicted (litdata's ``max_cache_size``).
    """

    def __init__(
        self,
        data_dir: str = "data/stdlib-bpe8192",
        context_length: int = 256,
        batch_size: int = 8,
        global_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        test_fraction: float = 0.0,
        corpus: list[str] | None = None,
        vocab_size: int = 8192,
        val_fraction: float = 0.05,
        text_field: str = "text",
        cache_dir: str | None = None,
        max_cache_size: str = "50GB",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.remote = remote.is_remote(data_dir)
        self.data_dir = str(data_dir).rstrip("/") if self.remote else Path(data_dir)
        # Where meta.json and tokenizer.json are read: the folder itself, or a remote dataset's cache.
        self.cache = remote.cache_folder(self.data_dir, cache_dir) if self.remote else None
        self.local_dir = self.cache / "meta" if self.remote else self.data_dir
        self.max_cache_size = max_cache_size
        self.context_length = context_length
        self.batch_size = batch_size
        self.global_batch_size = global_batch_size
        self.num_workers = num_workers
        self.seed = seed
        if not 0.0 <= test_fraction < 1.0:
            raise NagError(f"data.test_fraction must be in [0, 1), got {test_fraction}: the share of the validation "
                           "split's blocks held out as the test split (0: none).")
        self.test_fraction = test_fraction
        self.corpus = [corpus] if isinstance(corpus, str) else corpus
        self.vocab_size = vocab_size
        self.val_fraction = val_fraction
        self.text_field = text_field
        self.meta: dict[str, Any] | None = None
        self._train_loader: StreamingDataLoader | None = None
        self._pending_train_state: dict | None = None

    def prepare_data(self) -> None:
        missing = remote.read_remote_meta(self.data_dir) is None if self.remote else \
            not (self.data_dir / META_FILE).is_file()
        if self.corpus and missing:
            prepare(self.data_dir, PrepareSettings(self.corpus, self.vocab_size, self.val_fraction,
                                                   text_field=self.text_field))

    def setup(self, stage: str | None = None) -> None:
        self.meta = self._read_meta()
        if self.global_batch_size and self.trainer is not None and stage in ("fit", None):
            needed = self.accumulation(self.trainer.world_size, self.trainer.accumulate_grad_batches)
            if self.trainer.accumulate_grad_batches != needed:
                raise NagError(
                    f"data.global_batch_size={self.global_batch_size} needs {needed} accumulated micro-batches on "
                    f"{self.trainer.world_size} rank(s), but the Trainer accumulates "
                    f"{self.trainer.accumulate_grad_batches}: build it with Trainer(accumulate_grad_batches="
                    f"datamodule.accumulation({self.trainer.world_size})) (`nag fit` does this itself).")

    def accumulation(self, ranks: int, configured: int = 1) -> int:
        """Micro-batches accumulated per optimizer step so that ``global_batch_size`` blocks are seen."""
        per_step = ranks * self.batch_size
        if self.global_batch_size % per_step:
            raise NagError(
                f"data.global_batch_size={self.global_batch_size} is not divisible by ranks x micro-batch = "
                f"{ranks} x {self.batch_size} = {per_step}. Choose a global batch that is a multiple of {per_step}, "
                "or change data.batch_size / trainer.devices / trainer.num_nodes."
            )
        accumulate = self.global_batch_size // per_step
        if configured not in (1, accumulate):
            raise NagError(
                f"trainer.accumulate_grad_batches={configured} contradicts data.global_batch_size="
                f"{self.global_batch_size} ({ranks} rank(s) x {self.batch_size} x {accumulate}); set only one of them."
            )
        return accumulate

    # Facts the LightningModule checks against the model and uses for bits-per-byte.
    @property
    def tokenizer_vocab_size(self) -> int:
        return self._meta["vocab_size"]

    @property
    def val_bytes_per_token(self) -> float:
        return self._meta["splits"]["val"]["bytes_per_token"]

    @property
    def tokenizer_path(self) -> Path:
        return self.local_dir / self._meta["tokenizer"]

    @property
    def _meta(self) -> dict[str, Any]:
        if self.meta is None:
            self.meta = self._read_meta()
        return self.meta

    def _read_meta(self) -> dict[str, Any]:
        if not self.remote:
            return read_meta(self.data_dir)
        # The shards stay in the bucket: litdata checks what it downloads.
        return read_meta(remote.fetch_small_files(self.data_dir, self.local_dir), check_shards=False)

    def _dataset(self, split: str, shuffle: bool) -> StreamingDataset:
        if self.remote:
            remote.let_litdata_use_plain_http()
            where = {"input_dir": remote.join(self.data_dir, split), "cache_dir": str(self.cache / split),
                     "max_cache_size": self.max_cache_size}
        else:
            where = {"input_dir": str(self.data_dir / split)}
        return StreamingDataset(
            **where,
            item_loader=TokensLoader(block_size=self.context_length + 1),
            shuffle=shuffle,
            seed=self.seed,
            drop_last=True,
        )

    def train_dataloader(self) -> StreamingDataLoader:
        self._train_loader = StreamingDataLoader(
            self._dataset("train", shuffle=True), batch_size=self.batch_size,
            num_workers=self.num_workers, drop_last=True, **self._worker_setup(),
        )
        if self._pending_train_state is not None:
            self._train_loader.load_state_dict(self._pending_train_state)
            self._pending_train_state = None
        return self._train_loader

    def _held_out(self, part: str) -> StreamingDataset:
        """The validation split's blocks for validation (``part="val"``) or for test: with a
        ``test_fraction``, its first and last blocks (litdata's ``train_test_split`` in order)."""
        dataset = self._dataset("val", shuffle=False)
        if not self.test_fraction:
            return dataset
        validation, test = train_test_split(dataset, [1.0 - self.test_fraction, self.test_fraction], shuffle=False)
        return validation if part == "val" else test

    def _evaluation_loader(self, part: str) -> StreamingDataLoader:
        # Lightning keeps the validation iterator, and so its worker processes, alive until the
        # next validation. A worker forked from the training process shares its pages copy-on-write
        # and ends up holding a second copy of them while training goes on (measured: a worker of
        # 851 MB resident, 652 MB of it its own, beside a 1.1 GB trainer). Workers started from a
        # fork server hold only what they load.
        workers = self.num_workers
        return StreamingDataLoader(
            self._held_out(part), batch_size=self.batch_size, num_workers=workers,
            multiprocessing_context="forkserver" if workers > 0 else None, **self._worker_setup(),
        )

    def _worker_setup(self) -> dict[str, Any]:
        """Loader workers streaming from a bucket set litdata's downloader up as the main process does."""
        return {"worker_init_fn": remote.let_litdata_use_plain_http} if self.remote and self.num_workers > 0 else {}

    def val_dataloader(self) -> StreamingDataLoader:
        return self._evaluation_loader("val")

    def test_dataloader(self) -> StreamingDataLoader:
        return self._evaluation_loader("test")

    def predict_dataloader(self) -> StreamingDataLoader:
        return self._evaluation_loader("val")

    # The training stream's position travels in the checkpoint so a resumed run continues it.
    def state_dict(self) -> dict[str, Any]:
        if self._train_loader is None:
            return {}
        return {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_train_state = state_dict.get("train_loader")

